"""The O(parameters) labelling fast paths give exactly what torch's own walks and the plain rules give.

Pins the construction-speed work behind benchmarks/perf/construction.py: one iterative walk
instead of ``named_modules`` + ``named_parameters``, cached convention matching and cached
no-decay checks. Each must be invisible except in time.
"""

from __future__ import annotations

import torch
from hypothesis import given
from torch import nn

import loraplus
from loraplus._labels import _decay, _walk
from loraplus._layouts import LAYOUTS, NAME_INDEX, NameIndex, NameMatcher
from loraplus.testing import lora_models, tiny_lora_model


def _torch_walk(model: nn.Module):
    return dict(model.named_modules(remove_duplicate=False)), list(model.named_parameters())


@given(lora_models())
def test_walk_equals_torch_named_modules_and_named_parameters(gen):
    modules, params = _walk.walk(gen.model)
    ref_modules, ref_params = _torch_walk(gen.model)
    assert list(modules.items()) == list(ref_modules.items())
    assert params is not None
    assert [n for n, _ in params] == [n for n, _ in ref_params]
    assert all(p is q for (_, p), (_, q) in zip(params, ref_params))


def test_walk_with_shared_modules_tied_parameters_and_none_children():
    shared = nn.Linear(3, 3)
    model = nn.Module()
    model.first = nn.Sequential(shared, nn.ReLU())
    model.second = nn.Sequential(nn.Linear(3, 3), shared)  # the same module under a second name
    model.head = nn.Linear(3, 3)
    model.head.weight = model.second[0].weight  # a tied parameter
    model.register_module("missing", None)
    model.bias_only = nn.Linear(3, 3)
    model.bias_only.register_parameter("weight", None)
    modules, params = _walk.walk(model)
    ref_modules, ref_params = _torch_walk(model)
    assert list(modules.items()) == list(ref_modules.items())
    assert "second.1" in modules  # duplicates keep every name, like remove_duplicate=False
    assert [(n, id(p)) for n, p in params] == [(n, id(p)) for n, p in ref_params]
    assert "second.1.weight" not in dict(params)  # a shared module lends its parameters once


class _RenamingModule(nn.Module):
    """Overrides named_parameters, as FSDP1 does: the fast walk must defer to it."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = tiny_lora_model()

    def named_parameters(self, *args, **kwargs):  # type: ignore[override]
        for name, p in super().named_parameters(*args, **kwargs):
            yield name.replace("inner.", "", 1), p


class _CustomWalk(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.Linear(2, 2)

    def named_modules(self, memo=None, prefix="", remove_duplicate=True):  # type: ignore[override]
        yield from super().named_modules(memo, prefix, remove_duplicate)


def test_walk_defers_to_overridden_methods():
    model = _RenamingModule()
    modules, params = _walk.walk(model)
    assert params is None
    assert modules == dict(model.named_modules(remove_duplicate=False))
    assert set(loraplus.classify(model)) == {n for n, p in model.named_parameters() if p.requires_grad}
    nested = nn.Sequential(_CustomWalk())
    assert _walk.walk(nested)[1] is None


def test_cached_convention_matching_agrees_with_a_fresh_scan():
    model = tiny_lora_model()
    modules = _walk.named_modules_map(model)
    names = [n for n, _ in model.named_parameters()] + [
        "x.lora_A.default.weight",
        "module._orig_mod.x.lora_B.default.weight",
        "down_blocks.0.up.weight",
        "lora_A",
        "weight",
    ]
    cached = NameMatcher(NAME_INDEX, modules)
    for name in names * 2:  # second pass hits the per-model tail cache
        fresh = NameMatcher(NameIndex(LAYOUTS), modules)  # a fresh index and an empty cache
        assert cached.match(name) == fresh.match(name)
    assert cached.match("x.lora_A.default.weight") is None  # no module `x` with a lora_B: no partner
    assert cached.match("layers.0.lora_A.default.weight") is not None


def test_cached_leaf_rule():
    for leaf, expected in [
        ("bias", True),
        ("q_bias", True),
        ("weight", False),
        ("norm_weight", True),
        ("ln_1", True),
        ("normal", False),
        ("default", False),
        ("lora_B", False),
    ]:
        assert _decay._no_decay_leaf(leaf) is expected, leaf


def test_large_moe_model_groups_every_tensor_once():
    """A mid-size meta-device MoE model (the benchmark's shape, smaller) goes through LoraPlus intact."""
    from benchmarks.perf import construction as bench

    model = bench.build_model(layers=2, experts=8)
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-4, weight_decay=0.01)
    names = [n for g in opt.param_groups for n in g["param_names"]]
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sorted(names) == sorted(trainable) and len(names) == len(set(names))
    by_name = {g["name"]: len(g["params"]) for g in opt.param_groups}
    assert by_name == {"A": 2 * (8 * 3 + 2), "B": 2 * (8 * 3 + 2), "other.no_decay": 4}
