"""Parameters in the order third-party pair optimizers expect (``pytorch_optimizer.LoRARite``)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .._errors import LoraPlusError
from .._labels import RuleSpec
from ._pairs import pairs

__all__ = ["pair_params"]


def pair_params(model: nn.Module, rules: RuleSpec | None = None) -> list[dict[str, Any]]:
    """The model's A/B factors as param groups in alternating A, B order, for pair optimizers.

    ``pytorch_optimizer.LoRARite`` zips each group's parameters as ``(A₁, B₁), (A₂, B₂), …`` and
    reads the rank dimension of the left (A) and right (B) factor from the group's
    ``lora_l_dim`` / ``lora_r_dim``. This returns one group per orientation with those keys set
    (standard: A (r, in…) → 0, B (out, r…) → 1; transposed DeepSpeed-Chat / minLoRA embedding
    factors: A (in, r) → 1, B (r, out) → 0) and ``param_names``. Only paired factors are included:
    optimize the other trainable parameters (heads, norms, DoRA magnitudes) with a second optimizer.

    Args:
        model: the model with its adapters attached.
        rules: role rules, as for :func:`loraplus.LoraPlus`.

    Returns:
        A list of param-group dicts (``params``, ``param_names``, ``lora_l_dim``, ``lora_r_dim``).

    Raises:
        LoraPlusError: if the model has no A/B pair.

    Example:
        >>> import loraplus
        >>> groups = loraplus.pairing.pair_params(loraplus.testing.tiny_lora_model())
        >>> [(g["param_names"][:2], g["lora_l_dim"], g["lora_r_dim"]) for g in groups]
        [(['layers.0.lora_A.default.weight', 'layers.0.lora_B.default.weight'], 0, 1)]
    """
    found = pairs(model, rules)
    if not len(found):
        reasons = "; ".join(f"{u.name}: {u.reason}" for u in found.unpaired[:3])
        raise LoraPlusError(f"the model has no A/B factor pair{f' ({reasons})' if reasons else ''}")
    groups: dict[bool, dict[str, Any]] = {}
    for pr in found:
        group = groups.setdefault(pr.transposed, {
            "params": [], "param_names": [],
            "lora_l_dim": 1 if pr.transposed else 0, "lora_r_dim": 0 if pr.transposed else 1,
        })
        group["params"] += [pr.a, pr.b]
        group["param_names"] += [pr.a_name, pr.b_name]
    return list(groups.values())
