"""Reporting: the Monitor's text summary and plot, both read from the history's tensors."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .._errors import LoraPlusError
from .._table import render_table
from ._history import AdapterInfo

__all__ = ["plot_history", "summary_text"]


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3g}"


def _terms(activations: bool) -> tuple[str, str]:
    return ("act_B_dA", "act_dB_A") if activations else ("B_dA", "dB_A")


def _some(items: Sequence[str], n: int = 3) -> str:
    shown = ", ".join(items[:n])
    return shown + (f" and {len(items) - n} more" if len(items) > n else "")


def summary_text(
    h: Mapping[str, Any],
    adapters: Sequence[AdapterInfo],
    *,
    every: int,
    activations: bool,
    band: float,
    unpaired: Mapping[str, str],
    notes: Mapping[str, str],
    missing: Mapping[str, str],
) -> str:
    """Per layer group, the median A-side and B-side terms, the median of their ratio and a verdict.

    Args:
        h: :meth:`History.to_dict` output. ``adapters``: its columns.
        band: *balanced* when the median ratio lies within [1/band, band].
        unpaired: factors not monitored and why; ``notes``: per adapter, what its ΔW means where
            that is not plain s·B·A (DoRA); ``missing``: per adapter, why activation terms are missing.
    """
    which = "activation RMS ‖s·B·ΔA·x‖ vs ‖s·ΔB·A·x‖" if activations else "weight-space ‖s·B·ΔA‖ vs ‖s·ΔB·A‖"
    steps = h["step"].tolist()
    if not steps:
        return f"loraplus.Monitor: no sampled steps recorded yet ({len(adapters)} adapters attached)."
    a_key, b_key = _terms(activations)
    cols: dict[str, list[int]] = {}
    for j, info in enumerate(adapters):
        cols.setdefault(info.layer_group, []).append(j)
    rows = []
    for group, js in cols.items():
        a, b = h[a_key][:, js].flatten(), h[b_key][:, js].flatten()
        ok = (a > 0) & (b > 0)  # False for NaN; steps where a term is 0 (B = 0 at init) say nothing about balance
        if not ok.any():
            rows.append([group, "-", "-", "-", "no step with both terms > 0"])
            continue
        a, b = a[ok], b[ok]
        ratio = (a / b).median().item()
        if ratio > band:
            verdict = "A-side dominates: B's updates move the features too little"
        elif ratio < 1 / band:
            verdict = "B-side dominates: A's updates move the features too little"
        else:
            verdict = "balanced"
        rows.append([group, _fmt(a.median().item()), _fmt(b.median().item()), _fmt(ratio), verdict])
    lines = [
        f"loraplus.Monitor: {len(adapters)} adapters, {len(steps)} sampled steps "
        f"({steps[0]}..{steps[-1]}, every {every}); {which}; balanced = median ratio within "
        f"[{1 / band:.3g}, {band:g}]",
        render_table(["layer group", "A-side", "B-side", "A/B", "verdict"], rows, right={1, 2, 3}),
    ]
    unscaled = [info.key for info in adapters if info.scale is None]
    if unscaled:
        lines.append(
            f"scale unknown (ΔW terms are B·A, s = 1) for {len(unscaled)} adapters whose layout does not record "
            f"the LoRA scaling: {_some(unscaled)}"
        )
    by_note: dict[str, list[str]] = {}
    for key, note in notes.items():
        by_note.setdefault(note, []).append(key)
    lines += [f"{note}: {_some(keys)}" for note, keys in by_note.items()]
    if unpaired:
        shown = "; ".join(f"{n} ({r})" for n, r in list(unpaired.items())[:3])
        more = f" and {len(unpaired) - 3} more" if len(unpaired) > 3 else ""
        lines.append(f"not monitored: {shown}{more}")
    if missing:
        k, v = next(iter(missing.items()))
        lines.append(f"activation terms missing for {len(missing)} adapters, e.g. {k}: {v}")
    return "\n".join(lines)


def plot_history(
    h: Mapping[str, Any], *, every: int, activations: bool, path: str | os.PathLike[str] | None = None
) -> Any:
    """Draw the history (log scale): per-adapter and median curves of the δ terms and update norms."""
    try:
        import matplotlib
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as err:
        raise LoraPlusError(f"plot() needs matplotlib ({err}); pip install matplotlib (or loraplus[plot])") from None
    steps = h["step"].numpy()
    a_key, b_key = _terms(activations)
    a_lab, b_lab = ("RMS ‖s·B·ΔA·x‖", "RMS ‖s·ΔB·A·x‖") if activations else ("‖s·B·ΔA‖", "‖s·ΔB·A‖")
    fig = Figure(figsize=(12, 8), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(2, 2)
    cmap = getattr(matplotlib, "colormaps", {}).get("viridis")
    n = len(h["layer"])

    def color(j: int) -> Any:
        return None if cmap is None else cmap(j / max(1, n - 1))

    def positive(t: torch.Tensor) -> Any:
        t = t.clone()
        t[~(t > 0)] = math.nan
        return t.numpy()

    for ax, key, lab, side in ((axes[0, 0], a_key, a_lab, "A-side"), (axes[0, 1], b_key, b_lab, "B-side")):
        for j in range(n):
            ax.plot(steps, positive(h[key][:, j]), color=color(j), lw=0.8, alpha=0.8)
        ax.set_yscale("log")
        ax.set_title(f"{side} {lab}")
        ax.set_xlabel("step")
    ax = axes[1, 0]
    curves = ((a_key, a_lab), (b_key, b_lab), ("delta_A", "‖ΔA‖"), ("delta_B", "‖ΔB‖"), ("delta_BA", "‖Δ(s·BA)‖"))
    for key, lab in curves:
        ax.plot(steps, positive(torch.nanmedian(h[key], dim=1).values), lw=1.8, label=lab)
    ax.set_yscale("log")
    ax.set_title(f"median over {n} adapters")
    ax.set_xlabel("step")
    ax.legend(fontsize=8)
    ax = axes[1, 1]
    ratio = h[a_key] / h[b_key]
    for j in range(n):
        ax.plot(steps, positive(ratio[:, j]), color=color(j), lw=0.8, alpha=0.8)
    ax.axhline(1.0, color="k", lw=0.8, ls="--")
    ax.set_yscale("log")
    ax.set_title(f"A/B balance {a_lab} / {b_lab} per adapter")
    ax.set_xlabel("step")
    fig.suptitle(f"loraplus.Monitor: {n} adapters, every {every} steps (colour = adapter depth)")
    if path is not None:
        fig.savefig(os.fspath(path), dpi=110)
    return fig
