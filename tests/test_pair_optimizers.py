"""loraplus.pairing.pair_params with third-party pair optimizers (pytorch_optimizer.LoRARite, lora-pro-adamw)."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn

import loraplus
from loraplus import LoraPlusError
from loraplus.pairing import pair_params
from loraplus.testing import build_model

LoRARite = pytest.importorskip("pytorch_optimizer").LoRARite


def _spec(conv: str, d_in: int = 6, d_out: int = 5, r: int = 2) -> dict:
    return {"conv": conv, "d_in": d_in, "d_out": d_out, "r": r, "adapters": ["default"], "lora_bias": False}


def test_groups_alternate_a_and_b_with_the_rank_dimension_of_each_orientation():
    gen = build_model([_spec("peft"), _spec("deepspeed_chat"), _spec("kohya")], head=True)
    groups = pair_params(gen.model)
    assert [(g["lora_l_dim"], g["lora_r_dim"]) for g in groups] == [(0, 1), (1, 0)]
    assert groups[0]["param_names"] == [
        "layers.0.lora_A.default.weight", "layers.0.lora_B.default.weight",
        "layers.2.lora_down.weight", "layers.2.lora_up.weight",
    ]
    assert groups[1]["param_names"] == ["layers.1.lora_right_weight", "layers.1.lora_left_weight"]
    named = dict(gen.model.named_parameters())
    for g in groups:
        assert [named[n] for n in g["param_names"]] == g["params"]
        for a, b in zip(g["params"][::2], g["params"][1::2]):  # the rank dimension LoRARite reads
            assert a.shape[g["lora_l_dim"]] == b.shape[g["lora_r_dim"]] == 2


def test_a_model_without_pairs_is_refused_with_the_reasons():
    with pytest.raises(LoraPlusError, match="no A/B factor pair.*LoHa"):
        pair_params(build_model([_spec("peft_loha")]).model)


def _peft_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    net = nn.Sequential(nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 3))
    return get_peft_model(net, LoraConfig(r=2, target_modules=["0", "2"], init_lora_weights=False))


def test_lorarite_steps_a_peft_model():
    model = _peft_model()
    # LoRARite skips (zeroes) an update whose RMS exceeds update_skipping=1.0 by default
    opt = LoRARite(pair_params(model), lr=1e-2, update_skipping=0.0)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    for n, p in model.named_parameters():
        if p.requires_grad:
            assert torch.isfinite(p).all() and not torch.equal(p, before[n]), n


def test_lorarite_on_transposed_factors_equals_lorarite_on_the_standard_twin():
    """DeepSpeed-Chat stores A (in, r), B (r, out): the group's rank dims must make LoRARite see the same pair."""
    gen_t = build_model([_spec("deepspeed_chat", 6, 5, 2)], head=False, norm=False, frozen_extra=False)
    gen_s = build_model([_spec("kohya", 6, 5, 2)], head=False, norm=False, frozen_extra=False)
    lt, ls = gen_t.model.layers[0], gen_s.model.layers[0]
    torch.manual_seed(0)
    a, b = torch.randn(2, 6), torch.randn(5, 2)
    ga, gb = torch.randn(2, 6), torch.randn(5, 2)
    with torch.no_grad():
        lt.lora_right_weight.copy_(a.T)
        lt.lora_left_weight.copy_(b.T)
        ls.lora_down.weight.copy_(a)
        ls.lora_up.weight.copy_(b)
    lt.lora_right_weight.grad, lt.lora_left_weight.grad = ga.T.clone(), gb.T.clone()
    ls.lora_down.weight.grad, ls.lora_up.weight.grad = ga.clone(), gb.clone()
    for _ in range(2):
        LoRARite(pair_params(gen_t.model), lr=1e-2).step()
        LoRARite(pair_params(gen_s.model), lr=1e-2).step()
    torch.testing.assert_close(lt.lora_right_weight.detach().T, ls.lora_down.weight.detach())
    torch.testing.assert_close(lt.lora_left_weight.detach().T, ls.lora_up.weight.detach())
    assert not torch.equal(ls.lora_down.weight.detach(), a)


def test_lora_pro_finds_peft_pairs_itself_but_not_other_layouts():
    lora_pro = pytest.importorskip("lora_pro")
    model = _peft_model()
    opt = lora_pro.LoRAProAdamW(model, lr=1e-2)
    assert len(opt._pairs) == 2
    model(torch.randn(4, 8)).square().mean().backward()
    opt.step()
    gen = build_model([_spec("torchtune")], head=False, norm=False, frozen_extra=False)
    with pytest.raises(RuntimeError, match="no \\(lora_A, lora_B\\) pairs"):
        lora_pro.LoRAProAdamW(gen.model, lr=1e-2)
    assert len(loraplus.pairs(gen.model)) == 1  # what pair_params / precondition see there
