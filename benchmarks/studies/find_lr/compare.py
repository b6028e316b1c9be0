"""find_lr against the finders users know, a learning-rate-free optimizer and the λ^-1/2 law, where the rate matters.

For each task and seed, one probe: ``loraplus.find_lr`` with its defaults (ratios 1, 4, 16) on the
run's own first training batches; its range tests are kept whole. From the same probe:

* ``find_lr``: its suggestion (lr and ratio), trained as a full run;
* ``valley``, ``steepest``, ``min10``: the rules of fastai's ``lr_find`` (the middle of the longest
  valley of the smoothed loss), of Lightning's ``Tuner.lr_find`` and torch-lr-finder (the steepest
  slope, ``np.gradient``, after skipping the first 10 and last 1 points) and fastai's former
  ``minimum / 10``, each applied to the ratio-4 range test with the ratio kept (B at 4 × A), as
  those finders would be on a LoRA+ optimizer whose ratio survives; their cost is that one range
  test;
* ``prodigy_sf``: ``prodigyplus.ProdigyPlusScheduleFree`` with LoRA+ groups (ratio 4, lr 1 as the
  multiplier of one shared estimate, ``split_groups=False``), its defaults, no schedule, read in
  ``eval()`` mode: no probe, no tuning;
* ``law``: ``find_lr(..., lora_lr=<the best swept plain-LoRA rate>, ratios=(4,))``, i.e. A at
  ``lora_lr / 2`` and B at ``2 × lora_lr``: no probe steps, but it needs plain LoRA's rate, which
  the user of a switch from LoRA has; where the task's LoRA+ λ=4 sweep ran that rate on the same
  seed, that run is reused (the same training function, the same seed);
* ``law_confirm``: ``find_lr(..., lora_lr=<the same rate>, ratios=(1, 4, 16), max_steps=<one run>)``:
  each ratio at the law's rate (λ 1 at ``lora_lr`` itself), one confirmation run of a third of a
  run each, the lowest confirmation loss kept; its cost is those steps, one run in all. It can
  keep plain LoRA (λ 1, at the swept rate: then the reference run itself) where LoRA+ does not help.

Each is set against the same seed's best swept plain LoRA (the rate picked on validation, test
loss reported): paired differences with a 95 % t-interval, relative to its mean. Tasks: MiniLM
``order_B0`` and ``order_A0`` (5 seeds; study v2's sweeps), ``source_B0`` (held out: find_lr was
not tuned on it; its plain-LoRA and λ=4 sweeps were run for this), and the built-in ``demo``
(MLP, 3 seeds; its plain-LoRA sweep is run here, on the demo's grid).

Usage (resumable: each seed's methods already in ``benchmarks/studies/find_lr/results/compare/<task>.json``
are skipped)::

    python -m benchmarks.studies.find_lr.compare run order_B0 order_A0 source_B0 demo
    python -m benchmarks.studies.find_lr.compare report        # the table, from the committed JSON
    python -m benchmarks.studies.find_lr.compare law           # the λ^-α fit behind lora_lr, from study v2
    python -m benchmarks.studies.find_lr.compare --quick DIR   # tiny end to end (numbers mean nothing)
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from benchmarks.common import stats as S
from benchmarks.common.provenance import provenance
from benchmarks.studies.find_lr import evaluate as E
from benchmarks.studies.v2 import run as V

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "compare"
SWEEPS = V.OUT
TASKS = ("order_B0", "order_A0", "source_B0", "demo")
#: the ratio the peers' rules, Prodigy and the law keep: loraplus's default
RATIO = 4.0
METHODS = ("find_lr", "law", "law_confirm", "valley", "steepest", "min10", "prodigy_sf")
#: the issue's goal and bar: at most 2 % (goal) / 5 % (bar) above the best swept plain LoRA
GOAL, BAR = 0.02, 0.05
DEMO_SEEDS = (0, 1, 2)


# ------------------------------------------------------------------------------ the peers' rules


def valley(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's ``valley``: the longest (not necessarily contiguous) strictly falling run of the
    loss, and the lr halfway into it."""
    n = len(losses)
    run = [1] * n
    first, last = 0, 0
    for i in range(1, n):
        for j in range(i):
            if losses[i] < losses[j] and run[i] < run[j] + 1:
                run[i] = run[j] + 1
        if run[i] > run[last]:
            last = i
            first = last - run[last]
    third = (last - first) / 3
    return float(lrs[first + int(third) + int(third / 2)])


