"""Head-to-head of LoRA optimizers, each at its own tuned learning rate (all-MiniLM-L6-v2).

Usage (each slice saves ``benchmarks/studies/head_to_head/results/h2h/<slice>__<method>.json``, resumes if interrupted —
runs already in the file are skipped — and records the command that made it)::

    python -m benchmarks.studies.head_to_head.run run order_qv_B0 lora          # one (task, targets, init) slice, one method
    python -m benchmarks.studies.head_to_head.run run order_qv_B0 all           # every method of the slice, one after another
    python -m benchmarks.studies.head_to_head.run report                        # tables (markdown) + docs/img/h2h_<slice>.png
    python -m benchmarks.studies.head_to_head.run quick                         # smoke run of the harness (tests)

Slices: ``<task>_<targets>_<init>``: task ``order`` (the hard word-order task of
``common/minilm.py``) or ``source`` (a different classification on the same weights: does the window
come from a standard-library or a torch docstring), targets ``qv`` (query/value) or ``all``
(every linear layer), init ``B0`` (PEFT's)
or ``A0`` (the paper's). Methods, every one built through ``loraplus``:

* ``lora``: ``LoraPlus(AdamW, ratio=1)`` (plain LoRA); ``loraplus4``, ``loraplus16``: ratio 4, 16;
* ``riemannian``: ``precondition(LoraPlus(AdamW, ratio=1), model, method="riemannian")`` (δ = 10⁻²);
* ``riemannian_loraplus4``: the same on ratio 4;
* ``lorafa``: ``precondition(..., method="lorafa")`` on ratio 1 (A frozen, δ = 10⁻⁸);
* ``lorarite``: ``pytorch_optimizer.LoRARite(loraplus.pairing.pair_params(model))``, the head on its own AdamW;
* ``lorapro``: ``lora_pro.LoRAProAdamW(model)`` (it finds PEFT pairs itself; its inner AdamW takes
  the head, whose lr is set to the head's).

Protocol: AdamW(betas=(0.9, 0.99), eps=1e-8, weight_decay=0) (LoRA-RITE: its own update with the
same betas; LoRA-Pro: its SGD-on-the-equivalent-gradient port with the same betas), 10 % linear
warm-up then linear decay, batch 16, ``STEPS`` steps on a stream of fresh training windows; the
head always at ``HEAD_LR`` so only the adapter's rate is swept. Three window sets, disjoint by index
(about 30 % of the validation and test windows have an identical copy in the training stream:
``benchmarks/checks/window_overlap.py``): the
training stream, a validation set of ``N_VAL`` windows (picks each method's lr: lowest seed-mean
validation loss) and the test set of ``common/minilm.py`` (256 windows, reported). Seeds are paired
across methods: seed s gives every method the same adapter and head init and the same batches.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shlex
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

import torch
from torch import nn

import loraplus
from benchmarks import DOCS_IMG
from benchmarks.common import minilm as H
from benchmarks.common.provenance import provenance

STEPS = 60
SEEDS = (0, 1, 2, 3, 4)
N_VAL = 256
RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "h2h"
TIMING = RESULTS / "h2h_timing.json"
METHODS = ("lora", "loraplus4", "loraplus16", "riemannian", "riemannian_loraplus4", "lorafa", "lorarite", "lorapro")
LABELS = {
    "lora": "LoRA (λ=1)", "loraplus4": "LoRA+ λ=4", "loraplus16": "LoRA+ λ=16", "riemannian": "Riemannian",
    "riemannian_loraplus4": "Riemannian + LoRA+ λ=4", "lorafa": "LoRA-FA", "lorarite": "LoRA-RITE",
    "lorapro": "LoRA-Pro",
}

#: Learning-rate grids (of A; B gets ratio × lr) per slice and method, half-decade steps. A best
#: rate at either end of its grid is extended here and the slice rerun (finished runs are kept).
GRIDS: dict[str, dict[str, tuple[float, ...]]] = {
    "order_qv_B0": {
        "lora": (3e-3, 1e-2, 3e-2),
        "loraplus4": (1e-3, 3e-3, 1e-2),
        "loraplus16": (3e-4, 1e-3, 3e-3, 1e-2),  # extended: with 10 seeds the best moved to 3e-3, the edge
        "riemannian": (3e-3, 1e-2, 3e-2),
        "riemannian_loraplus4": (1e-3, 3e-3, 1e-2),
        "lorafa": (3e-3, 1e-2, 3e-2, 1e-1, 3e-1),  # extended: best at 3e-2, the first grid's edge
        "lorarite": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),  # extended: best at 3e-3, the first grid's edge
        "lorapro": (3e-4, 1e-3, 3e-3, 1e-2, 3e-2),  # extended: best at 3e-3, the first grid's edge
    },
    # The paper's init (A = 0): LoRA-FA is not run, its frozen A = 0 gives B a zero gradient forever.
    "order_qv_A0": {
        "lora": (1e-3, 3e-3, 1e-2),
        "loraplus4": (1e-3, 3e-3, 1e-2),
        "loraplus16": (3e-4, 1e-3, 3e-3, 1e-2),  # extended: best at 1e-3, the first grid's edge
        "riemannian": (1e-3, 3e-3, 1e-2),
        "riemannian_loraplus4": (1e-3, 3e-3, 1e-2),
        "lorarite": (3e-4, 1e-3, 3e-3, 1e-2),  # extended: best at 3e-3, the first grid's edge
        "lorapro": (3e-4, 1e-3, 3e-3),
    },
    # A second task on the same weights: which source (stdlib or torch docstring) a window comes from
    "source_qv_B0": {
        "lora": (1e-3, 3e-3, 1e-2, 3e-2),  # extended: best at 3e-3, the first grid's edge
        "loraplus4": (1e-3, 3e-3, 1e-2),
        "loraplus16": (3e-4, 1e-3, 3e-3, 1e-2),  # extended: best at 3e-3, the first grid's edge
        "riemannian": (1e-3, 3e-3, 1e-2, 3e-2),  # extended: best at 3e-3, the first grid's edge
        "riemannian_loraplus4": (1e-3, 3e-3, 1e-2),
        "lorafa": (1e-2, 3e-2, 1e-1),
        "lorarite": (3e-4, 1e-3, 3e-3, 1e-2),  # extended: its good band reached the edge
        "lorapro": (3e-4, 1e-3, 3e-3, 1e-2),  # extended: its good band reached the edge
    },
    "order_all_B0": {
        "lora": (1e-3, 3e-3, 1e-2),
        "loraplus4": (3e-4, 1e-3, 3e-3, 1e-2),  # extended: best at 3e-3, the first grid's edge
        "loraplus16": (1e-4, 3e-4, 1e-3, 3e-3),  # extended: best at 1e-3, the first grid's edge
        "riemannian": (1e-3, 3e-3, 1e-2),
        "riemannian_loraplus4": (3e-4, 1e-3, 3e-3, 1e-2),  # extended: its good band reached the edge
        "lorafa": (3e-3, 1e-2, 3e-2),
        "lorarite": (3e-4, 1e-3, 3e-3),
        "lorapro": (1e-4, 3e-4, 1e-3),
    },
}


def parse_slice(name: str) -> tuple[str, tuple[str, ...], str]:
    task, targets, init = name.split("_")
    return task, {"qv": H.QV, "all": H.ALL_LINEAR}[targets], init


def build(method: str, model: nn.Module, lr: float) -> list[torch.optim.Optimizer]:
    """The optimizer(s) of ``method`` for ``model`` (adapter factors at ``lr``, the head at ``HEAD_LR``)."""
    common: dict[str, Any] = {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0}
    head = {loraplus.Role.OTHER: H.HEAD_LR}
    if method in ("lora", "loraplus4", "loraplus16"):
        ratio = {"lora": 1, "loraplus4": 4, "loraplus16": 16}[method]
        return [loraplus.LoraPlus(torch.optim.AdamW, model, ratio=ratio, lr=lr, role_lr=head, **common)]
    if method in ("riemannian", "riemannian_loraplus4", "lorafa"):
        ratio = 4 if method == "riemannian_loraplus4" else 1
        opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=ratio, lr=lr, role_lr=head, **common)
        loraplus.precondition(opt, model, method="lorafa" if method == "lorafa" else "riemannian")
        return [opt]
    if method == "lorarite":
        from pytorch_optimizer import LoRARite

        groups = loraplus.pairing.pair_params(model)
        paired = {id(p) for g in groups for p in g["params"]}
        rest = [p for p in model.parameters() if p.requires_grad and id(p) not in paired]
        for g in groups:
            g.pop("param_names")
        return [LoRARite(groups, lr=lr, betas=(0.9, 0.99)),
                torch.optim.AdamW(rest, lr=H.HEAD_LR, **common)]
    if method == "lorapro":
        from lora_pro import LoRAProAdamW

        opt = LoRAProAdamW(model, lr=lr, weight_decay=0.0, betas=(0.9, 0.99), eps=1e-8)
        for g in opt.param_groups[:-1]:  # its inner AdamW holds the head; the last group is the adapter
            g["lr"] = H.HEAD_LR
        return [opt]
    raise ValueError(f"unknown method {method!r}")


def _evaluate(model: nn.Module, task: str, idx: torch.Tensor, seed: int) -> tuple[float, float]:
    gen = torch.Generator().manual_seed(seed)
    loss_fn = nn.CrossEntropyLoss()
    total, correct = 0.0, 0
    with torch.no_grad():
        for lo in range(0, len(idx), 128):
            x, y = H.make_batch(task, idx[lo : lo + 128], gen)
            logits = model(x)
            total += float(loss_fn(logits, y)) * len(y)
            correct += int((logits.argmax(-1) == y).sum())
    return total / len(idx), correct / len(idx)


def _step(model: Any, opts: list[Any], loss_fn: Any, x: Any, y: Any) -> Any:
    """One training step shared by the runs and the timing: forward, backward, every optimizer."""
    loss = loss_fn(model(x), y)
    for o in opts:
        o.zero_grad(set_to_none=True)
    loss.backward()
    for o in opts:
        o.step()
    return loss


def train(cfg: dict[str, Any]) -> dict[str, Any]:
    """One run: ``cfg`` = slice, method, lr, seed, steps. Returns the config, curves and losses."""
    torch.set_num_threads(1)
    task, targets, init = parse_slice(cfg["slice"])
    t0 = time.perf_counter()
    model = H.adapted_model("lora", init, targets, cfg["seed"])
    opts = build(cfg["method"], model, cfg["lr"])
    steps = cfg["steps"]
    warm = max(1, steps // 10)
    def lam(s):
        return min((s + 1) / warm, max(0.0, (steps - s) / max(1, steps - warm)))
    scheds = [torch.optim.lr_scheduler.LambdaLR(o, lam) for o in opts]
    train_idx, test_idx = H.split(task)
    val_idx, stream = train_idx[:N_VAL], train_idx[N_VAL:]
    if cfg.get("n_eval"):  # smoke runs only: evaluate on the first n_eval windows of each split
        val_idx, test_idx = val_idx[: cfg["n_eval"]], test_idx[: cfg["n_eval"]]
    gen = torch.Generator().manual_seed(cfg["seed"])
    order = stream[torch.randperm(len(stream), generator=gen)]
    loss_fn = nn.CrossEntropyLoss()
    curve: list[float] = []
    model.train()
    t_train = time.perf_counter()
    for step in range(steps):
        lo = (step * H.BATCH) % max(1, len(order) - H.BATCH)
        x, y = H.make_batch(task, order[lo : lo + H.BATCH], gen)
        loss = _step(model, opts, loss_fn, x, y)
        for s in scheds:
            s.step()
        val = float(loss.detach())
        curve.append(val if math.isfinite(val) else float("inf"))
        if not math.isfinite(val):
            break
    train_seconds = time.perf_counter() - t_train
    model.eval()
    ok = len(curve) == steps and math.isfinite(curve[-1])
    val_loss, val_acc = _evaluate(model, task, val_idx, 98)
    test_loss, test_acc = _evaluate(model, task, test_idx, 99)
    if not ok or not math.isfinite(val_loss):
        val_loss = test_loss = float("inf")
    return {
        "config": cfg, "train_loss": curve, "val_loss": val_loss, "val_acc": val_acc, "test_loss": test_loss,
        "test_acc": test_acc, "seconds_per_step": train_seconds / max(1, len(curve)),
        "seconds": time.perf_counter() - t0,
    }


def _key(cfg: dict[str, Any]) -> str:
    return json.dumps({k: cfg[k] for k in ("slice", "method", "lr", "seed", "steps")}, sort_keys=True)


def run_slice(slice_name: str, method: str, lrs: tuple[float, ...], seeds: tuple[int, ...], steps: int,
              out: Path, command: str, workers: int, n_eval: int | None = None) -> list[dict[str, Any]]:
    """Run every (lr, seed) of one method on one slice not already in ``out``; save after each run."""
    data: dict[str, Any] = {"meta": {}, "runs": []}
    if out.exists():
        data = json.loads(out.read_text())
    have = {_key(r["config"]) for r in data["runs"]}
    todo = [{"slice": slice_name, "method": method, "lr": lr, "seed": s, "steps": steps} for lr in lrs for s in seeds]
    if n_eval:
        todo = [dict(c, n_eval=n_eval) for c in todo]
    todo = [c for c in todo if _key(c) not in have]
    meta = data["meta"]
    commands = meta.setdefault("commands", [])
    if command not in commands:
        commands.append(command)
    meta.update(slice=slice_name, method=method, steps=steps, n_val=N_VAL, n_test=H.N_EVAL, batch=H.BATCH,
                seq=H.SEQ, head_lr=H.HEAD_LR, machine=f"2 shared CPU cores, torch {torch.__version__}",
                provenance=provenance(shlex.split(command)[3:], module="benchmarks.studies.head_to_head.run"),
                lr_grid=sorted({r["config"]["lr"] for r in data["runs"]} | set(lrs)))
    print(f"{slice_name} {method}: {len(todo)} runs to do ({len(data['runs'])} already in {out.name})", flush=True)
    t0 = time.perf_counter()
    wall0 = meta.get("wall_seconds", 0.0)

    def save() -> None:
        out.parent.mkdir(parents=True, exist_ok=True)
        meta["wall_seconds"] = wall0 + time.perf_counter() - t0
        out.write_text(json.dumps(data, indent=0))

    if not todo:
        save()
        return data["runs"]
    H.windows()  # build the corpus once before forking
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        for i, r in enumerate(pool.map(train, todo) if pool else map(train, todo)):
            data["runs"].append(r)
            c = r["config"]
            print(f"[{i + 1}/{len(todo)}] {method} lr={c['lr']:g} seed={c['seed']} val={r['val_loss']:.4f} "
                  f"test={r['test_loss']:.4f} acc={r['test_acc']:.3f} {r['seconds']:.0f}s", flush=True)
            save()
    finally:
        if pool:
            pool.shutdown()
    save()
    return data["runs"]


# ---------------------------------------------------------------------------------------------- report

#: A seed-mean test loss at or above this is "back at chance" (ln 2 = 0.693 for two balanced classes).
CHANCE = 0.69
BAND = 0.05  # a rate is "good" when its seed-mean test loss is within 5 % of the method's best


def _fin(v: float) -> float:
    return v if math.isfinite(v) else 10.0  # a diverged seed counts as a very bad loss


def method_best(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Best lr on validation (seed mean), its test statistics, the good-lr band and the curves."""
    by: dict[float, list[dict]] = {}
    for r in sorted(runs, key=lambda r: r["config"]["seed"]):
        by.setdefault(r["config"]["lr"], []).append(r)
    seeds = set.intersection(*({r["config"]["seed"] for r in rs} for rs in by.values()))
    by = {lr: [r for r in rs if r["config"]["seed"] in seeds] for lr, rs in by.items()}  # seeds every rate has
    val = {lr: statistics.fmean(_fin(r["val_loss"]) for r in rs) for lr, rs in by.items()}
    test = {lr: statistics.fmean(_fin(r["test_loss"]) for r in rs) for lr, rs in by.items()}
    grid = sorted(by)
    lr = min(val, key=val.get)
    rs = by[lr]
    losses = [_fin(r["test_loss"]) for r in rs]
    # good band: contiguous grid rates around the best (by test mean) within 5 % of the best test mean
    i_best = grid.index(min(test, key=test.get))
    lo = hi = i_best
    limit = (1 + BAND) * test[grid[i_best]]
    while lo > 0 and test[grid[lo - 1]] <= limit:
        lo -= 1
    while hi < len(grid) - 1 and test[grid[hi + 1]] <= limit:
        hi += 1
    return {
        "lr": lr, "lr_on_edge": len(grid) > 1 and lr in (grid[0], grid[-1]), "grid": grid,
        "lr_best_by_test": grid[i_best],
        "val_by_lr": {str(k): val[k] for k in grid}, "test_by_lr": {str(k): test[k] for k in grid},
        "test_min_by_lr": {str(k): min(_fin(r["test_loss"]) for r in by[k]) for k in grid},
        "test_max_by_lr": {str(k): max(_fin(r["test_loss"]) for r in by[k]) for k in grid},
        "mean": statistics.fmean(losses), "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "acc": statistics.fmean(r["test_acc"] for r in rs), "per_seed": losses,
        "seed_ids": [r["config"]["seed"] for r in rs], "seeds": len(rs),
        "band": [grid[lo], grid[hi]], "band_factor": grid[hi] / grid[lo],
        # the seed-mean test loss one grid step (about 3×) above the picked rate, None at the grid's top
        "test_one_step_up": test[grid[grid.index(lr) + 1]] if lr != grid[-1] else None,
        "band_open": lo == 0 or hi == len(grid) - 1,
        # the band cannot reach the first rates outside it: an upper bound on its width
        "band_bound": (grid[min(hi + 1, len(grid) - 1)] / grid[max(lo - 1, 0)]),
        "seconds_per_step": statistics.median(r["seconds_per_step"] for rs_ in by.values() for r in rs_),
        "seed_curves": [H.smooth(r["train_loss"]) for r in rs],
        "raw_curves": [[_fin(v) for v in r["train_loss"]] for r in rs],
    }


