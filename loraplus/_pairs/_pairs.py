"""Pairing: which A factor goes with which B factor, and how to read them as ΔW = s·B·A.

Labelling says what each tensor *is* and where it sits (its layout, holder and adapter); pairing
groups those labels by layer key. One :class:`Pair` per adapted layer and adapter name, in model
order, with the layout's orientation and the layer's LoRA scaling ``s`` where the layout records
it. Adapters whose update is not one B·A product (LoHa, LoKr, VeRA, AdaLoRA, KaSA) are listed apart
with the reason. The Monitor, the warnings of :func:`loraplus.LoraPlus` and the preconditioners
all read the same records.
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import Enum

import torch
from torch import nn

from .._errors import LoraPlusError
from .._labels import Label, Origin, RuleSpec, label_model
from .._layouts import Layout, Orientation, canonical_name, generic_scaling
from .._role import Role

__all__ = ["Pair", "Pairs", "Unpaired", "Why", "pair_labels", "pairs", "stack_factors", "std_factor"]


class Why(str, Enum):
    """Why an adapter factor is not part of a :class:`Pair` (read this, not the reason's text)."""

    NOT_A_PRODUCT = "not a product"  #: the layout's update is not one B·A product
    NO_PARTNER = "no partner"  #: the other factor of its layer is missing, frozen or unlabelled
    TIED = "tied"  #: its partner tensor is shared with (and labelled under) another layer
    BIAS = "bias"  #: the adapted layer's own bias, not a factor
    DUPLICATE = "duplicate"  #: a second factor of one side under the same layer key
    SHAPES = "shapes"  #: the two factors' shapes do not chain as B·A
    NOT_HELD = "not held"  #: the optimizer does not update it (Monitor, preconditioners)


@dataclass(frozen=True)
class Pair:
    """One adapter of one layer: its A and B factors and how to read them as ΔW = s·B·A.

    Attributes:
        layer: the adapted layer's name, without wrapper prefixes (``blocks.0.attn.q``).
        adapter: the adapter name (``default``), ``""`` where the layout has none.
        a_name, b_name: the factors' names as in ``model.named_parameters()``.
        convention: the layout's name (``PEFT``, ``torchtune``, ``declared roles``, …), for people.
        orientation: ``"standard"`` (A is (r, in…), B is (out, r…)) or ``"transposed"``
            (stored as A (in, r), B (r, out), applied as x·A·B: DeepSpeed-Chat, minLoRA embeddings).
        embedding: whether the adapted layer is an embedding (its input is one-hot).
        host: the module whose first input is the layer input x (raw name, ``""`` when unknown).
        scaling: the factor ``s`` the layer applies to B·A, read by the layout's reader (PEFT
            ``scaling[adapter]``, loralib/litgpt ``scaling``, torchtune ``alpha``/``rank``, minLoRA
            ``scale``, kohya ``alpha``/rank, diffusers ``network_alpha``/rank, NeMo ``alpha``/``dim``,
            DeepSpeed-Chat ``lora_scaling``); ``None`` where the layout does not record it.
        a, b: the parameters themselves.
        layout: the layout record (``None`` for pairs of declared roles or rules).
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
    layout: Layout | None = field(default=None, repr=False, compare=False)

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
        return self.orientation == Orientation.TRANSPOSED

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
        t = self.a if tensor is None else tensor
        assert t is not None
        return std_factor(t, self.transposed)

    def b_matrix(self, tensor: torch.Tensor | None = None) -> torch.Tensor:
        """B (or a tensor shaped like it) as an (out, r) matrix view."""
        t = self.b if tensor is None else tensor
        assert t is not None
        return std_factor(t, self.transposed)


@dataclass(frozen=True)
class Unpaired:
    """An adapter factor that is not part of a :class:`Pair`, and why.

    Attributes:
        name: the factor's name.
        role: its role.
        reason: why, for people.
        why: why, as a value to test (:class:`Why`).
    """

    name: str
    role: Role
    reason: str
    why: Why = Why.NO_PARTNER

    @property
    def missing_partner(self) -> bool:
        """True when the factor lacks its partner (as opposed to belonging to a non-product adapter)."""
        return self.why is Why.NO_PARTNER or self.why is Why.TIED


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
    if orientation == Orientation.TRANSPOSED:
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


def _host_name(lab: Label) -> str:
    """The adapted layer: the holder, or the module before the layout's ``within`` segment (minLoRA)."""
    within = lab.layout.within if lab.layout is not None else None
    if within is not None:
        segs = lab.holder.split(".")
        if within in segs:
            return ".".join(segs[: segs.index(within)])
    return lab.holder


def _partner_tied(lab: Label, modules: Mapping[str, nn.Module], labelled: Mapping[int, str]) -> str | None:
    """The name under which the factor's partner tensor is labelled when it is shared with another layer."""
    factor = lab.factor
    holder = modules.get(lab.holder)
    if factor is None or factor.partner is None or holder is None:
        return None
    sub = getattr(holder, factor.partner, None)
    tensors = list(sub.parameters()) if isinstance(sub, nn.Module) else [sub] if isinstance(sub, nn.Parameter) else []
    for t in tensors:
        other = labelled.get(id(t))
        if other is not None:
            return other
    return None


def pair_labels(
    labels: Sequence[Label], modules: Mapping[str, nn.Module] | None = None, *, records: bool = True
) -> tuple[list[Pair], dict[str, Unpaired]]:
    """Pair each A factor with its B factor; return the pairs and ``{name: Unpaired}`` for the rest.

    Factors of a layout pair by layer key: the same holder module and adapter name. Factors without
    a layout (declared roles, user rules) pair within their module, then within its parent, only
    when exactly one A and one B share it. Nothing is guessed. ``modules`` (the model's
    ``named_modules``) lets the pairs carry their layer's scaling. ``records=False`` only finds the
    factors without a partner (what ``LoraPlus`` warns about): no :class:`Pair` is built and shapes
    are not checked.
    """
    modules = modules or {}
    unpaired: dict[str, Unpaired] = {}
    by_key: dict[tuple[str, str], dict[bool, Label]] = {}
    loose: list[Label] = []
    for lab in labels:
        a_side = lab.role.a_side
        if not a_side and not lab.role.b_side:
            continue
        layout = lab.layout
        if layout is None:
            loose.append(lab)
            continue
        if not layout.product:
            unpaired[lab.name] = Unpaired(lab.name, lab.role, layout.not_a_product, Why.NOT_A_PRODUCT)
            continue
        if lab.factor is not None and lab.factor.bias:
            unpaired[lab.name] = Unpaired(lab.name, lab.role, "the adapted layer's own bias, not a factor", Why.BIAS)
            continue
        sides = by_key.setdefault((lab.holder, lab.adapter), {})
        if a_side in sides:
            side = "A" if a_side else "B"
            unpaired[lab.name] = Unpaired(
                lab.name, lab.role, f"a second {side} factor in the same layer as {sides[a_side].name!r}", Why.DUPLICATE
            )
            continue
        sides[a_side] = lab

    labelled = {id(lab.param): lab.name for lab in labels}
    found: list[Pair] = []
    for sides in by_key.values():
        if len(sides) == 1:
            ((a_side, lab),) = sides.items()
            tied = _partner_tied(lab, modules, labelled)
            if tied is not None:
                unpaired[lab.name] = Unpaired(
                    lab.name, lab.role,
                    f"its partner tensor is tied to {tied!r} (one tensor shared by two layers), so this layer's "
                    "factors cannot be paired; LoRA+ still gives each its role's rate",
                    Why.TIED,
                )
            else:
                unpaired[lab.name] = Unpaired(
                    lab.name, lab.role, f"no partner: no {'B' if a_side else 'A'} factor in its layer", Why.NO_PARTNER
                )
            continue
        if not records:
            continue
        a, b = sides[True], sides[False]
        layout = a.layout
        assert layout is not None
        emb = a.role is Role.EMBEDDING_A
        orientation = layout.orientation_on(emb)
        why = chain_reason(a.param, b.param, orientation)
        if why is not None:
            unpaired[a.name] = Unpaired(a.name, a.role, why, Why.SHAPES)
            unpaired[b.name] = Unpaired(b.name, b.role, why, Why.SHAPES)
            continue
        holder = modules.get(a.holder)
        scale = None if holder is None else layout.scaling(holder, a.adapter)
        host = _host_name(a)
        found.append(Pair(canonical_name(host), a.adapter, a.name, b.name, layout.display(emb), orientation.value,
                          emb, host, scale, a.param, b.param, layout))

    # factors without a layout: pair inside the same module, then its parent
    for depth in (1, 2):
        groups: dict[str, list[Label]] = {}
        for lab in loose:
            segs = lab.name.split(".")
            groups.setdefault(".".join(segs[:-depth]) if len(segs) > depth else "", []).append(lab)
        loose = []
        for prefix, labs in groups.items():
            a_labs = [lab for lab in labs if lab.role.a_side]
            b_labs = [lab for lab in labs if lab.role.b_side]
            if len(a_labs) == 1 and len(b_labs) == 1:
                a, b = a_labs[0], b_labs[0]
                orientation = Orientation.STANDARD
                if chain_reason(a.param, b.param, orientation) is not None:
                    orientation = Orientation.TRANSPOSED
                if chain_reason(a.param, b.param, orientation) is None:
                    if records:
                        emb = a.role is Role.EMBEDDING_A
                        source = "declared roles" if a.origin is Origin.DECLARED else "same module"
                        holder = modules.get(prefix)
                        scale = None if holder is None else generic_scaling(holder, "")
                        found.append(Pair(canonical_name(prefix), "", a.name, b.name, source, orientation.value, emb,
                                          prefix, scale, a.param, b.param))
                    continue
            loose.extend(labs)
    for lab in loose:
        missing = "B" if lab.role.a_side else "A"
        unpaired[lab.name] = Unpaired(
            lab.name, lab.role,
            f"no partner: no unique {missing} factor in its module; pass rules= naming both factors of one layer, "
            "or declare them with loraplus_roles()",
            Why.NO_PARTNER,
        )
    order = {lab.name: i for i, lab in enumerate(labels)}
    found.sort(key=lambda p: order[p.a_name])
    return found, unpaired


def pairs(model: nn.Module, rules: RuleSpec | None = None) -> Pairs:
    """The A/B factor pairs of ``model``: one per adapted layer and adapter, in model order.

    Uses the same role engine as :func:`loraplus.LoraPlus` (``rules`` as there). Factors that do
    not form one B·A product (LoHa, LoKr, VeRA, AdaLoRA, KaSA), factors without a partner and merged
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
    return Pairs(tuple(found), tuple(rest.values()))
