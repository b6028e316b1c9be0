"""One walk of the model: its modules by name and its parameters in ``named_parameters`` order."""

from __future__ import annotations

from torch import nn

__all__ = ["named_modules_map", "walk"]


class _Overridden(Exception):
    pass


def walk(model: nn.Module) -> tuple[dict[str, nn.Module], list[tuple[str, nn.Parameter]] | None]:
    """``dict(model.named_modules(remove_duplicate=False))`` and ``list(model.named_parameters())`` in one pass.

    torch's nested generators walk the tree twice and cost O(depth) per module; this is one
    walk with the same order, names and de-duplication (a module seen before lends no
    parameters again, and neither can its sub-modules, which were all seen under its first name).
    When a class overrides those methods (e.g. FSDP1), torch's own are used and the list is None.
    """
    base = nn.Module
    root = type(model)
    if root.named_parameters is not base.named_parameters or root._named_members is not base._named_members:
        return dict(model.named_modules(remove_duplicate=False)), None
    checked: set[type] = set()
    modules: dict[str, nn.Module] = {}
    params: list[tuple[str, nn.Parameter]] = []
    seen_modules: set[nn.Module] = set()
    seen_params: set[int] = set()  # ids: Tensor.__hash__ is id() in Python, this skips the call

    def visit(prefix: str, module: nn.Module) -> None:
        cls = type(module)
        if cls not in checked:
            if cls.named_modules is not base.named_modules:
                raise _Overridden
            checked.add(cls)
        modules[prefix] = module
        if module not in seen_modules:
            seen_modules.add(module)
            for key, value in module._parameters.items():
                if value is None or id(value) in seen_params:
                    continue
                seen_params.add(id(value))
                params.append((prefix + "." + key if prefix else key, value))
        for key, sub in module._modules.items():
            if sub is not None:
                visit(prefix + "." + key if prefix else key, sub)

    try:
        visit("", model)
    except (_Overridden, RecursionError):
        return dict(model.named_modules(remove_duplicate=False)), None
    return modules, params


def named_modules_map(model: nn.Module) -> dict[str, nn.Module]:
    """``dict(model.named_modules(remove_duplicate=False))``, computed in one iterative walk."""
    return walk(model)[0]