SMOOTH = 15  # steps in the trailing mean of the training loss used for steps-to-target


def _mean_curve(curves: list[list[float]]) -> tuple[int, list[float]]:
    """Seed mean of the full-window trailing means: entry i is the mean loss of steps i-14 … i (i ≥ 14)."""
    k = min([SMOOTH, *map(len, curves)])  # smoke runs are shorter than the window
    sm = [H.smooth(c, k)[k - 1 :] for c in curves]
    n = min(map(len, sm))
    return k, [statistics.fmean(c[i] for c in sm) for i in range(n)]


def slice_report(slice_name: str, runs_by_method: dict[str, list[dict]],
                 timing: dict[str, float] | None = None) -> tuple[str, dict[str, Any]]:
    from loraplus._demo import paired

    def complete(runs: list[dict]) -> set[int]:  # seeds every rate of a method has
        by: dict[float, set[int]] = {}
        for r in runs:
            by.setdefault(r["config"]["lr"], set()).add(r["config"]["seed"])
        return set.intersection(*by.values())

    methods = [m for m in METHODS if runs_by_method.get(m)]
    shared = set.intersection(*(complete(runs_by_method[m]) for m in methods)) if methods else set()
    # every method's rate is picked and reported on the same seeds
    bests = {m: method_best([r for r in runs_by_method[m] if r["config"]["seed"] in shared]) for m in methods}
    if "lora" not in bests:
        return f"(slice {slice_name}: no plain LoRA runs)", {}
    common = sorted(set.intersection(*(set(b["seed_ids"]) for b in bests.values())))
    for b in bests.values():  # pair on the seeds every method has
        keep = [i for i, s in enumerate(b["seed_ids"]) if s in common]
        b["per_seed"] = [b["per_seed"][i] for i in keep]
        b["seed_curves"] = [b["seed_curves"][i] for i in keep]
        b["raw_curves"] = [b["raw_curves"][i] for i in keep]
        b["seed_ids"] = common
    base = bests["lora"]
    for m, b in bests.items():
        if m != "lora":
            p = paired(b["per_seed"], base["per_seed"])
            b["diff"] = {"per_seed": list(p.diffs), "mean": p.mean, "ci95": [p.low, p.high], "wins": p.wins, "n": p.n}
    # steps to target on the seed-mean curve (single seeds are bimodal: some stay at chance for the
    # whole run): the target is the highest of every method's lowest seed-mean loss in the first 75 %
    windows = {m: _mean_curve(b["raw_curves"]) for m, b in bests.items()}
    curves = {m: c for m, (_, c) in windows.items()}
    at = max(1, math.ceil(0.75 * len(curves["lora"])))
    target = max(min(c[:at]) for c in curves.values())
    for m, b in bests.items():
        k = windows[m][0]
        b["steps_to_target"] = next(i for i, v in enumerate(curves[m]) if v <= target) + k
        b["target"] = target
        if timing and m in timing:
            b["seconds_per_step_interleaved"] = timing[m]
    lines = [
        ("| method | best lr (grid) | test loss: mean ± sd | vs LoRA, paired: mean [95 % CI] | wins | good-lr band "
         "| steps to target | s/step |"),
        "|---|---|---|---|---|---|---|---|",
    ]
    for m, b in bests.items():
        grid = ", ".join(f"{x:g}" for x in b["grid"])
        lr = f"{b['lr']:g}" + (" **edge, not best-vs-best**" if b["lr_on_edge"] else "") + f" ({grid})"
        if m == "lora":
            diff, wins = "–", "–"
        else:
            d = b["diff"]
            diff = f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
            wins = f"{d['wins']}/{d['n']}"
        lo, hi = b["band"]
        if b["band_open"]:
            band = f"≥ {b['band_factor']:.3g}× ({lo:g}–{hi:g}, grid edge)"
        elif b["band_factor"] == 1:
            band = f"one rate ({lo:g}; < {b['band_bound']:.3g}×)"
        else:
            band = f"{b['band_factor']:.3g}× ({lo:g}–{hi:g}; < {b['band_bound']:.3g}×)"
        sec = b.get("seconds_per_step_interleaved", b["seconds_per_step"])
        lines.append(f"| {LABELS[m]} | {lr} | {b['mean']:.3f} ± {b['std']:.3f} | {diff} | {wins} | {band} "
                     f"| {b['steps_to_target']} | {sec:.3f} |")
    lines.append("")
    lines.append(f"({len(common)} seeds, paired; lr picked on the validation split, loss on the test split; "
                 f"target {target:.3f}: seed-mean {SMOOTH}-step training loss; s/step: "
                 + ("interleaved timing, `time` command)" if timing else "median over the sweep's runs, noisy)"))
    return "\n".join(lines), bests


