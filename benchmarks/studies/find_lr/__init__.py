"""Study find_lr: see README.md in this folder."""
