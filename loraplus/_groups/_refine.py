"""Refining: keep the caller's param groups and move each group's B factors to a sibling group.

``param_groups``/``LoraPlus`` own the grouping; this module takes groups somebody else built
(weight-decay splits, layer-wise decay, per-module rates, a framework's presets) and only adds
LoRA+ on top: per parent group, its B factors (and, when asked, other roles) move to a sibling
right after it, whose learning-rate keys are the parent's times a factor. Nothing else changes.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import LoraPlusError
from .._labels import Label, RuleSpec, label_model
from .._numbers import check_number
from .._role import Role
from ._build import DEFAULT_RATIO, role_lrs, validate_labels, warn_where_loraplus_does_not_apply
from ._scheduler_catalog import scaled_group_keys

__all__ = ["MARK", "SCALED_KEYS", "Refined", "refine", "refine_groups"]

#: Group keys that hold a learning rate and are multiplied by the sibling's factor: the rate
#: itself and every rate a catalogued scheduler writes into the groups (the rate a torch scheduler
#: started from, ``initial_lr``; OneCycleLR's peak and floor, ``max_lr`` and ``min_lr``; SWALR's
#: ``swa_lr``: :data:`loraplus.schedulers.SCHEDULERS`). Every other key is copied unchanged.
SCALED_KEYS: tuple[str, ...] = ("lr", *(k for k in scaled_group_keys() if k != "lr"))

#: The key every refined group carries: ``{"parent": <parent group's name>, "scale": <factor>}``.
#: It marks the groups as LoRA+-refined (``apply`` refuses to run twice) and survives ``state_dict``.
MARK = "loraplus"

# roles that move to a sibling only when an option asks for it (B always moves)
_EMBEDDING_ROLES = (Role.EMBEDDING_A, Role.EMBEDDING_B)


@dataclass
class Refined:
    """What :func:`refine_groups` built: the groups and, for each, the index of its parent and its factor."""

    groups: list[dict[str, Any]]
    parent: list[int]
    scale: list[float]


def _as_groups(groups: Any) -> list[dict[str, Any]]:
    if isinstance(groups, (torch.Tensor, nn.Module, Mapping, str)) or not isinstance(groups, Iterable):
        raise LoraPlusError(
            f"refine takes a list of param groups (dicts with 'params') or an iterable of parameters, "
            f"got {type(groups).__name__}"
        )
    items = list(groups)
    if not items:
        raise LoraPlusError("refine got no param groups (an empty list)")
    if all(isinstance(g, torch.Tensor) for g in items):
        return [{"params": items}]
    bad = [i for i, g in enumerate(items) if not (isinstance(g, Mapping) and "params" in g)]
    if bad:
        raise LoraPlusError(
            f"refine: item(s) {bad[:5]} are neither param-group dicts with 'params' nor parameters; pass either a "
            "list of dicts or a list of parameters, not a mix"
        )
    out = []
    for g in items:
        params = g["params"]
        params = [params] if isinstance(params, torch.Tensor) else list(params)
        out.append({**g, "params": params})
    return out


def _group_name(i: int, group: Mapping[str, Any]) -> str:
    name = group.get("name")
    return f"group{i}" if name is None else str(name)


def _check_unique(groups: Sequence[Mapping[str, Any]], names: Mapping[int, str]) -> None:
    seen: dict[int, int] = {}
    for i, g in enumerate(groups):
        for p in g["params"]:
            if id(p) in seen:
                j = seen[id(p)]
                who = names.get(id(p), f"a parameter of shape {tuple(p.shape)}")
                where = f"in group {j} ({_group_name(j, groups[j])!r})" + (
                    " twice" if i == j else f" and in group {i} ({_group_name(i, g)!r})"
                )
                raise LoraPlusError(
                    f"{who} sits {where}; torch optimizers refuse a parameter in two places and LoRA+ could not "
                    "say which group's options it keeps: put every parameter in exactly one group"
                )
            seen[id(p)] = i


def _check_not_refined(groups: Sequence[Mapping[str, Any]]) -> None:
    for i, g in enumerate(groups):
        if MARK in g:
            raise LoraPlusError(
                f"group {i} ({_group_name(i, g)!r}) is already LoRA+-refined (it carries the {MARK!r} key): "
                "loraplus.apply/refine ran on these groups before, and a second run would multiply B's rate by "
                "the ratio again; build the optimizer afresh and apply LoRA+ once"
            )
        if g.get("role") == Role.B.value:
            raise LoraPlusError(
                f"group {i} ({_group_name(i, g)!r}) is a LoRA+ 'B' group (from loraplus.param_groups or LoraPlus), "
                "whose B factors already have their own rate; refine groups you built yourself, not LoRA+'s"
            )


def _numeric_lr(i: int, group: Mapping[str, Any], default_lr: Any) -> Any:
    lr = group.get("lr", default_lr)
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise LoraPlusError(f"group {i} ({_group_name(i, group)!r}) has a tensor lr with {lr.numel()} elements")
        return lr
    if lr is None or isinstance(lr, bool) or not isinstance(lr, numbers.Real):
        raise LoraPlusError(
            f"group {i} ({_group_name(i, group)!r}) has no numeric learning rate (lr={lr!r}), so its B factors "
            "cannot get ratio × its rate; give every group an 'lr' (or pass lr= to refine for groups without one)"
        )
    return lr


def _scale(value: Any, factor: float) -> Any:
    if isinstance(value, torch.Tensor):
        return value.detach().clone() * factor
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        return float(value) * factor  # NumPy scalars too
    return value  # not a number (a user's custom value under a scaled name): copied unchanged


def _factors(
    lr: float, ratio: float, lr_embedding: float | None, role_lr: Mapping[Any, float]
) -> dict[Role, float]:
    """The factor, relative to the parent's lr, of every role that moves to a sibling."""
    rates = role_lrs(lr, ratio, lr_embedding, role_lr) if lr > 0 else None
    moved: dict[Role, float] = {}
    for role in Role:
        absolute = role in role_lr or (role in _EMBEDDING_ROLES and lr_embedding is not None)
        if role is Role.B and not (Role.B in role_lr or Role.A in role_lr):
            moved[role] = ratio  # the common case: no division, exact also at lr == 0
        elif absolute or role is Role.B:
            if rates is None:
                raise LoraPlusError(
                    f"a group has lr={lr!r}, so the absolute rate role_lr/lr_embedding gives {role.value} cannot be "
                    "expressed as a multiple of it; give that group a positive lr"
                )
            moved[role] = rates[role] / lr
    return moved


