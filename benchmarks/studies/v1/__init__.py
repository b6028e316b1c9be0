"""Study v1: see README.md in this folder."""