def steepest(lrs: Sequence[float], losses: Sequence[float], skip_begin: int = 10, skip_end: int = 1) -> float:
    """Lightning's / torch-lr-finder's rule: the most negative ``np.gradient`` of the loss (central
    differences inside, one-sided at the ends), after skipping the first and last points."""
    y = list(losses[skip_begin : len(losses) - skip_end])
    if len(y) < 2:
        return float(lrs[0])
    grad = [y[1] - y[0], *((y[i + 1] - y[i - 1]) / 2 for i in range(1, len(y) - 1)), y[-1] - y[-2]]
    return float(lrs[skip_begin + min(range(len(grad)), key=grad.__getitem__)])


def min10(lrs: Sequence[float], losses: Sequence[float]) -> float:
    """fastai's former suggestion: the lr at the lowest loss, divided by 10."""
    return float(lrs[min(range(len(losses)), key=losses.__getitem__)]) / 10


RULES: dict[str, Callable[[Sequence[float], Sequence[float]], float]] = {
    "valley": valley, "steepest": steepest, "min10": min10}


# ------------------------------------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Reference:
    """A task's best swept plain LoRA: its rate, its test loss per seed, and the sweep's steps."""

    lr: float
    test: dict[int, float]
    sweep_steps: int


class MiniLMTask:
    """Study v2's MiniLM task: its sweeps, its training function and its probe batches."""

    def __init__(self, name: str, st: V.Settings | None = None, sweeps: Path = SWEEPS) -> None:
        self.name, self.st, self.sweeps = name, st or V.settings(name, "lora"), sweeps
        self.steps, self.seeds = self.st.steps, tuple(range(self.st.seeds))
        self.lr_range = E.LR_RANGE
        import loraplus
        from benchmarks.common import minilm as H

        # the sweep's optimizer options, the head at its fixed rate
        self.probe_options: dict[str, Any] = {"betas": (0.9, 0.99), "eps": 1e-8, "weight_decay": 0.0,
                                              "role_lr": {loraplus.Role.OTHER: H.HEAD_LR}}

    def probe_inputs(self, seed: int, n: int) -> tuple[Any, Any, list[Any]]:
        return E._probe_inputs(self.name, self.st, seed, n)

    def train(self, seed: int, lr: float, ratio: float) -> dict[str, Any]:
        return self._job(seed, lr, _method(ratio))

    def train_prodigy(self, seed: int) -> dict[str, Any]:
        return self._job(seed, 1.0, f"prodigysf{int(RATIO)}")

    def _job(self, seed: int, lr: float, method: str) -> dict[str, Any]:
        r = V._train({"task": self.name, "method": method, "lr": lr, "seed": seed, "settings": asdict(self.st)})
        return {"test": r["test_loss"], "val": r["val_loss"], "diverged": r["diverged"], "seconds": r["seconds"]}

    def reference(self) -> Reference:
        runs = _cell(self.sweeps, self.name, "lora")
        sel = S.select(runs)
        test = {r["seed"]: S.fin(r["test_loss"]) for r in runs if r["lr"] == sel.best_lr and not r.get("extra")}
        steps = sum(len(r["curve"]) for m in ("lora", f"loraplus{int(RATIO)}") for r in _cell(self.sweeps, self.name, m))
        return Reference(sel.best_lr, test, steps)

    def swept_run(self, seed: int, lr: float, ratio: float) -> dict[str, Any] | None:
        """The sweep's run of (lr, ratio, seed), when the sweep has it."""
        for r in _cell(self.sweeps, self.name, _method(ratio)):
            if r["seed"] == seed and math.isclose(r["lr"], lr, rel_tol=1e-4):
                return {"test": r["test_loss"], "val": r["val_loss"], "diverged": r["diverged"],
                        "seconds": r["seconds"], "from_sweep": True, "swept_lr": r["lr"]}
        return None


def _method(ratio: float) -> str:
    """Study v2's name for a ratio's cell: ``lora`` for λ 1, else ``loraplus<λ>``."""
    return "lora" if ratio == 1 else f"loraplus{int(ratio)}"


def _cell(sweeps: Path, task: str, method: str) -> list[dict[str, Any]]:
    path = V.cell_path(sweeps, task, method)
    return json.loads(path.read_text())["runs"] if path.exists() else []


