"""How good is ``loraplus.find_lr``? Its suggestion, trained as a full study-v2 run, against the swept bests.

For each task and seed: ``find_lr`` probes the task's model (the same adapter init as the sweep's
run of that seed) on the run's own first training batches; a full run at the suggestion (lr as the
schedule's peak, ratio λ) is trained with study v2's own training function; its test loss is set next
to the same seed's test loss of the best swept plain LoRA (``lora`` at its validation-best lr) and of
the best swept LoRA+ (the ``loraplus<λ>`` cell with the lowest seed-mean validation loss, at its
validation-best lr). Differences are paired per seed, with a 95 % t-interval (``common.stats.paired``).
The probe's cost is recorded in steps, as a fraction of one full run and of the task's whole sweep.

Usage (resumable: seeds already in ``benchmarks/studies/find_lr/results/eval/<task>.json`` are skipped)::

    python -m benchmarks.studies.find_lr.evaluate width32 width64 width128 width256 order_B0   # every task
    python -m benchmarks.studies.find_lr.evaluate width64 --seeds 1                            # fewer seeds

By default each task runs the seeds its sweep picked its rates on (width family: 0, 1; MiniLM: 0 … 4).
    python -m benchmarks.studies.find_lr.evaluate --quick /tmp/q       # tiny: width32, 3-step pretraining, 1 seed, 4 steps

``--quick`` writes into the given folder (and caches its tiny pretrained model there); its numbers
mean nothing, it runs the machinery end to end.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks.common import stats as S
from benchmarks.common.provenance import provenance
from benchmarks.studies.v2 import run as V

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "eval"
SWEEPS = V.OUT
#: ratios probed: the width family's sweep spans λ up to 64, MiniLM's up to 16
RATIOS = {"width": (1, 4, 16, 64), "minilm": (1, 4, 16)}
LR_RANGE = (1e-6, 1.0)
#: the issue's goal and bar: find_lr's test loss at most 2 % (goal) / 5 % (bar) above the best swept one
GOAL, BAR = 0.02, 0.05


def _probe_inputs(task: str, st: V.Settings, seed: int, n: int) -> tuple[Any, Any, list[Any]]:
    """The sweep's model for ``seed`` and the first ``n`` training batches its run would see, with the loss."""
    import torch

    if task in V.WIDTH_TASKS:
        from benchmarks.common import widthfamily as W

        model = W.adapted(st.width, seed, 8, st.pretrain_steps)
        p = W.prose()
        gen = torch.Generator().manual_seed(seed)
        return model, W.lm_loss, [W.stream_batch(p.train, st.batch, gen) for _ in range(n)]
    from benchmarks.common import minilm as H

    name, init = task.split("_")
    model = H.adapted_model("lora", init, H.QV, seed)
    train_idx, _, _ = H.split_v2(name)
    gen = torch.Generator().manual_seed(seed)
    order = train_idx[torch.randperm(len(train_idx), generator=gen)]
    batches = []
    for step in range(n):
        lo = (step * st.batch) % max(1, len(order) - st.batch)
        batches.append(H.make_batch(name, order[lo : lo + st.batch], gen))
    ce = torch.nn.CrossEntropyLoss()

    def loss_fn(m: Any, batch: Any) -> Any:
        return ce(m(batch[0]), batch[1])

    return model, loss_fn, batches


def _full_run(task: str, st: V.Settings, seed: int, lr: float, ratio: float) -> dict[str, Any]:
    method = "lora" if ratio == 1 else f"loraplus{int(ratio)}"
    job = {"task": task, "method": method, "lr": lr, "seed": seed, "settings": asdict(st)}
    return V._train(job)


