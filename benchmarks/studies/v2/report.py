"""Study v2's report: the cell files → summary.json, report.md, PLAN.md and the figures; and the smoke run.

Selection and statistics come from ``common.stats`` (tested against hand-computed values); this module
only gathers the records, renders them and draws.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from benchmarks import DOCS_IMG
from benchmarks.common import stats as S
from benchmarks.common.provenance import provenance
from benchmarks.studies.v2 import run as V

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


def task_summary(task: str, cells: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Every method of a task at its validation-picked lr, paired against plain LoRA."""
    order = [m for m in V.tasks_methods(task) if m in cells] + sorted(m for m in cells if m not in V.tasks_methods(task))
    if task in V.WIDTH_TASKS:
        order.sort(key=V.ratio_of)
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


def width_summary(tasks: dict[str, dict[str, Any]], task_names: Sequence[str] = V.WIDTH_TASKS) -> dict[str, Any]:
    """Best λ per width (on validation; λ band on test), and the log–log slope of best λ on width.

    ``task_names``: the width tasks to read, in order (the GPU kit adds widths beyond the study's)."""
    per: dict[str, Any] = {}
    for task in task_names:
        t = tasks.get(task)
        if not t:
            continue
        ms = t["methods"]
        lam = {V.ratio_of(m): s for m, s in ms.items()}
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


