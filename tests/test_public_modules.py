"""Every name the public submodules list in ``__all__`` imports, and is the object the private module defines."""

from __future__ import annotations

import importlib

import pytest

# Ground truth: the surface decided in issue #27, written here by hand, not read from the modules.
EXPECTED = {
    "loraplus.layouts": {"CONVENTIONS", "Convention"},
    "loraplus.pairing": {"Pair", "Pairs", "Unpaired", "pair_params", "Preconditioner", "preconditioner"},
    "loraplus.groups": {"split_groups", "guard", "Guard"},
    "loraplus.probe": {"LrSuggestion", "RatioSummary", "ProbePoint", "Phase"},
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


def test_public_submodules_reexport_the_same_objects() -> None:
    import loraplus
    from loraplus import groups, layouts, pairing, probe

    assert layouts.Convention is loraplus.Convention
    assert pairing.Pairs is loraplus.Pairs
    assert pairing.pair_params is loraplus.pair_params
    assert groups.guard is loraplus.guard
    assert groups.split_groups is loraplus.split_groups
    assert probe.LrSuggestion is loraplus.LrSuggestion
