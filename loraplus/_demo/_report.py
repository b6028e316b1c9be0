"""What the demo reports: per-method records, paired statistics, the table, the plot and the verdict.

Pure functions of the runs :mod:`loraplus._demo` produced; nothing here trains.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from .._table import render_table
from ._provenance import record

if TYPE_CHECKING:  # pragma: no cover
    from ._config import DemoConfig

__all__ = ["DemoResult", "MethodResult", "Paired", "format_table", "paired", "plot", "report", "verdict"]


@dataclass
class MethodResult:
    """One method (plain LoRA or LoRA+ at one ratio) at the learning rate its validation loss picked."""

    label: str
    ratio: float
    lr: float
    steps: list[int]
    seed_curves: list[list[float]]  # test loss per seed at the chosen lr, every eval step
    sweep: dict[float, float]  # lr -> final validation loss, mean over seeds (picks the lr)
    runs: dict[float, dict[str, list[Any]]] = field(default_factory=dict)  # lr -> {"test": curves, "val": finals}

    @property
    def curve(self) -> list[float]:
        """Mean test loss over seeds at each eval step."""
        return [sum(v) / len(v) for v in zip(*self.seed_curves)]

    @property
    def final(self) -> float:
        return self.curve[-1]

    @property
    def seed_finals(self) -> list[float]:
        return [c[-1] for c in self.seed_curves]

    def steps_to(self, target: float, curve: Sequence[float] | None = None) -> int | None:
        """First evaluated step at which ``curve`` (default: the seed-mean test curve) is at or below ``target``."""
        for step, loss in zip(self.steps, self.curve if curve is None else curve):
            if loss <= target:
                return step
        return None


def _t975(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
    for k in sorted(table, reverse=True):
        if df >= k:
            return table[k] if df <= 30 else 1.96
    raise ValueError("df must be at least 1")


@dataclass(frozen=True)
class Paired:
    """Paired-by-seed difference ``x - base`` (negative: ``x`` lower)."""

    diffs: tuple[float, ...]
    mean: float
    low: float  # 95 % t-interval of the mean difference (nan with one seed)
    high: float
    wins: int  # seeds where x < base

    @property
    def n(self) -> int:
        return len(self.diffs)


def paired(x: Sequence[float], base: Sequence[float]) -> Paired:
    """Per-seed differences ``x[i] - base[i]`` with their mean, 95 % t-interval and wins (x lower).

    Example:
        >>> p = paired([1.0, 2.0, 3.0], [2.0, 2.5, 3.5])
        >>> p.mean, p.wins, round(p.high, 3)
        (-0.6666666666666666, 3, 0.05)
    """
    if len(x) != len(base) or not x:
        raise ValueError("paired() needs two equally long, non-empty sequences (one value per seed)")
    d = [a - b for a, b in zip(x, base)]
    mean = sum(d) / len(d)
    if len(d) > 1 and all(math.isfinite(v) for v in d):
        sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))
        half = _t975(len(d) - 1) * sd / math.sqrt(len(d))
    else:
        half = math.nan
    return Paired(tuple(d), mean, mean - half, mean + half, sum(v < 0 for v in d))


@dataclass
class DemoResult:
    """The outcome: plain LoRA, LoRA+ at each ratio, the task description and how long it took."""

    model: str
    task: str
    lora: MethodResult
    plus: list[MethodResult]
    seconds: float
    config: DemoConfig | None = None
    notes: list[str] = field(default_factory=list)
    find_lr: dict[str, Any] | None = None  # ``--find-lr``: the suggestion and the sweep's best
    #: commit, versions and machine, taken while the run's threads were set (:func:`._provenance.record`)
    provenance: dict[str, Any] | None = None

    @property
    def methods(self) -> list[MethodResult]:
        return [self.lora, *self.plus]

    @staticmethod
    def _target(curves: Sequence[Sequence[float]]) -> float:
        at = max(1, math.ceil(0.75 * len(curves[0])))
        return max(min(curve[:at]) for curve in curves)

    @property
    def target(self) -> float:
        """A test loss every method's seed-mean curve reaches: the highest of the methods' lowest
        seed-mean test loss within the first 75 % of the run (the worst method reaches it by then)."""
        return self._target([res.curve for res in self.methods])

    def seed_targets(self) -> list[float]:
        """The same rule seed by seed (on each seed's curves), so every method reaches it on every seed."""
        return [self._target(curves) for curves in zip(*(res.seed_curves for res in self.methods))]

    @property
    def loraplus(self) -> MethodResult:
        """The LoRA+ ratio with the lowest final test loss."""
        return min(self.plus, key=lambda res: res.final)

    def seed_speedups(self, res: MethodResult) -> list[float | None]:
        """Per seed (paired: same LoRA init and batch order): plain LoRA's steps to that seed's target / ``res``'s."""
        out: list[float | None] = []
        for target, base_curve, curve in zip(self.seed_targets(), self.lora.seed_curves, res.seed_curves):
            a, b = self.lora.steps_to(target, base_curve), res.steps_to(target, curve)
            out.append(None if a is None or b is None else a / b)
        return out

    def speedup_of(self, res: MethodResult) -> float | None:
        """How many times sooner ``res``'s seed-mean test curve reached the target than plain LoRA's."""
        a, b = self.lora.steps_to(self.target), res.steps_to(self.target)
        return None if a is None or b is None else a / b

    @property
    def speedup(self) -> float | None:
        return self.speedup_of(self.loraplus)

    def paired_final(self, res: MethodResult) -> Paired:
        """Final test loss of ``res`` minus plain LoRA's, seed by seed."""
        return paired(res.seed_finals, self.lora.seed_finals)

    def to_json(self, command: str | None = None) -> dict[str, Any]:
        """Everything the run produced: config, per-method per-lr per-seed curves, the summary, and
        the provenance record (command, commit, dirty, versions, machine) at the top level."""
        summary = []
        for res in self.methods:
            p = self.paired_final(res)
            summary.append({
                "label": res.label, "ratio": res.ratio, "lr_A": res.lr, "lr_B": res.lr * res.ratio,
                "test_final_mean": res.final, "test_final_per_seed": res.seed_finals,
                "diff_vs_lora_per_seed": list(p.diffs), "diff_vs_lora_mean": p.mean,
                "diff_vs_lora_ci95": [p.low, p.high], "wins_vs_lora": p.wins, "seeds": p.n,
                "steps_to_target": res.steps_to(self.target), "speedup": self.speedup_of(res),
                "speedup_per_seed": self.seed_speedups(res),
                **_median_range("speedup_per_seed", self.seed_speedups(res)),
                "val_final_by_lr": {f"{lr:g}": v for lr, v in sorted(res.sweep.items())},
            })
        made = self.provenance if self.provenance is not None else record(command)
        return {
            **made,
            "command": command,
            "model": self.model,
            "task": self.task,
            **({} if self.find_lr is None else {"find_lr": self.find_lr}),
            "config": None if self.config is None else {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.__dict__.items()},
            "selection": "each method's lr: lowest seed-mean final loss on the validation split; "
                         "every reported loss is on the separate test split",
            "target": self.target,
            "seed_targets": self.seed_targets(),
            "target_rule": "the highest, over methods, of each method's lowest test loss within the first 75 % "
                           "of its run: on the seed-mean curves (target, steps_to_target) and seed by seed "
                           "(seed_targets, speedup_per_seed)",
            "steps": self.lora.steps,
            "summary": summary,
            "runs": {res.label: {f"{lr:g}": runs for lr, runs in sorted(res.runs.items())} for res in self.methods},
            "notes": self.notes,
            "seconds": self.seconds,
            "torch": torch.__version__,
        }


def plot(result: DemoResult, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f'matplotlib is not installed: no plot written to {path} (pip install -e ".[demo]" or matplotlib)'
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ("tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")
    for res, color in ((result.lora, "tab:blue"), *zip(result.plus, colors)):
        ax.plot(res.steps, res.curve, color=color, label=f"{res.label}, lr={res.lr:g}")
        lrs = sorted(res.sweep)
        ax2.plot(lrs, [res.sweep[lr] for lr in lrs], "o-", color=color, label=res.label)
    ax.axhline(result.target, color="gray", ls=":", lw=1, label="target (see the table)")
    ax.set_xlabel("step")
    ax.set_ylabel("test loss (mean over seeds)")
    ax.set_yscale("log")
    ax.set_title("each at the lr its validation loss picked")
    ax.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("learning rate of A (B gets ratio x lr)")
    ax2.set_ylabel("final validation loss")
    ax2.set_title("learning-rate sweep")
    ax2.legend(fontsize=8)
    fig.suptitle(f"loraplus demo ({result.model})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot written to {path}"


def _median_range(name: str, values: Sequence[float | None]) -> dict[str, float | None]:
    got = sorted(v for v in values if v is not None)
    if not got:
        return {f"{name}_median": None, f"{name}_min": None, f"{name}_max": None}
    return {f"{name}_median": statistics.median(got), f"{name}_min": got[0], f"{name}_max": got[-1]}


def _speedup_text(values: Sequence[float | None]) -> str:
    got = sorted(v for v in values if v is not None)
    if not got:
        return "-"
    text = f"{statistics.median(got):.2f}x"
    if len(values) > 1:
        text += f" ({got[0]:.2f}-{got[-1]:.2f})"
    if len(got) < len(values):
        text += f" {len(got)}/{len(values)} seeds"
    return text


def format_table(result: DemoResult) -> str:
    """The demo's summary table: test loss, paired difference to plain LoRA, steps to the target, speed-up."""
    target = result.target
    rows = []
    for res in result.methods:
        steps = res.steps_to(target)
        spread = f" ({min(res.seed_finals):.3f}-{max(res.seed_finals):.3f})" if len(res.seed_finals) > 1 else ""
        if res is result.lora:
            diff = "-"
        else:
            p = result.paired_final(res)
            ci = f" [{p.low:+.3f}, {p.high:+.3f}]" if math.isfinite(p.low) else ""
            diff = f"{p.mean:+.3f}{ci} {p.wins}/{p.n}"
        rows.append(
            [
                res.label,
                f"{res.lr:g}",
                f"{res.lr * res.ratio:g}",
                f"{res.final:.4f}{spread}",
                diff,
                "not reached" if steps is None else str(steps),
                "1.00x" if res is result.lora else _speedup_text(result.seed_speedups(res)),
            ]
        )
    headers = ["method", "lr(A)", "lr(B)", "test loss", "vs LoRA [95% CI] wins", f"steps to {target:.4f}", "speed-up"]
    return render_table(headers, rows)


def verdict(result: DemoResult) -> str:
    """One honest sentence per LoRA+ ratio about the outcome."""
    lines = []
    for res in result.plus:
        p = result.paired_final(res)
        sp = _speedup_text(result.seed_speedups(res))
        if p.n > 1 and math.isfinite(p.high) and p.high < 0:
            lines.append(
                f"{res.label} ended lower than plain LoRA on {p.wins} of {p.n} seeds "
                f"({p.mean:+.4f}, 95% CI {p.low:+.4f} to {p.high:+.4f}); speed-up to the target {sp}."
            )
        elif p.n > 1 and math.isfinite(p.low) and p.low > 0:
            lines.append(
                f"{res.label} did NOT beat plain LoRA here: it ended higher on {p.n - p.wins} of {p.n} seeds "
                f"({p.mean:+.4f}, 95% CI {p.low:+.4f} to {p.high:+.4f})."
            )
        else:
            why = "one seed is no evidence" if p.n == 1 else (
                f"95% CI {p.low:+.4f} to {p.high:+.4f} includes 0: not conclusive with {p.n} seeds")
            lines.append(
                f"{res.label} vs plain LoRA: {p.mean:+.4f} test loss, lower on {p.wins} of {p.n} seeds ({why}); "
                f"speed-up to the target {sp}."
            )
    return "\n".join(lines)


def report(result: DemoResult) -> str:
    """The full text the CLI prints."""
    seeds = len(result.lora.seed_curves)
    lines = [
        f"task: {result.task}",
        f"each method at the learning rate with the lowest validation loss; losses on a separate test split, "
        f"mean over {seeds} seed{'s' if seeds > 1 else ''} (min-max); 'vs LoRA': paired per-seed difference in "
        "final test loss, its 95% interval and the seeds where LoRA+ was lower; target: the highest of the "
        "methods' lowest test losses within 75% of the run (every method reaches it); speed-up: plain LoRA's "
        "steps to it / the method's, median (range) over seeds",
        "",
        format_table(result),
        "",
        verdict(result),
        *result.notes,
        f"total time {result.seconds:.1f} s",
    ]
    return "\n".join(lines)
