"""What the studies and benchmarks share: provenance, statistics, report rendering, the MiniLM and width-family task harnesses."""
