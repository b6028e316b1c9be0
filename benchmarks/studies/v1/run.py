"""LoRA vs LoRA+ on a real pretrained model: all-MiniLM-L6-v2, λ × learning rate × seed sweeps.

Usage (each part saves ``benchmarks/studies/v1/results/minilm_<part>.json`` and resumes if interrupted; the
file holds exactly the runs the part lists — delete it to rerun the part from scratch)::

    python -m benchmarks.studies.v1.run run main        # r=8 on query/value, hard task, PEFT init (B=0)
    python -m benchmarks.studies.v1.run run a0          # the same with the paper's init (A=0), λ ∈ {1,4,16,32}
    python -m benchmarks.studies.v1.run run all_linear  # r=8 on every linear layer, hard task
    python -m benchmarks.studies.v1.run run easy        # easy control task (source of a docstring)
    python -m benchmarks.studies.v1.run report          # tables (markdown) + docs/img/minilm_*.png

The harness (model, tasks, training loop) is ``benchmarks/common/minilm.py``; every optimizer is
built by ``loraplus.LoraPlus``.
"""

from __future__ import annotations

import argparse
import itertools
import sys
from pathlib import Path

from benchmarks.common import minilm as H
from benchmarks.common.provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results"

STEPS = 60
SEEDS = (0, 1, 2)
RATIOS = (1, 2, 4, 8, 16, 32)

PARTS = {
    "main": dict(task="order", targets=H.QV, inits=("B0",), ratios=RATIOS),
    "a0": dict(task="order", targets=H.QV, inits=("A0",), ratios=(1, 4, 16, 32),
               lrs={1: (1e-3, 3e-3, 1e-2), 4: (1e-3, 3e-3, 1e-2), 16: (3e-4, 1e-3, 3e-3, 1e-2), 32: (3e-4, 1e-3, 3e-3)}),
    "all_linear": dict(task="order", targets=H.ALL_LINEAR, inits=("B0",), ratios=(1, 16),
                       lrs={1: (1e-3, 3e-3, 1e-2), 16: (3e-4, 1e-3, 3e-3, 1e-2)}),
    "easy": dict(task="source", targets=H.QV, inits=("B0",), ratios=(1, 16),
                 lrs={1: (3e-3, 1e-2, 3e-2), 16: (3e-4, 1e-3, 3e-3, 1e-2)}),
}


#: Learning rates of A tried for each λ. Cells whose B rate λ·lr is far above the best B rate of
#: smaller λ are left out (λ=2…8 all diverge or stall from λ·lr ≈ 0.04 up): 2–4 rates per λ.
LR_GRID = {
    1: (1e-3, 3e-3, 1e-2, 3e-2),
    2: (1e-3, 3e-3, 1e-2, 3e-2),
    4: (1e-3, 3e-3, 1e-2),
    8: (1e-3, 3e-3, 1e-2),
    16: (3e-4, 1e-3, 3e-3),
    32: (3e-4, 1e-3, 3e-3),
}


def lr_grid(ratio: float) -> tuple[float, ...]:
    return LR_GRID[int(ratio)]


def _lrs(part: dict, ratio: float) -> tuple[float, ...]:
    lrs = part.get("lrs")
    if lrs is None:
        return lr_grid(ratio)
    return lrs[ratio] if isinstance(lrs, dict) else lrs


def configs(part: str) -> list[H.RunConfig]:
    p = PARTS[part]
    return [
        H.RunConfig(task=p["task"], family="lora", init=init, targets=tuple(p["targets"]), ratio=float(lam), lr=lr,
                    seed=seed, steps=STEPS)
        for init in p["inits"]
        for lam in p["ratios"]
        for lr, seed in itertools.product(_lrs(p, lam), SEEDS)
    ]


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run").add_argument("parts", nargs="+", choices=list(PARTS))
    sub.add_parser("report")
    return ap


def main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    if a.cmd == "run":
        for part in a.parts:
            p = PARTS[part]
            H.sweep(configs(part), RESULTS / f"minilm_{part}.json", meta={"part": part, "steps": STEPS,
                    "lr_grid": {str(lam): _lrs(p, lam) for lam in p["ratios"]}, "seeds": SEEDS,
                    "command": f"python -m benchmarks.studies.v1.run run {part}",
                    "provenance": provenance(["run", part], module="benchmarks.studies.v1.run")})
    else:
        from benchmarks.common import report as _report

        _report.minilm_report(RESULTS)


if __name__ == "__main__":
    main(sys.argv[1:])