class DemoTask:
    """The built-in demo's MLP task (``python -m loraplus demo``): constant-lr AdamW, 400 steps."""

    name = "demo"

    def __init__(self, quick: bool = False) -> None:
        from loraplus._demo._config import MLP_PRESETS
        from loraplus._demo._mlp import _MlpTask

        # --quick: the machinery only, at a size that takes seconds
        self.cfg = replace(MLP_PRESETS["quick"], steps=40, pretrain_steps=60, lrs=(3e-3,)) if quick else MLP_PRESETS["full"]
        self.task = _MlpTask(self.cfg, lambda k: None)
        self.steps, self.seeds = self.cfg.steps, DEMO_SEEDS[: len(self.cfg.seeds)]
        self.lr_range = (1e-5, 1.0)  # the demo's own find_lr call
        self.probe_options = {"weight_decay": 0.0}
        self._ref: Reference | None = None

    def probe_inputs(self, seed: int, n: int) -> tuple[Any, Any, list[Any]]:
        import torch

        gen = torch.Generator().manual_seed(100 + seed)  # the demo's training batches of this seed
        batches = []
        for _ in range(n):
            idx = torch.randint(0, len(self.task.x), (self.cfg.batch,), generator=gen)
            batches.append((self.task.x[idx], self.task.y[idx]))

        def loss_fn(m: Any, batch: Any) -> Any:
            return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

        return self.task.model(seed), loss_fn, batches

    def train(self, seed: int, lr: float, ratio: float, **kw: Any) -> dict[str, Any]:
        from loraplus._demo._train import _train

        t0 = time.perf_counter()
        curve, val = _train(self.task.model(seed), self.task, lr, ratio, seed, lambda k: None, **kw)
        test = curve[-1]
        return {"test": test, "val": val, "diverged": not (math.isfinite(test) and math.isfinite(val)),
                "seconds": time.perf_counter() - t0}

    def train_prodigy(self, seed: int) -> dict[str, Any]:
        from prodigyplus import ProdigyPlusScheduleFree

        return self.train(seed, 1.0, RATIO, optimizer_cls=ProdigyPlusScheduleFree,
                          options={"split_groups": False}, schedule_free=True)

    def reference(self) -> Reference:
        """The demo's plain-LoRA sweep, run here: its grid, its seeds, picked on validation."""
        if self._ref is None:
            runs = {lr: {s: self.train(s, lr, 1.0) for s in self.seeds} for lr in self.cfg.lrs}
            best = min(self.cfg.lrs, key=lambda lr: (statistics.fmean(S.fin(r["val"]) for r in runs[lr].values()), lr))
            self._ref = Reference(best, {s: S.fin(r["test"]) for s, r in runs[best].items()},
                                  3 * len(self.cfg.lrs) * len(self.seeds) * self.steps)  # the demo's 3 sweeps
        return self._ref

    def swept_run(self, seed: int, lr: float, ratio: float) -> dict[str, Any] | None:
        return None


def task_of(name: str, quick: bool = False) -> Any:
    if name == "demo":
        return DemoTask(quick)
    if name not in V.MINILM_TASKS:
        raise SystemExit(f"unknown task {name!r}; one of {', '.join(TASKS)}")
    return MiniLMTask(name)


# ------------------------------------------------------------------------------------------ running


