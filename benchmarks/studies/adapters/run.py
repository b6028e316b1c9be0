"""Does LoRA+ transfer to other adapters? PEFT DoRA, AdaLoRA, LoHa, LoKr and VeRA on MiniLM.

Same harness and task as ``minilm_convergence.py`` (all-MiniLM-L6-v2, query/value, the hard
``order`` task), every optimizer built by ``loraplus.LoraPlus`` with the roles loraplus gives
each family's parameters (see docs/adapters.md). For each family: λ = 1 against λ ∈ {4, 16},
each at the best of its learning-rate grid (3–5 rates ×3 apart, extended upwards wherever the
best rate sat at the top of the grid), 3 seeds, 40 steps. The JSON holds exactly the runs
``configs()`` lists (delete it to rerun everything from scratch: about 40 minutes on 2 cores). For DoRA also the magnitude
vector at lr vs λ·lr, and with weight decay on it (λ=4, lr=3e-3).

Usage::

    python -m benchmarks.studies.adapters.run run core  # λ = 1 and 4 (+ DoRA magnitude): benchmarks/studies/adapters/results/adapters.json
    python -m benchmarks.studies.adapters.run run       # everything, λ = 16 included (resumes where core stopped)
    python -m benchmarks.studies.adapters.run report    # markdown table + docs/img/adapters.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from benchmarks.common import minilm as H
from benchmarks.common.provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results"

STEPS = 40
SEEDS = (0, 1, 2)
RATIOS = (1, 4, 16)
FAMILIES = ("dora", "adalora", "loha", "lokr", "vera")
#: Learning rates of A (and every non-B role) by ratio: larger ratios get smaller base rates,
#: so each ratio is tried around where LoRA's best lr(A) lies for it (a diagonal band of the
#: (lr_A, lr_B) plane rather than a full grid, to fit the budget).
LR_BY_RATIO = {1: (3e-3, 1e-2), 4: (1e-3, 3e-3), 16: (3e-4, 1e-3)}
#: Per-family scale of those rates (VeRA trains only scaling vectors and needs larger rates).
FAMILY_LR_SCALE = {"dora": 1.0, "adalora": 1.0, "loha": 1.0, "lokr": 1.0, "vera": 10.0}
EXTRA_LR = {1: 3e-2, 4: 1e-2}
EXTRA_ROUND_2 = [
    *((fam, lam, lrs) for fam in ("adalora", "loha", "lokr") for lam, lrs in ((1, (1e-1,)), (4, (3e-2,)), (16, (3e-3, 1e-2)))),
    ("vera", 16, (3e-2,)),
    ("dora", 16, (3e-3,)),
    ("dora", 4, (1e-2,)),
    ("lokr", 4, (1e-1,)),
    ("dora", 1, (3e-2,)),  # earlier held one seed only, outside any command
]
#: Third round: best rates still at the edge of their grid (picked on the training stream, see
#: common/report.py) get the next rate, so every comparison is best-vs-best.
EXTRA_ROUND_3 = [
    ("dora", 16, (1e-2,)),
    *((fam, 16, (3e-2,)) for fam in ("adalora", "loha", "lokr")),
    ("adalora", 4, (1e-1,)),
]
DORA_MAGNITUDE_RATIO = 4
DORA_LR = 3e-3
DORA_WEIGHT_DECAY = 0.1  # on the magnitude only (every other group is exempt in those runs)


def configs() -> list[H.RunConfig]:
    """In priority order (the sweep is cut short when the budget runs out): λ=1 and 4 for every
    family, then DoRA's magnitude variants, then λ=16."""

    def runs(fam: str, lam: int, lrs: tuple[float, ...] | None = None, **kw: object) -> list[H.RunConfig]:
        lrs = lrs or tuple(lr * FAMILY_LR_SCALE[fam] for lr in LR_BY_RATIO[lam])
        return [H.RunConfig(task="order", family=fam, init="B0", ratio=float(lam), lr=lr, seed=seed, steps=STEPS, **kw)
                for lr in lrs for seed in SEEDS]

    out = [c for lam in (1, 4) for fam in FAMILIES for c in runs(fam, lam)]
    lam = DORA_MAGNITUDE_RATIO
    out += runs("dora", lam, (DORA_LR,), magnitude="B")
    out += runs("dora", lam, (DORA_LR,), magnitude="A", magnitude_decay=True, weight_decay=DORA_WEIGHT_DECAY)
    # AdaLoRA, LoHa, LoKr and VeRA were best at the top of both grids: one rate higher for each
    for fam in FAMILIES[1:]:
        for lam in (1, 4):
            out += runs(fam, lam, (EXTRA_LR[lam] * FAMILY_LR_SCALE[fam],))
    out += [c for fam in FAMILIES for c in runs(fam, 16)]
    # second round: every best rate that still sat at the top of its grid gets the next one up
    for fam, lam, lrs in (*EXTRA_ROUND_2, *EXTRA_ROUND_3):
        out += runs(fam, lam, lrs)
    return out


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sub.add_parser("run").add_argument("part", nargs="?", choices=["core"], help="core: everything but the λ=16 runs")
    sub.add_parser("report")
    return ap


def main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    if a.cmd == "run":
        todo = configs()
        if a.part == "core":  # everything but the λ=16 runs
            todo = [c for c in todo if c.ratio != 16]
        H.sweep(todo, RESULTS / "adapters.json", meta={"steps": STEPS, "seeds": SEEDS,
                "lr_by_ratio": {str(k): v for k, v in LR_BY_RATIO.items()}, "family_lr_scale": FAMILY_LR_SCALE,
                "command": "python -m benchmarks.studies.adapters.run " + " ".join(argv),
                "provenance": provenance(argv, module="benchmarks.studies.adapters.run"),
                "lr_grid": sorted({f"{c.family} λ={c.ratio:g}: {c.lr:g}" for c in todo})})
    else:
        from benchmarks.common import report as _report

        _report.adapters_report(RESULTS)


if __name__ == "__main__":
    main(sys.argv[1:])
