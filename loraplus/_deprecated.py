"""The top-level names of loraplus 0.1 that 0.2 renamed or moved to a submodule.

Each still resolves, through ``loraplus.__getattr__``, to the very object its new name gives, with
a ``FutureWarning`` the first time a process asks for it; 0.3 removes them.
"""

from __future__ import annotations

import functools
import importlib
import warnings
from dataclasses import dataclass
from typing import Any

__all__ = ["MOVED", "REMOVED_IN", "SINCE", "Moved", "resolve"]

#: The release (and its date) that deprecated the old names, and the release that removes them.
SINCE = "0.2 (2026-12-05)"
REMOVED_IN = "0.3"


@dataclass(frozen=True)
class Moved:
    """One old top-level name and where it lives now."""

    old: str  #: the name ``loraplus.<old>`` had in 0.1
    module: str  #: the module that has it now (``loraplus`` itself for a rename)
    name: str  #: its name there

    @property
    def new(self) -> str:
        """The spelling to use now, e.g. ``loraplus.pairing.Pairs``."""
        return f"{self.module}.{self.name}"


MOVED: tuple[Moved, ...] = (
    Moved("apply", "loraplus", "apply_to_optimizer"),
    Moved("refine", "loraplus", "apply_to_groups"),
    Moved("per_group", "loraplus", "scheduler_bounds"),
    Moved("load_state_dict", "loraplus", "load_optimizer_state"),
    Moved("Pair", "loraplus.pairing", "Pair"),
    Moved("Pairs", "loraplus.pairing", "Pairs"),
    Moved("Unpaired", "loraplus.pairing", "Unpaired"),
    Moved("pair_params", "loraplus.pairing", "pair_params"),
    Moved("Preconditioner", "loraplus.pairing", "Preconditioner"),
    Moved("preconditioner", "loraplus.pairing", "preconditioner"),
    Moved("split_groups", "loraplus.groups", "split_groups"),
    Moved("guard", "loraplus.groups", "guard"),
    Moved("Convention", "loraplus.layouts", "Convention"),
    Moved("CONVENTIONS", "loraplus.layouts", "CONVENTIONS"),
    Moved("LrSuggestion", "loraplus.probe", "LrSuggestion"),
)


def resolve(name: str) -> Any:
    """The object an old name stands for (warning once per name), else ``AttributeError``."""
    record = next((m for m in MOVED if m.old == name), None)
    if record is None:
        raise AttributeError(f"module 'loraplus' has no attribute {name!r}")
    _warn_once(record)
    return getattr(importlib.import_module(record.module), record.name)


@functools.cache
def _warn_once(record: Moved) -> None:
    warnings.warn(
        f"loraplus.{record.old} is deprecated since {SINCE} and will be removed in {REMOVED_IN}; use {record.new}",
        FutureWarning,
        stacklevel=4,  # _warn_once, resolve, loraplus.__getattr__, then the caller
    )
