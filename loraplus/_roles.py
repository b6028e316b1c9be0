"""Labelling: decide, for every trainable parameter of a model, which role it plays.

This module is a pure function of the model (``label_parameters``): it reads names,
module types and declared roles, never changes the model, and knows nothing about
optimizers or learning rates. The naming-convention table lives in ``_conventions.py``, the
weight-decay rules in ``_decay.py``, grouping in ``_groups.py``.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from torch import nn

from ._conventions import (  # noqa: F401 - re-exported: the rest of the package imports them from here
    ADAPTER_ROLES,
    CONVENTIONS,
    WRAPPER_SEGMENTS,
    Convention,
    Role,
    _INDEX,
    _kept_segments,
    _matching_tail,
    _may_have_wrappers,
    _name_source,
    canonical_name,
    match_convention,
    match_pattern,
)
from ._decay import (  # noqa: F401 - re-exported
    NoDecaySpec,
    _no_decay_leaf,
    _norm_named,
    default_no_decay,
    is_no_decay,
    is_norm_module,
    normalize_no_decay,
)
from ._errors import LoraPlusError

__all__ = [
    "CONVENTIONS",
    "Convention",
    "Label",
    "Role",
    "RuleSpec",
    "canonical_name",
    "classify",
    "label_model",
    "label_parameters",
]

A, B, EA, EB, MAG, CORE = Role.A, Role.B, Role.EMBEDDING_A, Role.EMBEDDING_B, Role.MAGNITUDE, Role.CORE

# PEFT tuner layers list their adapter sub-modules in ``adapter_layer_names``.
_PEFT_LAYER_ROLES: dict[str, tuple[Role, str]] = {
    "lora_A": (A, "lora"),
    "lora_B": (B, "lora"),
    "lora_embedding_A": (EA, "lora"),
    "lora_embedding_B": (EB, "lora"),
    "lora_magnitude_vector": (MAG, "dora"),
    "lora_E": (CORE, "adalora"),
    "hada_w1_a": (B, "loha"),
    "hada_w2_a": (B, "loha"),
    "hada_w1_b": (A, "loha"),
    "hada_w2_b": (A, "loha"),
    "hada_t1": (CORE, "loha"),
    "hada_t2": (CORE, "loha"),
    "lokr_w1_a": (B, "lokr"),
    "lokr_w2_a": (B, "lokr"),
    "lokr_w1_b": (A, "lokr"),
    "lokr_w2_b": (A, "lokr"),
    "lokr_w1": (CORE, "lokr"),
    "lokr_w2": (CORE, "lokr"),
    "lokr_t2": (CORE, "lokr"),
    "vera_lambda_d": (A, "vera"),
    "vera_lambda_b": (B, "vera"),
}
_TORCHTUNE_ROLES: dict[str, tuple[Role, str]] = {
    "lora_a": (A, "lora"),
    "lora_b": (B, "lora"),
    "magnitude": (MAG, "dora"),
}
_LORALIB_ROLES: dict[str, tuple[Role, str]] = {"lora_A": (A, "lora"), "lora_B": (B, "lora")}


# --------------------------------------------------------------------------- rules

RuleCallable = Callable[[str, nn.Parameter, nn.Module], Union[Role, str, None]]
#: What ``rules=`` accepts: a mapping ``{pattern: role}`` or a sequence of ``(pattern, role)`` pairs
#: and callables ``(name, param, module) -> Role | None``. A pattern is a glob (``str``) or a
#: compiled regular expression (searched).
RuleSpec = Union[Mapping[Union[str, "re.Pattern[str]"], Union[Role, str]], Sequence[Any]]


@dataclass(frozen=True)
class _Rule:
    description: str
    pattern: str | re.Pattern[str] | None
    role: Role | None
    func: RuleCallable | None

    def apply(self, name: str, canon: str, param: nn.Parameter, module: nn.Module) -> Role | None:
        if self.func is not None:
            out = self.func(name, param, module)
            return None if out is None else Role.coerce(out)
        return self.role if match_pattern(self.pattern, name, canon) else None


def normalize_rules(rules: RuleSpec | None) -> list[_Rule]:
    """Validate ``rules=`` and turn it into a list of rules, raising LoraPlusError on bad input."""
    if rules is None:
        return []
    items: list[Any]
    if isinstance(rules, Mapping):
        items = list(rules.items())
    elif isinstance(rules, (str, bytes, re.Pattern)) or callable(rules):
        items = [rules]
    else:
        try:
            items = list(rules)
        except TypeError:
            raise LoraPlusError(
                f"rules must be a mapping {{pattern: role}} or a list of (pattern, role) pairs and callables, "
                f"got {type(rules).__name__}"
            ) from None
    out: list[_Rule] = []
    for item in items:
        if callable(item) and not isinstance(item, (str, re.Pattern, Role)):
            desc = getattr(item, "__qualname__", None) or repr(item)
            out.append(_Rule(f"rule {desc}", None, None, item))
            continue
        if not (isinstance(item, (tuple, list)) and len(item) == 2):  # lists: rules loaded from YAML/JSON
            raise LoraPlusError(
                f"cannot use {item!r} as a rule: give (pattern, role) pairs, e.g. ('*.my_up', loraplus.Role.B), "
                "or a callable (name, param, module) -> Role | None"
            )
        pattern, role = item
        if not isinstance(pattern, (str, re.Pattern)):
            raise LoraPlusError(
                f"a rule's pattern must be a glob string or a compiled regex, got {type(pattern).__name__}: {pattern!r}"
            )
        shown = pattern.pattern if isinstance(pattern, re.Pattern) else pattern
        out.append(_Rule(f"rule {shown!r}", pattern, Role.coerce(role), None))
    return out


# --------------------------------------------------------------------------- labelling


@dataclass(frozen=True)
class Label:
    """The outcome of labelling one trainable parameter."""

    name: str
    param: nn.Parameter
    role: Role
    family: str | None
    source: str
    module: nn.Module
    #: The owning module's own attribute name says norm (``ln_f``, ``input_layernorm``) and the module
    #: is not a weight-matrix layer; a ModuleDict key (an adapter name) never counts.
    norm_named: bool = False
    #: Length of the naming convention that gave the role (0: none did), so pairing knows where the
    #: factor segment is without matching again.
    pattern_len: int = 0


def _host_module(name: str, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    """The layer a factor adapts: the module before ``.parametrizations`` (minLoRA), else the owner."""
    if "parametrizations" not in name:  # fast path: no such segment possible
        return modules.get(name.rpartition(".")[0])
    segs = name.split(".")
    if "parametrizations" in segs:
        i = segs.index("parametrizations")
        return modules.get(".".join(segs[:i]))
    return modules.get(".".join(segs[:-1]))


def _may_declare(cls: type) -> bool:
    """Whether modules of this class can reach one of ``_declared_roles``' branches."""
    modname = cls.__module__ or ""
    return (
        callable(getattr(cls, "loraplus_roles", None))
        or (modname.startswith("peft.") and isinstance(getattr(cls, "adapter_layer_names", None), tuple))
        or (modname.startswith("torchtune.") and callable(getattr(cls, "adapter_params", None)))
        or modname.startswith("loralib.")
    )


