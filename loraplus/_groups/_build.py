"""Grouping: turn role labels into named, non-empty, deterministic optimizer param groups."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

from torch import nn

from .._caller import stacklevel_outside
from .._errors import LoraPlusError
from .._labels import Label, NoDecaySpec, RuleSpec, is_no_decay, label_model, normalize_no_decay
from .._layouts import LAYOUTS
from .._numbers import check_number, check_product
from .._pairs._pairs import Why, pair_labels
from .._role import ADAPTER_ROLES, Role

__all__ = ["DEFAULT_RATIO", "build_groups", "param_groups", "role_lrs", "split_groups", "warn_if_ratio_below_one"]

#: The default B/A learning-rate ratio λ (see docs/convergence.md for the measurements behind it).
DEFAULT_RATIO: float = 4.0

_ROLE_ORDER = {role: i for i, role in enumerate(Role)}


def role_lrs(
    lr: float,
    ratio: float,
    lr_embedding: float | None = None,
    role_lr: Mapping[Role | str, float] | None = None,
) -> dict[Role, float]:
    """The learning rate of every role.

    A, MAGNITUDE, CORE and OTHER run at ``lr``, embedding factors at ``lr_embedding`` (default
    ``lr``); ``role_lr`` overrides any of them. B runs at ``ratio`` times A's rate *after* the
    override (``ratio * role_lr[A]`` when A's rate is overridden), unless ``role_lr[B]`` is given.
    """
    emb = lr if lr_embedding is None else lr_embedding
    out = {role: lr for role in Role}
    out[Role.EMBEDDING_A] = emb
    out[Role.EMBEDDING_B] = emb
    given: dict[Role, float] = {}
    if role_lr is not None:
        if not isinstance(role_lr, Mapping):
            raise LoraPlusError(f"role_lr must be a mapping {{Role: lr}}, got {type(role_lr).__name__}")
        for key, value in role_lr.items():
            role = Role.coerce(key)
            if role in given:
                raise LoraPlusError(f"role_lr names {role.value!r} twice (as {key!r} and another spelling)")
            checked = check_number(f"role_lr[{role.value!r}]", value)
            assert checked is not None
            given[role] = checked
    out.update(given)
    if Role.B not in given:
        out[Role.B] = check_product(f"B's learning rate (ratio {ratio:g} × A's {out[Role.A]:g})", ratio * out[Role.A])
    return out


def _no_adapters_message(labels: Sequence[Label], rules_given: bool) -> str:
    names = [lab.name for lab in labels[:8]]
    more = f" (and {len(labels) - 8} more)" if len(labels) > 8 else ""
    libs = list(dict.fromkeys(layout.name for layout in LAYOUTS))
    hint = (
        "none of your rules= matched an adapter factor either"
        if rules_given
        else "pass rules= to say which parameters are A and B"
    )
    return (
        f"no LoRA adapter parameters found among {len(labels)} trainable tensors: "
        f"{_role_counts(labels)}. First trainable names: {', '.join(names)}{more}. "
        f"Tried module types (PEFT, torchtune, loralib), modules declaring loraplus_roles(), and the name "
        f"conventions of {', '.join(libs)}; {hint}, e.g. "
        "rules={'*.my_down.weight': loraplus.Role.A, '*.my_up.weight': loraplus.Role.B}, "
        "or mark the parameters you do not want to train with requires_grad=False."
    )


def _role_counts(labels: Sequence[Label]) -> str:
    counts: dict[Role, int] = {}
    for lab in labels:
        counts[lab.role] = counts.get(lab.role, 0) + 1
    return ", ".join(f"{role.value}: {counts[role]}" for role in Role if role in counts)


def validate_labels(labels: Sequence[Label], *, rules_given: bool) -> None:
    """Raise LoraPlusError for models LoRA+ cannot sensibly group."""
    if not labels:
        raise LoraPlusError(
            "the model has no trainable parameters (every parameter has requires_grad=False); "
            "add your LoRA adapters (e.g. peft.get_peft_model) before building the optimizer"
        )
    present = {lab.role for lab in labels}
    if not present & (ADAPTER_ROLES | {Role.MAGNITUDE, Role.CORE}):
        raise LoraPlusError(_no_adapters_message(labels, rules_given))
    for a, b in ((Role.A, Role.B), (Role.EMBEDDING_A, Role.EMBEDDING_B)):
        if (a in present) != (b in present):
            have, missing = (a, b) if a in present else (b, a)
            examples = [lab.name for lab in labels if lab.role is have][:3]
            raise LoraPlusError(
                f"found {have.value} factors but no {missing.value} factor ({_role_counts(labels)}); "
                f"e.g. {', '.join(examples)}. Is the other factor frozen or named differently? "
                f"Pass rules= to label it, e.g. rules={{'*.my_factor': loraplus.Role.{missing.name}}}"
            )


def build_groups(
    labels: Sequence[Label],
    lrs: Mapping[Role, float],
    *,
    weight_decay: float | None,
    no_decay: Sequence[NoDecaySpec] = (),
) -> list[dict[str, Any]]:
    """Group labelled parameters by (role, decays?) in Role order, decaying group first.

    Every group carries ``params``, ``param_names``, ``role`` (the Role's value), ``name``
    and ``lr``; ``weight_decay`` is set to 0.0 for no-decay groups and to the user's value
    for decaying groups (left to the optimizer's default when the user gave none).
    """
    buckets: dict[tuple[Role, bool], dict[str, list[Any]]] = {}
    for lab in labels:
        bucket = buckets.setdefault((lab.role, is_no_decay(lab, no_decay)), {"params": [], "param_names": []})
        bucket["params"].append(lab.param)
        bucket["param_names"].append(lab.name)
    groups: list[dict[str, Any]] = []
    for (role, nd), bucket in sorted(buckets.items(), key=lambda kv: (_ROLE_ORDER[kv[0][0]], kv[0][1])):
        group: dict[str, Any] = {
            "params": bucket["params"],
            "param_names": bucket["param_names"],
            "role": role.value,
            "name": f"{role.value}.no_decay" if nd else role.value,
            "lr": lrs[role],
        }
        if nd:
            group["weight_decay"] = 0.0
        elif weight_decay is not None:
            group["weight_decay"] = weight_decay
        groups.append(group)
    return groups


def prepare(
    model: nn.Module,
    *,
    lr: Any,
    ratio: Any,
    lr_embedding: Any = None,
    role_lr: Mapping[Role | str, float] | None = None,
    weight_decay: Any = None,
    rules: RuleSpec | None = None,
    no_decay: NoDecaySpec | Sequence[NoDecaySpec] | None = None,
) -> tuple[list[Label], list[dict[str, Any]]]:
    """Validate every option, label the model and build its groups (shared by the public entry points)."""
    lr_f = check_number("lr", lr)
    ratio_f = check_number("ratio", ratio)
    assert lr_f is not None and ratio_f is not None
    check_product(f"lr × ratio ({lr_f:g} × {ratio_f:g})", lr_f * ratio_f)
    warn_if_ratio_below_one(ratio_f, than="A")
    emb = check_number("lr_embedding", lr_embedding, allow_none=True)
    wd = check_number("weight_decay", weight_decay, allow_none=True, allow_zero=True)
    lrs = role_lrs(lr_f, ratio_f, emb, role_lr)
    nd = normalize_no_decay(no_decay)
    labels, modules = label_model(model, rules)
    validate_labels(labels, rules_given=rules is not None)
    warn_where_loraplus_does_not_apply(labels, lrs, ratio_f, modules)
    return labels, build_groups(labels, lrs, weight_decay=wd, no_decay=nd)


def warn_if_ratio_below_one(ratio: float, *, than: str) -> None:
    """The one warning for ``ratio < 1``: B then trains slower than ``than`` (A, or the group B left).

    It points at the first line outside loraplus, whichever entry point the user called.
    """
    if ratio < 1:
        warnings.warn(
            f"ratio={ratio} < 1 gives the B factors a smaller learning rate than {than}; LoRA+ uses ratio >= 1 "
            "(the paper recommends 2-16)",
            UserWarning,
            stacklevel=stacklevel_outside(),
        )


def warn_where_loraplus_does_not_apply(
    labels: Sequence[Label], lrs: Mapping[Role, float], ratio: float, modules: Mapping[str, nn.Module]
) -> None:
    """One warning when the B factors end up at A's rate or adapter factors lack their partner.

    B at A's rate is not warned about when the caller asked for ``ratio=1``. Factors of adapters
    that are not one B·A product (LoHa, LoKr, VeRA, AdaLoRA) are never "without a partner".
    """
    problems: list[str] = []
    roles = {lab.role for lab in labels}
    if ratio != 1:
        if Role.B in roles:
            if lrs[Role.B] == lrs[Role.A]:
                problems.append(
                    f"role_lr gives the B factors the A factors' learning rate ({lrs[Role.A]:g}), so LoRA+ changes "
                    "nothing; pass ratio=1 if that is what you want"
                )
        elif Role.EMBEDDING_B in roles:
            if lrs[Role.EMBEDDING_B] == lrs[Role.EMBEDDING_A]:
                problems.append(
                    "the model's only adapters are embedding adapters, whose two factors both train at lr_embedding, "
                    "so the ratio changes nothing; set role_lr={loraplus.Role.EMBEDDING_B: ...} to give their B "
                    "factor its own rate"
                )
        else:
            problems.append(
                f"no B factor was found ({_role_counts(labels)}), so the ratio changes nothing; label the "
                "output-side factors with rules= if they exist"
            )
    _, unpaired = pair_labels(labels, modules, records=False)
    lonely = [u.name for u in unpaired.values() if u.why is Why.NO_PARTNER]
    if lonely:
        shown = ", ".join(lonely[:5]) + (f" (and {len(lonely) - 5} more)" if len(lonely) > 5 else "")
        problems.append(
            f"{len(lonely)} adapter factor(s) have no partner factor in their layer: {shown}; they train at their "
            "role's rate, but check that the other factor is trainable and labelled (rules=, loraplus.pairs(model))"
        )
    tied = [u for u in unpaired.values() if u.why is Why.TIED]
    if tied:
        shown = "; ".join(f"{u.name}: {u.reason}" for u in tied[:3]) + ("; …" if len(tied) > 3 else "")
        problems.append(f"{len(tied)} adapter factor(s) sit in a layer whose other factor is a tied tensor ({shown})")
    if problems:
        warnings.warn("LoRA+ may not do what you expect: " + "; ".join(problems), UserWarning, stacklevel=4)


def param_groups(
    model: nn.Module,
    *,
    lr: float,
    ratio: float = DEFAULT_RATIO,
    lr_embedding: float | None = None,
    role_lr: Mapping[Role | str, float] | None = None,
    weight_decay: float | None = None,
    rules: RuleSpec | None = None,
    no_decay: NoDecaySpec | Sequence[NoDecaySpec] | None = None,
) -> list[dict[str, Any]]:
    """LoRA+ param groups for ``model``, without building an optimizer.

    Use this where something else builds the optimizer (DeepSpeed's
    ``initialize(model_parameters=...)``, a custom factory). The groups are exactly those
    :func:`LoraPlus` passes to the optimizer.

    Args:
        model: the model with its adapters attached; frozen parameters are left out.
        lr: learning rate of the A factors (and of every non-B role unless overridden).
        ratio: λ, the B/A learning-rate ratio: B factors of every adapter family get ``ratio``
            times the A factors' rate (``ratio * role_lr[A]`` when that is given).
        lr_embedding: learning rate of both embedding-adapter factors (default: ``lr``).
        role_lr: per-role overrides, e.g. ``{Role.MAGNITUDE: 1e-4}``.
        weight_decay: decay of every decaying group; biases, norm weights and magnitudes get 0.
            ``None`` leaves decaying groups to the optimizer's default.
        rules: user rules that win over every built-in convention: ``{glob or regex: Role}``,
            ``[(pattern, Role), callable, ...]`` with callables ``(name, param, module) -> Role | None``.
        no_decay: extra no-decay rules (globs, regexes, or callables returning ``True``/``False``
            to force either way, ``None`` to defer to the default).

    Returns:
        A list of dicts with ``params``, ``param_names``, ``role``, ``name``, ``lr`` and,
        where set, ``weight_decay``. Never an empty group.

    Raises:
        LoraPlusError: on an invalid option or a model without adapter factors.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> groups = loraplus.param_groups(model, lr=1e-4, ratio=8, weight_decay=0.01)
        >>> [(g["name"], g["lr"]) for g in groups]
        [('A', 0.0001), ('B', 0.0008), ('other', 0.0001), ('other.no_decay', 0.0001)]
    """
    return prepare(
        model,
        lr=lr,
        ratio=ratio,
        lr_embedding=lr_embedding,
        role_lr=role_lr,
        weight_decay=weight_decay,
        rules=rules,
        no_decay=no_decay,
    )[1]


def split_groups(
    groups: Sequence[Mapping[str, Any]],
    where: Callable[[str, Any], bool],
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Split LoRA+ param groups in two by a per-parameter test, for two optimizers side by side.

    Each group is cut into the parameters for which ``where(name, param)`` is true and the
    rest; both halves keep the group's ``role``, ``name``, ``lr`` and every other option, and
    ``param_names`` stay aligned with ``params``. Empty halves are dropped. The typical use is
    an optimizer restricted to some parameters — ``torch.optim.Muon`` takes only 2-D ones —
    next to AdamW for the others, with both keeping the B/A ratio.

    Args:
        groups: param groups from :func:`param_groups` (or any groups carrying ``param_names``).
        where: ``(name, param) -> bool``; true sends the parameter to the first list.

    Returns:
        ``(selected, rest)``: two lists of param groups, in the original group order.

    Raises:
        LoraPlusError: if a group has no ``param_names`` aligned with its ``params``.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> groups = loraplus.param_groups(model, lr=0.02, ratio=4)
        >>> matrices, rest = loraplus.groups.split_groups(groups, lambda name, p: p.ndim == 2)
        >>> [g["name"] for g in matrices], [g["name"] for g in rest]
        (['A', 'B', 'other'], ['other.no_decay'])
        >>> muon = torch.optim.Muon(matrices, lr=0.02)
    """
    if not callable(where):
        raise LoraPlusError(f"split_groups needs where=(name, param) -> bool, got {type(where).__name__}")
    if isinstance(groups, (Mapping, nn.Module)) or not isinstance(groups, Iterable):
        raise LoraPlusError(
            f"split_groups takes a list of param groups (from loraplus.param_groups), got {type(groups).__name__}"
        )
    groups = list(groups)
    bad = [i for i, g in enumerate(groups) if not (isinstance(g, Mapping) and "params" in g)]
    if bad:
        raise LoraPlusError(f"split_groups: group(s) {bad} are not dicts with 'params' (from loraplus.param_groups)")
    selected: list[dict[str, Any]] = []
    rest: list[dict[str, Any]] = []
    for i, group in enumerate(groups):
        params = list(group["params"])
        names = list(group.get("param_names", ()))
        if len(names) != len(params):
            raise LoraPlusError(
                f"group {i} ({group.get('name', '?')!r}) has {len(params)} params but {len(names)} param_names; "
                "split_groups needs the names to decide: build the groups with loraplus.param_groups(model, ...)"
            )
        halves: tuple[dict[str, list[Any]], dict[str, list[Any]]] = (
            {"params": [], "param_names": []},
            {"params": [], "param_names": []},
        )
        for name, param in zip(names, params):
            half = halves[0] if where(name, param) else halves[1]
            half["params"].append(param)
            half["param_names"].append(name)
        for half, out in zip(halves, (selected, rest)):
            if half["params"]:
                out.append({**group, **half})
    return selected, rest
