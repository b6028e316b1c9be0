"""Finding a parameter's layout: by the module type that holds it, else by its trailing name segments.

Both return a :class:`Hit`: the layout, the factor, the holder (the module whose attribute is the
factor segment) and the adapter name. Names are matched on whole trailing segments, never
substrings, after wrapper segments (FSDP1, activation checkpointing, ``torch.compile``) are
dropped; a factor counts only next to its partner, and a generic layout's factors only when both
are bias-free and form a rank bottleneck.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass

from torch import nn

from ._record import Factor, Layout

__all__ = ["Hit", "NameIndex", "NameMatcher", "WRAPPER_SEGMENTS", "canonical_name", "detect_by_type", "kept_segments"]

#: Segments that wrappers (FSDP1, activation checkpointing, torch.compile, offloading) insert into names.
WRAPPER_SEGMENTS = frozenset(
    {"_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod", "_offload_wrapped_module"}
)
_WRAPPER_SUBSTRING = re.compile("|".join(sorted(map(re.escape, WRAPPER_SEGMENTS))))


def may_have_wrappers(name: str) -> bool:
    """False when no segment of ``name`` can be a wrapper segment (a substring test)."""
    return _WRAPPER_SUBSTRING.search(name) is not None


def canonical_name(name: str) -> str:
    """Drop wrapper segments (FSDP1, checkpointing, compile) and a leading DDP/DeepSpeed ``module.``."""
    if not name.startswith("module.") and not may_have_wrappers(name):
        return name
    segs = [s for s in name.split(".") if s not in WRAPPER_SEGMENTS]
    while len(segs) > 1 and segs[0] == "module":
        segs = segs[1:]
    return ".".join(segs)


def kept_segments(name: str) -> tuple[list[str], list[int]]:
    """The name's segments without wrapper segments, and each kept segment's index in the raw name."""
    segs = name.split(".")
    if not may_have_wrappers(name):
        return segs, list(range(len(segs)))
    kept = [i for i, s in enumerate(segs) if s not in WRAPPER_SEGMENTS]
    return [segs[i] for i in kept], kept


@dataclass(frozen=True)
class Hit:
    """Where a parameter sits in a layout.

    Attributes:
        layout: the record.
        factor: which of its tensors the parameter is.
        holder: raw name of the module whose attribute ``factor.segment`` holds the parameter.
        adapter: the adapter name (``""`` where the layout has none).
    """

    layout: Layout
    factor: Factor
    holder: str
    adapter: str


def _specificity(layout: Layout, factor: Factor, position: int) -> tuple[int, int, int, int]:
    """Sort key: longer patterns, then fewer wildcards, then records with a structural check, then catalog order."""
    checked = layout.requires is not None or layout.within is not None
    return (-len(factor.pattern), factor.pattern.count("*"), 0 if checked else 1, position)


class NameIndex:
    """Every layout's factor patterns, indexed by their right-most literal segment (built once, never changed)."""

    def __init__(self, layouts: Sequence[Layout]) -> None:
        index: dict[tuple[int, str], list[tuple[tuple[int, int, int, int], Layout, Factor]]] = {}
        for position, layout in enumerate(layouts):
            for factor in layout.factors:
                for offset, seg in enumerate(reversed(factor.pattern)):
                    if seg != "*":
                        index.setdefault((offset, seg), []).append((_specificity(layout, factor, position), layout, factor))
                        break
        self._index = {key: tuple(sorted(bucket, key=lambda t: t[0])) for key, bucket in index.items()}
        self.offsets = tuple(sorted({offset for offset, _ in self._index}))
        self.longest = max((len(f.pattern) for lay in layouts for f in lay.factors), default=0)

    def tail(self, segs: Sequence[str]) -> tuple[tuple[Layout, Factor], ...]:
        """The factors whose pattern matches the trailing segments, most specific first."""
        n = len(segs)
        out: list[tuple[tuple[int, int, int, int], Layout, Factor]] = []
        for offset in self.offsets:
            if offset >= n:
                break
            for entry in self._index.get((offset, segs[n - 1 - offset]), ()):
                pattern = entry[2].pattern
                k = len(pattern)
                if k <= n and all(p == "*" or p == s for p, s in zip(pattern, segs[n - k:])):
                    out.append(entry)
        out.sort(key=lambda t: t[0])
        return tuple((layout, factor) for _, layout, factor in out)


def _has_attr(module: nn.Module | None, attr: str) -> bool:
    if module is None:
        return False
    return attr in module._modules or attr in module._parameters or attr in module._buffers


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


def _rank_in(module: nn.Module) -> int | None:
    """The input width of the up factor (its rank side)."""
    if isinstance(module, nn.modules.conv._ConvNd):
        return module.in_channels // module.groups
    io = _in_out(module)
    return None if io is None else io[0]


def is_low_rank_pair(holder: nn.Module | None, layout: Layout) -> bool:
    """A generic layout's rule: the A and B modules are bias-free and map in → r → out with r below both."""
    if holder is None:
        return False
    a_seg = next(f.segment for f in layout.factors if f.role.a_side)
    b_seg = next(f.segment for f in layout.factors if f.role.b_side)
    down, up = holder._modules.get(a_seg), holder._modules.get(b_seg)
    if down is None or up is None:
        return False
    if down._parameters.get("bias") is not None or up._parameters.get("bias") is not None:
        return False  # squeeze-excite blocks and bottleneck adapters carry biases; LoRA factors do not
    d = _in_out(down)
    r_up = _rank_in(up)
    u = _in_out(up)
    if d is None or u is None or r_up is None:
        return False
    (fan_in, r), fan_out = d, u[1]
    return r == r_up and r < fan_in and r < fan_out


