"""Reports of the studies on MiniLM and the width family: what their result files say, as tables, figures and summaries.

* Study 1 and the adapter study (``minilm_report``, ``adapters_report``): best-vs-best per configuration,
  ``results/minilm_summary.json`` / ``adapters_summary.json`` and ``docs/img/minilm_*.png`` / ``adapters.png``;
  the protocol is ``STUDY1_METHOD``.
* Study v2 (``report``): every cell file → ``summary.json``, ``report.md``, ``PLAN.md`` and ``docs/img/v2_*.png``;
  what it needs of the study's design (tasks, methods, labels) comes in as a :class:`Design`
  (``benchmarks.studies.v2.run.DESIGN``), so this module imports no study.

Selection and statistics come from ``benchmarks.common.stats`` (one implementation for both studies, tested
against hand-computed values); this module only gathers the records, renders them and draws.
"""

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from benchmarks import DOCS_IMG
from benchmarks.common import stats as S
from benchmarks.common.provenance import provenance

__all__ = ["DOCS_IMG", "STUDY1_METHOD", "Design", "adapters_report", "grid_table", "load", "load_all",
           "method_summary", "minilm_report", "plan", "plan_md", "ratio_table", "report", "task_summary",
           "task_table", "width_summary", "width_table"]

#: Study 1's protocol as its summaries record it (``"method"``), for study 1 and the adapter study.
STUDY1_METHOD = """Tables and figures from the MiniLM sweeps (``benchmarks/studies/v1/results/minilm_*.json``, ``benchmarks/studies/adapters/results/adapters*.json``).

Best-vs-best: for every configuration (λ, init, family, ...) the learning rate is picked on
the *training stream* — the seed-mean of the last ``SELECT_LAST`` per-step training losses,
each measured on a fresh batch before the model steps on it (no window repeats within a run) —
and the fixed held-out set (disjoint from the stream by index; about 30 % of its windows have an
identical copy in the stream, ``benchmarks/checks/window_overlap.py``) is only used to report that lr's seeds:
mean ± sd, min–max, and the paired-by-seed difference to λ=1 (same seed: same adapter and head init and
batch order) with its 95 % t-interval and the number of seeds where λ beats λ=1. A best lr at
either end of its grid is flagged "edge, not best-vs-best".

Steps to target, per seed: the target is the highest of every configuration's lowest smoothed
training loss within the first 75 % of the run, so every configuration reaches it on every
seed; speed-up = λ=1's steps / λ's steps, median and range over seeds.
"""


@dataclass(frozen=True)
class Design:
    """What study v2's report reads of the study's design; ``benchmarks.studies.v2.run.DESIGN`` is the study's."""

    module: str  #: the runner: ``python -m <module> report`` (and ``run``) in the report, the plan and the provenance
    method: str  #: the protocol, recorded in summary.json as ``"method"``
    minilm_tasks: tuple[str, ...]
    width_tasks: tuple[str, ...]
    methods: tuple[str, ...]
    base_seeds: int
    tasks_methods: Callable[[str], tuple[str, ...]]  #: the methods a task runs, in the report's order
    ratio_of: Callable[[str], float]  #: a method's λ
    label: Callable[[str], str]  #: a method's name in tables and figures


