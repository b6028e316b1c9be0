"""The factory: labelling + grouping + the user's optimizer class, nothing else."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar, cast

import torch
from torch import nn

from .._errors import LoraPlusError
from .._labels import NoDecaySpec, RuleSpec
from .._role import Role
from ._build import DEFAULT_RATIO, prepare
from ._guard import attach_guard, coerce_mode
from ._lr_free import check_lr_free
from ._refine import MARK

__all__ = ["LoraPlus", "build_optimizer", "is_loraplus_optimizer"]

OptimizerT = TypeVar("OptimizerT")


def _unwrap(factory: Any) -> Any:
    while isinstance(factory, functools.partial):
        factory = factory.func
    return factory


def _check_optimizer_cls(optimizer_cls: Any) -> None:
    if not callable(optimizer_cls):
        raise LoraPlusError(
            f"optimizer_cls must be an optimizer class or a callable returning one "
            f"(e.g. torch.optim.AdamW or functools.partial(...)), got {type(optimizer_cls).__name__}"
        )
    target = _unwrap(optimizer_cls)
    if isinstance(target, type) and issubclass(target, torch.optim.LBFGS):
        raise LoraPlusError(
            f"{target.__name__} does not support per-parameter options (param groups), so it cannot give "
            "B a different learning rate than A; use a first-order optimizer such as torch.optim.AdamW"
        )


def is_loraplus_optimizer(obj: Any) -> bool:
    """Whether loraplus built or retrofitted ``obj``'s param groups (what ``isinstance(obj, LoraPlus)`` asks).

    True for an object with a non-empty ``param_groups`` list of dicts in which either some group
    carries the ``"loraplus"`` mark that :func:`~loraplus.apply_to_optimizer` and
    :func:`~loraplus.apply_to_groups` leave, or every group carries a ``"role"`` naming a
    :class:`~loraplus.Role` (as :func:`~loraplus.LoraPlus` and :func:`~loraplus.param_groups` build them).
    """
    groups = getattr(obj, "param_groups", None)
    if not isinstance(groups, list) or not groups or not all(isinstance(g, Mapping) for g in groups):
        return False
    if any(MARK in g for g in groups):
        return True
    return all(_names_a_role(g.get("role")) for g in groups)


def _names_a_role(value: Any) -> bool:
    if not isinstance(value, str):  # Role is a str enum
        return False
    try:
        Role.coerce(value)
    except LoraPlusError:
        return False
    return True


class _LoraPlusType(type):
    """``LoraPlus``'s metaclass: ``isinstance(x, LoraPlus)`` asks whether loraplus built ``x``'s groups."""

    def __instancecheck__(cls, obj: Any) -> bool:
        return is_loraplus_optimizer(obj)


class LoraPlus(metaclass=_LoraPlusType):
    """Build ``optimizer_cls`` over ``model``'s trainable parameters with LoRA+ learning rates.

    ``LoraPlus(...)`` returns the optimizer itself, not a ``LoraPlus``; ``isinstance(opt, LoraPlus)`` is
    true for any optimizer whose param groups loraplus built (``LoraPlus``, :func:`param_groups`) or
    retrofitted (:func:`apply_to_optimizer`, :func:`apply_to_groups`), and false for every other.

    Returns a genuine instance of ``optimizer_cls`` (or whatever the callable returns) — no
    wrapper — so schedulers, ``state_dict``, ``torch.compile``, fused kernels and ``isinstance``
    checks keep working. Its groups carry ``role``, ``name`` and ``param_names``. The model is never
    modified.

    Args:
        optimizer_cls: an optimizer class (``torch.optim.AdamW``, ``bnb.optim.AdamW8bit``, …) or a
            callable such as ``functools.partial(cls, ...)`` taking param groups first.
        model: the model with its adapters attached.
        ratio: λ, the B/A learning-rate ratio: every B factor gets ``ratio`` times its A
            factor's rate (``ratio * role_lr[A]`` when that is given), whatever the adapter family.
        lr: learning rate of the A factors and, unless overridden, of every non-B role.
        lr_embedding: learning rate of both embedding-adapter factors (default ``lr``).
        role_lr: per-role learning-rate overrides, e.g. ``{loraplus.Role.MAGNITUDE: 1e-4}``.
        weight_decay: applied to every decaying group; biases, norm weights and DoRA
            magnitudes get 0 (extend with ``no_decay``). ``None`` keeps the optimizer's default.
        rules: user role rules, winning over every built-in convention (see :func:`param_groups`).
        no_decay: extra no-decay rules (see :func:`param_groups`).
        precondition: ``"riemannian"`` or ``"lorafa"`` attaches :func:`loraplus.precondition` to the
            optimizer (same ``rules``), so each A/B pair's gradients are preconditioned before every
            step; ``None`` (default) attaches nothing. The optimizer owns it:
            ``loraplus.pairing.preconditioner(opt)`` returns it (e.g. to ``remove()`` it).
        precondition_reg: the preconditioner's damping δ (default: the method's, as in PEFT).
        guard: the ratio guard, a step pre-hook that checks before every step that each group still
            trains at the rate relative to the A group that LoRA+ gave it (B at ``ratio ×``), and on
            the first violation warns once (``"warn"``, the default) or raises
            :class:`~loraplus.LoraPlusError` before the step (``"raise"``), naming the group, both
            rates, the probable cause and the fix; ``None`` attaches nothing.
            ``loraplus.groups.guard(opt)`` returns it (e.g. to ``remove()`` it).
        **optimizer_kwargs: passed to ``optimizer_cls`` untouched (betas, eps, fused, …).

    Raises:
        LoraPlusError: on invalid options, a model without adapters, an optimizer that cannot
            take param groups (LBFGS), a learning-rate-free optimizer that crashes on or ignores
            different per-group rates (Prodigy, D-Adaptation: docs/compatibility.md lists each
            class) when the groups' rates differ, a model whose A factors a still alive LoRA-FA
            optimizer froze, or when the optimizer rejects its arguments (its
            ``TypeError``/``ValueError``, chained as the cause).

    Warns:
        UserWarning: once, when LoRA+ cannot act as asked: B factors at A's rate without
            ``ratio=1`` (through ``role_lr``), no B factor at all, adapter factors without a
            partner in their layer (see :func:`loraplus.pairs`), or a learning-rate-free
            optimizer that estimates its step size per group (``ProdigyPlusScheduleFree``
            without ``split_groups=False``).

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=2e-4, weight_decay=0.01)
        >>> type(opt).__name__, [g["name"] for g in opt.param_groups]
        ('AdamW', ['A', 'B', 'other', 'other.no_decay'])
        >>> isinstance(opt, loraplus.LoraPlus), isinstance(torch.optim.AdamW(model.parameters()), loraplus.LoraPlus)
        (True, False)
    """

    def __new__(  # type: ignore[misc]  # returns the user's optimizer, not a LoraPlus
        cls,
        optimizer_cls: Callable[..., OptimizerT],
        model: nn.Module,
        ratio: float = DEFAULT_RATIO,
        *,
        lr: float,
        lr_embedding: float | None = None,
        role_lr: Mapping[Role | str, float] | None = None,
        weight_decay: float | None = None,
        rules: RuleSpec | None = None,
        no_decay: NoDecaySpec | Sequence[NoDecaySpec] | None = None,
        precondition: str | None = None,
        precondition_reg: float | None = None,
        guard: str | None = "warn",
        **optimizer_kwargs: Any,
    ) -> OptimizerT:
        _check_optimizer_cls(optimizer_cls)
        mode = coerce_mode(guard)
        if precondition is None and precondition_reg is not None:
            raise LoraPlusError('precondition_reg= was given without precondition=; pass precondition="riemannian"')
        if "params" in optimizer_kwargs:
            raise LoraPlusError("do not pass params=: LoraPlus builds the param groups from the model")
        from .._pairs._precondition import check_not_frozen_by_lorafa  # (lazy, like attach below)

        check_not_frozen_by_lorafa(model)  # else labelling finds B without A and cannot say why
        _, groups = prepare(
            model,
            lr=lr,
            ratio=ratio,
            lr_embedding=lr_embedding,
            role_lr=role_lr,
            weight_decay=weight_decay,
            rules=rules,
            no_decay=no_decay,
        )
        optimizer = build_optimizer(optimizer_cls, groups, lr, optimizer_kwargs, "the LoRA+ groups")
        check_lr_free(optimizer, groups)
        attach_guard(optimizer, mode)
        if precondition is not None:
            from .._pairs._precondition import precondition as attach  # the optimizer owns it: preconditioner(opt)

            attach(
                cast(torch.optim.Optimizer, optimizer), model, method=precondition, reg=precondition_reg, rules=rules
            )
        return optimizer


def build_optimizer(
    optimizer_cls: Callable[..., OptimizerT], groups: list[dict[str, Any]], lr: float, kwargs: Mapping[str, Any], what: str
) -> OptimizerT:
    """Call the optimizer factory on ``groups``.

    What it raises about its arguments (``TypeError``, ``ValueError``) becomes a LoraPlusError
    with context; anything else (out of memory, interrupts, CUDA errors) passes through untouched.
    """
    try:
        return optimizer_cls(groups, lr=lr, **kwargs)
    except (TypeError, ValueError) as err:  # add context once, at the public entry point
        shown = getattr(_unwrap(optimizer_cls), "__name__", repr(optimizer_cls))
        kinds = ", ".join(f"{g['name']} ({len(g['params'])} tensors)" for g in groups)
        raise LoraPlusError(f"{shown} could not be built over {what} [{kinds}]: {type(err).__name__}: {err}") from err
