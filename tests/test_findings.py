"""Regression tests for the silent mislabelling findings: each failed before its fix.

Expected roles, rates and decay come from how each test builds its model.
"""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import loraplus
from loraplus import LoraPlus, LoraPlusError, Role, param_groups


class HandWritten(nn.Module):
    """The LoRA layer most tutorials write."""

    def __init__(self, d: int = 16, r: int = 4, alpha: float = 8.0):
        super().__init__()
        self.base = nn.Linear(d, d)
        self.base.requires_grad_(False)
        self.lora_A = nn.Linear(d, r, bias=False)
        self.lora_B = nn.Linear(r, d, bias=False)
        self.scaling = alpha / r

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * self.lora_B(self.lora_A(x))


def _lrs_by_name(opt_or_groups) -> dict[str, float]:
    groups = getattr(opt_or_groups, "param_groups", opt_or_groups)
    return {n: g["lr"] for g in groups for n in g["param_names"]}


def test_1_hand_written_nn_linear_factors_get_loraplus():
    model = nn.Sequential(HandWritten(), HandWritten())
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to warn about: every factor has its partner
        opt = LoraPlus(torch.optim.AdamW, model, lr=1e-3)
    lrs = _lrs_by_name(opt)
    for i in (0, 1):
        assert lrs[f"{i}.lora_A.weight"] == 1e-3
        assert lrs[f"{i}.lora_B.weight"] == 4e-3
    found = loraplus.pairs(model)
    assert [(p.a_name, p.b_name, p.scaling) for p in found] == [
        ("0.lora_A.weight", "0.lora_B.weight", 2.0),
        ("1.lora_A.weight", "1.lora_B.weight", 2.0),
    ]
    assert found.unpaired == ()
    # and the Monitor pairs them (it refused them as "not a B·A product")
    mon = loraplus.Monitor(opt, model)
    assert [p.key for p in mon.pairs] == ["0", "1"]
    mon.close()


@pytest.mark.parametrize("adapter", ["gender_bias", "norm_task", "ln2", "bias", "layernorm"])
def test_2_adapter_names_never_decide_weight_decay(adapter):
    peft = pytest.importorskip("peft")
    class Base(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(16, 16)
            self.final = nn.LayerNorm(16)
            self.classifier = nn.Linear(16, 4)

    cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["proj"], modules_to_save=["classifier"])
    model = peft.get_peft_model(Base(), cfg, adapter_name=adapter)
    groups = param_groups(model, lr=1e-3, weight_decay=0.1)
    wd = {n: g["weight_decay"] for g in groups for n in g["param_names"]}
    prefix = "base_model.model."
    assert wd[f"{prefix}proj.lora_A.{adapter}.weight"] == 0.1
    assert wd[f"{prefix}proj.lora_B.{adapter}.weight"] == 0.1
    # the modules_to_save copy of the head: its weight decays, its bias does not
    assert wd[f"{prefix}classifier.modules_to_save.{adapter}.weight"] == 0.1
    assert wd[f"{prefix}classifier.modules_to_save.{adapter}.bias"] == 0.0


def test_2_embedding_adapter_named_bias_decays():
    peft = pytest.importorskip("peft")

    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.emb = nn.Embedding(10, 8)
            self.out = nn.Linear(8, 8)

    model = peft.get_peft_model(M(), peft.LoraConfig(r=2, target_modules=["emb", "out"]), adapter_name="bias")
    wd = {n: g["weight_decay"] for g in param_groups(model, lr=1e-3, weight_decay=0.1) for n in g["param_names"]}
    assert wd["base_model.model.emb.lora_embedding_A.bias"] == 0.1
    assert wd["base_model.model.emb.lora_embedding_B.bias"] == 0.1


def test_3_ratio_spelled_4_is_the_default_for_every_family():
    peft = pytest.importorskip("peft")
    base = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    dora = peft.get_peft_model(base, peft.LoraConfig(r=4, target_modules=["0", "1"], use_dora=True))
    default, spelled = param_groups(dora, lr=1e-3), param_groups(dora, lr=1e-3, ratio=4.0)
    assert _lrs_by_name(default) == _lrs_by_name(spelled)
    b = [n for n in _lrs_by_name(default) if ".lora_B." in n]
    assert len(b) == 2 and all(_lrs_by_name(default)[n] == 4e-3 for n in b)


