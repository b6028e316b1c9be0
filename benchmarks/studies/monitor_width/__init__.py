"""Study monitor_width: see README.md in this folder."""