def run_task(task: Any, out: Path, command: str, quick: bool = False) -> dict[str, Any]:
    import torch

    import loraplus
    from loraplus._find_lr._probe import DEFAULT_STEPS_PER_RATIO

    torch.set_num_threads(1)
    path = out / f"{task.name}.json"
    data = json.loads(path.read_text()) if path.exists() else {"seeds": {}}
    ref = task.reference()
    data["meta"] = {**provenance(), "command": command, "task": task.name, "steps": task.steps,
                    "seeds": list(task.seeds), "ratio": RATIO, "lr_range": list(task.lr_range), "quick": quick,
                    "reference": {"lr": ref.lr, "test": {str(k): v for k, v in ref.test.items()},
                                  "sweep_steps": ref.sweep_steps}}
    ratios = (1.0, 4.0) if quick else (1.0, 4.0, 16.0)
    max_steps = 30 * len(ratios) if quick else None
    for seed in task.seeds:
        rec = data["seeds"].setdefault(str(seed), {"methods": {}})
        done = rec["methods"]
        if "probe" not in rec:
            model, loss_fn, batches = task.probe_inputs(seed, (max_steps or DEFAULT_STEPS_PER_RATIO * len(ratios)))
            t0 = time.perf_counter()
            s = loraplus.find_lr(model, loss_fn, batches, ratios=ratios, max_steps=max_steps, lr_range=task.lr_range,
                                 progress=False, **task.probe_options)
            rng = {f"{r:g}": [[p.lr, p.loss, p.smoothed] for p in s.table
                              if p.ratio == r and p.phase is loraplus._find_lr.Phase.RANGE and not p.diverged]
                   for r in ratios}
            rec["probe"] = {"lr": s.lr, "ratio": s.ratio, "steps_used": s.steps_used,
                            "seconds": time.perf_counter() - t0, "per_ratio": [r.to_dict() for r in s.per_ratio],
                            "range": rng}
            E._save(path, data)
        probe = rec["probe"]
        pts = probe["range"][f"{RATIO:g}"]
        lrs, smoothed = [p[0] for p in pts], [p[2] for p in pts]
        plan: dict[str, tuple[float, float, int]] = {"find_lr": (probe["lr"], probe["ratio"], probe["steps_used"])}
        if "law" not in done:  # one ratio under lora_lr: no step, but the task's model to label
            law = loraplus.find_lr(*task.probe_inputs(seed, 1)[:2], [], ratios=(RATIO,), lora_lr=ref.lr,
                                   progress=False, **task.probe_options)
            plan["law"] = (law.lr, RATIO, law.steps_used)
        if "law_confirm" not in done:  # the law's rates at λ 1, 4, 16, confirmed within one run's steps
            budget = max_steps or task.steps
            model, loss_fn, batches = task.probe_inputs(seed, budget)
            lc = loraplus.find_lr(model, loss_fn, batches, ratios=ratios, lora_lr=ref.lr, max_steps=budget,
                                  progress=False, **task.probe_options)
            plan["law_confirm"] = (lc.lr, lc.ratio, lc.steps_used)
        for name, rule in RULES.items():
            plan[name] = (rule(lrs, smoothed), RATIO, len(pts))
        for name in METHODS:
            if name in done:
                continue
            if name == "prodigy_sf":
                res = {**task.train_prodigy(seed), "lr": 1.0, "ratio": RATIO, "probe_steps": 0}
            else:
                lr, ratio, cost = plan[name]
                got = task.swept_run(seed, lr, ratio) or task.train(seed, lr, ratio)
                res = {**got, "lr": lr, "ratio": ratio, "probe_steps": cost}
            print(f"{task.name} seed={seed} {name}: lr={res['lr']:.3g} ratio={res['ratio']:g} "
                  f"test={res['test']:.4f} (LoRA best {ref.test.get(seed, math.nan):.4f})", flush=True)
            done[name] = res
            E._save(path, data)
    data["summary"] = summarize(data)
    E._save(path, data)
    return data


def summarize(data: dict[str, Any]) -> dict[str, Any]:
    """Per method: paired test-loss differences to the best swept plain LoRA, relative to its mean,
    with a 95 % t-interval; the probe's cost in steps, as runs and as a share of the sweep."""
    meta = data["meta"]
    ref = {int(k): v for k, v in meta["reference"]["test"].items()}
    out: dict[str, Any] = {"reference_lr": meta["reference"]["lr"]}
    for name in METHODS:
        rows = [(int(s), r["methods"][name]) for s, r in data["seeds"].items() if name in r["methods"]]
        rows = [(s, m) for s, m in rows if s in ref]
        if not rows:
            continue
        ours, base = [S.fin(m["test"]) for _, m in rows], [ref[s] for s, _ in rows]
        p = S.paired(ours, base)
        mean = statistics.fmean(base)
        cost = statistics.fmean(m["probe_steps"] for _, m in rows)
        out[name] = {"n": p.n, "seeds": [s for s, _ in rows], "test": ours, "lr": [m["lr"] for _, m in rows],
                     "ratio": [m["ratio"] for _, m in rows],
                     "ratio_counts": {f"{r:g}": sum(m["ratio"] == r for _, m in rows)
                                      for r in sorted({m["ratio"] for _, m in rows})},
                     "diverged": sum(bool(m["diverged"]) for _, m in rows),
                     "ref_test_mean": mean, "rel_diff_mean": p.mean / mean, "rel_ci95": [p.low / mean, p.high / mean],
                     "lower_than_ref": p.wins, "lr_over_ref": [m["lr"] / meta["reference"]["lr"] for _, m in rows],
                     "within_goal": p.mean / mean <= GOAL and p.high / mean < 0.05, "within_bar": p.mean / mean <= BAR,
                     "probe_steps_mean": cost, "probe_runs": cost / meta["steps"],
                     "probe_share_of_sweep": cost / meta["reference"]["sweep_steps"]}
    return out


# ------------------------------------------------------------------------------------ the law's fit


