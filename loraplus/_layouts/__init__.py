"""What loraplus knows about each LoRA implementation: one :class:`Layout` record per library.

The records (``_catalog.py``), what a record holds (``_record.py``), and how a parameter is found
in one — by the type of the module that holds it, else by its trailing name segments
(``_match.py``). :data:`CONVENTIONS` is the public, flat view of the records' name patterns.
"""

from __future__ import annotations

from dataclasses import dataclass

from .._role import Role
from ._catalog import LAYOUTS, generic_scaling
from ._match import (
    WRAPPER_SEGMENTS,
    Hit,
    NameIndex,
    NameMatcher,
    canonical_name,
    detect_by_type,
    kept_segments,
    may_have_wrappers,
)
from ._record import Detector, Factor, Family, Layout, Orientation

__all__ = [
    "CONVENTIONS",
    "Convention",
    "Detector",
    "Factor",
    "Family",
    "Hit",
    "LAYOUTS",
    "NAME_INDEX",
    "NameMatcher",
    "Orientation",
    "WRAPPER_SEGMENTS",
    "Layout",
    "canonical_name",
    "detect_by_type",
    "generic_scaling",
    "kept_segments",
    "may_have_wrappers",
]


@dataclass(frozen=True)
class Convention:
    """One naming pattern of one layout: the trailing segments of a parameter name and the role they imply.

    A flat, read-only view of :data:`loraplus._layouts.LAYOUTS` (each layout's factors).
    ``pattern`` is matched against the *last* segments of the name (after wrapper segments are
    removed); ``"*"`` matches exactly one segment (an adapter name such as ``default``).
    ``sibling``, when set, must also be an attribute of the module that holds the pattern's first
    segment; ``bottleneck`` layouts (generic names) also need both factors bias-free, mapping
    in → r → out with r below both.
    """

    library: str
    pattern: tuple[str, ...]
    role: Role
    family: str = "lora"
    sibling: str | None = None
    bottleneck: bool = False
    layout: Layout | None = None

    def describe(self) -> str:
        pat = ".".join("<adapter>" if s == "*" else s for s in self.pattern)
        checks = ", bias-free rank bottleneck" if self.bottleneck else ""
        extra = f" (next to {self.sibling!r}{checks})" if self.sibling else ""
        return f"{self.library}: …{pat}{extra}"


#: The naming patterns loraplus recognises, one row per factor of each layout (longer patterns win).
CONVENTIONS: tuple[Convention, ...] = tuple(
    Convention(layout.name, factor.pattern, factor.role, layout.family.value, factor.partner, layout.generic, layout)
    for layout in LAYOUTS
    for factor in layout.factors
)

#: The name index of every layout (built once at import, never changed).
NAME_INDEX = NameIndex(LAYOUTS)
