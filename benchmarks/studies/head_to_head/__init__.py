"""Study head_to_head: see README.md in this folder."""
