"""Everything measured about loraplus, by purpose; every script runs as a module from the checkout's root.

- :mod:`benchmarks.perf`: speed and memory benchmarks;
- :mod:`benchmarks.studies`: scientific studies, one package each with its runner and its ``results/``;
- :mod:`benchmarks.common`: what the studies share (provenance, statistics, report rendering, the MiniLM
  and width-family task harnesses);
- :mod:`benchmarks.checks`: checks of the data and of the library's invariants at scale;
- :mod:`benchmarks.gpu`: the GPU kit (``python -m benchmarks.gpu``).

See benchmarks/README.md; benchmarks/MOVED.toml maps each script's old path to its module.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["BENCHMARKS", "DOCS_IMG", "ROOT"]

#: this folder
BENCHMARKS = Path(__file__).resolve().parent
#: the checkout's root (commands run from here)
ROOT = BENCHMARKS.parent
#: the figures the docs show
DOCS_IMG = ROOT / "docs" / "img"
