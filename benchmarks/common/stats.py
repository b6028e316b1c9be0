"""The studies' statistics, pure functions on plain records (no torch, no files): tested by hand-computed values.

Study v2 (and the GPU kit's width part, find_lr's evaluations):

* the learning-rate lattice: ``lr = LR0 · 2^(k/2)``; even ``k`` are the ×2 grid, odd ``k`` the ×√2
  refinements (``lr_of`` / ``k_of``);
* ``next_ks``: what a cell still has to run (extend the ×2 grid until the best is interior, then
  the two ×√2 neighbours of the best);
* ``select``: seed means per lr on the seeds every lr has, the lr picked on validation;
* ``band``: the good-lr band at the ×2 resolution;
* ``paired``: paired-by-seed differences with a 95 % t-interval and wins;
* ``steps_to_target`` on the seed-mean trailing-mean curve;
* ``schedule``: 10 % linear warm-up, cosine decay to 0;
* ``fit_loglog``: least-squares slope of log2(y) on log2(x) with its 95 % t-interval;
* ``parabolic_min``: the vertex of a parabola through three points around a grid minimum.

Study 1 and the adapter study (best-vs-best per configuration, one implementation of the pairing and
of steps-to-target with study v2):

* ``smooth``: the trailing moving average of a training curve (partial windows at the start);
* ``group_runs``, ``best``: the lr picked on the training stream (``select_loss``), the held-out
  statistics of its seeds;
* ``compare_to_base``: every configuration's paired difference to the base (λ = 1) and its per-seed
  speed-up to a common target.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DIVERGED", "LR0", "SELECT_LAST", "Band", "band", "best", "compare_to_base", "contiguous_band", "fin",
    "Fit", "fit_loglog", "group_runs", "k_of", "lr_of", "mean_curve", "needs_more_seeds", "next_ks", "Paired",
    "paired", "parabolic_min", "schedule", "select", "select_loss", "Selection", "smooth", "steps_to_target",
    "t975", "target", "trailing_mean"
]

LR0 = 1e-3
DIVERGED = 10.0  # a diverged seed counts as this loss in every mean (as in study 1)

#: two-sided 95 % quantiles of Student's t, df = 1 … 30 (standard tables)
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145,
         2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048,
         2.045, 2.042)


def t975(df: int) -> float:
    if df < 1:
        return math.inf
    if df <= 30:
        return _T975[df - 1]
    z = 1.959964  # Cornish-Fisher expansion beyond the table (error < 1e-3 for df > 30)
    return z + (z**3 + z) / (4 * df) + (5 * z**5 + 16 * z**3 + 3 * z) / (96 * df**2)


def lr_of(k: int) -> float:
    return float(f"{LR0 * 2 ** (k / 2):.6g}")


def k_of(lr: float) -> int:
    return round(2 * math.log2(lr / LR0))


def fin(v: float) -> float:
    return v if math.isfinite(v) else DIVERGED


# ------------------------------------------------------------------------------------------ selection


@dataclass
class Selection:
    lrs: list[float]  # every lr of the cell, ascending
    seeds: list[int]  # seeds every lr has (the ones the means use)
    val: dict[float, float]  # seed-mean validation loss per lr
    test: dict[float, float]
    best_lr: float  # lowest seed-mean validation loss
    on_edge: bool  # best_lr is the lowest or the highest lr run
    diverged: dict[float, int] = field(default_factory=dict)  # diverged seeds per lr


def select(runs: Sequence[dict[str, Any]], seeds: Iterable[int] | None = None) -> Selection:
    """Seed means per lr on the seeds every lr has (or on ``seeds``); best lr on validation.

    Runs marked ``extra`` (a rate run only to compare at another method's best rate) take no part.
    """
    by: dict[float, dict[int, dict[str, Any]]] = {}
    for r in runs:
        if not r.get("extra"):
            by.setdefault(r["lr"], {})[r["seed"]] = r
    common = set.intersection(*(set(v) for v in by.values())) if by else set()
    if seeds is not None:
        common &= set(seeds)
    if not common:
        raise ValueError("select: no seed is shared by every learning rate")
    s = sorted(common)
    lrs = sorted(by)
    val = {lr: statistics.fmean(fin(by[lr][i]["val_loss"]) for i in s) for lr in lrs}
    test = {lr: statistics.fmean(fin(by[lr][i]["test_loss"]) for i in s) for lr in lrs}
    div = {lr: sum(bool(by[lr][i]["diverged"]) for i in s) for lr in lrs}
    best = min(lrs, key=lambda lr: (val[lr], lr))
    return Selection(lrs, s, val, test, best, len(lrs) > 1 and best in (lrs[0], lrs[-1]), div)


def next_ks(done: Iterable[int], val_by_k: dict[int, float], start: Sequence[int], refine: bool = True,
            k_min: int = -40, k_max: int = 20) -> list[int]:
    """The lattice points a cell still has to run, given those done and their seed-mean validation loss.

    Nothing done: ``start``. Best on an edge of the ×2 grid (even k): one more ×2 step past
    it (within [k_min, k_max]). Best interior: its ×√2 neighbours (k ± 1) if ``refine``.
    An empty list means the cell is complete.
    """
    done = set(done)
    if not done:
        return sorted(start)
    coarse = sorted(k for k in done if k % 2 == 0)
    best = min(done, key=lambda k: (val_by_k[k], k))
    if best <= coarse[0] and coarse[0] - 2 >= k_min:
        return [coarse[0] - 2]
    if best >= coarse[-1] and coarse[-1] + 2 <= k_max:
        return [coarse[-1] + 2]
    if not refine:
        return []
    return [k for k in (best - 1, best + 1) if k not in done and k_min <= k <= k_max]


@dataclass
class Band:
    lo: float
    hi: float
    factor: float  # hi / lo
    open: bool  # reaches an edge of the ×2 grid: the true band may be wider
    bound: float  # the band is narrower than the ratio of the first ×2 rates outside it


def contiguous_band(loss_by_x: dict[float, float], tol: float) -> Band:
    """The contiguous grid values around the grid's best whose loss is within ``(1 + tol)`` of it."""
    grid = sorted(loss_by_x)
    i = min(range(len(grid)), key=lambda j: (loss_by_x[grid[j]], grid[j]))
    limit = (1 + tol) * loss_by_x[grid[i]]
    lo = hi = i
    while lo > 0 and loss_by_x[grid[lo - 1]] <= limit:
        lo -= 1
    while hi < len(grid) - 1 and loss_by_x[grid[hi + 1]] <= limit:
        hi += 1
    bound = grid[min(hi + 1, len(grid) - 1)] / grid[max(lo - 1, 0)]
    return Band(grid[lo], grid[hi], grid[hi] / grid[lo], lo == 0 or hi == len(grid) - 1, bound)


def band(loss_by_lr: dict[float, float], tol: float) -> Band:
    """Good-lr band at the ×2 resolution: ``contiguous_band`` on the ×2-grid rates only (×√2
    refinements are left out, so every band is a power of 2 and its best is the ×2 grid's best)."""
    return contiguous_band({lr: v for lr, v in loss_by_lr.items() if k_of(lr) % 2 == 0}, tol)


# ------------------------------------------------------------------------------------------- pairing


@dataclass
class Paired:
    diffs: list[float]
    mean: float
    low: float
    high: float
    wins: int  # seeds where ``a`` is lower than ``b``
    n: int


def paired(a: Sequence[float], b: Sequence[float]) -> Paired:
    """a − b per seed (same order), mean and 95 % t-interval; wins: a < b."""
    if len(a) != len(b) or not a:
        raise ValueError("paired: need two equally long, non-empty sequences")
    d = [x - y for x, y in zip(a, b)]
    m = statistics.fmean(d)
    half = t975(len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d)) if len(d) > 1 else math.inf
    return Paired(d, m, m - half, m + half, sum(x < y for x, y in zip(a, b)), len(d))


