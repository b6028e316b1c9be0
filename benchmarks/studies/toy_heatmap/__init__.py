"""Study toy_heatmap: see README.md in this folder."""
