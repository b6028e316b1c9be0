"""User rules (``rules=``): globs, regexes and callables that win over every layout."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Union

from torch import nn

from .._errors import LoraPlusError
from .._role import Role

__all__ = ["Rule", "RuleSpec", "match_pattern", "normalize_rules"]


def match_pattern(pattern: str | re.Pattern[str] | None, name: str, canon: str) -> bool:
    """Glob (``str``, full match) or regex (``re.Pattern``, search) on the name or its canonical form."""
    if isinstance(pattern, re.Pattern):
        return bool(pattern.search(name) or pattern.search(canon))
    if isinstance(pattern, str):
        return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(canon, pattern)
    return False


RuleCallable = Callable[[str, nn.Parameter, nn.Module], Union[Role, str, None]]
#: What ``rules=`` accepts: a mapping ``{pattern: role}`` or a sequence of ``(pattern, role)`` pairs
#: and callables ``(name, param, module) -> Role | None``. A pattern is a glob (``str``) or a
#: compiled regular expression (searched).
RuleSpec = Union[Mapping[Union[str, "re.Pattern[str]"], Union[Role, str]], Sequence[Any]]


@dataclass(frozen=True)
class Rule:
    description: str
    pattern: str | re.Pattern[str] | None
    role: Role | None
    func: RuleCallable | None

    def apply(self, name: str, canon: str, param: nn.Parameter, module: nn.Module) -> Role | None:
        if self.func is not None:
            out = self.func(name, param, module)
            return None if out is None else Role.coerce(out)
        return self.role if match_pattern(self.pattern, name, canon) else None


def normalize_rules(rules: RuleSpec | None) -> list[Rule]:
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
    out: list[Rule] = []
    for item in items:
        if callable(item) and not isinstance(item, (str, re.Pattern, Role)):
            desc = getattr(item, "__qualname__", None) or repr(item)
            out.append(Rule(f"rule {desc}", None, None, item))
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
        out.append(Rule(f"rule {shown!r}", pattern, Role.coerce(role), None))
    return out