def law_fits(sweeps: Path = SWEEPS) -> dict[str, Any]:
    """Per study-v2 task: the best swept A rate of plain LoRA and of each LoRA+ λ (picked on
    validation), and the least-squares slope of log2(rate) on log2(λ); ``alpha`` is minus the
    slope, the exponent of ``lora_lr × λ^-alpha``. Then the median over tasks."""
    out: dict[str, Any] = {"tasks": {}}
    for task in (*V.MINILM_TASKS, *V.WIDTH_TASKS):
        best = {}
        for method in V.tasks_methods(task):
            runs = _cell(sweeps, task, method)
            if runs and (method == "lora" or method.startswith("loraplus")):
                best[V.ratio_of(method)] = S.select(runs).best_lr
        if len(best) < 3 or 1.0 not in best:
            continue
        lams = sorted(best)
        fit = S.fit_loglog(lams, [best[x] for x in lams])
        out["tasks"][task] = {"best_lr": {f"{x:g}": best[x] for x in lams}, "alpha": -fit.slope,
                              "ci95": [-fit.high, -fit.low], "n": fit.n}
    alphas = sorted(v["alpha"] for v in out["tasks"].values())
    out["median_alpha"] = statistics.median(alphas) if alphas else None
    return out


# ------------------------------------------------------------------------------------------ report

LABELS = {"find_lr": "`find_lr` (defaults)", "law": "`find_lr(lora_lr=…)`, λ 4",
          "law_confirm": "`find_lr(lora_lr=…)`, λ 1/4/16 confirmed", "valley": "valley (fastai), λ 4",
          "steepest": "steepest (Lightning), λ 4", "min10": "minimum / 10, λ 4",
          "prodigy_sf": "Prodigy+SF, λ 4, untuned"}


def report(out: Path = OUT) -> str:
    """The one table (markdown): a row per method, a column per task, each cell the relative
    difference in test loss to the best swept plain LoRA with its 95 % interval; then the cost."""
    tasks = [t for t in TASKS if (out / f"{t}.json").exists()]
    data = {t: json.loads((out / f"{t}.json").read_text()) for t in tasks}
    head = [f"{t} (n={data[t]['summary'].get('find_lr', {}).get('n', 0)})" for t in tasks]
    lines = ["| method | " + " | ".join(head) + " | probe, runs |", "|---" * (len(tasks) + 2) + "|"]
    for name in METHODS:
        cells = []
        for t in tasks:
            c = data[t]["summary"].get(name)
            cells.append("–" if c is None else
                         f"{100 * c['rel_diff_mean']:+.1f} % [{100 * c['rel_ci95'][0]:+.1f}, {100 * c['rel_ci95'][1]:+.1f}]")
        costs = [data[t]["summary"][name]["probe_runs"] for t in tasks if name in data[t]["summary"]]
        cost = f"{min(costs):.2f}–{max(costs):.2f}" if costs else "–"
        lines.append(f"| {LABELS[name]} | " + " | ".join(cells) + f" | {cost} |")
    table = "\n".join(lines)
    if tasks:
        (out / "table.md").write_text(table + "\n")
    return table


def write_law(out: Path = OUT, command: str = "python -m benchmarks.studies.find_lr.compare law") -> dict[str, Any]:
    fits = {"meta": {**provenance(), "command": command}, **law_fits()}
    E._save(out / "law.json", fits)
    return fits


def quick(tmp: Path) -> dict[str, Any]:
    """The demo at its quick preset, 1 seed, a 60-step probe: the machinery end to end."""
    return run_task(DemoTask(quick=True), Path(tmp), "python -m benchmarks.studies.find_lr.compare --quick", quick=True)


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("what", nargs="?", choices=("run", "report", "law"), default="report")
    ap.add_argument("tasks", nargs="*", help=", ".join(TASKS))
    ap.add_argument("--quick", metavar="DIR", default=None, help="a tiny end-to-end run into DIR")
    return ap


def main(argv: list[str]) -> None:
    a = parser().parse_args(argv)
    if a.quick:
        print(json.dumps(quick(Path(a.quick))["summary"], indent=1))
        return
    if a.what == "law":
        print(json.dumps(write_law(OUT, "python -m benchmarks.studies.find_lr.compare law")["tasks"], indent=1))
        return
    if a.what == "run":
        for name in a.tasks:
            run_task(task_of(name), OUT, "python -m benchmarks.studies.find_lr.compare " + " ".join(argv))
    print(report())


if __name__ == "__main__":
    main(sys.argv[1:])
