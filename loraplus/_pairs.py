"""Pairing: which A factor goes with which B factor, and how to read them as ΔW = s·B·A.

Labelling (``_roles.py``) says what each tensor *is*; this module says which tensors act
together. One :class:`Pair` per adapted layer and adapter name, in model order, with the
factors' orientation (DeepSpeed-Chat and minLoRA embeddings store them transposed, conv
adapters have 4-D factors) and the layer's LoRA scaling ``s`` where the layout records it.
Adapters whose update is not one B·A product (LoHa, LoKr, VeRA, AdaLoRA) are listed apart
with the reason. The Monitor, the warnings of :func:`loraplus.LoraPlus` and the
preconditioners all read the same records.
"""

from __future__ import annotations

import math
import numbers
import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ._errors import LoraPlusError
from ._roles import _INDEX, Label, Role, RuleSpec, _kept_segments, _matching_tail, canonical_name, label_model

__all__ = ["Pair", "Pairs", "Unpaired", "pair_labels", "pairs", "stack_factors", "std_factor"]

#: Factor segment of the A side -> (B-side segment, layout shown in reports, orientation).
#: "standard": A is (r, in) and B is (out, r), ΔW = B·A. "transposed": stored as A (in, r),
#: B (r, out) and applied as x·A·B, so ΔW = (A·B)ᵀ.
_FACTOR_SEGMENTS: dict[str, tuple[str, str, str]] = {
    "lora_A": ("lora_B", "PEFT/loralib/litgpt/minLoRA", "standard"),
    "lora_embedding_A": ("lora_embedding_B", "PEFT embedding", "standard"),
    "lora_a": ("lora_b", "torchtune", "standard"),
    "lora_down": ("lora_up", "kohya/mmpretrain", "standard"),
    "down": ("up", "diffusers", "standard"),
    "linear_in": ("linear_out", "NeMo", "standard"),
    "lora_right_weight": ("lora_left_weight", "DeepSpeed-Chat", "transposed"),
}
_B_SEGMENTS = {b: a for a, (b, _, _) in _FACTOR_SEGMENTS.items()}
_A_SIDE = (Role.A, Role.EMBEDDING_A)
_B_SIDE = (Role.B, Role.EMBEDDING_B)
#: Adapter families whose update is not a single B·A product.
NOT_A_PRODUCT = {"loha": "LoHa", "lokr": "LoKr", "vera": "VeRA", "adalora": "AdaLoRA"}

#: Reasons (prefixes) that mean "a factor without its partner", as opposed to "not a product".
NO_PARTNER = "no partner"


