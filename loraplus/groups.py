"""Lower-level param-group tools: :func:`split_groups` (split existing groups into LoRA+ roles) and
:func:`guard` (the ratio guard attached to an optimizer, a :class:`Guard`, or ``None``).
"""

from __future__ import annotations

from ._groups._build import split_groups
from ._groups._guard import Guard, guard

__all__ = ["Guard", "guard", "split_groups"]
