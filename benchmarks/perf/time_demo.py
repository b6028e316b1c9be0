"""How long the README's main job takes: ``python -m loraplus demo`` timed from outside, wall clock.

The demo runs in a fresh temporary directory (so its PNG and JSON land there, not in the
checkout) in a child process, exactly as the README prints it after the install; the install
itself (pip, network) is not timed. Recorded: the wall-clock seconds of the whole command
(interpreter start and imports included), the demo's own ``seconds`` from the JSON it wrote, and
the machine with its load averages at the start and at the end (``provenance()``): on a shared
machine the time says as much about the other jobs as about the demo.

Usage::

    python -m benchmarks.perf.time_demo --json benchmarks/perf/results/demo_timing.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common.provenance import ROOT, provenance

RESULTS = Path(__file__).resolve().parent / "results"
DEMO = [sys.executable, "-m", "loraplus", "demo"]  # as the README prints it


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", type=Path, default=RESULTS / "demo_timing.json")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    import torch

    torch.set_num_threads(1)  # the demo's own default (--threads 1), so the record names the threads it runs with
    made_by = provenance(argv, module="benchmarks.perf.time_demo")  # at the start: the code that runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        subprocess.run(DEMO, cwd=tmp, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wall = time.perf_counter() - t0
        demo = json.loads((Path(tmp) / "loraplus_demo.json").read_text())
    out = {**made_by, "timed": "python -m loraplus demo (after the install; the install is not timed)",
           "wall_seconds": wall, "demo_seconds": demo["seconds"],
           "loadavg_at_end": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=1) + "\n")
    print(f"python -m loraplus demo: {wall:.1f} s wall clock (the demo's own count: {demo['seconds']:.1f} s); "
          f"wrote {args.json}")


if __name__ == "__main__":
    main()
