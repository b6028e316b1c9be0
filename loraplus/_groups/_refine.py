"""Refining: keep the caller's param groups and move each group's B factors to a sibling group.

``param_groups``/``LoraPlus`` own the grouping; this module takes groups somebody else built
(weight-decay splits, layer-wise decay, per-module rates, a framework's presets) and only adds
LoRA+ on top: per parent group, its B factors (and, when asked, other roles) move to a sibling
right after it, whose learning-rate keys are the parent's times a factor. Nothing else changes.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .._errors import LoraPlusError
from .._labels import Label, RuleSpec, label_model
from .._numbers import check_number
from .._role import Role, group_role
from ._build import (
    DEFAULT_RATIO,
    role_lrs,
    validate_labels,
    warn_if_ratio_below_one,
    warn_where_loraplus_does_not_apply,
)
from ._scheduler_catalog import scaled_group_keys

__all__ = ["MARK", "SCALED_KEYS", "Refined", "RefinedGroup", "apply_to_groups", "refine_groups"]

#: Group keys that hold a learning rate and are multiplied by the sibling's factor: the rate
#: itself and every rate a catalogued scheduler writes into the groups (the rate a torch scheduler
#: started from, ``initial_lr``; OneCycleLR's peak and floor, ``max_lr`` and ``min_lr``; SWALR's
#: ``swa_lr``: :data:`loraplus.schedulers.SCHEDULERS`). Every other key is copied unchanged.
SCALED_KEYS: tuple[str, ...] = ("lr", *(k for k in scaled_group_keys() if k != "lr"))

#: The key every refined group carries: ``{"parent": <parent group's name>, "scale": <factor>}``.
#: It marks the groups as LoRA+-refined (``apply_to_optimizer`` refuses to run twice) and survives ``state_dict``.
MARK = "loraplus"

# roles that move to a sibling only when an option asks for it (B always moves)
_EMBEDDING_ROLES = (Role.EMBEDDING_A, Role.EMBEDDING_B)


@dataclass(frozen=True)
class RefinedGroup:
    """One output group of :func:`refine_groups` and where it came from.

    Attributes:
        group: the param-group dict.
        parent: the index of the input group it was cut from.
        scale: its learning-rate keys are the parent's times this (1.0 for what stays in the parent).
        role: the role of the factors it holds, or ``None`` for what stays in the parent.
    """

    group: dict[str, Any]
    parent: int
    scale: float
    role: Role | None


@dataclass(frozen=True)
class Refined:
    """What :func:`refine_groups` built: one :class:`RefinedGroup` per output group, in output order."""

    out: tuple[RefinedGroup, ...]

    @property
    def groups(self) -> list[dict[str, Any]]:
        """The param-group dicts, in output order (a new list; the dicts themselves are shared)."""
        return [r.group for r in self.out]


def _as_groups(groups: Any) -> list[dict[str, Any]]:
    """The input as a list of group dicts, each with a list of tensors under ``params``.

    Accepts what torch optimizers accept: an iterable of parameters or of ``(name, parameter)``
    pairs (``model.named_parameters()``), or of group dicts whose ``params`` are either. Names given
    as pairs become the group's ``param_names``, as ``torch.optim.Optimizer.add_param_group`` does.
    """
    if isinstance(groups, (torch.Tensor, nn.Module, Mapping, str)) or not isinstance(groups, Iterable):
        raise LoraPlusError(
            f"apply_to_groups takes a list of param groups (dicts with 'params'), an iterable of parameters or of "
            f"(name, parameter) pairs (as model.named_parameters() yields), got {type(groups).__name__}"
        )
    items = list(groups)
    if not items:
        raise LoraPlusError("apply_to_groups got no param groups (an empty list)")
    if all(isinstance(g, (torch.Tensor, tuple)) for g in items):
        return [_with_names("the parameter list", {"params": items})]
    bad = [i for i, g in enumerate(items) if not (isinstance(g, Mapping) and "params" in g)]
    if bad:
        raise LoraPlusError(
            f"apply_to_groups: item(s) {bad[:5]} are neither param-group dicts with 'params' nor parameters; pass either a "
            "list of dicts or a list of parameters (or of (name, parameter) pairs), not a mix"
        )
    return [_with_names(f"group {i} ({_group_name(i, g)!r})", g) for i, g in enumerate(items)]


def _with_names(where: str, group: Mapping[str, Any]) -> dict[str, Any]:
    """``group`` with ``params`` a list of tensors; ``(name, parameter)`` pairs become ``param_names``."""
    params = group["params"]
    params = [params] if isinstance(params, torch.Tensor) else list(params)
    paired = [k for k, p in enumerate(params) if isinstance(p, tuple)]
    if not paired:
        return {**group, "params": params}
    if len(paired) != len(params):
        bare = [k for k, p in enumerate(params) if not isinstance(p, tuple)]
        raise LoraPlusError(
            f"{where} mixes (name, parameter) pairs (items {paired[:3]}) with bare parameters (items {bare[:3]}); "
            "torch refuses such a group too ('all optimizer params should be with/without names'): give every "
            "parameter of a group its name, as model.named_parameters() does, or none"
        )
    odd = [
        k
        for k, p in enumerate(params)
        if len(p) != 2 or not isinstance(p[0], str) or not isinstance(p[1], torch.Tensor)
    ]
    if odd:
        found = tuple(type(x).__name__ for x in params[odd[0]])
        raise LoraPlusError(
            f"{where}: item {odd[0]} is a tuple of {found}, not a (name, parameter) pair (str, Tensor) as "
            "model.named_parameters() yields"
        )
    names = [p[0] for p in params]
    if "param_names" in group and list(group["param_names"]) != names:
        raise LoraPlusError(
            f"{where} names its parameters twice, as (name, parameter) pairs and as 'param_names', and they "
            f"differ ({_first_mismatch(list(group['param_names']), names)}); give the names one way"
        )
    return {**group, "params": [p[1] for p in params], "param_names": names}


def _first_mismatch(given: Sequence[str], paired: Sequence[str]) -> str:
    for k, (a, b) in enumerate(zip(given, paired)):
        if a != b:
            return f"item {k}: param_names {a!r}, pair {b!r}"
    return f"{len(given)} param_names for {len(paired)} pairs"


def _group_name(i: int, group: Mapping[str, Any]) -> str:
    name = group.get("name")
    return f"group{i}" if name is None else str(name)


def _names_to_add(
    groups: Sequence[Mapping[str, Any]], have_names: Sequence[bool], names: Mapping[int, str]
) -> list[bool]:
    """Which groups get ``param_names`` filled in from the model: all groups or none carry them, as torch wants.

    Without names anywhere, every group gets them when every parameter is the model's (else none does);
    next to groups that name their parameters, every other group gets them, and one holding a
    parameter that is not the model's (so it cannot be named) is refused.
    """
    model_only = [all(id(p) in names for p in g["params"]) for g in groups]
    if not any(have_names):
        return [all(model_only)] * len(groups)
    unnamed = [i for i, (named, known) in enumerate(zip(have_names, model_only)) if not (named or known)]
    if unnamed:
        i = unnamed[0]
        named = [j for j, h in enumerate(have_names) if h]
        raise LoraPlusError(
            f"group {named[0]} ({_group_name(named[0], groups[named[0]])!r}) names its parameters (param_names or "
            f"(name, parameter) pairs) but group {i} ({_group_name(i, groups[i])!r}) does not, and holds a "
            "parameter that is not the model's, so it cannot be named from the model; torch refuses groups with "
            "and without names in one optimizer: name the parameters of every group, or of none"
        )
    return [not h for h in have_names]


def _check_distinct_names(groups: Sequence[Mapping[str, Any]], out: Refined, what: str) -> None:
    """Refuse two output groups with one name (say which input groups they come from and how to fix it)."""
    first: dict[str, RefinedGroup] = {}
    for r in out.out:
        name = r.group["name"]
        if name not in first:
            first[name] = r
            continue
        one, two = (_origin(groups, made) for made in (first[name], r))
        raise LoraPlusError(
            f"{what} would give two groups the name {name!r}: {one} and {two}; loggers, schedulers and "
            "checkpoint checks find groups by name, so names must be unique: give the input groups distinct "
            "'name' keys (a group's siblings are called '<name>.<role>', e.g. '<name>.B')"
        )


def _origin(groups: Sequence[Mapping[str, Any]], made: RefinedGroup) -> str:
    i = made.parent
    given = groups[i].get("name")
    parent = f"input group {i}" + (
        f" (named {given!r})" if given is not None else f" (unnamed, so {_group_name(i, groups[i])!r})"
    )
    if made.role is None:
        return parent
    return f"the {made.role.value} sibling of {parent}"


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
                "loraplus.apply_to_optimizer/apply_to_groups ran on these groups before, and a second run would multiply B's rate by "
                "the ratio again; build the optimizer afresh and apply LoRA+ once"
            )
        if group_role(g) is Role.B:
            raise LoraPlusError(
                f"group {i} ({_group_name(i, g)!r}) is a LoRA+ 'B' group (from loraplus.param_groups or LoraPlus), "
                "whose B factors already have their own rate; pass groups you built yourself, not LoRA+'s"
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
            "cannot get ratio × its rate; give every group an 'lr' (or pass lr= to apply_to_groups for groups without one)"
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
    what: str = "apply_to_groups",
    scaled_keys: Sequence[str] = SCALED_KEYS,
) -> Refined:
    """`apply_to_groups`, also saying where each output group came from (for :func:`loraplus.apply_to_optimizer`)."""
    ratio_f = check_number("ratio", ratio)
    assert ratio_f is not None
    default_lr = check_number("lr", lr, allow_none=True)
    emb = check_number("lr_embedding", lr_embedding, allow_none=True)
    given = role_lrs(1.0, ratio_f, emb, role_lr)  # validates role_lr's keys and values
    overrides = {Role.coerce(k): given[Role.coerce(k)] for k in (role_lr or {})}
    warn_if_ratio_below_one(ratio_f, than="their group")
    parents = _as_groups(groups)
    _check_not_refined(parents)
    labels, modules = label_model(model, rules)
    validate_labels(labels, rules_given=rules is not None)
    warn_where_loraplus_does_not_apply(labels, role_lrs(1.0, ratio_f, emb, role_lr), ratio_f, modules)
    by_id: dict[int, Label] = {id(lab.param): lab for lab in labels}
    names = {id(p): n for n, p in model.named_parameters()}
    _check_unique(parents, names)

    have_names = [("param_names" in g) for g in parents]
    add_names = _names_to_add(parents, have_names, names)

    made: list[RefinedGroup] = []
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
        elif add_names[i]:
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
            made.append(RefinedGroup(new, i, scale, key))
    if not moved_any:
        b_names = [lab.name for lab in labels if lab.role is Role.B][:3]
        raise LoraPlusError(
            f"{what}: none of the {len(parents)} param group(s) holds a LoRA B factor of this model "
            f"(the model's B factors: {', '.join(b_names) or 'none'}), so LoRA+ would change nothing; pass the "
            "model whose parameters the groups hold (the same wrapped or unwrapped object), and check that its "
            "B factors are trainable and in the optimizer"
        )
    out = Refined(tuple(made))
    _check_distinct_names(parents, out, what)
    return out


def apply_to_groups(
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
    empty is dropped. Parameters that are not ``model``'s stay where they are. Every output group
    carries ``name`` and the ``"loraplus": {"parent": ..., "scale": ...}`` mark; siblings also carry
    ``role``.

    Group names are unique or apply_to_groups refuses: an input group whose name is already taken by another
    output group (two input groups named alike, a group named ``"dec.B"`` next to a group ``"dec"``
    whose B factors move to ``"dec.B"``, or one named ``"group1"`` next to an unnamed second group)
    raises a :class:`~loraplus.LoraPlusError` naming both groups. Nothing is renamed behind your back,
    so a name you log or resume by always means the group you named.

    Input forms are those torch optimizers take: parameters, ``(name, parameter)`` pairs such as
    ``model.named_parameters()`` (one group), or group dicts whose ``params`` are parameters or
    pairs. Names given as pairs become the group's ``param_names``, as torch does. ``param_names``
    are split alongside ``params``; groups without them get them from the model when every
    parameter is the model's, so that all groups carry them or none (as torch requires).

    Embedding adapters and the other roles follow :func:`loraplus.LoraPlus`: by default both
    embedding factors keep their group's rate (``LoraPlus`` gives them ``lr``), and so do DoRA
    magnitudes, cores and everything else. ``lr_embedding`` (absolute, as in ``LoraPlus``) moves
    both embedding factors to siblings ``"<name>.embedding_A"``/``"<name>.embedding_B"`` at that
    rate; ``role_lr`` (absolute rates per role) moves those roles to ``"<name>.<role>"`` siblings.
    A sibling at an absolute rate scales its other learning-rate keys by ``rate / parent lr``.

    Args:
        groups: a list of param-group dicts (each with ``params``), or an iterable of parameters
            or of ``(name, parameter)`` pairs (one group).
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
            a group holding B factors without a numeric ``lr``, a model without adapters, when
            no group holds any of the model's B factors, when two output groups would share a
            name, for a group mixing ``(name, parameter)`` pairs with bare parameters, or for named
            groups next to a group that holds parameters not in ``model`` (which cannot be named).

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> decay = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2]
        >>> rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
        >>> groups = loraplus.apply_to_groups([{"params": decay, "weight_decay": 0.01, "lr": 1e-3},
        ...                           {"params": rest, "weight_decay": 0.0, "lr": 1e-3}], model, ratio=4)
        >>> [(g["name"], g["lr"], g["weight_decay"]) for g in groups]
        [('group0', 0.001, 0.01), ('group0.B', 0.004, 0.01), ('group1', 0.001, 0.0)]
    """
    return refine_groups(
        groups, model, ratio, lr=lr, lr_embedding=lr_embedding, role_lr=role_lr, rules=rules
    ).groups
