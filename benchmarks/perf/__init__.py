"""Speed and memory benchmarks: ``python -m benchmarks.perf.<name>``; results in benchmarks/perf/results/."""