@dataclass(frozen=True)
class Pair:
    """One adapter of one layer: its A and B factors and how to read them as ΔW = s·B·A.

    Attributes:
        layer: the adapted layer's name, without wrapper prefixes (``blocks.0.attn.q``).
        adapter: the adapter name (``default``), ``""`` where the layout has none.
        a_name, b_name: the factors' names as in ``model.named_parameters()``.
        convention: the layout the pair was found by (``PEFT``, ``torchtune``, ``declared roles``, …).
        orientation: ``"standard"`` (A is (r, in…), B is (out, r…)) or ``"transposed"``
            (stored as A (in, r), B (r, out), applied as x·A·B: DeepSpeed-Chat, minLoRA embeddings).
        embedding: whether the adapted layer is an embedding (its input is one-hot).
        host: the module whose first input is the layer input x (raw name, ``""`` when unknown).
        scaling: the factor ``s`` the layer applies to B·A (PEFT ``scaling[adapter]``, loralib,
            litgpt ``scaling``, torchtune ``alpha``/``rank`` (DoRA: ``scaling``), minLoRA ``scale``,
            kohya ``alpha``/rank, diffusers ``network_alpha``/rank, NeMo ``alpha``/``dim``, DeepSpeed-Chat
            ``lora_scaling``); ``None`` where the layout does not record it.
        a, b: the parameters themselves.
    """

    layer: str
    adapter: str
    a_name: str
    b_name: str
    convention: str
    orientation: str
    embedding: bool
    host: str
    scaling: float | None = None
    a: nn.Parameter | None = field(default=None, repr=False, compare=False)
    b: nn.Parameter | None = field(default=None, repr=False, compare=False)

    @property
    def key(self) -> str:
        """``layer`` or ``layer[adapter]``: unique per adapter."""
        return f"{self.layer}[{self.adapter}]" if self.adapter else self.layer

    @property
    def layer_group(self) -> str:
        """The layer name with numeric segments replaced by ``*`` (``blocks.*.attn.q``)."""
        return re.sub(r"(^|\.)\d+(?=\.|$)", r"\1*", self.layer) or "<root>"

    @property
    def transposed(self) -> bool:
        return self.orientation == "transposed"

    @property
    def kind(self) -> str:
        """``"embedding"``, ``"conv"`` (factors with kernel dimensions) or ``"linear"``."""
        if self.embedding:
            return "embedding"
        return "conv" if self.a is not None and self.a.dim() > 2 else "linear"

    @property
    def rank(self) -> int | None:
        """r, read from the A factor's shape."""
        if self.a is None:
            return None
        return int(self.a.shape[1] if self.transposed else self.a.shape[0])

    def a_matrix(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """A (or a tensor shaped like it, e.g. its gradient) as an (r, in) matrix view."""
        return std_factor(self.a if tensor is None else tensor, self.transposed)

    def b_matrix(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """B (or a tensor shaped like it) as an (out, r) matrix view."""
        return std_factor(self.b if tensor is None else tensor, self.transposed)


@dataclass(frozen=True)
class Unpaired:
    """An adapter factor that is not part of a :class:`Pair`, and why."""

    name: str
    role: Role
    reason: str

    @property
    def missing_partner(self) -> bool:
        """True when the factor lacks its partner (as opposed to belonging to a non-product adapter)."""
        return self.reason.startswith(NO_PARTNER)


@dataclass(frozen=True)
class Pairs:
    """What :func:`pairs` returns: the pairs in model order (iterate, index, ``len``) and the rest."""

    pairs: tuple[Pair, ...]
    unpaired: tuple[Unpaired, ...]

    def __iter__(self) -> Iterator[Pair]:
        return iter(self.pairs)

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, index: int) -> Pair:
        return self.pairs[index]


def std_factor(t: torch.Tensor, transposed: bool) -> torch.Tensor:
    """A factor as a 2-D matrix in standard orientation (A: (r, in), B: (out, r)); a view where possible."""
    t = t.detach()
    if transposed:
        return t.t()
    return t if t.dim() == 2 else t.flatten(1)


def stack_factors(factors: Sequence[torch.Tensor], transposed: bool) -> torch.Tensor:
    """Copy equally shaped factors, in standard orientation, into one (k, rows, cols) tensor."""
    if transposed:
        return torch.stack([f.t() for f in factors])
    if factors[0].dim() == 2:
        return torch.stack(list(factors))
    return torch.stack([f.flatten(1) for f in factors])


def chain_reason(a: torch.Tensor, b: torch.Tensor, orientation: str) -> str | None:
    """Why A and B cannot be read as ΔW = B·A in this orientation (None if they can)."""
    if a.dim() < 2 or b.dim() < 2:
        return f"not matrices (A {tuple(a.shape)}, B {tuple(b.shape)})"
    if orientation == "transposed":
        if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[0]:
            return f"shapes do not chain as x·A·B (A {tuple(a.shape)}, B {tuple(b.shape)})"
        return None
    if any(s != 1 for s in b.shape[2:]):
        return f"B {tuple(b.shape)} is not a 1x1 projection"
    if a.shape[0] != b.shape[1]:
        return (
            f"shapes do not chain as B·A (A {tuple(a.shape)}, B {tuple(b.shape)}); merged or grouped "
            "adapters (loralib MergedLinear, litgpt merged QKV) are not one B·A product"
        )
    return None


def _find_factor(label: Label) -> tuple[int, str, list[str], list[int]] | None:
    """(index among the kept segments, segment, kept segments, their indices) of an adapter label's factor."""
    segs, kept = _kept_segments(label.name)
    table = _FACTOR_SEGMENTS if label.role in _A_SIDE else _B_SEGMENTS
    # the longest naming convention that starts with a factor segment says where that segment is,
    # so an adapter (or module) named `up`, `down` or `lora_B` is never taken for the factor
    best = 0
    for conv in _matching_tail(segs, _INDEX):
        if conv.pattern[0] in table and len(conv.pattern) > best:
            best = len(conv.pattern)
    if best:
        i = len(segs) - best
        return i, segs[i], segs, kept
    for i in range(len(segs) - 1, max(len(segs) - 4, -1), -1):
        if segs[i] in table:
            return i, segs[i], segs, kept
    return None


def _number(value: object) -> float | None:
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        value = value.item()
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    out = float(value)
    return out if math.isfinite(out) else None


def _ratio(num: object, den: object) -> float | None:
    n, d = _number(num), _number(den)
    return None if n is None or not d else n / d


def layer_scaling(convention: str, holder: nn.Module | None, adapter: str) -> float | None:
    """The s in ΔW = s·B·A, read from the module that holds the factors, per layout (None: unknown)."""
    if holder is None:
        return None
    attrs = holder.__dict__
    if convention.startswith("PEFT"):
        table = attrs.get("scaling")
        return _number(table.get(adapter)) if isinstance(table, Mapping) else None
    if convention == "kohya/mmpretrain":  # LoRAModule: alpha buffer / lora_dim (also kept as .scale)
        alpha = holder._buffers.get("alpha") if "alpha" in holder._buffers else attrs.get("alpha")
        return _ratio(alpha, attrs.get("lora_dim")) or _number(attrs.get("scale"))
    if convention == "diffusers":  # LoRALinearLayer: up(down(x)) * network_alpha / rank, or 1 without alpha
        if "rank" not in attrs:
            return None
        alpha = attrs.get("network_alpha")
        return 1.0 if alpha is None else _ratio(alpha, attrs["rank"])
    if convention == "torchtune":  # LoRALinear: (alpha / rank) * lora_b(lora_a(x)); DoRALinear keeps `scaling`
        ratio = _ratio(attrs.get("alpha"), attrs.get("rank"))
        return ratio if ratio is not None else _number(attrs.get("scaling"))
    if convention == "NeMo":
        return _ratio(attrs.get("alpha"), attrs.get("dim"))
    if convention == "DeepSpeed-Chat":  # LinearLayer_LoRA keeps lora_scaling / lora_dim as lora_scaling
        return _number(attrs.get("lora_scaling"))
    # loralib, litgpt and hand-written layers: `scaling`; minLoRA parametrizations: `scale`
    for attr in ("scaling", "scale"):
        if attr in attrs:
            return _number(attrs[attr])
    return None


def pair_labels(
    labels: Sequence[Label], modules: Mapping[str, nn.Module] | None = None
) -> tuple[list[Pair], dict[str, str]]:
    """Pair each A factor with its B factor; return the pairs and ``{name: reason}`` for the rest.

    Named layouts pair by the canonical name with the factor segment swapped
    (``lora_A.<adapter>.weight`` ↔ ``lora_B.<adapter>.weight``, ``lora_down`` ↔ ``lora_up``, …).
    Factors without a known segment (declared roles, user rules) pair within their module, then
    within its parent, only when exactly one A and one B share it. Nothing is guessed.
    ``modules`` (the model's ``named_modules``) lets the pairs carry their layer's scaling.
    """
    modules = modules or {}
    unpaired: dict[str, str] = {}
    by_key: dict[tuple[str, ...], dict[str, Label]] = {}
    meta: dict[tuple[str, ...], tuple[str, str, str, str, str, str]] = {}
    loose: list[Label] = []
    for lab in labels:
        if lab.role not in _A_SIDE and lab.role not in _B_SIDE:
            continue
        if lab.family in NOT_A_PRODUCT:
            unpaired[lab.name] = f"{NOT_A_PRODUCT[lab.family]} factors do not form one B·A product"
            continue
        found = _find_factor(lab)
        if found is None:
            loose.append(lab)
            continue
        i, seg, segs, kept = found
        a_seg = seg if lab.role in _A_SIDE else _B_SEGMENTS[seg]
        key = (*segs[:i], a_seg, *segs[i + 1 :])
        side = "A" if lab.role in _A_SIDE else "B"
        sides = by_key.get(key)
        if sides is None:
            sides = by_key[key] = {}
        elif side in sides:
            unpaired[lab.name] = f"a second {side} factor under the same name as {sides[side].name!r}"
            continue
        sides[side] = lab
        if key in meta:
            continue
        orig = lab.name.split(".")
        prefix = segs[:i]
        host_end = kept[i]
        holder = ".".join(orig[: kept[i]])  # the module holding the factor (PEFT layer, minLoRA parametrization, …)
        if "parametrizations" in prefix:  # minLoRA: the adapted layer sits before .parametrizations
            j = prefix.index("parametrizations")
            host_end = kept[j]
            prefix = prefix[:j]
        suffix = [s for s in segs[i + 1 :] if s not in ("weight",)]
        _, conv, orientation = _FACTOR_SEGMENTS[a_seg]
        if a_seg == "lora_A":
            if suffix:
                conv = "PEFT"
            elif "parametrizations" in segs:
                conv = "minLoRA"
            else:
                conv = "hand-written nn.Linear" if segs[i + 1 :] == ["weight"] else "loralib/litgpt"
        if "parametrizations" in segs and lab.role in (Role.EMBEDDING_A, Role.EMBEDDING_B):
            orientation, conv = "transposed", "minLoRA embedding"
        meta[key] = (
            canonical_name(".".join(prefix)),
            ".".join(suffix),
            conv,
            orientation,
            ".".join(orig[:host_end]),
            holder,
        )

    pairs: list[Pair] = []
    for key, sides in by_key.items():
        layer, adapter, conv, orientation, host, holder = meta[key]
        if "A" not in sides or "B" not in sides:
            ((side, lab),) = sides.items()
            missing = "B" if side == "A" else "A"
            if lab.name.split(".")[-1] == "bias":
                unpaired[lab.name] = "an adapter bias, not a factor"
            else:
                unpaired[lab.name] = f"{NO_PARTNER}: no {missing} factor named like it"
            continue
        a, b = sides["A"], sides["B"]
        why = chain_reason(a.param, b.param, orientation)
        if why is not None:
            unpaired[a.name] = unpaired[b.name] = why
            continue
        emb = a.role is Role.EMBEDDING_A
        scale = layer_scaling(conv, modules.get(holder), adapter)
        pairs.append(Pair(layer, adapter, a.name, b.name, conv, orientation, emb, host, scale, a.param, b.param))

    # factors without a known factor segment: pair inside the same module, then its parent
    for depth in (1, 2):
        groups: dict[str, list[Label]] = {}
        for lab in loose:
            segs = lab.name.split(".")
            groups.setdefault(".".join(segs[:-depth]) if len(segs) > depth else "", []).append(lab)
        loose = []
        for prefix, labs in groups.items():
            a_side = [lab for lab in labs if lab.role in _A_SIDE]
            b_side = [lab for lab in labs if lab.role in _B_SIDE]
            if len(a_side) == 1 and len(b_side) == 1:
                a, b = a_side[0], b_side[0]
                orientation = "standard"
                if chain_reason(a.param, b.param, "standard") is not None:
                    orientation = "transposed"
                if chain_reason(a.param, b.param, orientation) is None:
                    emb = a.role is Role.EMBEDDING_A
                    source = "declared roles" if a.source.startswith("declared") else "same module"
                    scale = layer_scaling(source, modules.get(prefix), "")
                    pairs.append(
                        Pair(canonical_name(prefix), "", a.name, b.name, source, orientation, emb, prefix, scale,
                             a.param, b.param)
                    )
                    continue
            loose.extend(labs)
    for lab in loose:
        side = "A" if lab.role in _A_SIDE else "B"
        unpaired[lab.name] = (
            f"{NO_PARTNER}: no unique {'B' if side == 'A' else 'A'} factor in its module; pass rules= naming both "
            "factors of one layer, or declare them with loraplus_roles()"
        )
    order = {lab.name: i for i, lab in enumerate(labels)}
    pairs.sort(key=lambda p: order[p.a_name])
    return pairs, unpaired


def pairs(model: nn.Module, rules: RuleSpec | None = None) -> Pairs:
    """The A/B factor pairs of ``model``: one per adapted layer and adapter, in model order.

    Uses the same role engine as :func:`loraplus.LoraPlus` (``rules`` as there). Factors that do
    not form one B·A product (LoHa, LoKr, VeRA, AdaLoRA), factors without a partner and merged
    adapters whose shapes do not chain are listed in ``.unpaired`` with the reason.

    Args:
        model: the model with its adapters attached (frozen parameters are ignored).
        rules: role rules, as for :func:`loraplus.LoraPlus`.

    Returns:
        :class:`Pairs`: iterate it for the :class:`Pair` records; ``.unpaired`` holds the rest.

    Raises:
        LoraPlusError: if ``model`` is not an ``nn.Module`` or ``rules`` are invalid.

    Example:
        >>> import loraplus
        >>> found = loraplus.pairs(loraplus.testing.tiny_lora_model())
        >>> [(p.key, p.a_name, p.b_name) for p in found][0]
        ('layers.0[default]', 'layers.0.lora_A.default.weight', 'layers.0.lora_B.default.weight')
        >>> found[0].rank, found[0].a_matrix().shape, found[0].b_matrix().shape, found.unpaired
        (2, torch.Size([2, 8]), torch.Size([8, 2]), ())
    """
    if not isinstance(model, nn.Module):
        raise LoraPlusError(f"pairs() takes a torch.nn.Module, got {type(model).__name__}")
    labels, modules = label_model(model, rules)
    found, rest = pair_labels(labels, modules)
    roles = {lab.name: lab.role for lab in labels}
    return Pairs(tuple(found), tuple(Unpaired(name, roles[name], why) for name, why in rest.items()))
