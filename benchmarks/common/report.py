"""Tables and figures from the MiniLM sweeps (``benchmarks/studies/v1/results/minilm_*.json``, ``benchmarks/studies/adapters/results/adapters*.json``).

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

from __future__ import annotations

import json
import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from benchmarks import DOCS_IMG
from benchmarks.common.minilm import smooth
from benchmarks.common.provenance import provenance
from loraplus._demo import paired

#: Steps at the end of a run whose training losses pick the learning rate.
SELECT_LAST = 15


def load(results: Path, name: str) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    path = results / name
    if not path.exists():
        return {}, []
    data = json.loads(path.read_text())
    return data["meta"], data["runs"]


def _finite(v: float) -> float:
    return v if math.isfinite(v) else 10.0  # a diverged seed counts as a very bad loss


def _select_loss(run: dict[str, Any]) -> float:
    """Mean training loss of the last ``SELECT_LAST`` steps (fresh batches, not the held-out set)."""
    tail = run["train_loss"][-SELECT_LAST:]
    if len(run["train_loss"]) < run["config"]["steps"] or not all(math.isfinite(v) for v in tail):
        return 10.0
    return statistics.fmean(tail)


def group_runs(runs: Sequence[dict[str, Any]], key: Callable[[dict[str, Any]], Any]) -> dict[Any, dict[float, list[dict]]]:
    """{key: {lr: [runs of the seeds, in seed order]}}."""
    out: dict[Any, dict[float, list[dict]]] = defaultdict(lambda: defaultdict(list))
    for r in sorted(runs, key=lambda r: r["config"]["seed"]):
        out[key(r["config"])][r["config"]["lr"]].append(r)
    return out


def best(by_lr: dict[float, list[dict]]) -> dict[str, Any]:
    """The lr with the lowest seed-mean training-stream loss and the held-out statistics of its seeds."""
    select = {lr: statistics.fmean(_select_loss(r) for r in rs) for lr, rs in by_lr.items()}
    held_out = {lr: statistics.fmean(_finite(r["eval_loss"]) for r in rs) for lr, rs in by_lr.items()}
    lr = min(select, key=select.get)
    rs = by_lr[lr]
    losses = [_finite(r["eval_loss"]) for r in rs]
    accs = [r["eval_acc"] for r in rs]
    curves = [smooth(r["train_loss"]) for r in rs if len(r["train_loss"]) == r["config"]["steps"]]
    mean_curve = [statistics.fmean(c[i] for c in curves) for i in range(min(map(len, curves)))] if curves else []
    grid = sorted(by_lr)
    return {
        "lr": lr,
        "lr_on_edge": len(grid) > 1 and lr in (grid[0], grid[-1]),
        "lr_best_by_held_out": min(held_out, key=held_out.get),
        "mean": statistics.fmean(losses),
        "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "min": min(losses),
        "max": max(losses),
        "acc": statistics.fmean(accs),
        "seeds": len(rs),
        "seed_ids": [r["config"]["seed"] for r in rs],
        "per_seed": losses,
        "curve": mean_curve,
        "seed_curves": [smooth(r["train_loss"]) for r in rs],
        "grid": {str(k): v for k, v in sorted(held_out.items())},
        "grid_select": {str(k): v for k, v in sorted(select.items())},
    }


def steps_to(curve: Sequence[float], target: float) -> int | None:
    for i, v in enumerate(curve):
        if v <= target:
            return i + 1
    return None


def fmt(b: dict[str, Any]) -> str:
    return f"{b['mean']:.3f} ± {b['std']:.3f} ({b['min']:.3f}–{b['max']:.3f})"


def compare(bests: dict[Any, dict[str, Any]], base_key: Any) -> None:
    """Add to every entry of ``bests`` its paired difference to ``bests[base_key]`` and per-seed speed-ups."""
    base = bests.get(base_key)
    if base is None:
        return
    keys = list(bests)
    n_seeds = min(len(bests[k]["seed_curves"]) for k in keys)
    targets = []
    for s in range(n_seeds):
        curves = [bests[k]["seed_curves"][s] for k in keys]
        at = math.ceil(0.75 * len(curves[0]))
        targets.append(max(min(c[:at]) for c in curves))
    for k, b in bests.items():
        if b["seed_ids"] != base["seed_ids"]:
            raise ValueError(f"{k}: seeds {b['seed_ids']} differ from λ=1's {base['seed_ids']}: cannot pair")
        p = paired(b["per_seed"], base["per_seed"])
        b["diff"] = {"per_seed": list(p.diffs), "mean": p.mean, "ci95": [p.low, p.high], "wins": p.wins, "n": p.n}
        sp = []
        for s, target in enumerate(targets):
            a, c = steps_to(base["seed_curves"][s], target), steps_to(b["seed_curves"][s], target)
            sp.append(a / c if a and c else None)
        b["speedup_per_seed"] = sp
        got = sorted(v for v in sp if v is not None)
        b["speedup_median"] = statistics.median(got) if got else None
        b["speedup_range"] = [got[0], got[-1]] if got else None
        b["seed_targets"] = targets


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
    by = group_runs(runs, lambda c: c["ratio"])
    bests = {lam: best(by[lam]) for lam in sorted(by)}
    compare(bests, 1.0)
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
    by = group_runs(runs, lambda c: c["ratio"])
    lrs = sorted({r["config"]["lr"] for r in runs})
    lines = ["| λ \\ lr(A) | " + " | ".join(f"{lr:g}" for lr in lrs) + " |", "|---" * (len(lrs) + 1) + "|"]
    for lam in sorted(by):
        cells = []
        for lr in lrs:
            rs = by[lam].get(lr)
            cells.append(f"{statistics.fmean(_finite(r['eval_loss']) for r in rs):.3f}" if rs else "–")
        lines.append(f"| {lam:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_curves(panels: list[tuple[str, dict[float, dict]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
    summary: dict[str, Any] = {**provenance(["report"], module="benchmarks.studies.v1.run"), "method": __doc__}
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
    by = group_runs(plain, lambda c: (c["family"], c["ratio"]))
    fams = sorted({k[0] for k in by}, key=["dora", "adalora", "loha", "lokr", "vera"].index)
    summary: dict[str, Any] = {**provenance(["report"], module="benchmarks.studies.adapters.run"), "method": __doc__, "meta": meta,
                               "families": {}}
    lines = [
        "| family | λ | best lr(A) (grid) | held-out loss: mean ± sd (min–max) | vs λ=1, paired: mean [95 % CI], wins | accuracy |",
        "|---|---|---|---|---|---|",
    ]
    for fam in fams:
        fb = {lam: best(by[(fam, lam)]) for (f, lam) in sorted(by) if f == fam}
        compare(fb, 1.0)
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
                variants[(c["magnitude"], c["magnitude_decay"])].append(_finite(r["eval_loss"]))
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
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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
