"""Drop-in replacement for PEFT's ``create_loraplus_optimizer``, for users migrating.

:func:`create_loraplus_optimizer` reproduces PEFT's grouping exactly — the same learning
rate, weight decay and group membership for every parameter — without importing PEFT or
transformers and without PEFT's empty groups. It deliberately keeps PEFT's choices, which
differ from :func:`loraplus.LoraPlus`:

| parameter | PEFT / ``compat`` | ``loraplus.LoraPlus`` |
|---|---|---|
| B factors | ``ratio * lr`` | ``ratio * lr`` |
| any other 1-D parameter | ``ratio * lr`` (``ndim == 1``) | ``lr`` (biases, norms, DoRA magnitudes) |
| embedding adapters (A and B) | ``loraplus_lr_embedding``, default 1e-6 | ``lr`` (``lr_embedding=`` to change) |
| weight decay | ``loraplus_weight_decay`` (default 0.0); a ``weight_decay=`` kwarg is ignored by the groups | the user's ``weight_decay`` on every decaying group; 0 for biases, norm weights, magnitudes |
| no-decay test | "bias" substring, inside an ``nn.LayerNorm`` | bias/norm names, torch norm types, any ``*Norm`` class |
| recognised names | ``lora_B`` substring, PEFT LoRA ``Embedding`` layers | every convention in ``CONVENTIONS``, module types, ``rules=`` |
| empty groups | always 4 groups | never (same here) |
| bitsandbytes side effect | registers 32-bit overrides for every ``nn.Embedding`` | none (same here) |
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from ._errors import LoraPlusError
from ._groups._factory import build_optimizer
from ._numbers import check_number

__all__ = ["create_loraplus_optimizer", "peft_param_groups"]

OptimizerT = TypeVar("OptimizerT")


def _is_peft_lora_embedding(module: nn.Module | None) -> bool:
    """Whether ``module`` is PEFT's LoRA embedding layer (or a subclass), by type.

    PEFT is imported only when it already is: a PEFT layer cannot exist before its package is
    imported, and a model without PEFT must not pay for (or fail on) importing it.
    """
    if module is None or "peft" not in sys.modules:
        return False
    try:
        from peft.tuners.lora import Embedding
    except ImportError:  # a PEFT without LoRA embeddings (or a broken install): nothing is one
        return False
    return isinstance(module, Embedding)


def peft_param_groups(
    model: nn.Module,
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
) -> list[dict[str, Any]]:
    """PEFT's four LoRA+ groups (``groupA``, ``embedding``, ``groupB``, ``groupB_no_decay``), empty ones dropped.

    Membership follows PEFT 0.21: a parameter of a PEFT LoRA ``Embedding`` layer goes to
    ``embedding``; else any name containing ``lora_B`` or any 1-D parameter goes to a B group
    (``groupB_no_decay`` when it sits in an ``nn.LayerNorm`` or its name contains ``bias``);
    everything else to ``groupA``. Groups also carry ``name`` and ``param_names``.
    """
    lr_f = check_number("lr", lr)
    ratio_f = check_number("loraplus_lr_ratio", loraplus_lr_ratio)
    emb_f = check_number("loraplus_lr_embedding", loraplus_lr_embedding)
    wd_f = check_number("loraplus_weight_decay", loraplus_weight_decay, allow_zero=True)
    assert lr_f is not None and ratio_f is not None and emb_f is not None and wd_f is not None
    if not isinstance(model, nn.Module):
        raise LoraPlusError(f"expected a torch.nn.Module, got {type(model).__name__}")
    modules = dict(model.named_modules(remove_duplicate=False))
    buckets: dict[str, list[tuple[str, nn.Parameter]]] = {k: [] for k in ("groupA", "embedding", "groupB", "groupB_no_decay")}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        segs = name.split(".")
        if len(segs) > 2 and _is_peft_lora_embedding(modules.get(".".join(segs[:-2]))):
            buckets["embedding"].append((name, param))
        elif "lora_B" in name or param.ndim == 1:
            in_layernorm = any(isinstance(modules.get(".".join(segs[:k])), nn.LayerNorm) for k in range(1, len(segs)))
            decays = not in_layernorm and "bias" not in name
            buckets["groupB" if decays else "groupB_no_decay"].append((name, param))
        else:
            buckets["groupA"].append((name, param))
    settings = {
        "groupA": (lr_f, wd_f),
        "embedding": (emb_f, wd_f),
        "groupB": (lr_f * ratio_f, wd_f),
        "groupB_no_decay": (lr_f * ratio_f, 0.0),
    }
    groups = []
    for key, items in buckets.items():
        if items:
            group_lr, group_wd = settings[key]
            groups.append(
                {
                    "params": [p for _, p in items],
                    "param_names": [n for n, _ in items],
                    "name": key,
                    "lr": group_lr,
                    "weight_decay": group_wd,
                }
            )
    if not groups:
        raise LoraPlusError("the model has no trainable parameters (every parameter has requires_grad=False)")
    return groups


def create_loraplus_optimizer(
    model: nn.Module,
    optimizer_cls: Callable[..., OptimizerT],
    *,
    lr: float,
    loraplus_lr_ratio: float,
    loraplus_lr_embedding: float = 1e-6,
    loraplus_weight_decay: float = 0.0,
    **kwargs: Any,
) -> OptimizerT:
    """Build ``optimizer_cls`` with PEFT's LoRA+ grouping (see the module docs for how it differs).

    Same signature as ``peft.optimizers.create_loraplus_optimizer``; ``kwargs`` go to the
    optimizer. Like PEFT, a ``weight_decay=`` kwarg only sets the optimizer's default,
    which no group uses: pass ``loraplus_weight_decay`` instead.

    Example:
        >>> import torch, loraplus
        >>> from loraplus.compat import create_loraplus_optimizer
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=1e-4, loraplus_lr_ratio=16)
        >>> [(g["name"], g["lr"]) for g in opt.param_groups]
        [('groupA', 0.0001), ('groupB', 0.0016), ('groupB_no_decay', 0.0016)]
    """
    groups = peft_param_groups(
        model,
        lr=lr,
        loraplus_lr_ratio=loraplus_lr_ratio,
        loraplus_lr_embedding=loraplus_lr_embedding,
        loraplus_weight_decay=loraplus_weight_decay,
    )
    return build_optimizer(optimizer_cls, groups, lr, kwargs, "PEFT's LoRA+ groups")