def grid_table(bests: dict[str, Any]) -> str:
    lrs = sorted({lr for b in bests.values() for lr in b["grid"]})
    lines = ["| method \\ lr | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for m, b in bests.items():
        cells = [f"{b['test_by_lr'][str(lr)]:.3f}" if str(lr) in b["test_by_lr"] else "–" for lr in lrs]
        lines.append(f"| {LABELS[m]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(slice_name: str, bests: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m, b in bests.items():
        xs = b["grid"]
        ys = [b["test_by_lr"][str(x)] for x in xs]
        line, = ax.plot(xs, ys, marker="o", label=LABELS[m], lw=2.2 if m == "lora" else 1.3,
                        color="black" if m == "lora" else None)
        ax.fill_between(xs, [b["test_min_by_lr"][str(x)] for x in xs], [b["test_max_by_lr"][str(x)] for x in xs],
                        color=line.get_color(), alpha=0.12)
    ax.set_xscale("log")
    ax.set_xlabel("learning rate (of A; B gets λ × it)")
    ax.set_ylabel("test loss (mean of seeds; band: min–max)")
    ax.set_title(f"head-to-head, {slice_name}", fontsize=10)
    ax.legend(fontsize=8, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(results: Path = OUT, img_dir: Path | None = None, summary_path: Path | None = None,
           timing_path: Path = TIMING) -> dict[str, Any]:
    img_dir = img_dir or DOCS_IMG
    timing = json.loads(timing_path.read_text())["slices"] if timing_path.exists() else {}
    runs: dict[str, dict[str, list[dict]]] = {}
    metas: dict[str, dict[str, Any]] = {}
    for f in sorted(results.glob("*.json")):
        if f.name == "summary.json":
            continue
        data = json.loads(f.read_text())
        m = data["meta"]
        runs.setdefault(m["slice"], {}).setdefault(m["method"], []).extend(data["runs"])
        metas[f.name] = {k: m[k] for k in ("commands", "wall_seconds", "lr_grid", "steps") if k in m}
        metas[f.name]["runs"] = len(data["runs"])
    summary: dict[str, Any] = {**provenance(["report"], module="benchmarks.studies.head_to_head.run"), "files": metas, "slices": {},
                               "method": __doc__}
    md: list[str] = []
    order = [s for s in GRIDS if s in runs] + sorted(s for s in runs if s not in GRIDS)
    for s in order:
        table, bests = slice_report(s, runs[s], timing.get(s, {}).get("median_seconds"))
        grid = grid_table(bests) if bests else ""
        md.append(f"**{s}**\n\n{table}\n\nTest loss (seed mean) at every rate:\n\n{grid}\n")
        print(md[-1])
        if bests:
            img_dir.mkdir(parents=True, exist_ok=True)
            plot(s, bests, img_dir / f"h2h_{s}.png")
            summary["slices"][s] = {m: {k: v for k, v in b.items() if k not in ("seed_curves", "raw_curves")}
                                    for m, b in bests.items()}
            up = [b["test_one_step_up"] for b in bests.values() if b["test_one_step_up"] is not None]
            summary.setdefault("one_step_up", {})[s] = {
                "at_chance": sum(v >= CHANCE for v in up), "of": len(up), "chance": CHANCE}
    lines = ["| file | runs | wall time | command(s) |", "|---|---|---|---|"]
    for name, m in metas.items():
        cmds = "<br>".join(f"`{c}`" for c in m.get("commands", []))
        lines.append(f"| {name} | {m['runs']} | {m.get('wall_seconds', 0.0) / 60:.1f} min | {cmds} |")
    total = sum(m.get("wall_seconds", 0.0) for m in metas.values())
    n_runs = sum(m["runs"] for m in metas.values())
    lines.append(f"\n({len(metas)} files, {n_runs} runs, {total / 60:.0f} min of wall time "
                 "in all, two training processes at a time.)")
    md.append("**Commands and run times**\n\n" + "\n".join(lines) + "\n")
    summary["total"] = {"files": len(metas), "runs": n_runs, "wall_seconds": total}
    print(md[-1])
    summary_path = summary_path or results / "summary.json"
    summary_path.write_text(json.dumps(summary, indent=1))
    summary_path.with_name("report.md").write_text("\n".join(md))
    return summary


def time_steps(slice_name: str, rounds: int = 20, warmup: int = 3, path: Path = TIMING,
               command: str = "") -> dict[str, float]:
    """Median wall time of one training step (forward, backward, every optimizer's step) per method.

    All methods are built first (seed 0, the middle rate of each grid) and then stepped round-robin,
    one step each per round, on the same batch, so every method is timed under the same load.
    """
    torch.set_num_threads(1)
    task, targets, init = parse_slice(slice_name)
    train_idx, _ = H.split(task)
    x, y = H.make_batch(task, train_idx[: H.BATCH], torch.Generator().manual_seed(0))
    loss_fn = nn.CrossEntropyLoss()
    methods = [m for m in METHODS if m in GRIDS[slice_name]]
    built = {}
    for m in methods:
        model = H.adapted_model("lora", init, targets, 0)
        grid = GRIDS[slice_name][m]
        built[m] = (model, build(m, model, grid[len(grid) // 2]))
    times: dict[str, list[float]] = {m: [] for m in methods}
    for i in range(warmup + rounds):
        for m in methods:
            model, opts = built[m]
            t0 = time.perf_counter()
            _step(model, opts, loss_fn, x, y)
            if i >= warmup:
                times[m].append(time.perf_counter() - t0)
    out = {m: statistics.median(t) for m, t in times.items()}
    data = json.loads(path.read_text()) if path.exists() else {"commands": {}, "slices": {}}
    data["slices"][slice_name] = {"median_seconds": out, "rounds": rounds,
                                  "min_seconds": {m: min(t) for m, t in times.items()}}
    data["commands"][slice_name] = command
    data["machine"] = f"2 shared CPU cores, one thread, torch {torch.__version__}"
    data.setdefault("provenance", {})[slice_name] = provenance(shlex.split(command)[3:] if command.startswith("python ")
                                                               else [], module="benchmarks.studies.head_to_head.run")
    path.write_text(json.dumps(data, indent=1))
    for m in methods:
        print(f"{m:22s} {out[m] * 1e3:7.1f} ms/step (median of {rounds}; fastest {min(times[m]) * 1e3:.1f})")
    return out


def quick(tmp: Path) -> dict[str, Any]:
    """Smoke run: every method, 2 rates, 2 seeds, 2 steps, 32 evaluation windows, then the report."""
    out = tmp / "results"
    for m in METHODS:
        run_slice("order_qv_B0", m, (1e-3, 3e-3), (0, 1), 2, out / f"order_qv_B0__{m}.json", "quick", workers=1,
                  n_eval=32)
    time_steps("order_qv_B0", rounds=1, warmup=0, path=tmp / "timing.json", command="quick")
    return report(out, img_dir=tmp / "img", summary_path=out / "summary.json", timing_path=tmp / "timing.json")


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("slice", choices=sorted(GRIDS))
    r.add_argument("method", choices=[*METHODS, "all"])
    r.add_argument("--seeds", type=int, default=len(SEEDS), help="number of seeds (0..n-1)")
    r.add_argument("--workers", type=int, default=int(os.environ.get("MINILM_WORKERS", "2")))
    t = sub.add_parser("time")
    t.add_argument("slice", choices=sorted(GRIDS))
    t.add_argument("--rounds", type=int, default=20)
    sub.add_parser("report")
    q = sub.add_parser("quick")
    q.add_argument("out", type=Path)
    return ap


def main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    if a.cmd == "run":
        command = "python -m benchmarks.studies.head_to_head.run " + shlex.join(argv)
        for m in [m for m in METHODS if m in GRIDS[a.slice]] if a.method == "all" else (a.method,):
            run_slice(a.slice, m, GRIDS[a.slice][m], tuple(range(a.seeds)), STEPS, OUT / f"{a.slice}__{m}.json",
                      command, a.workers)
    elif a.cmd == "time":
        time_steps(a.slice, a.rounds, command="python -m benchmarks.studies.head_to_head.run " + shlex.join(argv))
    elif a.cmd == "report":
        report()
    else:
        quick(a.out)


if __name__ == "__main__":
    main(sys.argv[1:])