def needs_more_seeds(p: Paired, base_mean: float, threshold: float = 0.01) -> bool:
    """Study v2's rule: 10 seeds where the interval straddles 0 and |mean difference| > 1 % of the base."""
    return p.low < 0 < p.high and abs(p.mean) > threshold * abs(base_mean)


# -------------------------------------------------------------------------------------- curves, speed


def trailing_mean(curve: Sequence[float], k: int) -> list[float]:
    """Entry i is the mean of curve[i-k+1 … i] (full windows only: len(curve) - k + 1 entries)."""
    return [statistics.fmean(curve[i - k + 1 : i + 1]) for i in range(k - 1, len(curve))]


def mean_curve(curves: Sequence[Sequence[float]], k: int) -> list[float]:
    """Seed mean of the trailing means (diverged steps count as DIVERGED)."""
    sm = [trailing_mean([fin(v) for v in c], k) for c in curves]
    n = min(map(len, sm))
    return [statistics.fmean(c[i] for c in sm) for i in range(n)]


def target(curves: dict[str, Sequence[float]], frac: float = 0.75) -> float:
    """The highest of every method's lowest seed-mean loss within the first ``frac`` of the run."""
    return max(min(c[: max(1, math.ceil(frac * len(c)))]) for c in curves.values())


def steps_to_target(curve: Sequence[float], tgt: float, k: int) -> int | None:
    """Steps taken when the trailing mean (window k) first reaches ``tgt`` (entry i ends at step i + k)."""
    return next((i + k for i, v in enumerate(curve) if v <= tgt), None)


