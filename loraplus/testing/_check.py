"""The group checker: an optimizer's groups against the ground truth of ``_truth`` (written apart from loraplus)."""

from __future__ import annotations

import math
from collections.abc import Collection, Mapping
from typing import Any

import torch
from torch import nn

from .._errors import LoraPlusError
from .._role import Role, group_role
from ._truth import GeneratedModel, expected_lr

__all__ = ["assert_loraplus_groups"]


def assert_loraplus_groups(
    optimizer: Any,
    model: nn.Module | GeneratedModel,
    ratio: float | None = None,
    *,
    lr: float | None = None,
    weight_decay: float | None = None,
    lr_embedding: float | None = None,
    role_lr: Mapping[Role | str, float] | None = None,
    expected_roles: Mapping[str, Role] | None = None,
    no_decay: Collection[str] | None = None,
) -> None:
    """Assert that ``optimizer``'s param groups give every parameter what it must get.

    The ground truth comes from the caller, never from loraplus: pass a :class:`GeneratedModel`
    (its roles and no-decay names), or a model with ``expected_roles`` (``{name: Role}``, every
    trainable parameter) and, to check weight decay, ``no_decay`` (the names exempt from it).

    Checks: no empty group; every group has ``role`` and ``param_names`` matching its params;
    every trainable parameter sits in exactly one group and no frozen one in any; each
    parameter's group role is its expected role; with ``lr`` and ``ratio``, each parameter's
    group lr is the documented rate of its role (:func:`expected_lr`, with ``lr_embedding`` and
    ``role_lr``); with ``ratio`` alone, lr(B) = ratio · lr(A) across groups; with ``weight_decay``,
    each parameter's group decay is 0 if it is exempt, else ``weight_decay``; groups named
    ``*.no_decay`` always have decay 0.

    Raises:
        AssertionError: listing every problem found.
        LoraPlusError: when no ground truth is given, or the arguments do not fit.
    """
    if isinstance(model, GeneratedModel):
        expected_roles = model.expected if expected_roles is None else expected_roles
        no_decay = model.no_decay if no_decay is None else no_decay
        model = model.model
    if not isinstance(model, nn.Module):
        raise LoraPlusError(
            f"assert_loraplus_groups(optimizer, model): model must be an nn.Module, got {type(model).__name__}"
        )
    if expected_roles is None:
        raise LoraPlusError(
            "assert_loraplus_groups needs ground truth: pass a loraplus.testing.GeneratedModel, or "
            "expected_roles={name: Role} for every trainable parameter (written from how you built the model)"
        )
    if weight_decay is not None and no_decay is None:
        raise LoraPlusError("checking weight_decay needs no_decay= (the names that must get no decay)")
    if lr is not None and ratio is None:
        raise LoraPlusError("checking lr needs ratio= too (B's rate is ratio times A's)")
    problems: list[str] = []
    groups = getattr(optimizer, "param_groups", optimizer)
    named = dict(model.named_parameters())
    trainable = {id(p): n for n, p in named.items() if p.requires_grad}
    frozen = {id(p): n for n, p in named.items() if not p.requires_grad}
    unknown = sorted(set(trainable.values()) - set(expected_roles))
    if unknown:
        problems.append(f"no expected role for trainable parameters {unknown[:5]}")
    # torchao (and compiled-optimizer recipes) keep lr as a float32 tensor: compare at float32 precision.
    tol = 1e-6 if any(isinstance(g.get("lr"), torch.Tensor) for g in groups) else 1e-12
    seen: dict[int, str] = {}
    for i, g in enumerate(groups):
        tag = f"group {i} ({g.get('name', '?')})"
        params = list(g["params"])
        names = list(g.get("param_names", []))
        if not params:
            problems.append(f"{tag} is empty")
        if "role" not in g:
            problems.append(f"{tag} has no 'role'")
        if len(names) != len(params):
            problems.append(f"{tag} has {len(params)} params but {len(names)} param_names")
        for name, p in zip(names, params):
            if named.get(name) is not p:
                problems.append(f"{tag}: param_names says {name!r} but holds another tensor")
        wd = g.get("weight_decay")
        if str(g.get("name", "")).endswith(".no_decay") and wd not in (0, 0.0):
            problems.append(f"{tag} is a no-decay group with weight_decay={wd}")
        for p in params:
            if id(p) in frozen:
                problems.append(f"{tag} holds frozen parameter {frozen[id(p)]!r}")
                continue
            if id(p) not in trainable:
                problems.append(f"{tag} holds a tensor that is not a parameter of the model")
                continue
            name = trainable[id(p)]
            if id(p) in seen:
                problems.append(f"{name!r} is in {seen[id(p)]} and in {tag}")
            seen[id(p)] = tag
            want = expected_roles.get(name)
            if want is None:
                continue
            if group_role(g) is not want:
                problems.append(f"{name!r} is in a {g.get('role')!r} group but its role is {want.value!r}")
            if lr is not None and ratio is not None:
                rate = expected_lr(want, lr=lr, ratio=ratio, lr_embedding=lr_embedding, role_lr=role_lr)
                if not math.isclose(float(g["lr"]), rate, rel_tol=tol):
                    problems.append(f"{name!r} ({want.value}) has lr={float(g['lr'])}, expected {rate}")
            if weight_decay is not None and no_decay is not None:
                want_wd = 0.0 if name in no_decay else weight_decay
                if wd is None or not math.isclose(float(wd), want_wd, rel_tol=1e-12, abs_tol=0.0):
                    problems.append(f"{name!r} has weight_decay={wd}, expected {want_wd}")
    missing = [n for i, n in trainable.items() if i not in seen]
    if missing:
        problems.append(f"trainable parameters in no group: {missing[:5]}")
    if ratio is not None and lr is None:
        a_lrs = [float(g["lr"]) for g in groups if group_role(g) is Role.A]
        b_lrs = [float(g["lr"]) for g in groups if group_role(g) is Role.B]
        for a in a_lrs:
            for b in b_lrs:
                if not math.isclose(b, ratio * a, rel_tol=tol):
                    problems.append(f"lr(B)/lr(A) = {b}/{a} = {b / a}, expected {ratio}")
    if problems:
        raise AssertionError("LoRA+ groups are wrong:\n  " + "\n  ".join(problems))
