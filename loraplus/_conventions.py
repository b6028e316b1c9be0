"""Naming conventions: the roles, the table of trailing-name patterns, and matching names against it.

Data, not ``if`` chains: :data:`CONVENTIONS` maps trailing name segments to a :class:`Role`;
:func:`match_convention` finds the longest pattern that matches a parameter name (wrapper
segments removed), with the partner and rank-bottleneck checks some conventions require.
"""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum

from torch import nn

from ._errors import LoraPlusError

__all__ = [
    "ADAPTER_ROLES",
    "CONVENTIONS",
    "Convention",
    "Role",
    "WRAPPER_SEGMENTS",
    "canonical_name",
    "match_convention",
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


def match_pattern(pattern: str | re.Pattern[str] | None, name: str, canon: str) -> bool:
    """Glob (``str``, full match) or regex (``re.Pattern``, search) on the name or its canonical form."""
    if isinstance(pattern, re.Pattern):
        return bool(pattern.search(name) or pattern.search(canon))
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(canon, pattern)
    return False


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
