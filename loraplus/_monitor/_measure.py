"""Measurement: the Monitor's maths, as pure functions of tensors (no hooks, no state).

With ΔA, ΔB the applied updates of the factors A (r, in) and B (out, r) and s the layer's LoRA
scaling, the layer's weight changes by

    Δ(s·B·A) = s·B·ΔA + s·ΔB·A + s·ΔB·ΔA     (δ¹ = s·B·ΔA·x, δ² = s·ΔB·A·x, δ³ = s·ΔB·ΔA·x)

Every norm is computed from r×r Gram matrices (``‖X·Y‖² = ⟨XᵀX, YYᵀ⟩``), so the cost per adapter
is O((in + out)·r²) and no (out, in) matrix is ever formed. The functions work on stacks of
equally shaped adapters (a leading batch dimension k).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "ACTIVATION_METRICS",
    "SCALED_METRICS",
    "WEIGHT_METRICS",
    "StepFactors",
    "activation_terms",
    "take_rows",
    "weight_terms",
]

#: Weight-space metrics, in record order.
WEIGHT_METRICS = ("norm_A", "norm_B", "delta_A", "delta_B", "B_dA", "dB_A", "dB_dA", "delta_BA")
#: Activation-space metrics: RMS over the entries of the layer output change.
ACTIVATION_METRICS = ("act_B_dA", "act_dB_A", "act_dB_dA")
#: The metrics that are norms of ΔW terms, so carry the layer's scaling s (the factor norms do not).
SCALED_METRICS = ("B_dA", "dB_A", "dB_dA", "delta_BA", *ACTIVATION_METRICS)
_SCALED_COLUMNS = slice(4, 8)


@dataclass(frozen=True)
class StepFactors:
    """What the activation terms of a stack of k adapters need from one step, in the working dtype.

    Attributes:
        a0: A before the step, (k, r, in).
        da: ΔA, (k, r, in).
        gb: BᵀB before the step, (k, r, r).
        gdb: ΔBᵀΔB, (k, r, r).
    """

    a0: torch.Tensor
    da: torch.Tensor
    gb: torch.Tensor
    gdb: torch.Tensor


def _inner(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    return (p * q).sum(dim=(1, 2))


def _trace(p: torch.Tensor) -> torch.Tensor:
    return p.diagonal(dim1=1, dim2=2).sum(-1)


def weight_terms(
    a0: torch.Tensor, b0: torch.Tensor, a1: torch.Tensor, b1: torch.Tensor, scale: torch.Tensor | None = None
) -> tuple[torch.Tensor, StepFactors]:
    """The weight-space metrics of k adapters from their factors before (a0, b0) and after (a1, b1) a step.

    Args:
        a0, a1: A before and after, (k, r, in) in standard orientation.
        b0, b1: B before and after, (k, out, r).
        scale: the layers' LoRA scaling s, (k,); ``None`` for s = 1.

    Returns:
        ``(values, factors)``: values (k, 8) in :data:`WEIGHT_METRICS` order (‖A‖, ‖B‖, ‖ΔA‖, ‖ΔB‖,
        ‖s·B·ΔA‖, ‖s·ΔB·A‖, ‖s·ΔB·ΔA‖, ‖Δ(s·B·A)‖), on the factors' device, in float32 (float64
        for float64 factors); and the :class:`StepFactors` the activation terms need.

    Example:
        >>> a0, b0 = torch.ones(1, 1, 2), torch.ones(1, 3, 1)
        >>> values, _ = weight_terms(a0, b0, 2 * a0, b0, scale=torch.tensor([0.5]))
        >>> [round(v, 4) for v in values[0].tolist()]  # ‖B·ΔA‖ = √6, times s = 0.5
        [1.4142, 1.7321, 1.4142, 0.0, 1.2247, 0.0, 0.0, 1.2247]
    """
    work = torch.float64 if a0.dtype == torch.float64 else torch.float32
    a0, b0, a1, b1 = (z.to(work) for z in (a0, b0, a1, b1))
    da, db = a1 - a0, b1 - b0
    r = a0.shape[1]
    x = torch.cat([b0, db], dim=2)  # (k, out, 2r)
    y = torch.cat([da, a1, a0], dim=1)  # (k, 3r, in)
    gx = x.transpose(1, 2) @ x  # (k, 2r, 2r): BᵀB, BᵀΔB, ΔBᵀΔB
    gy = y @ y.transpose(1, 2)  # (k, 3r, 3r): ΔAΔAᵀ, A'A'ᵀ, A A ᵀ and their cross terms
    gb, gdb = gx[:, :r, :r], gx[:, r:, r:]
    gda, ga0 = gy[:, :r, :r], gy[:, 2 * r :, 2 * r :]
    # Δ(BA) = B'A' − BA = [B, ΔB]·[ΔA; A']: its squared norm is ⟨[B, ΔB]ᵀ[B, ΔB], [ΔA; A'][ΔA; A']ᵀ⟩
    sq = torch.stack(
        [
            _trace(ga0),
            _trace(gb),
            _trace(gda),
            _trace(gdb),
            _inner(gb, gda),
            _inner(gdb, ga0),
            _inner(gdb, gda),
            _inner(gx, gy[:, : 2 * r, : 2 * r]),
        ],
        dim=1,
    )
    values = sq.clamp_min(0).sqrt()
    if scale is not None:
        values[:, _SCALED_COLUMNS] *= scale.to(values).abs()[:, None]
    return values, StepFactors(a0, da, gb, gdb)


def activation_terms(
    x: torch.Tensor, factors: StepFactors, out_features: int, scale: torch.Tensor | None = None,
    embedding: bool = False,
) -> torch.Tensor:
    """RMS over output entries of s·B·ΔA·x, s·ΔB·A·x, s·ΔB·ΔA·x for m adapters and their inputs.

    ``‖X·ΔAᵀ·Bᵀ‖² = ⟨UᵀU, BᵀB⟩`` with U = X·ΔAᵀ (N, r): only r×r products again.

    Args:
        x: the layer inputs, (m, N, in) rows for dense layers, or (m, N) token ids for embeddings
            (their one-hot rows select columns of A).
        factors: the m adapters' :class:`StepFactors` (a batch of m).
        out_features: the output width (the RMS is over N·out entries).
        scale: the layers' scaling s, (m,); ``None`` for s = 1.
        embedding: whether ``x`` holds token ids.

    Returns:
        (m, 3) in :data:`ACTIVATION_METRICS` order, in the working dtype.

    Example:
        >>> f = StepFactors(torch.ones(1, 1, 2), torch.ones(1, 1, 2), torch.ones(1, 1, 1), torch.zeros(1, 1, 1))
        >>> activation_terms(torch.ones(1, 4, 2), f, out_features=1).tolist()  # B·ΔA·x = 2 on every row
        [[2.0, 0.0, 0.0]]
    """
    a0, da = factors.a0, factors.da
    if embedding:
        index = x.to(a0.device, torch.long)[:, None, :].expand(-1, a0.shape[1], -1)  # (m, r, N)
        u, v = da.gather(2, index).transpose(1, 2), a0.gather(2, index).transpose(1, 2)
    else:
        x = x.to(a0.device, a0.dtype)
        u, v = x @ da.transpose(1, 2), x @ a0.transpose(1, 2)  # (m, N, r)
    gu, gv = u.transpose(1, 2) @ u, v.transpose(1, 2) @ v
    gb, gdb = factors.gb, factors.gdb
    sq = torch.stack([_inner(gu, gb), _inner(gv, gdb), _inner(gu, gdb)], dim=1)
    out = sq.clamp_min(0).div(max(1, x.shape[1] * out_features)).sqrt()
    if scale is not None:
        out = out * scale.to(out).abs()[:, None]
    return out


def take_rows(x: torch.Tensor, room: int, in_features: int | None) -> torch.Tensor | str:
    """At most ``room`` rows of a layer input, as a copy: an evenly strided subset, no RNG.

    Args:
        x: the layer input: (…, in_features) for dense layers, token ids for embeddings.
        room: how many rows may still be kept (> 0).
        in_features: the adapter's input width; ``None`` for an embedding (x holds token ids).

    Returns:
        (n, in_features) rows, or (n,) token ids; or a string saying why ``x`` cannot be used.

    Example:
        >>> take_rows(torch.arange(12.0).reshape(6, 2), room=3, in_features=2)[:, 0].tolist()
        [0.0, 4.0, 8.0]
    """
    if in_features is None:
        if x.is_floating_point() or x.is_complex():
            return f"embedding input is {x.dtype}, expected token ids"
        flat = x.detach().reshape(-1)
    else:
        if x.dim() < 1 or x.shape[-1] != in_features:
            return f"layer input of shape {tuple(x.shape)} does not end in the adapter's in-features {in_features}"
        flat = x.detach().reshape(-1, x.shape[-1])
    n = flat.shape[0]
    if n > room:
        flat = flat[:: math.ceil(n / room)][:room]
    return flat.clone()