def refine_groups(
    groups: Any,
    model: nn.Module,
    ratio: Any = DEFAULT_RATIO,
    *,
    lr: Any = None,
    lr_embedding: Any = None,
    role_lr: Mapping[Role | str, float] | None = None,
    rules: RuleSpec | None = None,
    what: str = "refine",
    scaled_keys: Sequence[str] = SCALED_KEYS,
) -> Refined:
    """:func:`refine`, also saying where each output group came from (for :func:`loraplus.apply`)."""
    ratio_f = check_number("ratio", ratio)
    assert ratio_f is not None
    default_lr = check_number("lr", lr, allow_none=True)
    emb = check_number("lr_embedding", lr_embedding, allow_none=True)
    given = role_lrs(1.0, ratio_f, emb, role_lr)  # validates role_lr's keys and values
    overrides = {Role.coerce(k): given[Role.coerce(k)] for k in (role_lr or {})}
    if ratio_f < 1:
        warnings.warn(
            f"ratio={ratio_f} < 1 gives the B factors a smaller learning rate than their group; LoRA+ uses "
            "ratio >= 1 (the paper recommends 2-16)",
            UserWarning,
            stacklevel=3,
        )
    parents = _as_groups(groups)
    _check_not_refined(parents)
    labels, modules = label_model(model, rules)
    validate_labels(labels, rules_given=rules is not None)
    warn_where_loraplus_does_not_apply(labels, role_lrs(1.0, ratio_f, emb, role_lr), ratio_f, modules)
    by_id: dict[int, Label] = {id(lab.param): lab for lab in labels}
    names = {id(p): n for n, p in model.named_parameters()}
    _check_unique(parents, names)

    # param_names: carried when the groups have them; added (from the model) only when no group has
    # them and every parameter is the model's, so that all groups or none carry them, as torch wants
    have_names = [("param_names" in g) for g in parents]
    add_names = not any(have_names) and all(id(p) in names for g in parents for p in g["params"])

    out = Refined([], [], [])
    moved_any = False
    for i, group in enumerate(parents):
        params = group["params"]
        pnames: list[str] | None = None
        if have_names[i]:
            pnames = list(group["param_names"])
            if len(pnames) != len(params):
                raise LoraPlusError(
                    f"group {i} ({_group_name(i, group)!r}) has {len(params)} params but {len(pnames)} param_names"
                )
        elif add_names:
            pnames = [names[id(p)] for p in params]
        buckets: dict[Role | None, list[int]] = {}
        lr_i = None
        factors: dict[Role, float] = {}
        for j, p in enumerate(params):
            lab = by_id.get(id(p))
            role = lab.role if lab is not None else None
            if role is not None and lr_i is None and any(
                r is role for r in (Role.B, *overrides, *(_EMBEDDING_ROLES if emb is not None else ()))
            ):
                lr_i = _numeric_lr(i, group, default_lr)
                factors = _factors(float(lr_i), ratio_f, emb, overrides)
            key = role if role in factors else None
            buckets.setdefault(key, []).append(j)
        name = _group_name(i, group)
        for key in (None, *sorted((r for r in buckets if r is not None), key=list(Role).index)):
            if key not in buckets:
                continue  # every parameter moved: no empty parent
            idx = buckets[key]
            new: dict[str, Any] = {**group, "params": [params[j] for j in idx]}
            if pnames is not None:
                new["param_names"] = [pnames[j] for j in idx]
            scale = 1.0
            if key is None:
                new["name"] = name
            else:
                moved_any = True
                scale = factors[key]
                if "lr" not in group:
                    new["lr"] = lr_i
                for k in scaled_keys:
                    if k in new:
                        new[k] = _scale(new[k], scale)
                new["name"] = f"{name}.{key.value}"
                new["role"] = key.value
            new[MARK] = {"parent": name, "scale": scale}
            out.groups.append(new)
            out.parent.append(i)
            out.scale.append(scale)
    if not moved_any:
        b_names = [lab.name for lab in labels if lab.role is Role.B][:3]
        raise LoraPlusError(
            f"{what}: none of the {len(parents)} param group(s) holds a LoRA B factor of this model "
            f"(the model's B factors: {', '.join(b_names) or 'none'}), so LoRA+ would change nothing; pass the "
            "model whose parameters the groups hold (the same wrapped or unwrapped object), and check that its "
            "B factors are trainable and in the optimizer"
        )
    return out


