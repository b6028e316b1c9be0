"""The LoRA scaling s of a layer (ΔW = s·B·A), read per layout from the module that holds the factors."""

from __future__ import annotations

import math
import numbers
from collections.abc import Mapping

import torch
from torch import nn

__all__ = ["layer_scaling"]


def _number(value: object) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _ratio(num: object, den: object) -> float | None:
    n, d = _number(num), _number(den)
    return None if n is None or not d else n / d


def layer_scaling(convention: str, holder: nn.Module | None, adapter: str) -> float | None:
    """The s in ΔW = s·B·A, read from the module that holds the factors, per layout (None: unknown)."""
    if holder is None:
        return None
    attrs = holder.__dict__
    if convention.startswith("PEFT"):
        table = attrs.get("scaling")
        return _number(table.get(adapter)) if isinstance(table, Mapping) else None
    if convention == "kohya/mmpretrain":  # LoRAModule: alpha buffer / lora_dim (also kept as .scale)
        alpha = holder._buffers.get("alpha") if "alpha" in holder._buffers else attrs.get("alpha")
        return _ratio(alpha, attrs.get("lora_dim")) or _number(attrs.get("scale"))
    if convention == "diffusers":  # LoRALinearLayer: up(down(x)) * network_alpha / rank, or 1 without alpha
        if "rank" not in attrs:
            return None
        alpha = attrs.get("network_alpha")
        return 1.0 if alpha is None else _ratio(alpha, attrs["rank"])
    if convention == "torchtune":  # LoRALinear: (alpha / rank) * lora_b(lora_a(x)); DoRALinear keeps `scaling`
        ratio = _ratio(attrs.get("alpha"), attrs.get("rank"))
        return ratio if ratio is not None else _number(attrs.get("scaling"))
    if convention == "NeMo":
        return _ratio(attrs.get("alpha"), attrs.get("dim"))
    if convention == "DeepSpeed-Chat":  # LinearLayer_LoRA keeps lora_scaling / lora_dim as lora_scaling
        return _number(attrs.get("lora_scaling"))
    # loralib, litgpt and hand-written layers: `scaling`; minLoRA parametrizations: `scale`
    for attr in ("scaling", "scale"):
        if attr in attrs:
            return _number(attrs[attr])
    return None