def _pyplot() -> Any:
    """matplotlib's pyplot on the Agg backend (files only, no display)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


# ----------------------------------------------------------------------------- study 1 and the adapter study


def load(results: Path, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = results / name
    if not path.exists():
        return {}, []
    data = json.loads(path.read_text())
    return data["meta"], data["runs"]


def fmt(b: dict[str, Any]) -> str:
    return f"{b['mean']:.3f} ± {b['std']:.3f} ({b['min']:.3f}–{b['max']:.3f})"


def fmt_diff(b: dict[str, Any]) -> str:
    d = b["diff"]
    return f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], {d['wins']}/{d['n']}"


def fmt_speedup(b: dict[str, Any]) -> str:
    got = sorted(v for v in b["speedup_per_seed"] if v is not None)
    if not got:
        return "–"
    return f"{statistics.median(got):.2f}× ({got[0]:.2f}–{got[-1]:.2f})"


def edge(b: dict[str, Any]) -> str:
    return " (edge, not best-vs-best)" if b["lr_on_edge"] else ""


def ratio_table(runs: list[dict], title: str) -> tuple[str, dict[float, dict[str, Any]]]:
    """Markdown table of best-vs-best per λ: held-out loss, paired difference to λ=1, speed-up."""
    by = S.group_runs(runs, lambda c: c["ratio"])
    bests = {lam: S.best(by[lam]) for lam in sorted(by)}
    S.compare_to_base(bests, 1.0)
    lines = [
        f"**{title}**",
        "",
        "| λ | best lr(A) | held-out loss: mean ± sd (min–max) | vs λ=1, paired: mean [95 % CI], wins | accuracy | speed-up to target: median (range) |",
        "|---|---|---|---|---|---|",
    ]
    for lam, b in bests.items():
        diff = "–" if lam == 1.0 else fmt_diff(b)
        sp = "1.00×" if lam == 1.0 else fmt_speedup(b)
        lines.append(f"| {lam:g} | {b['lr']:g}{edge(b)} | {fmt(b)} | {diff} | {b['acc']:.3f} | {sp} |")
    first = bests[next(iter(bests))]
    targets = first.get("seed_targets", [])
    lines.append("")
    lines.append(
        f"({first['seeds']} seeds per cell, paired by seed; lr picked on the training stream, loss on the held-out "
        f"set; per-seed targets {', '.join(f'{t:.3f}' for t in targets)}.)"
    )
    return "\n".join(lines), bests


def grid_table(runs: list[dict]) -> str:
    """Seed-mean held-out loss for every (λ, lr): the sensitivity to λ and to lr."""
    by = S.group_runs(runs, lambda c: c["ratio"])
    lrs = sorted({r["config"]["lr"] for r in runs})
    lines = ["| λ \\ lr(A) | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for lam in sorted(by):
        cells = []
        for lr in lrs:
            rs = by[lam].get(lr)
            cells.append(f"{statistics.fmean(S.fin(r['eval_loss']) for r in rs):.3f}" if rs else "–")
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_curves(panels: list[tuple[str, dict[float, dict]]], path: Path) -> None:
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, (title, bests) in zip(axes[0], panels):
        for lam, b in bests.items():
            if b["curve"]:
                ax.plot(range(1, len(b["curve"]) + 1), b["curve"], label=f"λ={lam:g} (lr={b['lr']:g})",
                        lw=2.2 if lam == 1 else 1.3, color="black" if lam == 1 else None)
        ax.set_title(title, fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (15-step mean, mean of seeds)")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_ratio(series: list[tuple[str, dict[float, dict]]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    for label, bests in series:
        lams = list(bests)
        ax.errorbar(lams, [bests[lam]["mean"] for lam in lams], yerr=[bests[lam]["std"] for lam in lams], marker="o",
                    capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("λ = lr(B) / lr(A)")
    ax.set_ylabel("held-out loss, each λ at its best lr (mean ± sd)")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.15), ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _strip(b: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in b.items() if k not in ("curve", "seed_curves")}


def minilm_report(results: Path) -> dict[str, Any]:
    """Study 1's tables and figures from ``results/minilm_*.json``; writes ``results/minilm_summary.json``."""
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    parts = {
        "main": ("minilm_main.json", "B=0 init (PEFT default), r=8 on query/value, hard task"),
        "a0": ("minilm_a0.json", "A=0 init (paper), r=8 on query/value, hard task"),
        "all_linear": ("minilm_all_linear.json", "B=0 init, r=8 on all linear layers, hard task"),
        "easy": ("minilm_easy.json", "B=0 init, r=8 on query/value, easy control task"),
    }
    summary: dict[str, Any] = {**provenance(["report"], module="benchmarks.studies.v1.run"), "method": STUDY1_METHOD}
    panels, series = [], []
    for part, (name, title) in parts.items():
        meta, runs = load(results, name)
        if not runs:
            continue
        table, bests = ratio_table(runs, title)
        print(table)
        print()
        print(grid_table(runs))
        print()
        summary[part] = {
            "title": title,
            "meta": meta,
            "best": {str(k): _strip(v) for k, v in bests.items()},
            "runs": len(runs),
            "run_seconds": sum(r["seconds"] for r in runs),
        }
        if part in ("main", "a0"):
            panels.append((title, bests))
        series.append((title, bests))
    if panels:
        _plot_curves(panels, DOCS_IMG / "minilm_curves.png")
    if series:
        _plot_ratio(series, DOCS_IMG / "minilm_ratio.png")
    (results / "minilm_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def adapters_report(results: Path) -> dict[str, Any]:
    """The adapter study's table and figure from ``results/adapters.json``; writes ``results/adapters_summary.json``."""
    meta, runs = load(results, "adapters.json")
    plain = [r for r in runs if r["config"]["magnitude"] == "A" and not r["config"]["magnitude_decay"]]
    by = S.group_runs(plain, lambda c: (c["family"], c["ratio"]))
    fams = sorted({k[0] for k in by}, key=["dora", "adalora", "loha", "lokr", "vera"].index)
    summary: dict[str, Any] = {**provenance(["report"], module="benchmarks.studies.adapters.run"), "method": STUDY1_METHOD, "meta": meta,
                               "families": {}}
    lines = [
        "| family | λ | best lr(A) (grid) | held-out loss: mean ± sd (min–max) | vs λ=1, paired: mean [95 % CI], wins | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for fam in fams:
        fb = {lam: S.best(by[(fam, lam)]) for (f, lam) in sorted(by) if f == fam}
        S.compare_to_base(fb, 1.0)
        for lam, b in fb.items():
            delta = fmt_diff(b) if lam != 1.0 and "diff" in b else "–"
            grid = ", ".join(f"{float(x):g}" for x in b["grid"])
            lines.append(f"| {fam} | {lam:g} | {b['lr']:g}{edge(b)} ({grid}) | {fmt(b)} | {delta} | {b['acc']:.3f} |")
        summary["families"][fam] = {str(k): _strip(v) for k, v in fb.items()}
    print("\n".join(lines))
    # DoRA magnitude variants at one (λ, lr)
    dora = [r for r in runs if r["config"]["family"] == "dora"]
    variants = defaultdict(list)
    mags = {(r["config"]["magnitude"], r["config"]["magnitude_decay"]) for r in dora if r["config"]["magnitude"] != "A" or r["config"]["magnitude_decay"]}
    if mags:
        ref = next(r["config"] for r in dora if r["config"]["magnitude"] != "A" or r["config"]["magnitude_decay"])
        for r in dora:
            c = r["config"]
            if c["ratio"] == ref["ratio"] and c["lr"] == ref["lr"]:
                variants[(c["magnitude"], c["magnitude_decay"])].append(S.fin(r["eval_loss"]))
        print()
        print(f"DoRA magnitude at λ={ref['ratio']:g}, lr(A)={ref['lr']:g}:")
        print("| magnitude lr | weight decay on magnitude | held-out loss: mean ± sd (min–max) |")
        print("|---|---|---|")
        summary["dora_magnitude"] = {}
        for (mag, dec), ls in sorted(variants.items()):
            lr_txt = "lr" if mag == "A" else "λ·lr"
            m, s = statistics.fmean(ls), statistics.stdev(ls) if len(ls) > 1 else 0.0
            print(f"| {lr_txt} | {'0.1' if dec else '0'} | {m:.3f} ± {s:.3f} ({min(ls):.3f}–{max(ls):.3f}) |")
            summary["dora_magnitude"][f"{lr_txt}, decay={dec}"] = {"mean": m, "std": s, "losses": ls}
    _plot_adapters(summary)
    (results / "adapters_summary.json").write_text(json.dumps(summary, indent=1))
    return summary


def _plot_adapters(summary: dict[str, Any]) -> None:
    plt = _pyplot()
    fams = list(summary["families"])
    if not fams:
        return
    fig, ax = plt.subplots(figsize=(7, 3.8))
    lams = sorted({float(lam) for f in fams for lam in summary["families"][f]})
    width = 0.8 / len(lams)
    for j, lam in enumerate(lams):
        xs, ys, es = [], [], []
        for i, f in enumerate(fams):
            b = summary["families"][f].get(str(lam))
            if b:
                xs.append(i + j * width)
                ys.append(b["mean"])
                es.append(b["std"])
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=f"λ={lam:g}")
    ax.set_xticks([i + width * (len(lams) - 1) / 2 for i in range(len(fams))], fams)
    ax.set_ylabel("held-out loss at best lr (mean ± sd)")
    ax.set_ylim(bottom=max(0.0, min(b["min"] for f in fams for b in summary["families"][f].values()) - 0.1))
    ax.legend(fontsize=8)
    fig.tight_layout()
    DOCS_IMG.mkdir(parents=True, exist_ok=True)
    fig.savefig(DOCS_IMG / "adapters.png", dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------- study v2

TOLS = {"2pct": 0.02, "5pct": 0.05}
#: the width family's losses move little with λ: its λ band is also given at 0.5 %
WIDTH_TOLS = {"0.5pct": 0.005, "2pct": 0.02, "5pct": 0.05}
#: seconds per run assumed in PLAN.md where a task has no measured run yet
DEFAULT_RUN_SECONDS = {"minilm": 35.0, 32: 3.0, 64: 6.0, 128: 15.0, 256: 50.0, 512: 200.0}


def load_all(out: Path) -> dict[str, dict[str, dict[str, Any]]]:
    cells: dict[str, dict[str, dict[str, Any]]] = {}
    for f in sorted(out.glob("*__*.json")):
        d = json.loads(f.read_text())
        cells.setdefault(d["meta"]["task"], {})[d["meta"]["method"]] = d
    return cells


def _band_dict(b: S.Band) -> dict[str, Any]:
    return asdict(b)


def method_summary(d: dict[str, Any]) -> dict[str, Any]:
    st = d["meta"]["settings"]
    base = list(range(st["seeds"]))
    sel = S.select(d["runs"], base)
    at_best = sorted((r for r in d["runs"] if r["lr"] == sel.best_lr and not r.get("extra")), key=lambda r: r["seed"])
    by_lr: dict[float, list[dict]] = {}
    for r in d["runs"]:
        if r["seed"] in base and not r.get("extra"):
            by_lr.setdefault(r["lr"], []).append(r)
    return {
        "best_lr": sel.best_lr, "on_edge": sel.on_edge, "complete": d["meta"].get("complete", False),
        "grid": sel.lrs, "selection_seeds": sel.seeds,
        "val_by_lr": {str(k): v for k, v in sel.val.items()}, "test_by_lr": {str(k): v for k, v in sel.test.items()},
        "test_min_by_lr": {str(k): min(S.fin(r["test_loss"]) for r in rs) for k, rs in sorted(by_lr.items())},
        "test_max_by_lr": {str(k): max(S.fin(r["test_loss"]) for r in rs) for k, rs in sorted(by_lr.items())},
        "diverged_by_lr": {str(k): v for k, v in sel.diverged.items()},
        "bands": {name: _band_dict(S.band(sel.test, tol)) for name, tol in TOLS.items()},
        "seed_ids": [r["seed"] for r in at_best], "per_seed": [S.fin(r["test_loss"]) for r in at_best],
        "mean": statistics.fmean(S.fin(r["test_loss"]) for r in at_best),
        "std": statistics.stdev([S.fin(r["test_loss"]) for r in at_best]) if len(at_best) > 1 else 0.0,
        "seconds_per_run": statistics.median(r["seconds"] for r in d["runs"]),
        "_curves": {r["seed"]: r["curve"] for r in at_best},
    }


def task_summary(task: str, cells: dict[str, dict[str, Any]], design: Design) -> dict[str, Any]:
    """Every method of a task at its validation-picked lr, paired against plain LoRA."""
    order = [m for m in design.tasks_methods(task) if m in cells] + sorted(m for m in cells if m not in design.tasks_methods(task))
    if task in design.width_tasks:
        order.sort(key=design.ratio_of)
    ms = {m: method_summary(cells[m]) for m in order}
    any_meta = cells[order[0]]["meta"]
    out: dict[str, Any] = {"methods": ms, "data": any_meta.get("data", {}), "settings": any_meta["settings"]}
    lora = ms.get("lora")
    if lora:
        out["lora_best_lr"] = lora["best_lr"]
        base_n = any_meta["settings"]["seeds"]
        for m, s in ms.items():
            at = [r for r in cells[m]["runs"] if math.isclose(r["lr"], lora["best_lr"], rel_tol=1e-9) and r["seed"] < base_n]
            s["test_at_lora_lr"] = statistics.fmean(S.fin(r["test_loss"]) for r in at) if len(at) == base_n else None
            if m == "lora":
                continue
            common = sorted(set(s["seed_ids"]) & set(lora["seed_ids"]))
            a = [s["per_seed"][s["seed_ids"].index(i)] for i in common]
            b = [lora["per_seed"][lora["seed_ids"].index(i)] for i in common]
            if len(common) >= 2:
                p = S.paired(a, b)
                s["diff"] = {"per_seed": p.diffs, "mean": p.mean, "ci95": [p.low, p.high], "wins": p.wins, "n": p.n,
                             "seeds": common}
                first = [i for i in common if i < base_n]
                p5 = S.paired([a[common.index(i)] for i in first], [b[common.index(i)] for i in first])
                s["needs_10_seeds"] = S.needs_more_seeds(p5, statistics.fmean(b[: len(first)]))
    # steps to target on the seed-mean curve of every method at its chosen lr (seeds all methods have)
    k = any_meta["settings"]["smooth"]
    seeds = sorted(set.intersection(*(set(s["_curves"]) for s in ms.values())))
    curves = {}
    for m, s in ms.items():
        cs = [s["_curves"][i] for i in seeds]
        if cs and all(len(c) >= k for c in cs):
            curves[m] = S.mean_curve(cs, k)
    if curves:
        tgt = S.target(curves)
        out["target"] = {"loss": tgt, "smooth": k, "seeds": seeds,
                         "definition": "highest of every method's lowest seed-mean trailing-mean training loss "
                                       "within the first 75 % of the run (on the seed-mean curve, not per seed)"}
        for m, c in curves.items():
            ms[m]["steps_to_target"] = S.steps_to_target(c, tgt, k)
            ms[m]["_mean_curve"] = c
    return out


def width_summary(tasks: dict[str, dict[str, Any]], design: Design, task_names: Sequence[str] | None = None) -> dict[str, Any]:
    """Best λ per width (on validation; λ band on test), and the log–log slope of best λ on width.

    ``task_names``: the width tasks to read, in order (default: the study's; the GPU kit adds widths beyond them)."""
    per: dict[str, Any] = {}
    for task in design.width_tasks if task_names is None else task_names:
        t = tasks.get(task)
        if not t:
            continue
        ms = t["methods"]
        lam = {design.ratio_of(m): s for m, s in ms.items()}
        val = {x: s["val_by_lr"][str(s["best_lr"])] for x, s in lam.items()}
        test = {x: s["test_by_lr"][str(s["best_lr"])] for x, s in lam.items()}
        grid = sorted(lam)
        best = min(grid, key=lambda x: (val[x], x))
        interp = 2 ** S.parabolic_min([math.log2(x) for x in grid], [val[x] for x in grid])
        per[str(t["settings"]["width"])] = {
            "width": t["settings"]["width"], "ratios": grid, "best_ratio": best, "best_ratio_interp": interp,
            "best_ratio_on_edge": len(grid) > 1 and best in (grid[0], grid[-1]),
            "complete": all(s["complete"] for s in ms.values()),
            "val_at_best_lr": {str(x): val[x] for x in grid}, "test_at_best_lr": {str(x): test[x] for x in grid},
            "best_lr": {str(x): lam[x]["best_lr"] for x in grid},
            "lr_on_edge": {str(x): lam[x]["on_edge"] for x in grid},
            "ratio_bands": {name: asdict(S.contiguous_band(test, tol)) for name, tol in WIDTH_TOLS.items()},
            "gain_vs_lora": (test[1.0] - test[best]) / test[1.0] if 1.0 in test else None,
            "seeds": t["methods"][next(iter(ms))]["selection_seeds"],
        }
    out: dict[str, Any] = {"per_width": per, "paper_slope": 1.0,
                           "paper_prediction": "λ* = Θ(width) under Adam (slope 1 of log λ* on log width)"}
    ok = [p for p in per.values() if p["complete"] and not p["best_ratio_on_edge"]]  # a cut-short sweep is left out
    if len(ok) >= 2:
        ws = [p["width"] for p in ok]
        for key, field in (("fit_interp", "best_ratio_interp"), ("fit_grid", "best_ratio")):
            f = S.fit_loglog(ws, [p[field] for p in ok])
            out[key] = {"slope": f.slope, "ci95": [f.low, f.high], "n": f.n, "widths": ws}
    out["widths_left_out"] = sorted(p["width"] for p in per.values() if p not in ok)
    return out


# ------------------------------------------------------------------------------------------ rendering


def _g(x: float | None, fmt: str = ".3f") -> str:
    return "–" if x is None else format(x, fmt)


def _band_txt(b: dict[str, Any]) -> str:
    lo, hi = f"{b['lo']:g}", f"{b['hi']:g}"
    if b["open"]:
        return f"≥ {b['factor']:g}× ({lo}–{hi}, grid edge)"
    if b["factor"] == 1:
        return f"one rate ({lo}; < {b['bound']:g}×)"
    return f"{b['factor']:g}× ({lo}–{hi}; < {b['bound']:g}×)"


def task_table(task: str, t: dict[str, Any], design: Design) -> str:
    lines = ["| method | best lr (grid) | test loss: mean ± sd | vs LoRA, paired: mean [95 % CI] | wins | band 2 % "
             "| band 5 % | test loss at LoRA's lr | steps to target |", "|---" * 9 + "|"]
    for m, s in t["methods"].items():
        grid = ", ".join(f"{x:g}" for x in s["grid"])
        lr = f"{s['best_lr']:g}" + (" **edge**" if s["on_edge"] else "") + ("" if s["complete"] else " (grid not complete)")
        d = s.get("diff")
        diff = "–" if not d else f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        wins = "–" if not d else f"{d['wins']}/{d['n']}"
        lines.append(f"| {design.label(m)} | {lr} ({grid}) | {s['mean']:.3f} ± {s['std']:.3f} | {diff} | {wins} "
                     f"| {_band_txt(s['bands']['2pct'])} | {_band_txt(s['bands']['5pct'])} "
                     f"| {_g(s.get('test_at_lora_lr'))} | {s.get('steps_to_target', '–')} |")
    tg = t.get("target")
    note = (f"target {tg['loss']:.3f}: {tg['definition']}; trailing mean of {tg['smooth']} steps"
            if tg else "no target")
    seeds = {len(s["seed_ids"]) for s in t["methods"].values()}
    lines.append(f"\n(lr picked on validation (seeds 0–{t['settings']['seeds'] - 1}), test loss reported at it "
                 f"({'/'.join(map(str, sorted(seeds)))} seeds); {note}; bands at the ×2 resolution on the "
                 "seed-mean test loss.)")
    return "\n".join(lines)


def width_table(w: dict[str, Any]) -> str:
    lines = ["| width | λ run | best λ (val) | λ* (parabola) | λ band 0.5 % | λ band 2 % | test loss at best λ | "
             "gain vs λ=1 | complete |", "|---" * 9 + "|"]
    for p in w["per_width"].values():
        b05, b2 = p["ratio_bands"]["0.5pct"], p["ratio_bands"]["2pct"]
        lines.append(f"| {p['width']} | {', '.join(f'{x:g}' for x in p['ratios'])} | {p['best_ratio']:g}"
                     f"{' **edge**' if p['best_ratio_on_edge'] else ''} | {p['best_ratio_interp']:.2f} "
                     f"| {b05['lo']:g}–{b05['hi']:g}{' (edge)' if b05['open'] else ''} "
                     f"| {b2['lo']:g}–{b2['hi']:g}{' (edge)' if b2['open'] else ''} "
                     f"| {p['test_at_best_lr'][str(p['best_ratio'])]:.4f} "
                     f"| {_g(None if p['gain_vs_lora'] is None else 100 * p['gain_vs_lora'], '.2f')} % "
                     f"| {'yes' if p['complete'] else 'no'} |")
    for key in ("fit_interp", "fit_grid"):
        f = w.get(key)
        if f:
            lines.append(f"\nlog2 λ* on log2 width ({key[4:]}, widths {f['widths']}): slope {f['slope']:.2f} "
                         f"[{f['ci95'][0]:.2f}, {f['ci95'][1]:.2f}] (95 % t, n = {f['n']}); the paper predicts 1.")
    if "fit_interp" not in w:
        lines.append("\n(fewer than two widths with an interior best λ: no slope)")
    return "\n".join(lines)


def plot_task(task: str, t: dict[str, Any], path: Path, design: Design) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m, s in t["methods"].items():
        xs = s["grid"]
        ys = [s["test_by_lr"][str(x)] for x in xs]
        line, = ax.plot(xs, ys, marker="o", ms=3, label=design.label(m), lw=2.2 if m == "lora" else 1.2,
                        color="black" if m == "lora" else None)
        ax.fill_between(xs, [s["test_min_by_lr"][str(x)] for x in xs], [s["test_max_by_lr"][str(x)] for x in xs],
                        color=line.get_color(), alpha=0.12)
    ax.set_xscale("log")
    lo = min(min(s["test_by_lr"].values()) for s in t["methods"].values())
    ax.set_ylim(lo * 0.97, lo * (1.25 if task in design.width_tasks else 1.8))
    ax.set_xlabel("learning rate of A (B gets λ ×)")
    ax.set_ylabel("test loss (seed mean; band: min–max of seeds)")
    ax.set_title(f"study v2, {task}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_width(w: dict[str, Any], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.2))
    ps = list(w["per_width"].values())
    xs = [p["width"] for p in ps]
    b = [p["ratio_bands"]["0.5pct"] for p in ps]
    ys = [p["best_ratio_interp"] for p in ps]
    ax.errorbar(xs, ys, yerr=[[y - bb["lo"] for y, bb in zip(ys, b)], [bb["hi"] - y for y, bb in zip(ys, b)]],
                fmt="o", capsize=4, label="λ* (parabola on validation); bar: λ band within 0.5 % (test)")
    ax.plot(xs, [p["best_ratio"] for p in ps], "x", color="gray", label="grid argmin (validation)")
    if "fit_interp" in w:
        f = w["fit_interp"]
        import numpy as np

        ws = np.array(sorted(xs), dtype=float)
        a = statistics.fmean(math.log2(y) for y, p in zip(ys, ps) if p["width"] in f["widths"]) - f["slope"] * \
            statistics.fmean(math.log2(x) for x in f["widths"])
        ax.plot(ws, 2 ** (a + f["slope"] * np.log2(ws)), "-", label=f"fit: slope {f['slope']:.2f}")
        ax.plot(ws, ys[0] * ws / ws[0], ":", color="gray", label="slope 1 (paper, through the first width)")
    ax.set_xscale("log", base=2)
    ax.set_yscale("log", base=2)
    ax.set_xlabel("width (d_model)")
    ax.set_ylabel("best λ = lr(B) / lr(A)")
    ax.set_title("width family: best λ vs width", fontsize=10)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------- the plan


def _seconds_per_run(task: str, tasks: dict[str, Any], design: Design) -> float:
    t = tasks.get(task)
    if t:
        return statistics.median(s["seconds_per_run"] for s in t["methods"].values())
    if task in design.width_tasks:
        w = int(task[5:])
        measured = {int(k[5:]): statistics.median(s["seconds_per_run"] for s in tasks[k]["methods"].values())
                    for k in tasks if k in design.width_tasks}
        if measured:
            w0 = max(measured)
            return measured[w0] * (w / w0) ** 2  # step cost ∝ width² at these sizes
        return DEFAULT_RUN_SECONDS[w]
    measured = [s["seconds_per_run"] for k, t in tasks.items() if k in design.minilm_tasks for s in t["methods"].values()]
    return statistics.median(measured) if measured else DEFAULT_RUN_SECONDS["minilm"]


def plan(cells: dict[str, dict[str, Any]], tasks: dict[str, Any], design: Design, workers: int = 2) -> list[dict[str, Any]]:
    """Remaining commands in the order to run them, with estimated wall time (``workers`` at a time)."""
    rows = []
    first = ("lora", "loraplus4", "loraplus16")
    for task in (*design.width_tasks, *design.minilm_tasks):
        have = cells.get(task, {})
        sec = _seconds_per_run(task, tasks, design)
        if task in design.width_tasks:
            done = bool(have) and all(d["meta"].get("complete") for d in have.values())
            w = tasks.get("width", {}).get("per_width", {}).get(task[5:], {})
            # ``run widthN all`` stops where the best λ is interior, or λ = 1 (smaller λ are not run)
            if done and (not w.get("best_ratio_on_edge", True) or w.get("best_ratio") == 1.0):
                continue
            n_left = sum(max(0, 8 - len(have[m]["runs"]) if m in have else 8) for m in design.tasks_methods(task))
            # ``run`` pretrains first when the model is not in the cache (outside the repository)
            cmds = [f"python -m {design.module} run {task} all"]
            rows.append({"commands": cmds, "runs_left_estimate": n_left, "seconds_per_run": sec,
                         "wall_minutes_estimate": n_left * sec / workers / 60})
            continue
        ordered = [*first, *(m for m in design.methods if m not in first)]
        for m in ordered:
            d = have.get(m)
            if d and d["meta"].get("complete"):
                continue
            n_left = max(0, 6 * design.base_seeds - (len(d["runs"]) if d else 0))
            rows.append({"commands": [f"python -m {design.module} run {task} {m}"], "runs_left_estimate": n_left,
                         "seconds_per_run": sec, "wall_minutes_estimate": n_left * sec / workers / 60})
        t = tasks.get(task)
        if t:
            for m, s in t["methods"].items():
                if s.get("needs_10_seeds") and len(s["seed_ids"]) < 10:
                    for mm in (m, "lora"):
                        rows.append({"commands": [f"python -m {design.module} run {task} {mm} --seeds 10"],
                                     "runs_left_estimate": 5, "seconds_per_run": sec,
                                     "wall_minutes_estimate": 5 * sec / workers / 60})
    seen, out = set(), []
    for r in rows:
        key = tuple(r["commands"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def plan_md(rows: list[dict[str, Any]], design: Design) -> str:
    total = sum(r["wall_minutes_estimate"] for r in rows)
    lines = ["# Study v2: commands still to run", "",
             f"Generated by `python -m {design.module} report` from the cell files in this folder; run them in "
             "this order (width family first, then the MiniLM cells), then the report command again. Each "
             "command resumes where it stopped; estimates assume 2 worker processes on 2 CPU cores, and a "
             "MiniLM cell's 6 rates × 5 seeds (3 starting rates, one ×2 extension, two ×√2 refinements).", "",
             "| # | command(s) | runs left (estimate) | s/run | wall time (estimate) |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        cmds = "<br>".join(f"`{c}`" for c in r["commands"])
        lines.append(f"| {i} | {cmds} | {r['runs_left_estimate']} | {r['seconds_per_run']:.0f} | "
                     f"{r['wall_minutes_estimate']:.0f} min |")
    lines.append(f"\nIn all about {total / 60:.1f} h of wall time, then `python -m {design.module} report`.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- report


def _public(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _public(v) for k, v in x.items() if not str(k).startswith("_")}
    return x


def report(out: Path, design: Design, img_dir: Path | None = None, write_plan: bool = True) -> dict[str, Any]:
    """Study v2's report: every ``<task>__<method>.json`` cell in ``out`` → ``out/summary.json``, ``out/report.md``,
    ``out/PLAN.md`` (unless ``write_plan`` is false) and the figures in ``img_dir`` (default docs/img)."""
    img_dir = img_dir or DOCS_IMG
    cells = load_all(out)
    tasks = {task: task_summary(task, cs, design) for task, cs in cells.items()}
    files = {}
    for task, cs in cells.items():
        for m, d in cs.items():
            mm = d["meta"]
            files[f"{task}__{m}.json"] = {"runs": len(d["runs"]), "wall_seconds": mm.get("wall_seconds", 0.0),
                                          "commands": mm.get("commands", []), "complete": mm.get("complete", False),
                                          "versions": mm.get("versions"), "machine": mm.get("machine")}
    width = width_summary(tasks, design)
    summary: dict[str, Any] = {"command": f"python -m {design.module} report", "method": design.method,
                               "provenance": provenance(["report"], module=design.module),
                               "files": files, "tasks": {k: _public(v) for k, v in tasks.items()}, "width": width,
                               "totals": {"files": len(files), "runs": sum(f["runs"] for f in files.values()),
                                          "wall_seconds": sum(f["wall_seconds"] for f in files.values())}}
    rows = plan(cells, {**tasks, "width": width}, design)
    summary["plan"] = rows
    md = ["# Study v2 report", "", f"Generated by `python -m {design.module} report`.", ""]
    img_dir.mkdir(parents=True, exist_ok=True)
    for task in [*design.width_tasks, *design.minilm_tasks]:
        if task in tasks:
            plot_task(task, tasks[task], img_dir / f"v2_{task}.png", design)
            ov = tasks[task]["data"].get("held_out_overlap")
            md += [f"## {task}", "", task_table(task, tasks[task], design), "", f"held-out windows with an exact copy in the "
                   f"training text: {ov}", ""]
    if width["per_width"]:
        plot_width(width, img_dir / "v2_best_lambda_vs_width.png")
        md += ["## Width family: best λ per width", "", width_table(width), ""]
    md += ["## Files", "", "| file | runs | wall time | complete | command(s) |", "|---|---|---|---|---|"]
    for name, f in files.items():
        md.append(f"| {name} | {f['runs']} | {f['wall_seconds'] / 60:.1f} min | {'yes' if f['complete'] else 'no'} | "
                  + "<br>".join(f"`{c}`" for c in f["commands"]) + " |")
    tot = summary["totals"]
    md.append(f"\n({tot['files']} files, {tot['runs']} runs, {tot['wall_seconds'] / 60:.0f} min of wall time.)")
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    (out / "report.md").write_text("\n".join(md) + "\n")
    if write_plan:
        (out / "PLAN.md").write_text(plan_md(rows, design))
    return summary