def task_table(task: str, t: dict[str, Any]) -> str:
    lines = ["| method | best lr (grid) | test loss: mean ± sd | vs LoRA, paired: mean [95 % CI] | wins | band 2 % "
             "| band 5 % | test loss at LoRA's lr | steps to target |", "|---" * 9 + "|"]
    for m, s in t["methods"].items():
        grid = ", ".join(f"{x:g}" for x in s["grid"])
        lr = f"{s['best_lr']:g}" + (" **edge**" if s["on_edge"] else "") + ("" if s["complete"] else " (grid not complete)")
        d = s.get("diff")
        diff = "–" if not d else f"{d['mean']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}]"
        wins = "–" if not d else f"{d['wins']}/{d['n']}"
        lines.append(f"| {V.label(m)} | {lr} ({grid}) | {s['mean']:.3f} ± {s['std']:.3f} | {diff} | {wins} "
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


def plot_task(task: str, t: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 4.5))
    for m, s in t["methods"].items():
        xs = s["grid"]
        ys = [s["test_by_lr"][str(x)] for x in xs]
        line, = ax.plot(xs, ys, marker="o", ms=3, label=V.label(m), lw=2.2 if m == "lora" else 1.2,
                        color="black" if m == "lora" else None)
        ax.fill_between(xs, [s["test_min_by_lr"][str(x)] for x in xs], [s["test_max_by_lr"][str(x)] for x in xs],
                        color=line.get_color(), alpha=0.12)
    ax.set_xscale("log")
    lo = min(min(s["test_by_lr"].values()) for s in t["methods"].values())
    ax.set_ylim(lo * 0.97, lo * (1.25 if task in V.WIDTH_TASKS else 1.8))
    ax.set_xlabel("learning rate of A (B gets λ ×)")
    ax.set_ylabel("test loss (seed mean; band: min–max of seeds)")
    ax.set_title(f"study v2, {task}", fontsize=10)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_width(w: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def _seconds_per_run(task: str, tasks: dict[str, Any]) -> float:
    t = tasks.get(task)
    if t:
        return statistics.median(s["seconds_per_run"] for s in t["methods"].values())
    if task in V.WIDTH_TASKS:
        w = int(task[5:])
        measured = {int(k[5:]): statistics.median(s["seconds_per_run"] for s in tasks[k]["methods"].values())
                    for k in tasks if k in V.WIDTH_TASKS}
        if measured:
            w0 = max(measured)
            return measured[w0] * (w / w0) ** 2  # step cost ∝ width² at these sizes
        return DEFAULT_RUN_SECONDS[w]
    measured = [s["seconds_per_run"] for k, t in tasks.items() if k in V.MINILM_TASKS for s in t["methods"].values()]
    return statistics.median(measured) if measured else DEFAULT_RUN_SECONDS["minilm"]


def plan(cells: dict[str, dict[str, Any]], tasks: dict[str, Any], workers: int = 2) -> list[dict[str, Any]]:
    """Remaining commands in the order to run them, with estimated wall time (``workers`` at a time)."""
    rows = []
    first = ("lora", "loraplus4", "loraplus16")
    for task in (*V.WIDTH_TASKS, *V.MINILM_TASKS):
        have = cells.get(task, {})
        sec = _seconds_per_run(task, tasks)
        if task in V.WIDTH_TASKS:
            done = bool(have) and all(d["meta"].get("complete") for d in have.values())
            w = tasks.get("width", {}).get("per_width", {}).get(task[5:], {})
            # ``run widthN all`` stops where the best λ is interior, or λ = 1 (smaller λ are not run)
            if done and (not w.get("best_ratio_on_edge", True) or w.get("best_ratio") == 1.0):
                continue
            n_left = sum(max(0, 8 - len(have[m]["runs"]) if m in have else 8) for m in V.tasks_methods(task))
            # ``run`` pretrains first when the model is not in the cache (outside the repository)
            cmds = [f"python -m benchmarks.studies.v2.run run {task} all"]
            rows.append({"commands": cmds, "runs_left_estimate": n_left, "seconds_per_run": sec,
                         "wall_minutes_estimate": n_left * sec / workers / 60})
            continue
        ordered = [*first, *(m for m in V.METHODS if m not in first)]
        for m in ordered:
            d = have.get(m)
            if d and d["meta"].get("complete"):
                continue
            n_left = max(0, 6 * V.BASE_SEEDS - (len(d["runs"]) if d else 0))
            rows.append({"commands": [f"python -m benchmarks.studies.v2.run run {task} {m}"], "runs_left_estimate": n_left,
                         "seconds_per_run": sec, "wall_minutes_estimate": n_left * sec / workers / 60})
        t = tasks.get(task)
        if t:
            for m, s in t["methods"].items():
                if s.get("needs_10_seeds") and len(s["seed_ids"]) < 10:
                    for mm in (m, "lora"):
                        rows.append({"commands": [f"python -m benchmarks.studies.v2.run run {task} {mm} --seeds 10"],
                                     "runs_left_estimate": 5, "seconds_per_run": sec,
                                     "wall_minutes_estimate": 5 * sec / workers / 60})
    seen, out = set(), []
    for r in rows:
        key = tuple(r["commands"])
        if key not in seen:
            seen.add(key)
            out.append(r)
    return out


def plan_md(rows: list[dict[str, Any]]) -> str:
    total = sum(r["wall_minutes_estimate"] for r in rows)
    lines = ["# Study v2: commands still to run", "",
             "Generated by `python -m benchmarks.studies.v2.run report` from the cell files in this folder; run them in "
             "this order (width family first, then the MiniLM cells), then the report command again. Each "
             "command resumes where it stopped; estimates assume 2 worker processes on 2 CPU cores, and a "
             "MiniLM cell's 6 rates × 5 seeds (3 starting rates, one ×2 extension, two ×√2 refinements).", "",
             "| # | command(s) | runs left (estimate) | s/run | wall time (estimate) |", "|---|---|---|---|---|"]
    for i, r in enumerate(rows, 1):
        cmds = "<br>".join(f"`{c}`" for c in r["commands"])
        lines.append(f"| {i} | {cmds} | {r['runs_left_estimate']} | {r['seconds_per_run']:.0f} | "
                     f"{r['wall_minutes_estimate']:.0f} min |")
    lines.append(f"\nIn all about {total / 60:.1f} h of wall time, then `python -m benchmarks.studies.v2.run report`.")
    return "\n".join(lines) + "\n"


# ------------------------------------------------------------------------------------------- report


def _public(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _public(v) for k, v in x.items() if not str(k).startswith("_")}
    return x


def report(out: Path, img_dir: Path | None = None, write_plan: bool = True) -> dict[str, Any]:
    img_dir = img_dir or DOCS_IMG
    cells = load_all(out)
    tasks = {task: task_summary(task, cs) for task, cs in cells.items()}
    files = {}
    for task, cs in cells.items():
        for m, d in cs.items():
            mm = d["meta"]
            files[f"{task}__{m}.json"] = {"runs": len(d["runs"]), "wall_seconds": mm.get("wall_seconds", 0.0),
                                          "commands": mm.get("commands", []), "complete": mm.get("complete", False),
                                          "versions": mm.get("versions"), "machine": mm.get("machine")}
    width = width_summary(tasks)
    summary: dict[str, Any] = {"command": "python -m benchmarks.studies.v2.run report", "method": V.__doc__,
                               "provenance": provenance(["report"], module="benchmarks.studies.v2.run"),
                               "files": files, "tasks": {k: _public(v) for k, v in tasks.items()}, "width": width,
                               "totals": {"files": len(files), "runs": sum(f["runs"] for f in files.values()),
                                          "wall_seconds": sum(f["wall_seconds"] for f in files.values())}}
    rows = plan(cells, {**tasks, "width": width})
    summary["plan"] = rows
    md = ["# Study v2 report", "", "Generated by `python -m benchmarks.studies.v2.run report`.", ""]
    img_dir.mkdir(parents=True, exist_ok=True)
    for task in [*V.WIDTH_TASKS, *V.MINILM_TASKS]:
        if task in tasks:
            plot_task(task, tasks[task], img_dir / f"v2_{task}.png")
            ov = tasks[task]["data"].get("held_out_overlap")
            md += [f"## {task}", "", task_table(task, tasks[task]), "", f"held-out windows with an exact copy in the "
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
        (out / "PLAN.md").write_text(plan_md(rows))
    return summary


# -------------------------------------------------------------------------------------------- quick


def quick(tmp: Path) -> dict[str, Any]:
    """Every method for 2 steps on tiny settings, the width family's machinery on a 3-step pretraining,
    then the report — all into ``tmp`` (the width-family cache too)."""
    tmp = Path(tmp)
    old = os.environ.get("LORAPLUS_CACHE")
    os.environ["LORAPLUS_CACHE"] = str(tmp / "cache")
    try:
        out = tmp / "results"
        tiny = V.Settings(steps=2, batch=4, seeds=2, start=(0,), refine=False, k_min=0, k_max=0, n_eval=16, smooth=1)
        for m in V.METHODS:
            V.run_cell("order_B0", m, out, "quick", workers=1, st=tiny)
        wtiny = replace(tiny, width=64, pretrain_steps=3, start=(8,), k_min=8, k_max=8)
        V.run_task("width64", out, "quick", workers=1, methods=("lora", "loraplus2"), st_of=lambda t, m: wtiny)
        return report(out, img_dir=tmp / "img")
    finally:
        if old is None:
            os.environ.pop("LORAPLUS_CACHE", None)
        else:
            os.environ["LORAPLUS_CACHE"] = old