class NameMatcher:
    """Matches the parameter names of one model against a :class:`NameIndex` (a cache per model, not global)."""

    def __init__(self, index: NameIndex, modules: Mapping[str, nn.Module]) -> None:
        self._index = index
        self._modules = modules
        self._tails: dict[tuple[str, ...], tuple[tuple[Layout, Factor], ...]] = {}
        self._generic: dict[int, bool] = {}

    def _tail(self, name: str) -> tuple[list[str], list[int] | None, tuple[tuple[Layout, Factor], ...]]:
        """The name's kept segments, their raw indices (None without wrapper segments) and the matching factors."""
        if may_have_wrappers(name):
            segs, kept = kept_segments(name)
        else:
            segs, kept = name.split("."), None
        key = tuple(segs[-self._index.longest:])
        found = self._tails.get(key)
        if found is None:
            found = self._tails[key] = self._index.tail(segs)
        return segs, kept, found

    @staticmethod
    def _holder_name(name: str, n: int, k: int, kept: list[int] | None) -> str:
        if kept is not None:
            return ".".join(name.split(".")[: kept[n - k]])
        return name.rsplit(".", k)[0] if n > k else ""

    def candidates(self, name: str) -> Iterator[Hit]:
        """Every factor whose pattern matches the trailing segments of ``name``, most specific first, unchecked."""
        segs, kept, found = self._tail(name)
        n = len(segs)
        for layout, factor in found:
            k = len(factor.pattern)
            if layout.within is not None and layout.within not in segs[: n - k]:
                continue
            at = factor.adapter_at
            yield Hit(layout, factor, self._holder_name(name, n, k, kept), segs[n - k + at] if at is not None else "")

    def match(self, name: str) -> Hit | None:
        """The most specific factor whose pattern, partner, bottleneck and holder checks ``name`` passes.

        The same candidates as :meth:`candidates`, in a plain loop: this runs once per parameter.
        """
        segs, kept, found = self._tail(name)
        if not found:
            return None
        n = len(segs)
        modules = self._modules
        last_k, holder_name, holder = -1, "", None
        for layout, factor in found:
            k = len(factor.pattern)
            if layout.within is not None and layout.within not in segs[: n - k]:
                continue
            if k != last_k:
                last_k, holder_name = k, self._holder_name(name, n, k, kept)
                holder = modules.get(holder_name)
            if holder is None:
                continue
            partner = factor.partner
            if partner is not None and not (
                    partner in holder._modules or partner in holder._parameters or partner in holder._buffers):
                continue
            at = factor.adapter_at
            adapter = segs[n - k + at] if at is not None else ""
            if layout.requires is not None and not layout.requires(holder, adapter):
                continue
            if layout.generic and not self._low_rank(holder, layout):
                continue
            return Hit(layout, factor, holder_name, adapter)
        return None

    def _low_rank(self, holder: nn.Module | None, layout: Layout) -> bool:
        key = id(holder)
        hit = self._generic.get(key)
        if hit is None:
            hit = self._generic[key] = is_low_rank_pair(holder, layout)
        return hit


def _full_match(factors: Iterable[Factor], segs: Sequence[str]) -> tuple[Factor, str] | None:
    n = len(segs)
    for factor in factors:
        if len(factor.pattern) == n and all(p == "*" or p == s for p, s in zip(factor.pattern, segs)):
            return factor, (segs[factor.adapter_at] if factor.adapter_at is not None else "")
    return None


def detect_by_type(modules: Mapping[str, nn.Module], layouts: Sequence[Layout]) -> dict[int, Hit]:
    """``{id(param): Hit}`` for parameters held by a module whose type a layout detects.

    A module's own parameter names (``lora_A.default.weight`` inside a PEFT layer) are matched against
    the layout's factor patterns; the module type stands in for the partner and bottleneck checks.
    When several layouts detect a module (AdaLoRA's layer subclasses PEFT's LoRA layer), the one whose
    type is nearest in the module's class hierarchy, then one whose structural check holds, wins.
    """
    typed = [(layout, types) for layout in layouts if layout.detect is not None
             for types in [layout.detect.types()] if types]
    if not typed:
        return {}
    per_class: dict[type, list[Layout]] = {}
    hits: dict[int, Hit] = {}
    for prefix, module in modules.items():
        cls = type(module)
        cands = per_class.get(cls)
        if cands is None:
            ranked = []
            for position, (layout, types) in enumerate(typed):
                depth = min((cls.__mro__.index(t) for t in types if issubclass(cls, t)), default=None)
                if depth is not None:
                    checked = layout.requires is not None
                    ranked.append(((depth, 0 if checked else 1, position), layout))
            cands = per_class[cls] = [layout for _, layout in sorted(ranked, key=lambda t: t[0])]
        if not cands:
            continue
        for local, param in module.named_parameters():
            if id(param) in hits:
                continue
            segs = local.split(".")
            for layout in cands:
                found = _full_match(layout.factors, segs)
                if found is not None and layout.accepts(module, found[1]):
                    hits[id(param)] = Hit(layout, found[0], prefix, found[1])
                    break
    return hits