def _declared_roles(
    modules: Mapping[str, nn.Module],
) -> dict[int, tuple[Role, str | None, str]]:
    """Roles declared by modules (protocol) and by known library module types, keyed by id(param).

    Returns ``{id(param): (role, family, source)}``; declared roles win over library types,
    and a deeper module's declaration wins over an outer one.
    """
    declared: dict[int, tuple[Role, str | None, str]] = {}
    by_type: dict[int, tuple[Role, str | None, str]] = {}
    # only modules whose class can declare anything (one check per class: O(modules) overall)
    kinds: dict[type, bool] = {}
    candidates = []
    for item in modules.items():
        cls = type(item[1])
        may = kinds.get(cls)
        if may is None:
            may = kinds[cls] = _may_declare(cls)
        if may:
            candidates.append(item)
    # deeper modules later, so their declarations overwrite outer ones
    for prefix, module in sorted(candidates, key=lambda kv: kv[0].count(".") + bool(kv[0])):
        cls = type(module)
        if callable(getattr(cls, "loraplus_roles", None)):
            table = module.loraplus_roles()
            if not isinstance(table, Mapping):
                raise LoraPlusError(
                    f"{cls.__qualname__}.loraplus_roles() at {prefix or '<root>'!r} must return a mapping "
                    f"{{parameter name: Role}}, got {type(table).__name__}"
                )
            for local, role in table.items():
                try:
                    param = module.get_parameter(local)
                except AttributeError:
                    raise LoraPlusError(
                        f"{cls.__qualname__}.loraplus_roles() at {prefix or '<root>'!r} names {local!r}, "
                        "which is not a parameter of that module"
                    ) from None
                declared[id(param)] = (Role.coerce(role), None, f"declared by {cls.__name__}.loraplus_roles()")
            continue
        modname = cls.__module__ or ""
        if modname.startswith("peft.") and isinstance(getattr(cls, "adapter_layer_names", None), tuple):
            use_dora = getattr(module, "use_dora", None)
            for attr in module.adapter_layer_names:
                hit = _PEFT_LAYER_ROLES.get(attr)
                sub = module._modules.get(attr)
                if hit is None or sub is None:
                    continue
                for local, p in sub.named_parameters():
                    family = hit[1]
                    if attr in ("lora_A", "lora_B"):  # shared by LoRA, DoRA and AdaLoRA layers
                        if modname.startswith("peft.tuners.adalora."):
                            family = "adalora"
                        elif isinstance(use_dora, Mapping) and use_dora.get(local.split(".")[0]):
                            family = "dora"
                    by_type[id(p)] = (hit[0], family, f"PEFT {cls.__name__}.{attr}")
        elif modname.startswith("torchtune.") and callable(getattr(cls, "adapter_params", None)):
            dora = "magnitude" in module.adapter_params()  # DoRALinear: its factors belong to family "dora"
            for local in module.adapter_params():
                hit = _TORCHTUNE_ROLES.get(local.split(".")[0])
                if hit is not None:
                    family = "dora" if dora else hit[1]
                    by_type[id(module.get_parameter(local))] = (hit[0], family, f"torchtune {cls.__name__}")
        elif modname.startswith("loralib."):
            for attr, hit in _LORALIB_ROLES.items():
                p = module._parameters.get(attr)
                if p is not None:
                    by_type[id(p)] = (hit[0], hit[1], f"loralib {cls.__name__}")
    by_type.update(declared)
    return by_type


