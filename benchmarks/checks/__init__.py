"""Checks of the data and of invariants at scale: ``python -m benchmarks.checks.<name>``; results in benchmarks/checks/results/."""
