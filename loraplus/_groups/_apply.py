"""Applying: LoRA+ in place on an optimizer somebody else built, and on the schedulers attached to it."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from .._errors import LoraPlusError
from .._labels import RuleSpec
from .._role import Role
from ._build import DEFAULT_RATIO
from ._lr_free import check_lr_free
from ._refine import MARK, refine_groups

__all__ = ["SCHEDULER_SCALED_LISTS", "SCHEDULER_COPIED_LISTS", "apply"]

OptimizerT = TypeVar("OptimizerT")

#: Per-group scheduler lists holding learning rates: a sibling's entry is its parent's times its factor.
SCHEDULER_SCALED_LISTS: tuple[str, ...] = ("base_lrs", "_last_lr", "max_lrs", "min_lrs")
#: Per-group scheduler lists holding something else (functions, momenta): a sibling's entry is its parent's.
SCHEDULER_COPIED_LISTS: tuple[str, ...] = ("lr_lambdas", "base_momentums", "max_momentums")


def _inner_optimizer(optimizer: Any) -> Any:
    """The object whose ``param_groups`` list is the real one: wrappers that expose ``.optimizer``
    (accelerate's AcceleratedOptimizer, SageMaker's DistributedOptimizer, …) are looked through."""
    seen = set()
    inner = optimizer
    while id(inner) not in seen:
        seen.add(id(inner))
        nxt = getattr(inner, "optimizer", None)
        if nxt is None or nxt is inner or not isinstance(getattr(nxt, "param_groups", None), list):
            break
        inner = nxt
    if not isinstance(getattr(inner, "param_groups", None), list) or not hasattr(inner, "state"):
        raise LoraPlusError(
            f"apply needs a torch optimizer (or a wrapper exposing one as .optimizer), got {type(optimizer).__name__}"
        )
    return inner


def _inner_scheduler(scheduler: Any) -> Any:
    while not hasattr(scheduler, "optimizer") and hasattr(scheduler, "scheduler"):  # accelerate's wrapper
        scheduler = scheduler.scheduler
    return scheduler


def _walk_schedulers(scheduler: Any) -> list[Any]:
    """A scheduler and, for SequentialLR/ChainedScheduler, the schedulers it drives."""
    out = [scheduler]
    for child in getattr(scheduler, "_schedulers", ()) or ():
        out.extend(_walk_schedulers(_inner_scheduler(child)))
    return out


def _check_schedulers(schedulers: Sequence[Any], inner: Any, n_groups: int) -> list[Any]:
    found: list[Any] = []
    for k, given in enumerate(schedulers):
        top = _inner_scheduler(given)
        for sched in _walk_schedulers(top):
            owner = getattr(sched, "optimizer", None)
            if owner is None or _inner_optimizer(owner) is not inner:
                raise LoraPlusError(
                    f"schedulers[{k}] ({type(sched).__name__}) is attached to another optimizer; pass only the "
                    "schedulers of the optimizer given to apply"
                )
            for attr in (*SCHEDULER_SCALED_LISTS, *SCHEDULER_COPIED_LISTS):
                value = getattr(sched, attr, None)
                if isinstance(value, list) and len(value) != n_groups:
                    raise LoraPlusError(
                        f"schedulers[{k}] ({type(sched).__name__}) has {len(value)} {attr} for {n_groups} param "
                        "groups: it no longer matches this optimizer; attach schedulers after building the optimizer"
                    )
            found.append(sched)
    return found


def _extend(sched: Any, parent: Sequence[int], scale: Sequence[float]) -> None:
    for attr in SCHEDULER_SCALED_LISTS:
        value = getattr(sched, attr, None)
        if isinstance(value, list):
            setattr(sched, attr, [_times(value[i], s) for i, s in zip(parent, scale)])
    for attr in SCHEDULER_COPIED_LISTS:
        value = getattr(sched, attr, None)
        if isinstance(value, list):
            setattr(sched, attr, [value[i] for i in parent])


def _times(value: Any, factor: float) -> Any:
    if factor == 1.0:
        return value
    if isinstance(value, torch.Tensor):
        return value.detach().clone() * factor
    return value * factor


def apply(
    optimizer: OptimizerT,
    model: nn.Module,
    ratio: float = DEFAULT_RATIO,
    *,
    schedulers: Iterable[Any] | None = None,
    lr_embedding: float | None = None,
    role_lr: Mapping[Role | str, float] | None = None,
    rules: RuleSpec | None = None,
) -> OptimizerT:
    """Turn an optimizer you already built into a LoRA+ one, in place, before its first step.

    Its param groups are replaced by :func:`loraplus.refine` of them: each group's B factors move
    to a sibling ``"<name>.B"`` right after it at ``ratio ×`` its learning-rate keys, and every
    other option stays. Works on any ``torch.optim.Optimizer`` and on wrappers that expose it as
    ``.optimizer`` (accelerate's ``AcceleratedOptimizer``). Call it before the first step; state that
    already exists (Adagrad's initial sums, a loaded checkpoint) is keyed by parameter in torch, so it
    stays with each parameter in its new group, unchanged.

    Schedulers keep their own per-group lists, and nothing in torch links an optimizer to its
    schedulers, so pass the ones already attached as ``schedulers=[...]``: their per-group rate
    lists (``base_lrs``, ``_last_lr``, CyclicLR's ``max_lrs``, ReduceLROnPlateau's ``min_lrs``)
    get each sibling's entry as its parent's times the factor, function and momentum lists
    (LambdaLR's ``lr_lambdas``, CyclicLR's momenta) the parent's entry; SequentialLR's and
    ChainedScheduler's children are followed. OneCycleLR keeps its bounds in the groups
    (``initial_lr``, ``max_lr``, ``min_lr``), which are scaled with ``lr``. When the groups carry
    ``initial_lr`` (a scheduler was attached) and ``schedulers`` is not given, apply refuses,
    since the scheduler would no longer match; pass ``schedulers=[]`` if none is left.

    Args:
        optimizer: the built optimizer (or a wrapper exposing ``.optimizer``).
        model: the model whose LoRA B factors the optimizer holds.
        ratio: λ: B factors get ``ratio`` times their group's rate.
        schedulers: the schedulers attached to ``optimizer`` (see above).
        lr_embedding: as in :func:`loraplus.refine`.
        role_lr: as in :func:`loraplus.refine`.
        rules: as in :func:`loraplus.refine`.

    Returns:
        ``optimizer`` itself (its groups now carry ``name``, the ``loraplus`` mark, ``param_names``
        where known, and ``role`` on the siblings), so ``print(loraplus.explain(apply(opt, model)))``
        works.

    Raises:
        LoraPlusError: on a second call (the groups carry the ``loraplus`` mark), when the optimizer
            has state not keyed by its parameters, for a parameter in two groups, when no group holds a B factor of
            ``model``, when groups carry ``initial_lr`` but ``schedulers`` is not given, or when a
            scheduler belongs to another optimizer or no longer matches its groups.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        >>> sched = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.5, total_iters=4)
        >>> opt = loraplus.apply(opt, model, ratio=8, schedulers=[sched])
        >>> [(g["name"], g["lr"]) for g in opt.param_groups], sched.base_lrs
        ([('group0', 0.0005), ('group0.B', 0.004)], [0.001, 0.008])
    """
    inner = _inner_optimizer(optimizer)
    groups = inner.param_groups
    marked = [i for i, g in enumerate(groups) if MARK in g]
    if marked:
        raise LoraPlusError(
            "loraplus.apply was already called on this optimizer (its groups carry the "
            f"{MARK!r} key); a second call would multiply B's rate by the ratio again. Apply LoRA+ once, "
            "right after building the optimizer"
        )
    # torch.optim (and bitsandbytes, torchao, …) key state by the parameter object, so a parameter's state
    # (Adagrad's initial sums, momenta after a step) moves with it to its new group untouched; a state keyed
    # by anything else cannot be moved faithfully
    held = {id(p) for g in groups for p in g["params"]}
    strange = [k for k in getattr(inner, "state", {}) if id(k) not in held]
    if strange:
        raise LoraPlusError(
            f"the optimizer's state has {len(strange)} entr(y/ies) not keyed by one of its parameters "
            f"(e.g. {type(strange[0]).__name__}), so apply cannot move it with the parameters; apply LoRA+ "
            "before the first step"
        )
    sched_list = None if schedulers is None else list(schedulers)
    if sched_list is None and any("initial_lr" in g for g in groups):
        raise LoraPlusError(
            "the param groups carry 'initial_lr', so a scheduler is attached to this optimizer; its per-group "
            "lists would no longer match the new groups: pass it as apply(..., schedulers=[scheduler]) "
            "(or schedulers=[] if none is in use)"
        )
    found = _check_schedulers(sched_list or [], inner, len(groups))
    refined = refine_groups(
        groups, model, ratio, lr_embedding=lr_embedding, role_lr=role_lr, rules=rules, what="apply"
    )
    check_lr_free(inner, refined.groups)  # before anything changes
    inner.param_groups[:] = refined.groups  # the same list object: wrappers that alias it stay right
    for sched in found:
        _extend(sched, refined.parent, refined.scale)
    return optimizer