class _Overridden(Exception):
    pass


def _walk(model: nn.Module) -> tuple[dict[str, nn.Module], list[tuple[str, nn.Parameter]] | None]:
    """``dict(model.named_modules(remove_duplicate=False))`` and ``list(model.named_parameters())`` in one pass.

    torch's nested generators walk the tree twice and cost O(depth) per module; this is one
    walk with the same order, names and de-duplication (a module seen before lends no
    parameters again, and neither can its sub-modules, which were all seen under its first name).
    When a class overrides those methods (e.g. FSDP1), torch's own are used and the list is None.
    """
    base = nn.Module
    root = type(model)
    if root.named_parameters is not base.named_parameters or root._named_members is not base._named_members:
        return dict(model.named_modules(remove_duplicate=False)), None
    checked: set[type] = set()
    modules: dict[str, nn.Module] = {}
    params: list[tuple[str, nn.Parameter]] = []
    seen_modules: set[nn.Module] = set()
    seen_params: set[int] = set()  # ids: Tensor.__hash__ is id() in Python, this skips the call

    def visit(prefix: str, module: nn.Module) -> None:
        cls = type(module)
        if cls not in checked:
            if cls.named_modules is not base.named_modules:
                raise _Overridden
            checked.add(cls)
        modules[prefix] = module
        if module not in seen_modules:
            seen_modules.add(module)
            for key, value in module._parameters.items():
                if value is None or id(value) in seen_params:
                    continue
                seen_params.add(id(value))
                params.append((prefix + "." + key if prefix else key, value))
        for key, sub in module._modules.items():
            if sub is not None:
                visit(prefix + "." + key if prefix else key, sub)

    try:
        visit("", model)
    except (_Overridden, RecursionError):
        return dict(model.named_modules(remove_duplicate=False)), None
    return modules, params


