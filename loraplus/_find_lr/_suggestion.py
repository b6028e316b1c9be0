"""What :func:`loraplus.find_lr` returns: the suggestion, every probe point, a per-ratio summary."""

from __future__ import annotations

import enum
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .._errors import LoraPlusError
from .._table import render_table

__all__ = ["LrSuggestion", "Phase", "ProbePoint", "RatioSummary", "Rule"]


class Phase(enum.Enum):
    """Which part of a ratio's probe a :class:`ProbePoint` belongs to."""

    RANGE = "range"  #: the lr range test
    CONFIRM = "confirm"  #: the confirmation run at the ratio's suggested lr


class Rule(enum.Enum):
    """How a ratio's suggested lr was read (:attr:`RatioSummary.rule`)."""

    EDGE = "edge / safety"  #: the range test's edge divided by ``safety``
    MINIMUM = "minimum / safety"  #: no edge: the lr at the smoothed minimum divided by ``safety``
    STEEPEST = "steepest fall"  #: no edge, and the smoothed loss fell fastest below minimum / safety
    LAW = "lora_lr x ratio^-1/2"  #: no range test: from the plain-LoRA rate the user gave (``lora_lr``)


@dataclass(frozen=True, kw_only=True)
class ProbePoint:
    """One step of one probe.

    ``phase`` is :attr:`Phase.RANGE` (the lr range test) or :attr:`Phase.CONFIRM` (the
    confirmation run at the ratio's suggested lr); ``lr`` is A's rate at that step (B's is ``lr * ratio``); ``step``
    counts from 1 within the probe; ``loss`` is the loss ``loss_fn`` returned before the step's
    update, ``smoothed`` its bias-corrected moving average. A ``diverged`` point took no step.
    """

    ratio: float
    phase: Phase
    lr: float
    step: int
    loss: float
    smoothed: float
    diverged: bool

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (``phase`` as its value), for JSON."""
        return {**asdict(self), "phase": self.phase.value}


@dataclass(frozen=True, kw_only=True)
class RatioSummary:
    """The probe of one ratio (every lr is A's).

    ``rule`` says how ``suggested_lr`` was read: ``edge_lr / safety`` (:attr:`Rule.EDGE`); without
    an edge the lower of ``lr_at_best / safety`` (:attr:`Rule.MINIMUM`) and ``steepest_lr``
    (:attr:`Rule.STEEPEST`); or, given ``lora_lr``, ``lora_lr × ratio^-1/2`` with no range test
    (:attr:`Rule.LAW`; the range-test fields are then ``None``). It is halved
    ``halvings`` times because the confirmation run at it diverged (each retry from the same
    start, while the budget allows). ``start_loss`` is the mean loss of the range test's first
    tenth; ``best_smoothed`` the lowest smoothed loss after that tenth and ``lr_at_best`` the lr it
    reflects (the smoothed value lags its input by ``beta / (1 - beta)`` steps, so this is the lr
    of that many steps earlier); ``steepest_lr`` the lr at which the smoothed loss fell fastest
    before its minimum (read at its own step, as the peers' steepest-slope finders read it);
    ``edge_lr`` the lr, read the same way as ``lr_at_best``, at which the smoothed loss
    first climbed back above ``start_loss`` after its minimum, or the test diverged (``None``:
    neither, within ``lr_range``); ``diverged_at`` the lr of the step that diverged (``None``:
    none did); ``confirm_loss`` the mean loss of the confirmation run's last quarter (``inf``: it
    diverged); ``steps`` the optimizer steps both took.
    """

    ratio: float
    rule: Rule
    suggested_lr: float
    best_smoothed: float | None
    lr_at_best: float | None
    steepest_lr: float | None
    start_loss: float | None
    edge_lr: float | None
    diverged_at: float | None
    halvings: int
    confirm_loss: float
    steps: int

    def to_dict(self) -> dict[str, Any]:
        """Plain values only (``rule`` as its value), for JSON."""
        return {**asdict(self), "rule": self.rule.value}


def _g(value: float | None) -> str:
    return "-" if value is None else f"{value:.4g}"


def _confirm(loss: float) -> str:
    """A confirmation loss as shown: ``nan`` when there was no confirmation run (one ratio under
    ``lora_lr``), ``inf`` when it diverged."""
    if math.isnan(loss):
        return "-"
    return _g(loss) if math.isfinite(loss) else "diverged"


@dataclass(frozen=True, kw_only=True)
class LrSuggestion:
    """The learning rate (A's; B's is ``lr * ratio``) and ratio :func:`loraplus.find_lr` suggests.

    Attributes:
        lr: A's learning rate (pass it as ``lr=`` to :func:`loraplus.LoraPlus`).
        ratio: the B/A ratio (pass it as ``ratio=``).
        table: every probe point, in the order they were taken (:class:`ProbePoint`).
        per_ratio: one :class:`RatioSummary` per ratio probed.
        steps_used: optimizer steps taken over all probes.
        reason: why this ratio was chosen.
        notes: warnings about the probe's range (minimum at an edge, no divergence, …).
        lag: the steps by which the smoothed loss lags the loss (``round(beta / (1 - beta))``);
            ``per_ratio``'s lrs and ``plot()`` read each smoothed value against the lr of that
            many steps earlier.
    """

    lr: float
    ratio: float
    table: tuple[ProbePoint, ...]
    per_ratio: tuple[RatioSummary, ...]
    steps_used: int
    reason: str
    notes: tuple[str, ...] = ()
    lag: int = 0

    def explain(self) -> str:
        """A plain-text table, one row per ratio, the chosen one marked, then why it was chosen."""
        rows = [
            [
                f"{s.ratio:g}",
                s.rule.value,
                _g(s.suggested_lr),
                _g(s.suggested_lr * s.ratio),
                _g(s.start_loss),
                _g(s.best_smoothed),
                _g(s.edge_lr),
                _g(s.diverged_at),
                str(s.halvings),
                _confirm(s.confirm_loss),
                str(s.steps),
                "<- chosen" if s.ratio == self.ratio else "",
            ]
            for s in self.per_ratio
        ]
        headers = ["ratio", "rule", "lr(A)", "lr(B)", "start loss", "best smoothed", "edge lr(A)", "diverged at",
                   "halvings", "confirm loss", "steps", ""]
        lines = [render_table(headers, rows, right={2, 3, 4, 5, 6, 7, 8, 9, 10}), "", f"chosen: ratio {self.ratio:g}, lr {self.lr:.4g}: {self.reason}"]
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"steps used: {self.steps_used}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str]) -> Path:
        """Write a PNG of the range tests to ``path``: smoothed loss against A's lr, one curve per
        ratio, its edge dashed and its suggestion dotted.

        Raises:
            LoraPlusError: when matplotlib is not installed.
        """
        try:
            import matplotlib

            matplotlib.use("Agg", force=False)
            import matplotlib.pyplot as plt
        except ImportError as err:
            raise LoraPlusError("LrSuggestion.plot needs matplotlib: pip install matplotlib") from err
        fig, ax = plt.subplots(figsize=(6, 4))
        for s in self.per_ratio:
            pts = [p for p in self.table if p.ratio == s.ratio and p.phase is Phase.RANGE]
            lrs = [p.lr for p in pts]
            shown = [(lrs[max(0, i - self.lag)], p.smoothed) for i, p in enumerate(pts) if math.isfinite(p.smoothed)]
            (line,) = ax.plot([x for x, _ in shown], [y for _, y in shown], label=f"ratio {s.ratio:g}")
            ax.axvline(s.suggested_lr, color=line.get_color(), ls=":", lw=1)
            if s.edge_lr is not None:
                ax.axvline(s.edge_lr, color=line.get_color(), ls="--", lw=1)
        ax.set_xscale("log")
        ax.set_xlabel(f"learning rate of A (B: ratio x), {self.lag} steps before the smoothed loss")
        ax.set_ylabel("smoothed loss")
        ax.set_title(f"find_lr: lr {self.lr:.3g}, ratio {self.ratio:g}")
        ax.legend()
        out = Path(path)
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return out
