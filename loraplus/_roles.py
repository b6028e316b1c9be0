"""Labelling: decide, for every trainable parameter of a model, which role it plays.

This module is a pure function of the model (``label_parameters``): it reads names,
module types and declared roles, never changes the model, and knows nothing about
optimizers or learning rates. Grouping lives in ``_groups.py``.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum
from typing import Any, Union

from torch import nn

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


class Role(str, Enum):
    """What a trainable parameter is to LoRA+.

    The value (a short string) is what optimizer param groups carry under ``"role"``.
    """

    #: Input-side (down) factor: ``x -> A x`` maps the layer input to the rank space.
    A = "A"
    #: Output-side (up) factor: maps the rank space to the layer output. LoRA+ gives it ``ratio * lr``.
    B = "B"
    #: A factor of an embedding adapter (its input is one-hot).
    EMBEDDING_A = "embedding_A"
    #: B factor of an embedding adapter.
    EMBEDDING_B = "embedding_B"
    #: Per-output-channel scale of weight-decomposed adapters (DoRA magnitude).
    MAGNITUDE = "magnitude"
    #: A middle factor that is neither input nor output side: AdaLoRA singular values,
    #: LoHa/LoKr Tucker cores, LoKr full Kronecker factors.
    CORE = "core"
    #: Trainable, but not an adapter factor: heads, ``modules_to_save`` copies, norms, biases.
    OTHER = "other"

    @classmethod
    def coerce(cls, value: Role | str) -> Role:
        """Turn ``Role.B``, ``"B"``, ``"b"`` or ``"embedding_a"`` into a :class:`Role`."""
        if isinstance(value, Role):
            return value
        if isinstance(value, str):
            key = value.strip()
            for role in cls:
                if key == role.value or key.lower() == role.value.lower() or key.upper() == role.name:
                    return role
        choices = ", ".join(repr(r.value) for r in cls)
        raise LoraPlusError(f"unknown role {value!r}; expected a loraplus.Role or one of {choices}")

    def __str__(self) -> str:
        return self.value


ADAPTER_ROLES = frozenset({Role.A, Role.B, Role.EMBEDDING_A, Role.EMBEDDING_B})

#: Segments that wrappers (FSDP1, activation checkpointing, torch.compile) insert into names.
WRAPPER_SEGMENTS = frozenset(
    {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "_offload_wrapped_module"}
)


@dataclass(frozen=True)
class Convention:
    """One naming convention: the trailing segments of a parameter name and the role they imply.

    ``pattern`` is matched against the *last* segments of the name (after wrapper segments
    are removed); ``"*"`` matches exactly one segment (an adapter name such as ``default``).
    ``sibling``, when set, must also be an attribute of the module that holds the
    pattern's first segment (so ``up``/``down`` only match when both exist).
    """

    library: str
    pattern: tuple[str, ...]
    role: Role
    family: str = "lora"
    sibling: str | None = None
    bottleneck: bool = False

    def describe(self) -> str:
        pat = ".".join("<adapter>" if s == "*" else s for s in self.pattern)
        extra = f" (next to {self.sibling!r}{', rank bottleneck' if self.bottleneck else ''})" if self.sibling else ""
        return f"{self.library}: …{pat}{extra}"


def _c(
    library: str, pattern: str, role: Role, family: str = "lora", sibling: str | None = None, bottleneck: bool = False
) -> Convention:
    return Convention(library, tuple(pattern.split(".")), role, family, sibling, bottleneck)


A, B, EA, EB, MAG, CORE = Role.A, Role.B, Role.EMBEDDING_A, Role.EMBEDDING_B, Role.MAGNITUDE, Role.CORE

#: The naming conventions loraplus recognises, as data. Longer patterns win over shorter ones.
CONVENTIONS: tuple[Convention, ...] = (
    # PEFT LoRA (Linear, Conv, MHA, bnb), lora_bias, DoRA, embeddings, KaSA
    _c("PEFT", "lora_A.*.weight", A, sibling="lora_B"),
    _c("PEFT", "lora_B.*.weight", B, sibling="lora_A"),
    _c("PEFT", "lora_B.*.bias", B, sibling="lora_A"),
    _c("PEFT", "lora_embedding_A.*", EA, sibling="lora_embedding_B"),
    _c("PEFT", "lora_embedding_B.*", EB, sibling="lora_embedding_A"),
    # hand-written layers: `self.lora_A = nn.Linear(d, r, bias=False)`, `self.lora_B = nn.Linear(r, d)`.
    # A literal segment beats the AdaLoRA wildcard below (`lora_A.*` would read `weight` as an adapter name).
    _c("hand-written nn.Linear", "lora_A.weight", A, sibling="lora_B"),
    _c("hand-written nn.Linear", "lora_B.weight", B, sibling="lora_A"),
    _c("hand-written nn.Linear", "lora_B.bias", B, sibling="lora_A"),
    _c("PEFT DoRA", "lora_magnitude_vector.*.weight", MAG, "dora"),
    _c("PEFT DoRA", "lora_magnitude_vector.*", MAG, "dora"),
    _c("PEFT KaSA", "lora_diag.*", CORE),
    # PEFT AdaLoRA (raw ParameterDicts)
    _c("PEFT AdaLoRA", "lora_A.*", A, "adalora", sibling="lora_B"),
    _c("PEFT AdaLoRA", "lora_B.*", B, "adalora", sibling="lora_A"),
    _c("PEFT AdaLoRA", "lora_E.*", CORE, "adalora", sibling="lora_A"),
    # PEFT LoHa: *_a is the up (output) side, *_b the down (input) side
    _c("PEFT LoHa", "hada_w1_a.*", B, "loha"),
    _c("PEFT LoHa", "hada_w2_a.*", B, "loha"),
    _c("PEFT LoHa", "hada_w1_b.*", A, "loha"),
    _c("PEFT LoHa", "hada_w2_b.*", A, "loha"),
    _c("PEFT LoHa", "hada_t1.*", CORE, "loha"),
    _c("PEFT LoHa", "hada_t2.*", CORE, "loha"),
    # PEFT LoKr
    _c("PEFT LoKr", "lokr_w1_a.*", B, "lokr"),
    _c("PEFT LoKr", "lokr_w2_a.*", B, "lokr"),
    _c("PEFT LoKr", "lokr_w1_b.*", A, "lokr"),
    _c("PEFT LoKr", "lokr_w2_b.*", A, "lokr"),
    _c("PEFT LoKr", "lokr_w1.*", CORE, "lokr"),
    _c("PEFT LoKr", "lokr_w2.*", CORE, "lokr"),
    _c("PEFT LoKr", "lokr_t2.*", CORE, "lokr"),
    # PEFT VeRA: lambda_d scales the rank space (input side), lambda_b the output
    _c("PEFT VeRA", "vera_lambda_d.*", A, "vera"),
    _c("PEFT VeRA", "vera_lambda_b.*", B, "vera"),
    # microsoft loralib, litgpt, minLoRA (raw parameters or parametrizations)
    _c("loralib/litgpt/minLoRA", "lora_A", A, sibling="lora_B"),
    _c("loralib/litgpt/minLoRA", "lora_B", B, sibling="lora_A"),
    # torchtune
    _c("torchtune", "lora_a.weight", A, sibling="lora_b"),
    _c("torchtune", "lora_b.weight", B, sibling="lora_a"),
    _c("torchtune DoRA", "magnitude", MAG, "dora", sibling="lora_a"),
    # diffusers (legacy attention processors), kohya sd-scripts, mmpretrain
    _c("kohya/mmpretrain", "lora_down.weight", A, sibling="lora_up"),
    _c("kohya/mmpretrain", "lora_up.weight", B, sibling="lora_down"),
    # generic names a model without LoRA may use: only counted when the pair forms a rank bottleneck
    _c("diffusers", "down.weight", A, sibling="up", bottleneck=True),
    _c("diffusers", "up.weight", B, sibling="down", bottleneck=True),
    # DeepSpeed-Chat (stored transposed)
    _c("DeepSpeed-Chat", "lora_right_weight", A, sibling="lora_left_weight"),
    _c("DeepSpeed-Chat", "lora_left_weight", B, sibling="lora_right_weight"),
    # NVIDIA NeMo
    _c("NeMo", "linear_in.weight", A, sibling="linear_out", bottleneck=True),
    _c("NeMo", "linear_out.weight", B, sibling="linear_in", bottleneck=True),
    _c("NeMo DoRA", "weight_magnitude", MAG, "dora", sibling="linear_in"),
)

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
_TORCHTUNE_ROLES: dict[str, tuple[Role, str]] = {"lora_a": (A, "lora"), "lora_b": (B, "lora"), "magnitude": (MAG, "dora")}
_LORALIB_ROLES: dict[str, tuple[Role, str]] = {"lora_A": (A, "lora"), "lora_B": (B, "lora")}


def _index_conventions(conventions: Iterable[Convention]) -> dict[tuple[int, str], list[Convention]]:
    """Index each convention by its right-most literal segment: (offset from the end, literal)."""
    index: dict[tuple[int, str], list[Convention]] = {}
    for conv in conventions:
        for offset, seg in enumerate(reversed(conv.pattern)):
            if seg != "*":
                index.setdefault((offset, seg), []).append(conv)
                break
    for bucket in index.values():
        bucket.sort(key=lambda c: (-len(c.pattern), c.pattern.count("*")))
    return index


_INDEX = _index_conventions(CONVENTIONS)
_OFFSETS = sorted({offset for offset, _ in _INDEX})


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


def match_pattern(pattern: str | re.Pattern[str] | None, name: str, canon: str) -> bool:
    """Glob (``str``, full match) or regex (``re.Pattern``, search) on the name or its canonical form."""
    if isinstance(pattern, re.Pattern):
        return bool(pattern.search(name) or pattern.search(canon))
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(canon, pattern)
    return False


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


_WRAPPER_SUBSTRING = re.compile("|".join(sorted(map(re.escape, WRAPPER_SEGMENTS))))


def _may_have_wrappers(name: str) -> bool:
    # a substring test: when it is False no segment can be a wrapper segment
    return _WRAPPER_SUBSTRING.search(name) is not None


def canonical_name(name: str) -> str:
    """Drop wrapper segments (FSDP1, checkpointing, compile) and a leading DDP/DeepSpeed ``module.``."""
    if not name.startswith("module.") and not _may_have_wrappers(name):
        return name  # fast path (labelling is O(parameters) and this runs several times per name)
    segs = [s for s in name.split(".") if s not in WRAPPER_SEGMENTS]
    while len(segs) > 1 and segs[0] == "module":
        segs = segs[1:]
    return ".".join(segs)


def _kept_segments(name: str) -> tuple[list[str], list[int]]:
    segs = name.split(".")
    if not _may_have_wrappers(name):
        return segs, list(range(len(segs)))
    kept = [i for i, s in enumerate(segs) if s not in WRAPPER_SEGMENTS]
    return [segs[i] for i in kept], kept


def _has_attr(module: nn.Module | None, attr: str) -> bool:
    if module is None:
        return False
    return attr in module._modules or attr in module._parameters or attr in module._buffers


_MAX_PATTERN = max(len(c.pattern) for c in CONVENTIONS)
_TAIL_CACHE: dict[tuple[str, ...], tuple[Convention, ...]] = {}


def _matching_tail(
    segs: Sequence[str], conventions_index: Mapping[tuple[int, str], list[Convention]]
) -> tuple[Convention, ...]:
    """Conventions whose pattern matches the trailing segments, in index order (cached per tail)."""
    n = len(segs)
    cacheable = conventions_index is _INDEX
    if cacheable:
        key = tuple(segs[-_MAX_PATTERN:])
        hit = _TAIL_CACHE.get(key)
        if hit is not None:
            return hit
    out: list[Convention] = []
    for offset in _OFFSETS:
        if offset >= n:
            break
        for conv in conventions_index.get((offset, segs[n - 1 - offset]), ()):
            k = len(conv.pattern)
            if k <= n and all(p == "*" or p == s for p, s in zip(conv.pattern, segs[n - k :])):
                out.append(conv)
    if cacheable:
        if len(_TAIL_CACHE) > 65536:
            _TAIL_CACHE.clear()
        _TAIL_CACHE[key] = tuple(out)
    return tuple(out)


def match_convention(
    name: str, modules: Mapping[str, nn.Module], conventions_index: Mapping[tuple[int, str], list[Convention]] = _INDEX
) -> Convention | None:
    """The first (longest) convention whose trailing pattern matches ``name``."""
    wrapped = _may_have_wrappers(name)
    segs = name.split(".")
    if wrapped:
        segs, kept = _kept_segments(name)
    n = len(segs)
    best: Convention | None = None
    raw = segs if not wrapped else None
    for conv in _matching_tail(segs, conventions_index):
        k = len(conv.pattern)
        if best is not None and (len(best.pattern), -best.pattern.count("*")) >= (k, -conv.pattern.count("*")):
            continue
        if conv.sibling is not None:
            if raw is not None:  # no wrapper segments: the parent is the name without its last k segments
                parent = modules.get(name.rsplit(".", k)[0] if n > k else "")
            else:
                parent = modules.get(".".join(name.split(".")[: kept[n - k]]))
            if not _has_attr(parent, conv.sibling):
                continue
            if conv.bottleneck and not _is_bottleneck(parent, conv):
                continue
        best = conv
    return best


def _in_out(module: object) -> tuple[int, int] | None:
    """(fan-in, fan-out) of a factor module: from Linear/Conv metadata (sharding-proof), else its weight."""
    if isinstance(module, nn.Linear):
        return module.in_features, module.out_features
    if isinstance(module, nn.modules.conv._ConvNd):
        k = 1
        for size in module.kernel_size:
            k *= size
        return module.in_channels * k // module.groups, module.out_channels
    weight = module._parameters.get("weight") if isinstance(module, nn.Module) else None
    if weight is not None and weight.dim() >= 2:
        return weight[0].numel(), int(weight.shape[0])
    return None


def _is_bottleneck(parent: nn.Module | None, conv: Convention) -> bool:
    """Whether the (down, up) sibling modules map in -> r -> out with r below both in and out."""
    if parent is None or conv.sibling is None:
        return False
    here = conv.pattern[0]
    down, up = (here, conv.sibling) if conv.role is Role.A else (conv.sibling, here)
    d, u = _in_out(parent._modules.get(down)), _in_out(parent._modules.get(up))
    if d is None or u is None:
        return False
    (fan_in, r), (r_up, fan_out) = d, u
    if isinstance(parent._modules.get(up), nn.modules.conv._ConvNd):
        r_up = parent._modules[up].in_channels // parent._modules[up].groups  # type: ignore[union-attr]
    return r == r_up and r < fan_in and r < fan_out


@functools.lru_cache(maxsize=None)
def _name_source(conv: Convention) -> str:
    return f"name {conv.describe()}"


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


_MATRIX_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention)


def _norm_named(name: str, owner: nn.Module, modules: Mapping[str, nn.Module]) -> bool:
    """Whether the owner's own attribute name (not a ModuleDict key) names a normalisation layer."""
    segs = name.split(".")[:-1]
    while segs and segs[-1] in WRAPPER_SEGMENTS:
        segs.pop()
    if not segs or not _NORM_LEAF.search(segs[-1].lower()) or isinstance(owner, _MATRIX_LAYERS):
        return False
    parent = modules.get(".".join(segs[:-1]))
    return not isinstance(parent, (nn.ModuleDict, nn.ParameterDict))


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


