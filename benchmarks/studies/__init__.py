"""Scientific studies, one package each: its runner (``python -m benchmarks.studies.<study>.run``), its ``results/``, its README.md."""
