"""mkdocstrings (griffe) extension: render ``Example:`` docstring sections as doctest code.

loraplus docstrings use Google style with an ``Example:`` section of ``>>>`` lines. griffe
reads the singular title as a plain admonition and renders its lines as Markdown, where
doctest output such as ``[('A', 0.0001)]`` looks like a link. The plural ``Examples:`` is
parsed as code, so this renames the title before parsing. Docs build only; the package does
not import it.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(\s*)Example:\s*$", re.M)


class DoctestExamples(griffe.Extension):
    def on_object(self, *, obj: Any, **kwargs: Any) -> None:
        doc = getattr(obj, "docstring", None)
        if doc is not None and ">>>" in doc.value:
            doc.value = _EXAMPLE.sub(r"\1Examples:", doc.value)
