"""mkdocstrings (griffe) extension: a class whose ``__new__`` builds something else is documented by it.

``loraplus.LoraPlus`` is a class so that ``isinstance(opt, loraplus.LoraPlus)`` works, but calling it
returns the user's optimizer: its signature is its ``__new__``'s and it has no ``__init__``. griffe
takes a class's signature and parameters from ``__init__`` only, so the class docstring's ``Args:``
would match nothing. This gives such a class an ``__init__`` member with ``__new__``'s parameters
(after ``cls``). Docs build only; the package does not import it.
"""

from __future__ import annotations

from typing import Any

import griffe


class NewAsSignature(griffe.Extension):
    def on_class_members(self, *, cls: griffe.Class, **kwargs: Any) -> None:
        new = cls.members.get("__new__")
        if "__init__" in cls.members or not isinstance(new, griffe.Function):
            return
        params = [p for p in new.parameters if p.name != "cls"]
        init = griffe.Function(
            "__init__",
            lineno=new.lineno,
            endlineno=new.endlineno,
            parameters=griffe.Parameters(griffe.Parameter("self", kind=griffe.ParameterKind.positional_or_keyword), *params),
            returns="None",
        )
        cls.set_member("__init__", init)
