"""Labelling: decide, for every trainable parameter of a model, which role it plays.

A pure function of the model (:func:`label_model`): it walks the model once and emits one
:class:`Label` record per trainable parameter — its role, the layout it was found in, the module
that holds it (its layer key for pairing) and the adapter name. It never changes the model and
knows nothing about optimizers or learning rates. What each library names its factors lives in
``loraplus._layouts``; weight decay in ``_decay.py``; user rules in ``_rules.py``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from enum import Enum

from torch import nn

from .._errors import LoraPlusError
from .._layouts import LAYOUTS, NAME_INDEX, Factor, Hit, Layout, NameMatcher, canonical_name, detect_by_type
from .._role import ADAPTER_ROLES, Role
from ._decay import norm_named
from ._rules import RuleSpec, normalize_rules
from ._walk import walk

__all__ = ["Label", "Origin", "classify", "label_model", "label_parameters"]


class Origin(str, Enum):
    """What decided a parameter's role, in order of precedence."""

    RULE = "rule"  #: the user's ``rules=``
    DECLARED = "declared"  #: a module's ``loraplus_roles()``
    MODULE_TYPE = "module type"  #: a layout detected by the type of the module holding it
    NAME = "name"  #: a layout's trailing-name pattern
    NONE = "none"  #: nothing: ``Role.OTHER``


@dataclass
class Label:
    """The outcome of labelling one trainable parameter.

    Attributes:
        name: as in ``model.named_parameters()``.
        param: the parameter.
        role: its role.
        origin: what decided the role.
        detail: the rule's description, the declaring class or the detected module class (for :attr:`source`).
        module: the module that owns the parameter (the model itself for top-level parameters).
        layout: the layout it belongs to (None for rules, declared roles and ``Role.OTHER``).
        factor: which factor of the layout it is.
        holder: raw name of the module holding the factor (its layer key for pairing, with ``adapter``).
        adapter: the adapter name (``""`` where there is none).
        norm_named: the owning module's own attribute name says norm (``ln_f``) and it is no weight-matrix layer.
    """

    name: str
    param: nn.Parameter
    role: Role
    origin: Origin
    detail: str
    module: nn.Module
    layout: Layout | None = None
    factor: Factor | None = None
    holder: str = ""
    adapter: str = ""
    norm_named: bool = False

    @property
    def source(self) -> str:
        """What decided the role, said for people (rule, declaring class, layout and pattern); never branched on."""
        origin, layout, factor = self.origin, self.layout, self.factor
        if layout is None or factor is None:
            return self.detail if origin is not Origin.NONE else "not an adapter factor"
        if origin is Origin.MODULE_TYPE:
            text = f"{layout.library} {self.detail}.{factor.segment}"
        else:
            text = f"name {layout.name}: …{_pattern_text(factor)}"
        promoted = self.role in (Role.EMBEDDING_A, Role.EMBEDDING_B) and factor.role in (Role.A, Role.B)
        return text + " on an nn.Embedding" if promoted else text

    @property
    def family(self) -> str | None:
        """The adapter family's name (``lora``, ``dora``, …), None without a layout."""
        return None if self.layout is None else self.layout.family.value


def _host(name: str, hit: Hit | None, modules: Mapping[str, nn.Module]) -> nn.Module | None:
    """The layer a factor adapts: before the layout's ``within`` segment (minLoRA), else the owner."""
    if hit is not None and hit.layout.within is not None:
        segs = name.split(".")
        if hit.layout.within in segs:
            return modules.get(".".join(segs[: segs.index(hit.layout.within)]))
    return modules.get(name.rpartition(".")[0])


def _declares(cls: type) -> bool:
    return callable(getattr(cls, "loraplus_roles", None))