def test_3_checkpoint_made_with_the_default_loads_with_ratio_4(tmp_path):
    from loraplus.testing import build_model

    layers = [
        {"conv": conv, "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": False}
        for conv in ("peft", "peft_vera")
    ]
    m1 = build_model(layers, head=False, norm=False).model
    opt1 = LoraPlus(torch.optim.AdamW, m1, lr=1e-3)
    for p in m1.parameters():
        if p.requires_grad:
            p.grad = torch.ones_like(p)
    opt1.step()
    opt2 = LoraPlus(torch.optim.AdamW, m1, ratio=4.0, lr=1e-3)
    loraplus.load_optimizer_state(opt2, opt1.state_dict())  # raised "4 groups vs 3" with family defaults
    assert [g["name"] for g in opt2.param_groups] == [g["name"] for g in opt1.param_groups]


def test_5_role_lr_for_a_moves_b_with_it():
    model = nn.Sequential(HandWritten())
    lrs = _lrs_by_name(param_groups(model, lr=1e-3, ratio=4, role_lr={Role.A: 5e-4}))
    assert lrs["0.lora_A.weight"] == 5e-4 and lrs["0.lora_B.weight"] == 4 * 5e-4
    # an explicit B rate still wins
    lrs = _lrs_by_name(param_groups(model, lr=1e-3, ratio=4, role_lr={Role.A: 5e-4, "B": 7e-3}))
    assert lrs["0.lora_B.weight"] == 7e-3


def test_loud_when_b_ends_at_a_rate_without_ratio_1():
    model = nn.Sequential(HandWritten())
    with pytest.warns(UserWarning, match="B factors the A factors' learning rate"):
        param_groups(model, lr=1e-3, ratio=4, role_lr={"B": 1e-3})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        param_groups(model, lr=1e-3, ratio=1)  # asked for: no warning


def test_loud_when_a_factor_has_no_partner():
    model = nn.Sequential(HandWritten(), HandWritten())
    model[1].lora_B.requires_grad_(False)  # frozen by mistake
    with pytest.warns(UserWarning, match=r"1 adapter factor\(s\) have no partner.*1\.lora_A\.weight") as rec:
        param_groups(model, lr=1e-3)
    assert len([w for w in rec if "no partner" in str(w.message)]) == 1  # once, naming it


def test_loud_when_no_b_factor_exists():
    class CoreOnly(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(4, 4)
            self.lokr_w1 = nn.ParameterDict({"default": nn.Parameter(torch.ones(2, 2))})
            self.lokr_w2 = nn.ParameterDict({"default": nn.Parameter(torch.ones(2, 2))})

    with pytest.warns(UserWarning, match="no B factor was found"):
        param_groups(nn.Sequential(CoreOnly()), lr=1e-3)


class _Boom:
    def __init__(self, exc: BaseException):
        self.exc = exc

    def __call__(self, groups, **kwargs):
        raise self.exc


@pytest.mark.parametrize("exc", [MemoryError("out of memory"), RuntimeError("CUDA out of memory"), KeyboardInterrupt()])
def test_6_errors_the_optimizer_did_not_raise_about_its_arguments_pass_through(exc):
    with pytest.raises(type(exc)) as info:
        LoraPlus(_Boom(exc), nn.Sequential(HandWritten()), lr=1e-3)
    assert not isinstance(info.value, LoraPlusError)


@pytest.mark.parametrize("exc", [TypeError("unexpected keyword 'betas'"), ValueError("Invalid learning rate")])
def test_6_argument_errors_get_context(exc):
    with pytest.raises(LoraPlusError, match="could not be built over") as info:
        LoraPlus(_Boom(exc), nn.Sequential(HandWritten()), lr=1e-3)
    assert info.value.__cause__ is exc


# --------------------------------------------------------------------------- pairs, against how the model was built

from hypothesis import given  # noqa: E402

from loraplus.testing import lora_models  # noqa: E402


@given(lora_models())
def test_pairs_match_how_each_generated_model_was_built(gen):
    """Every A/B pair the generator built is found, and nothing else (hostile adapter names included)."""
    found = loraplus.pairs(gen.model, gen.rules)
    assert {(p.a_name, p.b_name) for p in found} == gen.pairs
    # every other adapter factor is listed apart, with a reason that is not "no partner"
    factors = {n for n, r in gen.expected.items() if r in (Role.A, Role.B, Role.EMBEDDING_A, Role.EMBEDDING_B)}
    paired = {n for pair in gen.pairs for n in pair}
    assert {u.name for u in found.unpaired} == factors - paired
    assert not any(u.missing_partner for u in found.unpaired)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every factor has its partner: nothing to warn about
        try:
            param_groups(gen.model, lr=1e-3, ratio=2, rules=gen.rules)
        except UserWarning as w:
            assert "no partner" not in str(w), w