# --------------------------------------------------------------------------- weight decay

_NORM_CLASS = re.compile(r"Norm(\d*[dD])?(Gated)?$")
_NORM_TYPES: tuple[type, ...] = (
    nn.LayerNorm,
    nn.GroupNorm,
    nn.LocalResponseNorm,
    nn.modules.batchnorm._NormBase,
    *((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ()),
)
#: A parameter's own (leaf) name that says it is a normalisation weight: ``norm_weight``, ``ln_scale``.
_NORM_LEAF = re.compile(r"(^|_)(norm|layernorm|rmsnorm|ln)(_|\d|$)")
_CONTAINERS = (nn.ParameterDict, nn.ParameterList)
_NORM_CLASS_CACHE: dict[type, bool] = {}


def is_norm_module(module: nn.Module) -> bool:
    """A torch norm layer, or any class whose name ends in ``Norm`` (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    cls = type(module)
    hit = _NORM_CLASS_CACHE.get(cls)
    if hit is None:
        hit = _NORM_CLASS_CACHE[cls] = isinstance(module, _NORM_TYPES) or bool(_NORM_CLASS.search(cls.__name__))
    return hit


def default_no_decay(label: Label) -> bool:
    """Whether a parameter is exempt from weight decay by default.

    Decided by the parameter's own (leaf) name and its module, never by a segment that names an
    adapter: a bias (leaf ``bias`` or ``*_bias``), every parameter of a normalisation module
    (torch norm layers, classes named ``*Norm``, or a module that is not a Linear/Conv/Embedding
    whose own attribute name says norm: ``ln_f``, ``input_layernorm``), a raw parameter whose
    leaf name says norm (``norm_weight``), and DoRA magnitudes.
    An adapter factor is exempt only when it is its layer's bias (PEFT ``lora_bias``): entries of
    a ``ParameterDict``/``ParameterList`` have adapter names for leaves, which decide nothing.
    """
    if label.role is Role.MAGNITUDE:
        return True
    owner = label.module
    if isinstance(owner, _CONTAINERS):
        return False
    leaf = label.name.rpartition(".")[2]
    if label.role in ADAPTER_ROLES:
        return leaf == "bias"
    if label.norm_named or is_norm_module(owner):
        return True
    return _no_decay_leaf(leaf)


@functools.lru_cache(maxsize=4096)
def _no_decay_leaf(leaf: str) -> bool:
    low = leaf.lower()
    return low == "bias" or low.endswith("_bias") or bool(_NORM_LEAF.search(low))


NoDecaySpec = Union[str, "re.Pattern[str]", Callable[[str, nn.Parameter, nn.Module], Union[bool, None]]]


def normalize_no_decay(no_decay: NoDecaySpec | Sequence[NoDecaySpec] | None) -> list[NoDecaySpec]:
    if no_decay is None:
        return []
    if isinstance(no_decay, (str, re.Pattern)) or callable(no_decay):
        items = [no_decay]
    else:
        try:
            items = list(no_decay)
        except TypeError:
            raise LoraPlusError(
                f"no_decay must be a glob, a compiled regex, a callable or a list of them, got {type(no_decay).__name__}"
            ) from None
    for item in items:
        if not (isinstance(item, (str, re.Pattern)) or callable(item)):
            raise LoraPlusError(
                f"no_decay entries must be globs, compiled regexes or callables "
                f"(name, param, module) -> bool | None, got {item!r}"
            )
    return items


def is_no_decay(label: Label, user: Sequence[NoDecaySpec]) -> bool:
    """User ``no_decay`` rules first (a callable may return False to force decay), then the default."""
    canon = canonical_name(label.name) if user else ""
    for item in user:
        if isinstance(item, (str, re.Pattern)):
            if match_pattern(item, label.name, canon):
                return True
        else:
            out = item(label.name, label.param, label.module)
            if out is not None:
                return bool(out)
    return default_no_decay(label)