def named_modules_map(model: nn.Module) -> dict[str, nn.Module]:
    """``dict(model.named_modules(remove_duplicate=False))``, computed in one iterative walk."""
    return _walk(model)[0]


def label_parameters(
    model: nn.Module,
    rules: RuleSpec | None = None,
    *,
    modules: Mapping[str, nn.Module] | None = None,
) -> list[Label]:
    """Label every trainable parameter of ``model`` (each tensor once, in ``named_parameters`` order).

    Precedence: user ``rules`` > modules' declared roles (``loraplus_roles()``) > known library
    module types > the :data:`CONVENTIONS` name table > :attr:`Role.OTHER`.
    """
    return label_model(model, rules, modules=modules)[0]


def label_model(
    model: nn.Module,
    rules: RuleSpec | None = None,
    *,
    modules: Mapping[str, nn.Module] | None = None,
) -> tuple[list[Label], Mapping[str, nn.Module]]:
    """:func:`label_parameters` and the ``named_modules`` map it walked (one walk of the model)."""
    if not isinstance(model, nn.Module):
        raise LoraPlusError(f"expected a torch.nn.Module, got {type(model).__name__}")
    user_rules = normalize_rules(rules)
    named: list[tuple[str, nn.Parameter]] | None = None
    if modules is None:
        modules, named = _walk(model)
    typed = _declared_roles(modules)
    labels: list[Label] = []
    for name, param in model.named_parameters() if named is None else named:
        if not param.requires_grad:
            continue
        owner = modules.get(name.rpartition(".")[0])
        if owner is None:
            owner = model
        canon = canonical_name(name)
        role: Role | None = None
        family: str | None = None
        source = ""
        pattern_len = 0
        if user_rules:
            hits = [(r, r.apply(name, canon, param, owner)) for r in user_rules]
            hits = [(r, role_) for r, role_ in hits if role_ is not None]
            if hits:
                roles = {role_ for _, role_ in hits}
                if len(roles) > 1:
                    shown = "; ".join(f"{r.description} -> {role_.value}" for r, role_ in hits)
                    raise LoraPlusError(
                        f"parameter {name!r} is matched by user rules with different roles ({shown}); "
                        "make the rules disjoint"
                    )
                role, source = hits[0][1], hits[0][0].description
        if role is None:
            hit = typed.get(id(param))
            if hit is not None:
                role, family, source = hit
        if role is None:
            conv = match_convention(name, modules)
            if conv is not None:
                role, family, source, pattern_len = conv.role, conv.family, _name_source(conv), len(conv.pattern)
        if role is None:
            role, source = Role.OTHER, "not an adapter factor"
        elif role in (Role.A, Role.B) and not source.startswith(("rule", "declared")):
            if isinstance(_host_module(name, modules), nn.Embedding):
                role = Role.EMBEDDING_A if role is Role.A else Role.EMBEDDING_B
                source += " on an nn.Embedding"
        labels.append(Label(name, param, role, family, source, owner, _norm_named(name, owner, modules), pattern_len))
    return labels, modules


def classify(model: nn.Module, rules: RuleSpec | None = None) -> dict[str, Role]:
    """Map every trainable parameter name of ``model`` to its :class:`Role`.

    Frozen parameters are left out; tied tensors appear once, under their first name.
    ``rules`` are the same as :func:`loraplus.param_groups`'s.

    Example:
        >>> import loraplus
        >>> roles = loraplus.classify(loraplus.testing.tiny_lora_model())
        >>> roles["layers.0.lora_A.default.weight"], roles["layers.0.lora_B.default.weight"], roles["head.bias"]
        (<Role.A: 'A'>, <Role.B: 'B'>, <Role.OTHER: 'other'>)
    """
    return {lab.name: lab.role for lab in label_parameters(model, rules)}