def _swept(task: str, sweeps: Path) -> dict[str, Any]:
    """Per seed: the test loss of the best swept plain LoRA and LoRA+; and the sweep's total steps."""
    cells = {}
    for method in V.tasks_methods(task):
        path = V.cell_path(sweeps, task, method)
        if path.exists() and (method == "lora" or method.startswith("loraplus")):
            cells[method] = json.loads(path.read_text())["runs"]
    if "lora" not in cells:
        return {}
    sel = {m: S.select(runs) for m, runs in cells.items()}
    plus = [m for m in sel if m != "lora"]
    best_plus = min(plus, key=lambda m: sel[m].val[sel[m].best_lr]) if plus else None

    def at(method: str) -> dict[int, float]:
        lr = sel[method].best_lr
        return {r["seed"]: S.fin(r["test_loss"]) for r in cells[method] if r["lr"] == lr and not r.get("extra")}

    sweep_steps = sum(len(r["curve"]) for runs in cells.values() for r in runs)
    return {"best_lr_by_ratio": {str(V.ratio_of(m)): sel[m].best_lr for m in sel},
            "lora": {"lr": sel["lora"].best_lr, "test": at("lora")},
            "loraplus": None if best_plus is None else {"method": best_plus, "lr": sel[best_plus].best_lr,
                                                        "ratio": V.ratio_of(best_plus), "test": at(best_plus)},
            "sweep_steps": sweep_steps}


def run_task(task: str, out: Path, seeds: int, st: V.Settings | None = None, max_steps: int | None = None,
             sweeps: Path = SWEEPS, quick: bool = False) -> dict[str, Any]:
    import torch

    import loraplus

    torch.set_num_threads(1)
    st = st or V.settings(task, "lora")
    ratios = RATIOS["width" if task in V.WIDTH_TASKS else "minilm"]
    if quick:
        ratios = ratios[:2]
    path = out / f"{task}.json"
    data = json.loads(path.read_text()) if path.exists() else {"runs": []}
    data["meta"] = {**provenance(), "task": task, "settings": asdict(st), "ratios": list(ratios),
                    "lr_range": list(LR_RANGE), "max_steps": max_steps, "quick": quick}
    done = {r["seed"] for r in data["runs"]}
    per_ratio_steps = (max_steps or loraplus._find_lr._probe.DEFAULT_STEPS_PER_RATIO * len(ratios)) // len(ratios)
    for seed in range(seeds):
        if seed in done:
            continue
        t0 = time.perf_counter()
        model, loss_fn, batches = _probe_inputs(task, st, seed, per_ratio_steps)
        s = loraplus.find_lr(model, loss_fn, batches, ratios=ratios, max_steps=max_steps, lr_range=LR_RANGE,
                             betas=(0.9, 0.99), eps=1e-8, weight_decay=0.0,
                             **({} if task in V.WIDTH_TASKS else {"role_lr": {loraplus.Role.OTHER: 1e-3}}),
                             progress=False)
        probe_s = time.perf_counter() - t0
        run = _full_run(task, st, seed, s.lr, s.ratio)
        data["runs"].append({"seed": seed, "lr": s.lr, "ratio": s.ratio, "steps_used": s.steps_used,
                             "probe_seconds": probe_s, "explain": s.explain(),
                             "per_ratio": [r.to_dict() for r in s.per_ratio],
                             "test_loss": run["test_loss"], "val_loss": run["val_loss"], "diverged": run["diverged"],
                             "run_seconds": run["seconds"]})
        _save(path, data)
    data["summary"] = _summary(data["runs"], _swept(task, sweeps), st.steps)
    _save(path, data)
    return data


