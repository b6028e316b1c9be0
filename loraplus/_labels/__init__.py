"""Labelling and weight decay: every trainable parameter gets a :class:`Label` (role, layout, layer key)."""

from ._decay import NoDecaySpec, default_no_decay, is_no_decay, is_norm_module, normalize_no_decay
from ._label import Label, Origin, classify, label_model, label_parameters
from ._rules import RuleSpec, match_pattern, normalize_rules
from ._walk import named_modules_map, walk

__all__ = [
    "Label",
    "NoDecaySpec",
    "Origin",
    "RuleSpec",
    "classify",
    "default_no_decay",
    "is_no_decay",
    "is_norm_module",
    "label_model",
    "label_parameters",
    "match_pattern",
    "named_modules_map",
    "normalize_no_decay",
    "normalize_rules",
    "walk",
]
