"""Weight decay: which trainable parameters are exempt by default, and the user's ``no_decay=`` rules.

Decided by a parameter's own (leaf) name and its module, never by a segment that names an adapter.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from typing import Protocol, Union

from torch import nn

from .._errors import LoraPlusError
from .._layouts import WRAPPER_SEGMENTS, canonical_name
from .._role import ADAPTER_ROLES, Role
from ._rules import match_pattern

__all__ = ["NoDecaySpec", "default_no_decay", "is_no_decay", "is_norm_module", "norm_named", "normalize_no_decay"]


class Label(Protocol):
    """What the decay rules read of a label (``loraplus._labels.Label``)."""

    name: str
    param: nn.Parameter
    role: Role
    module: nn.Module
    norm_named: bool


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


def is_norm_module(module: nn.Module) -> bool:
    """A torch norm layer, or any class whose name ends in ``Norm`` (``LlamaRMSNorm``, ``T5LayerNorm``)."""
    return isinstance(module, _NORM_TYPES) or bool(_NORM_CLASS.search(type(module).__name__))


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


_MATRIX_LAYERS = (nn.Linear, nn.modules.conv._ConvNd, nn.Embedding, nn.MultiheadAttention)


def norm_named(name: str, owner: nn.Module, modules: Mapping[str, nn.Module]) -> bool:
    """Whether the owner's own attribute name (not a ModuleDict key) names a normalisation layer."""
    segs = name.split(".")[:-1]
    while segs and segs[-1] in WRAPPER_SEGMENTS:
        segs.pop()
    if not segs or not _NORM_LEAF.search(segs[-1].lower()) or isinstance(owner, _MATRIX_LAYERS):
        return False
    parent = modules.get(".".join(segs[:-1]))
    return not isinstance(parent, (nn.ModuleDict, nn.ParameterDict))
