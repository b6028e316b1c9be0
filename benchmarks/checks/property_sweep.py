"""Fresh-randomness sweep: build N generated LoRA models and check every parameter's group.

CI runs the same properties derandomized on 60 examples (tests/test_core.py); this command
draws N models (default 10,000) with a fresh random seed and counts, over every trainable
parameter of every model, the ones lost (in no group), duplicated (in two), given the wrong
role, the wrong learning rate or the wrong weight decay. Ground truth is the generator's
(``GeneratedModel.expected`` / ``.no_decay``, decided by how it built each model) and the
documented rate rule (``loraplus.testing.expected_lr``); the labeller is never asked.

    python -m benchmarks.checks.property_sweep --models 10000

writes benchmarks/checks/results/property_sweep.json (its ``command``, seed and counts).
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
import warnings
from collections import Counter
from pathlib import Path

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import seed as hseed
from hypothesis import strategies as st

import loraplus
from benchmarks.common.provenance import provenance
from loraplus.testing import expected_lr, lora_models

# how a caller may spell the rates: (kwargs to LoraPlus, ratio, role_lr)
SPELLINGS = [
    ({}, 4.0, None),
    ({"ratio": 4.0}, 4.0, None),
    ({"ratio": 16}, 16.0, None),
    ({"ratio": 1.0}, 1.0, None),
    ({"ratio": 3.5, "role_lr": {"A": 2e-3}}, 3.5, {"A": 2e-3}),
    ({"ratio": 2.0, "role_lr": {"B": 5e-2, "other": 1e-5}}, 2.0, {"B": 5e-2, "other": 1e-5}),
    ({"lr_embedding": 1e-4, "role_lr": {"magnitude": 7e-4}}, 4.0, {"magnitude": 7e-4}),
]
LR = 1e-3


def check(gen, spelling, wd) -> Counter:
    """Count what each trainable parameter got against what it must get."""
    kwargs, ratio, role_lr = spelling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = loraplus.LoraPlus(torch.optim.AdamW, gen.model, lr=LR, weight_decay=wd, rules=gen.rules, **kwargs)
    out: Counter = Counter(models=1)
    seen: Counter = Counter()
    named = {id(p): n for n, p in gen.model.named_parameters() if p.requires_grad}
    for group in opt.param_groups:
        if not group["params"]:
            out["empty_groups"] += 1
        for p in group["params"]:
            name = named.get(id(p))
            if name is None:
                out["foreign_or_frozen"] += 1
                continue
            seen[name] += 1
            role = gen.expected[name]
            out["parameters_checked"] += 1
            if group["role"] != role.value:
                out["wrong_role"] += 1
            rate = expected_lr(role, lr=LR, ratio=ratio, lr_embedding=kwargs.get("lr_embedding"), role_lr=role_lr)
            if not math.isclose(group["lr"], rate, rel_tol=1e-12):
                out["wrong_lr"] += 1
            want_wd = 0.0 if name in gen.no_decay else (0.01 if wd is None else wd)  # AdamW's default 0.01
            if group["weight_decay"] != want_wd:
                out["wrong_weight_decay"] += 1
    out["lost"] = sum(1 for n in gen.expected if seen[n] == 0)
    out["duplicated"] = sum(1 for n in gen.expected if seen[n] > 1)
    out["parameters"] = len(gen.expected)
    return out


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", type=int, default=10_000)
    ap.add_argument("--seed", type=int, default=None, help="default: a fresh random seed (recorded)")
    ap.add_argument("--out", default="benchmarks/checks/results/property_sweep.json")
    return ap


def main() -> None:
    args = parser().parse_args()
    seed = random.SystemRandom().randrange(2**32) if args.seed is None else args.seed
    totals: Counter = Counter()
    conventions: Counter = Counter()
    failures: list[str] = []

    @settings(
        max_examples=args.models,
        deadline=None,
        database=None,
        derandomize=False,
        suppress_health_check=list(HealthCheck),
    )
    @given(lora_models(), st.sampled_from(SPELLINGS), st.sampled_from([None, 0.0, 0.01]))
    def sweep(gen, spelling, wd):
        counts = check(gen, spelling, wd)
        totals.update(counts)
        conventions.update(set(gen.conventions))
        bad = {k: counts[k] for k in ("wrong_role", "wrong_lr", "wrong_weight_decay", "lost", "duplicated")}
        if any(bad.values()) and len(failures) < 20:
            failures.append(f"{gen!r} {spelling} wd={wd}: {bad}")

    start = time.perf_counter()
    hseed(seed)(sweep)()  # fresh randomness, reproducible from the recorded seed
    wall = time.perf_counter() - start
    result = {
        **provenance(module="benchmarks.checks.property_sweep"),
        "seed": seed,
        "reproduce": f"python -m benchmarks.checks.property_sweep --models {args.models} --seed {seed}",
        "models": totals["models"],
        "parameters_checked": totals["parameters_checked"],
        "lost": totals["lost"],
        "duplicated": totals["duplicated"],
        "wrong_role": totals["wrong_role"],
        "wrong_lr": totals["wrong_lr"],
        "wrong_weight_decay": totals["wrong_weight_decay"],
        "empty_groups": totals["empty_groups"],
        "foreign_or_frozen": totals["foreign_or_frozen"],
        "models_per_convention": dict(sorted(conventions.items())),
        "failures": failures,
        "wall_s": round(wall, 1),
        "torch": torch.__version__,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps({k: v for k, v in result.items() if k != "models_per_convention"}, indent=1))
    if failures:
        sys.exit(1)


if __name__ == "__main__":
    main()