def _declared_roles(modules: Mapping[str, nn.Module]) -> dict[int, tuple[Role, str, str]]:
    """Roles declared by modules' ``loraplus_roles()``: ``{id(param): (role, holder name, source)}``.

    A deeper module's declaration wins over an outer one.
    """
    kinds: dict[type, bool] = {}
    found = []
    for prefix, module in modules.items():
        cls = type(module)
        may = kinds.get(cls)
        if may is None:
            may = kinds[cls] = _declares(cls)
        if may:
            found.append((prefix, module))
    declared: dict[int, tuple[Role, str, str]] = {}
    for prefix, module in sorted(found, key=lambda kv: kv[0].count(".") + bool(kv[0])):
        cls = type(module)
        table = module.loraplus_roles()  # type: ignore[operator]
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
            declared[id(param)] = (Role.coerce(role), prefix, f"declared by {cls.__name__}.loraplus_roles()")
    return declared


def _pattern_text(factor: Factor) -> str:
    return ".".join("<adapter>" if s == "*" else s for s in factor.pattern)


def label_parameters(model: nn.Module, rules: RuleSpec | None = None) -> list[Label]:
    """Label every trainable parameter of ``model`` (each tensor once, in ``named_parameters`` order).

    Precedence: user ``rules`` > modules' declared roles (``loraplus_roles()``) > layouts detected by
    module type > layouts' name patterns > :attr:`Role.OTHER`.
    """
    return label_model(model, rules)[0]


def label_model(model: nn.Module, rules: RuleSpec | None = None) -> tuple[list[Label], Mapping[str, nn.Module]]:
    """:func:`label_parameters` and the ``named_modules`` map it walked (one walk of the model)."""
    if not isinstance(model, nn.Module):
        raise LoraPlusError(f"expected a torch.nn.Module, got {type(model).__name__}")
    user_rules = normalize_rules(rules)
    modules, named = walk(model)
    declared = _declared_roles(modules)
    typed = detect_by_type(modules, LAYOUTS)
    matcher = NameMatcher(NAME_INDEX, modules)
    labels: list[Label] = []
    for name, param in model.named_parameters() if named is None else named:
        if not param.requires_grad:
            continue
        owner_name = name.rpartition(".")[0]
        owner = modules.get(owner_name)
        if owner is None:
            owner = model
        role: Role | None = None
        hit: Hit | None = None
        holder, origin, detail = owner_name, Origin.NONE, ""
        if user_rules:
            canon = canonical_name(name)
            hits = [(r, r.apply(name, canon, param, owner)) for r in user_rules]
            hits = [(r, role_) for r, role_ in hits if role_ is not None]
            if hits:
                roles = {role_ for _, role_ in hits}
                if len(roles) > 1:
                    shown = "; ".join(f"{r.description} -> {role_.value}" for r, role_ in hits if role_)
                    raise LoraPlusError(
                        f"parameter {name!r} is matched by user rules with different roles ({shown}); "
                        "make the rules disjoint"
                    )
                role, origin, detail = hits[0][1], Origin.RULE, hits[0][0].description
        if role is None and declared:
            dec = declared.get(id(param))
            if dec is not None:
                role, holder, detail = dec
                origin = Origin.DECLARED
        if role is None:
            hit = typed.get(id(param)) if typed else None
            if hit is not None:
                origin = Origin.MODULE_TYPE
                held = modules.get(hit.holder)
                detail = type(held).__name__ if held is not None else "layer"
            else:
                hit = matcher.match(name)
                origin = Origin.NAME if hit is not None else Origin.NONE
            if hit is not None:
                role, holder = hit.factor.role, hit.holder
                if role is Role.A or role is Role.B:
                    host = owner if hit.layout.within is None else _host(name, hit, modules)
                    if isinstance(host, nn.Embedding):
                        role = Role.EMBEDDING_A if role is Role.A else Role.EMBEDDING_B
        if role is None:
            role = Role.OTHER
        labels.append(
            Label(
                name, param, role, origin, detail, owner,
                None if hit is None else hit.layout, None if hit is None else hit.factor, holder,
                "" if hit is None else hit.adapter,
                # only non-adapter tensors can be exempt as norms (the decay rules read it for them alone)
                role is not Role.MAGNITUDE and role not in ADAPTER_ROLES and norm_named(name, owner, modules),
            )
        )
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
