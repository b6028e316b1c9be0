"""Every name the public submodules list in ``__all__`` imports, and is the object the private module defines."""

from __future__ import annotations

import importlib

import pytest

# Ground truth: the surface decided in issue #27, written here by hand, not read from the modules.
EXPECTED = {
    "loraplus.layouts": {"CONVENTIONS", "Convention"},
    "loraplus.pairing": {"Pair", "Pairs", "Unpaired", "Why", "pair_params", "Preconditioner", "preconditioner"},
    "loraplus.groups": {"split_groups", "guard", "Guard"},
    "loraplus.probe": {"LrSuggestion", "RatioSummary", "ProbePoint", "Phase", "Rule"},
}


@pytest.mark.parametrize("module_name", sorted(EXPECTED))
def test_public_submodule_exports(module_name: str) -> None:
    module = importlib.import_module(module_name)
    assert module.__doc__
    assert set(module.__all__) == EXPECTED[module_name]
    for name in module.__all__:
        obj = getattr(module, name)
        assert obj is not None
        exec(f"from {module_name} import {name}", {})


def test_public_submodules_reexport_the_private_objects() -> None:
    from loraplus import _find_lr, _layouts, groups, layouts, pairing, probe
    from loraplus._groups import _build, _guard
    from loraplus._pairs import _pairs, _params, _precondition

    assert layouts.Convention is _layouts.Convention and layouts.CONVENTIONS is _layouts.CONVENTIONS
    assert pairing.Pairs is _pairs.Pairs and pairing.pair_params is _params.pair_params
    assert pairing.preconditioner is _precondition.preconditioner
    assert groups.guard is _guard.guard and groups.split_groups is _build.split_groups
    assert probe.LrSuggestion is _find_lr.LrSuggestion and probe.Rule is _find_lr.Rule


def test_submodules_are_reachable_from_the_package() -> None:
    import loraplus

    for name in ("groups", "layouts", "pairing", "probe", "schedulers", "testing"):
        assert getattr(loraplus, name).__name__ == f"loraplus.{name}"
