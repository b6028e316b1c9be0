"""loraplus 0.2 trimmed the top level to fifteen names: every 0.1 name still works for one release.

Ground truth is written here by hand (the 0.1 ``__all__`` and the renames decided in issue #27),
not read from ``loraplus._deprecated``.
"""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest
import torch

import loraplus
from loraplus import _deprecated

# the public names of loraplus 0.1 (its __all__, minus the `testing` submodule, which stays)
OLD_ALL = {
    "CONVENTIONS", "Convention", "DEFAULT_RATIO", "LoraPlus", "LoraPlusError", "LrSuggestion", "Monitor",
    "Pair", "Pairs", "Preconditioner", "Unpaired", "Role", "apply", "classify", "explain", "find_lr",
    "guard", "load_state_dict", "pair_params", "pairs", "param_groups", "per_group", "precondition",
    "preconditioner", "refine", "split_groups",
}
# old name -> where it is now
NEW_HOME = {
    "apply": "loraplus.apply_to_optimizer",
    "refine": "loraplus.apply_to_groups",
    "per_group": "loraplus.scheduler_bounds",
    "load_state_dict": "loraplus.load_optimizer_state",
    "Pair": "loraplus.pairing.Pair",
    "Pairs": "loraplus.pairing.Pairs",
    "Unpaired": "loraplus.pairing.Unpaired",
    "pair_params": "loraplus.pairing.pair_params",
    "Preconditioner": "loraplus.pairing.Preconditioner",
    "preconditioner": "loraplus.pairing.preconditioner",
    "split_groups": "loraplus.groups.split_groups",
    "guard": "loraplus.groups.guard",
    "Convention": "loraplus.layouts.Convention",
    "CONVENTIONS": "loraplus.layouts.CONVENTIONS",
    "LrSuggestion": "loraplus.probe.LrSuggestion",
}
NEW_ALL = {
    "LoraPlus", "param_groups", "apply_to_optimizer", "apply_to_groups", "scheduler_bounds", "explain",
    "classify", "Role", "LoraPlusError", "DEFAULT_RATIO", "load_optimizer_state", "find_lr", "Monitor",
    "precondition", "pairs",
}


def _new(dotted: str):
    module, _, name = dotted.rpartition(".")
    return getattr(importlib.import_module(module), name)


def test_the_top_level_has_at_most_fifteen_names():
    assert set(loraplus.__all__) == NEW_ALL
    assert len(loraplus.__all__) <= 15
    for name in loraplus.__all__:
        assert getattr(loraplus, name) is not None


def test_every_old_name_is_still_there():
    # unchanged names plus the moved ones cover 0.1's whole surface
    assert OLD_ALL == (OLD_ALL & NEW_ALL) | set(NEW_HOME)
    assert {m.old for m in _deprecated.MOVED} == set(NEW_HOME)


@pytest.mark.parametrize("old", sorted(NEW_HOME))
def test_old_name_is_the_new_object_and_warns_once(old):
    _deprecated._warn_once.cache_clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        first = getattr(loraplus, old)
        second = getattr(loraplus, old)
    assert first is second is _new(NEW_HOME[old])
    future = [w for w in caught if issubclass(w.category, FutureWarning)]
    assert len(future) == 1, [str(w.message) for w in caught]
    text = str(future[0].message)
    assert f"loraplus.{old} is deprecated since 0.2 (2026-12-05)" in text
    assert "removed in 0.3" in text and NEW_HOME[old] in text
    assert future[0].filename == __file__  # points at the caller, not at loraplus


def test_the_warning_comes_once_per_name_per_process_and_from_imports():
    code = (
        "import warnings; warnings.simplefilter('always')\n"
        "with warnings.catch_warnings(record=True) as w:\n"
        "    warnings.simplefilter('always')\n"
        "    from loraplus import apply, refine\n"
        "    from loraplus import apply\n"
        "    import loraplus; loraplus.refine; loraplus.guard\n"
        "print(sorted(str(x.message).split()[0] for x in w if issubclass(x.category, FutureWarning)))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "['loraplus.apply', 'loraplus.guard', 'loraplus.refine']"


def test_unknown_names_still_raise_attribute_error():
    with pytest.raises(AttributeError, match="no attribute 'aply'"):
        loraplus.aply  # noqa: B018
    assert not hasattr(loraplus, "Refined")


def test_new_names_never_warn():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in NEW_ALL:
            getattr(loraplus, name)
        for dotted in NEW_HOME.values():
            _new(dotted)


def test_isinstance_loraplus_means_loraplus_built_the_groups():
    model = loraplus.testing.tiny_lora_model()
    built = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-3)
    assert type(built) is torch.optim.AdamW  # the genuine optimizer, not a wrapper
    assert isinstance(built, loraplus.LoraPlus)
    assert isinstance(torch.optim.SGD(loraplus.param_groups(model, lr=1e-3), lr=1e-3), loraplus.LoraPlus)
    plain = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    assert not isinstance(plain, loraplus.LoraPlus)
    loraplus.apply_to_optimizer(plain, model, ratio=4)
    assert isinstance(plain, loraplus.LoraPlus)  # retrofitted in place
    hand = torch.optim.AdamW([{"params": [next(model.parameters())], "role": "not a role"}], lr=1e-3)
    assert not isinstance(hand, loraplus.LoraPlus)
    for other in (None, 3, "B", model, [{"role": "B"}]):
        assert not isinstance(other, loraplus.LoraPlus)
