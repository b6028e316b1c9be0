"""Study adapters: see README.md in this folder."""
