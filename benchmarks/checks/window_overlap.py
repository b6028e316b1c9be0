"""How many held-out windows of the MiniLM tasks have an identical copy in the training stream.

The validation and test windows of ``common/minilm.py`` (study 1: the convergence and adapter sweeps)
and of ``studies/head_to_head/run.py`` are disjoint from the training stream *by index*: no window index is
in two sets. The corpus, though, holds repeated text (the same docstring sentence in several
functions), so two different indices can carry the same 8 tokens. This command counts, for each
held-out set, the windows whose token sequence also occurs in the training pool (every window the
stream can draw) and in the windows a 60-step run actually trains on (batch 16, seeds 0–9), and
how often a run's own stream repeats a window it already trained on::

    python -m benchmarks.checks.window_overlap      # writes benchmarks/checks/results/window_overlap.json (about a minute)

It reads the task generator of ``common/minilm.py`` without changing it.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from benchmarks.common import minilm as H
from benchmarks.common.provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results"

STEPS = 60
SEEDS = range(10)
N_VAL = 256  # head_to_head.N_VAL (not imported: head_to_head pulls in the optimizer libraries)


def _keys(ids: torch.Tensor, idx: torch.Tensor) -> list[tuple[int, ...]]:
    return [tuple(row) for row in ids[idx].tolist()]


def _share(held: list[tuple[int, ...]], pool: set[tuple[int, ...]]) -> dict[str, float | int]:
    n = sum(k in pool for k in held)
    return {"windows": len(held), "with_a_copy": n, "fraction": n / len(held)}


def _seen(stream: torch.Tensor, seed: int) -> torch.Tensor:
    """The windows a run of ``STEPS`` steps trains on: the harnesses' own batch order."""
    gen = torch.Generator().manual_seed(seed)
    order = stream[torch.randperm(len(stream), generator=gen)]
    return torch.cat([order[(s * H.BATCH) % max(1, len(order) - H.BATCH):][: H.BATCH] for s in range(STEPS)])


def measure(task: str) -> dict[str, object]:
    ids, _ = H.windows()
    train_idx, test_idx = H.split(task)
    test = _keys(ids, test_idx)
    out: dict[str, object] = {"task_windows": len(train_idx) + len(test_idx)}  # the source task is balanced
    # study 1 (minilm_convergence.py, adapters.py): held-out = the test windows, stream = the rest
    # studies/head_to_head/run.py: validation = the first N_VAL training windows, stream = the rest
    for study, stream, held in (("study1", train_idx, {"held_out": test}),
                                ("head_to_head", train_idx[N_VAL:],
                                 {"validation": _keys(ids, train_idx[:N_VAL]), "test": test})):
        pool = set(_keys(ids, stream))
        part: dict[str, object] = {"stream_windows": len(stream)}
        for name, keys in held.items():
            runs = [_share(keys, set(_keys(ids, _seen(stream, s)))) for s in SEEDS]
            part[name] = {
                "in_training_pool": _share(keys, pool),
                "in_a_60_step_run": {"seeds": list(SEEDS), "with_a_copy": [r["with_a_copy"] for r in runs],
                                     "fraction_mean": sum(r["fraction"] for r in runs) / len(runs)},
            }
        repeats = []
        for s in SEEDS:
            seen = _keys(ids, _seen(stream, s))
            repeats.append(len(seen) - len(set(seen)))
        part["stream_repeats_in_a_60_step_run"] = {"seeds": list(SEEDS), "windows_seen": STEPS * H.BATCH,
                                                   "repeated_windows": repeats}
        out[study] = part
    if "validation" in out["head_to_head"]:  # type: ignore[operator]
        val = set(_keys(ids, train_idx[:N_VAL]))
        out["head_to_head"]["test_in_validation"] = _share(test, val)  # type: ignore[index]
    return out


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    return argparse.ArgumentParser(description=__doc__.splitlines()[0])


def main() -> None:
    parser().parse_args()
    ids, _ = H.windows()
    distinct = len(set(_keys(ids, torch.arange(len(ids)))))
    result = {
        **provenance(),
        "what": "held-out windows whose 8 tokens also occur as a training window (same token sequence, "
                "another index); 'in_training_pool': anywhere in the stream a run draws from; "
                "'in_a_60_step_run': among the 960 windows a 60-step run of batch 16 trains on, per seed",
        "windows": len(ids), "torch_fraction": float(H.windows()[1].float().mean()), "distinct_windows": distinct, "duplicate_fraction": 1 - distinct / len(ids),
        "tasks": {task: measure(task) for task in ("order", "source")},
    }
    path = RESULTS / "window_overlap.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(result["tasks"], indent=1))


if __name__ == "__main__":
    main()