def refine(
    groups: Any,
    model: nn.Module,
    ratio: float = DEFAULT_RATIO,
    *,
    lr: float | None = None,
    lr_embedding: float | None = None,
    role_lr: Mapping[Role | str, float] | None = None,
    rules: RuleSpec | None = None,
) -> list[dict[str, Any]]:
    """Add LoRA+ to param groups you built yourself: each group's B factors move to a sibling group.

    For every input group (its name is its ``name`` key, else ``group<i>``), the LoRA B factors of
    ``model`` it holds move to a new group ``"<name>.B"`` placed right after it, whose learning-rate
    keys — ``lr`` and the rates schedulers keep in the groups: ``initial_lr``, ``max_lr``,
    ``min_lr``, ``swa_lr`` (:data:`SCALED_KEYS`, from :data:`loraplus.schedulers.SCHEDULERS`) — are the
    parent's times ``ratio``. Every other key (weight decay, betas, custom keys a framework reads)
    is copied unchanged, so each parameter keeps its group's options. A and every other parameter
    stay in their group. Groups come out in input order, each sibling after its parent; a group left
    empty is dropped; ``param_names`` are split alongside ``params`` (and filled in from the model
    when no group has them and every parameter is the model's). Parameters that are not
    ``model``'s stay where they are. Every output group carries ``name`` and the
    ``"loraplus": {"parent": ..., "scale": ...}`` mark; siblings also carry ``role``.

    Embedding adapters and the other roles follow :func:`loraplus.LoraPlus`: by default both
    embedding factors keep their group's rate (``LoraPlus`` gives them ``lr``), and so do DoRA
    magnitudes, cores and everything else. ``lr_embedding`` (absolute, as in ``LoraPlus``) moves
    both embedding factors to siblings ``"<name>.embedding_A"``/``"<name>.embedding_B"`` at that
    rate; ``role_lr`` (absolute rates per role) moves those roles to ``"<name>.<role>"`` siblings.
    A sibling at an absolute rate scales its other learning-rate keys by ``rate / parent lr``.

    Args:
        groups: a list of param-group dicts (each with ``params``), or an iterable of parameters
            (one group).
        model: the model whose LoRA factors are looked for (as in :func:`loraplus.LoraPlus`).
        ratio: λ: B factors get ``ratio`` times their group's learning rate.
        lr: the rate of groups without an ``lr`` key (what the optimizer's ``lr=`` will give them).
        lr_embedding: absolute rate of both embedding-adapter factors (default: their group's).
        role_lr: absolute per-role rates, e.g. ``{loraplus.Role.MAGNITUDE: 1e-4}``; with ``Role.A``
            given, B gets ``ratio`` times it.
        rules: role rules, as in :func:`loraplus.LoraPlus`.

    Returns:
        The new list of param groups (the input is not modified).

    Raises:
        LoraPlusError: for a parameter in two groups, groups already refined (or LoRA+'s own),
            a group holding B factors without a numeric ``lr``, a model without adapters, or when
            no group holds any of the model's B factors.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2]
        >>> rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        >>> groups = loraplus.refine([{"params": decay, "weight_decay": 0.01, "lr": 1e-3},
        ...                           {"params": rest, "weight_decay": 0.0, "lr": 1e-3}], model, ratio=4)
        >>> [(g["name"], g["lr"], g["weight_decay"]) for g in groups]
        [('group0', 0.001, 0.01), ('group0.B', 0.004, 0.01), ('group1', 0.001, 0.0)]
    """
    return refine_groups(
        groups, model, ratio, lr=lr, lr_embedding=lr_embedding, role_lr=role_lr, rules=rules
    ).groups
