"""How the width part's cost grows with width, measured on the CPU: ``python -m benchmarks.gpu._sizing``.

Seconds per pretraining step and per fine-tuning step of the width family's model (``_width.probe``,
one thread, random weights) at each width, and the width part's least time per width
(``_width.estimate``) at the GPU settings were those per-step costs the device's. Written to
benchmarks/results/gpu_sizing_cpu.json; docs/gpu.md quotes it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import torch

from benchmarks.common.provenance import provenance

from . import BENCHMARKS, _width
from ._context import Context

DEFAULT_OUT = BENCHMARKS / "results" / "gpu_sizing_cpu.json"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--widths", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    ctx = Context(torch.device("cpu"), smoke=False, deadline=time.monotonic() + 3600)
    probes = {}
    for w in args.widths:
        c = _width.probe(ctx, w, steps=args.steps)
        probes[str(w)] = {**c, "least_seconds_at_gpu_settings": _width.estimate(c, _width.SETTINGS)}
        print(w, probes[str(w)], flush=True)
    given = list(sys.argv[1:] if argv is None else argv)
    out = {**provenance(given), "command": shlex.join(["python", "-m", "benchmarks.gpu._sizing", *given]),
           "threads": 1, "steps": args.steps, "settings": _width.SETTINGS, "probes": probes}
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    return out


if __name__ == "__main__":
    main()
