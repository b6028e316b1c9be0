"""The adapter layouts loraplus recognises: the :class:`Convention` record and the
:data:`CONVENTIONS` catalog (peft, loralib, ...), for users who inspect or extend them.

    >>> from loraplus.layouts import CONVENTIONS, Convention
    >>> all(isinstance(c, Convention) for c in CONVENTIONS)
    True
"""

from __future__ import annotations

from ._layouts import CONVENTIONS, Convention

__all__ = ["CONVENTIONS", "Convention"]