def _summary(runs: list[dict[str, Any]], swept: dict[str, Any], steps: int) -> dict[str, Any]:
    used = [r["steps_used"] for r in runs]
    out: dict[str, Any] = {"seeds": [r["seed"] for r in runs], "test_loss": [r["test_loss"] for r in runs],
                           "probe_steps_mean": statistics.fmean(used) if used else None,
                           "probe_fraction_of_one_run": statistics.fmean(used) / steps if used else None}
    if swept:
        out["probe_fraction_of_sweep"] = out["probe_steps_mean"] / swept["sweep_steps"] if used else None
        out["landmarks_vs_swept"] = _landmarks(runs, swept["best_lr_by_ratio"])
        for key in ("lora", "loraplus"):
            ref = swept.get(key)
            if not ref:
                continue
            pairs = [(S.fin(r["test_loss"]), ref["test"][r["seed"]]) for r in runs if r["seed"] in ref["test"]]
            entry = {k: v for k, v in ref.items() if k != "test"}
            if pairs:
                p = S.paired([a for a, _ in pairs], [b for _, b in pairs])
                ref_mean = statistics.fmean(b for _, b in pairs)
                rel = p.mean / ref_mean
                entry.update(diff_mean=p.mean, ci95=[p.low, p.high], find_lr_lower=p.wins, n=p.n,
                             diffs=list(p.diffs), ref_test_mean=ref_mean, rel_diff_mean=rel,
                             rel_ci95=[p.low / ref_mean, p.high / ref_mean],
                             within_goal_2pct=rel <= GOAL, within_bar_5pct=rel <= BAR)
            out[f"vs_best_{key}"] = entry
    return _finite(out)


def _landmarks(runs: list[dict[str, Any]], best: dict[str, float]) -> dict[str, Any]:
    """Where each ratio's range-test edge and minimum sat against that ratio's best swept lr (the
    figures the default ``safety`` was set from, on the development tasks)."""
    points = []
    for r in runs:
        for p in r["per_ratio"]:
            ref = best.get(str(float(p["ratio"])))
            if ref is None:
                continue
            points.append({"seed": r["seed"], "ratio": p["ratio"], "best_swept_lr": ref,
                           "edge_over_best": None if p.get("edge_lr") is None else p["edge_lr"] / ref,
                           "min_over_best": p["lr_at_best"] / ref})
    out: dict[str, Any] = {"points": points}
    for key in ("edge_over_best", "min_over_best"):
        vals = [q[key] for q in points if q[key] is not None]
        out[key] = ({"n": len(vals), "geomean": math.exp(statistics.fmean(math.log(v) for v in vals)),
                     "min": min(vals), "max": max(vals), "spread": max(vals) / min(vals)} if vals else None)
    return out


def _finite(v: Any) -> Any:
    """Strict JSON: non-finite numbers (a diverged run, one seed's open interval) become None."""
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {k: _finite(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_finite(x) for x in v]
    return v


def _save(path: Path, data: dict[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(_finite(data), indent=1, allow_nan=False))
    tmp.replace(path)


def quick(tmp: Path) -> dict[str, Any]:
    """width32 on a 3-step pretraining, 4-step runs, 1 seed, the smallest probe; all into ``tmp``."""
    tmp = Path(tmp)
    old = os.environ.get("LORAPLUS_CACHE")
    os.environ["LORAPLUS_CACHE"] = str(tmp / "cache")
    try:
        st = replace(V.settings("width32", "lora"), steps=4, pretrain_steps=3, n_eval=16, batch=4)
        return run_task("width32", tmp / "results", 1, st=st, max_steps=60, quick=True)
    finally:
        if old is None:
            os.environ.pop("LORAPLUS_CACHE", None)
        else:
            os.environ["LORAPLUS_CACHE"] = old


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("tasks", nargs="*", help="order_B0, width32 ... width256")
    ap.add_argument("--seeds", type=int, default=None,
                    help="seeds 0 … N-1 (default: the seeds the task's sweep picked its rates on)")
    ap.add_argument("--quick", metavar="DIR", default=None, help="a tiny end-to-end run into DIR")
    return ap


def main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    if a.quick:
        print(json.dumps(quick(Path(a.quick))["summary"], indent=1))
        return
    for task in a.tasks:
        if task not in V.WIDTH_TASKS and task not in V.MINILM_TASKS:
            raise SystemExit(f"unknown task {task!r}")
        seeds = a.seeds if a.seeds is not None else V.settings(task, "lora").seeds
        print(task, json.dumps(run_task(task, OUT, seeds)["summary"], indent=1), flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
