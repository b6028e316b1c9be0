"""Study v2: see README.md in this folder."""