def schedule(steps: int, warm_frac: float = 0.1):
    """LambdaLR factor: linear warm-up over round(warm_frac · steps) steps, then cosine decay to 0."""
    warm = max(1, round(warm_frac * steps))

    def f(s: int) -> float:
        if s < warm:
            return (s + 1) / warm
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, steps - warm))))

    return f


# ------------------------------------------------------------------------------------------- fitting


@dataclass
class Fit:
    slope: float
    intercept: float
    low: float
    high: float
    n: int


def fit_loglog(xs: Sequence[float], ys: Sequence[float]) -> Fit:
    """Least squares log2(y) = a + b·log2(x); 95 % t-interval of b (df = n − 2; infinite for n = 2)."""
    lx, ly = [math.log2(x) for x in xs], [math.log2(y) for y in ys]
    n = len(lx)
    mx, my = statistics.fmean(lx), statistics.fmean(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ly)) / sxx
    a = my - b * mx
    if n > 2:
        s2 = sum((y - a - b * x) ** 2 for x, y in zip(lx, ly)) / (n - 2)
        half = t975(n - 2) * math.sqrt(s2 / sxx)
    else:
        half = math.inf
    return Fit(b, a, b - half, b + half, n)


def parabolic_min(xs: Sequence[float], ys: Sequence[float]) -> float:
    """x of the minimum of the parabola through the grid argmin and its two neighbours (equally
    spaced xs); the argmin itself when it lies on an edge or the three points are not convex."""
    i = min(range(len(ys)), key=lambda j: (ys[j], xs[j]))
    if i == 0 or i == len(ys) - 1:
        return xs[i]
    y0, y1, y2 = ys[i - 1], ys[i], ys[i + 1]
    den = y0 - 2 * y1 + y2
    if den <= 0:
        return xs[i]
    h = xs[i + 1] - xs[i]
    return xs[i] + 0.5 * h * (y0 - y2) / den


# ----------------------------------------------------------------------- study 1: best-vs-best per configuration
# (study 1 and the adapter study: the lr picked on the training stream, reported on the held-out set)


def smooth(curve: Sequence[float], k: int = 15) -> list[float]:
    """Trailing moving average (the per-step loss of one batch is noisy)."""
    out, acc = [], 0.0
    for i, v in enumerate(curve):
        acc += v
        if i >= k:
            acc -= curve[i - k]
        out.append(acc / min(i + 1, k))
    return out



#: Steps at the end of a run whose training losses pick the learning rate.
SELECT_LAST = 15


def select_loss(run: dict[str, Any]) -> float:
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
    select = {lr: statistics.fmean(select_loss(r) for r in rs) for lr, rs in by_lr.items()}
    held_out = {lr: statistics.fmean(fin(r["eval_loss"]) for r in rs) for lr, rs in by_lr.items()}
    lr = min(select, key=select.get)
    rs = by_lr[lr]
    losses = [fin(r["eval_loss"]) for r in rs]
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


def compare_to_base(bests: dict[Any, dict[str, Any]], base_key: Any) -> None:
    """Add to every entry of ``bests`` its paired difference to ``bests[base_key]`` and per-seed speed-ups.

    The pairing is the library's own (``loraplus._demo.paired``, what the demo reports), as study 1's
    committed summaries were computed: it sums where :func:`paired` uses ``statistics.fmean``/``stdev``, and
    the two differ in the last binary digit of a few intervals, which would rewrite those summaries."""
    from loraplus._demo import paired as paired_as_the_demo  # torch comes with loraplus: imported when used

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
        p = paired_as_the_demo(b["per_seed"], base["per_seed"])
        b["diff"] = {"per_seed": list(p.diffs), "mean": p.mean, "ci95": [p.low, p.high], "wins": p.wins, "n": p.n}
        sp = []
        for s, target in enumerate(targets):
            a, c = steps_to_target(base["seed_curves"][s], target, 1), steps_to_target(b["seed_curves"][s], target, 1)
            sp.append(a / c if a and c else None)
        b["speedup_per_seed"] = sp
        got = sorted(v for v in sp if v is not None)
        b["speedup_median"] = statistics.median(got) if got else None
        b["speedup_range"] = [got[0], got[-1]] if got else None
        b["seed_targets"] = targets
