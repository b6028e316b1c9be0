"""Scheduler helpers: turn a scalar learning-rate bound into per-group values that keep LoRA+ intact."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .._errors import LoraPlusError
from .._numbers import check_number
from .._role import Role, group_role
from ._scheduler_catalog import start_keys

__all__ = ["scheduler_bounds"]


def _groups_of(optimizer: Any) -> list[Mapping[str, Any]]:
    groups = getattr(optimizer, "param_groups", optimizer)
    if isinstance(groups, Mapping) or not isinstance(groups, Iterable):
        raise LoraPlusError(f"scheduler_bounds needs an optimizer or a list of param groups, got {type(optimizer).__name__}")
    groups = list(groups)
    if not groups or not all(isinstance(g, Mapping) and "lr" in g for g in groups):
        raise LoraPlusError(
            "scheduler_bounds needs param groups that carry an 'lr' (an optimizer, or loraplus.param_groups(...)); "
            f"got {len(groups)} group(s) without one"
        )
    return groups


def _start_lr(group: Mapping[str, Any]) -> float:
    # A scheduler stores the lr it started from in the group ("initial_lr"); after it has stepped, "lr" has moved.
    for key in start_keys():
        if key in group:
            return float(group[key])
    return float(group["lr"])


def scheduler_bounds(optimizer: Any, value: float, *, reference: float | None = None) -> list[float]:
    """Expand a scalar scheduler bound into one value per param group, keeping the LoRA+ ratio.

    Schedulers that *set* learning rates from a scalar — ``OneCycleLR(max_lr=)``,
    ``CyclicLR(base_lr=, max_lr=)``, ``ReduceLROnPlateau(min_lr=)``, ``SWALR(swa_lr=)``,
    transformers' ``GreedyLR(min_lr=, max_lr=)`` — give every group the same value, so B ends up
    with A's learning rate and LoRA+ silently turns into plain LoRA. They all accept a list
    instead; this builds it: group ``i`` gets ``value * lr_i / reference``, so every group keeps
    its ratio to the others. (``CosineAnnealingLR``/``CosineAnnealingWarmRestarts`` accept no
    list for ``eta_min``: use a ``LambdaLR`` whose factor ends at ``eta_min / lr``.) Which
    arguments these are is recorded in :data:`loraplus.schedulers.SCHEDULERS`.

    Args:
        optimizer: the LoRA+ optimizer (or a list of param groups, e.g. from
            :func:`loraplus.param_groups`). A group's starting lr is its ``initial_lr`` when a
            scheduler has already been attached, else its ``lr``.
        value: the scalar you would have passed for the A factors (plain LoRA's value), e.g.
            ``max_lr=1e-3``. Zero is allowed (``min_lr=0``).
        reference: the learning rate ``value`` corresponds to. Default: the starting lr of the
            A-factor group (the ``lr=`` given to :func:`loraplus.LoraPlus`).

    Returns:
        One float per param group, in group order.

    Raises:
        LoraPlusError: if ``value``/``reference`` is not a valid number, if the optimizer has no
            param groups with an ``lr``, or if there is no A group and no ``reference``.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4)
        >>> loraplus.scheduler_bounds(opt, 1e-3)  # groups A, B, other, other.no_decay
        [0.001, 0.016, 0.001, 0.001]
        >>> sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=loraplus.scheduler_bounds(opt, 1e-3), total_steps=10)
    """
    val = check_number("value", value, allow_zero=True)
    assert val is not None
    groups = _groups_of(optimizer)
    if reference is None:
        a_groups = [g for g in groups if group_role(g) is Role.A]
        if not a_groups:
            roles = sorted({str(g.get("role", "<none>")) for g in groups})
            raise LoraPlusError(
                f"scheduler_bounds scales by the A group's lr, but no group has role 'A' (roles found: {', '.join(roles)}); "
                "pass reference=<the lr that value corresponds to>"
            )
        ref = _start_lr(a_groups[0])
    else:
        ref = check_number("reference", reference)
    if ref == 0:
        raise LoraPlusError("the reference learning rate is 0, so ratios are undefined; pass reference=<a positive lr>")
    return [val * (_start_lr(g) / ref) for g in groups]
