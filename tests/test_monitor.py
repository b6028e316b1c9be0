"""loraplus.Monitor: pairing per convention, exact update terms, exports, hooks, numerics, evidence."""

from __future__ import annotations

import csv
import gc
import json
import math
import sys
import threading
import warnings
import weakref

import loralib
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn.utils import parametrize
from torchtune.modules.peft import DoRALinear, LoRALinear

import loraplus
from loraplus import LoraPlusError, Monitor, Role
from loraplus.testing import CONVENTION_NAMES, build_model, lora_models, tiny_lora_model

# --------------------------------------------------------------------------- helpers


def _delta_w(a: torch.Tensor, b: torch.Tensor, how: str) -> torch.Tensor:
    """ΔW as the (out, in) matrix the layer applies, written out per library forward."""
    if how == "transposed":  # DeepSpeed-Chat: y = x @ right @ left;  minLoRA embedding: W(V, D) = A @ B
        return (a @ b).t()
    return b.flatten(1) @ a.flatten(1)  # PEFT/loralib/torchtune/kohya/diffusers/NeMo: y = x @ A.T @ B.T


def _fro(t: torch.Tensor) -> float:
    return float(t.double().norm())


def _reference(a0, b0, a1, b1, how, s=1.0):
    """Every weight metric from explicit (out, in) products; s is the layer's LoRA scaling, known to the test."""
    da, db = a1 - a0, b1 - b0
    return {
        "norm_A": _fro(a0),
        "norm_B": _fro(b0),
        "delta_A": _fro(da),
        "delta_B": _fro(db),
        "B_dA": _fro(s * _delta_w(da, b0, how)),
        "dB_A": _fro(s * _delta_w(a0, db, how)),
        "dB_dA": _fro(s * _delta_w(da, db, how)),
        "delta_BA": _fro(s * _delta_w(a1, b1, how) - s * _delta_w(a0, b0, how)),
    }


def _close(got: float, want: float, rel: float = 1e-4) -> bool:
    return math.isclose(got, want, rel_tol=rel, abs_tol=1e-5 * max(1.0, abs(want)))


def _random_step(model: nn.Module, opt: torch.optim.Optimizer, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.randn(p.shape, generator=g)
    opt.step()
    opt.zero_grad()


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _check_records(mon: Monitor, before, after, how_of=None, step: int = 0, scale: float | None = None) -> None:
    """Compare each record with explicit products; ``scale`` is the s the test built the layers with
    (None: a layout that records no scaling, so the record must say ``scale: None`` and use s = 1)."""
    recs = {(r["layer"], r["adapter"]): r for r in mon.records if r["step"] == step}
    assert len(recs) == len(mon.pairs)
    s = 1.0 if scale is None else scale
    for pair in mon.pairs:
        how = pair.orientation if how_of is None else how_of(pair)
        want = _reference(before[pair.a_name], before[pair.b_name], after[pair.a_name], after[pair.b_name], how, s)
        rec = recs[(pair.layer, pair.adapter)]
        assert rec["scale"] == (None if scale is None else pytest.approx(scale)), (pair, rec["scale"])
        for k, v in want.items():
            assert _close(rec[k], v), (pair, k, rec[k], v)


# --------------------------------------------------------------------------- pairing per convention

_ORIENTATION = {"deepspeed_chat": "transposed"}
#: Generated conventions whose update is not one B·A product: reported, never monitored.
_NOT_A_PRODUCT = {"peft_adalora": "AdaLoRA", "peft_loha": "LoHa", "peft_lokr": "LoKr", "peft_vera": "VeRA"}


@pytest.mark.parametrize("conv", [c for c in CONVENTION_NAMES if c not in _NOT_A_PRODUCT])
@pytest.mark.parametrize("wrapper", ["none", "ddp"])
def test_each_convention_pairs_and_measures_exact_terms(conv, wrapper):
    adapters = ["default", "other"] if conv.startswith("peft") else ["default"]
    spec = [dict(conv=conv, d_in=5, d_out=7, r=3, adapters=adapters, lora_bias=False) for _ in range(2)]
    gen = build_model(spec, wrapper=wrapper, block_wrapper="checkpoint")
    model = gen.model
    opt = loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.1, rules=gen.rules)
    mon = Monitor(opt, model, rules=gen.rules)
    assert [(p.layer, p.adapter) for p in mon.pairs] == [
        (f"layers.{i}", a if conv.startswith("peft") else "") for i in range(2) for a in adapters
    ]
    assert mon.unpaired == {}
    assert {p.orientation for p in mon.pairs} == {_ORIENTATION.get(conv, "standard")}
    before = _snapshot(model)
    _random_step(model, opt)
    # the generator's hand-written layer is built with `scaling = 2.0`; the other generated layouts record none
    scale = 2.0 if conv == "handwritten" else None
    _check_records(
        mon, before, _snapshot(model), how_of=lambda p: _ORIENTATION.get(conv, "standard"), scale=scale
    )
    lr_b = 0.1 if conv.endswith("embedding") else 0.4  # embedding adapters run at lr_embedding (default lr)
    assert all(r["lr_A"] == 0.1 and r["lr_B"] == pytest.approx(lr_b) for r in mon.records)
    mon.close()


@pytest.mark.parametrize("conv", sorted(_NOT_A_PRODUCT))
def test_adalora_loha_lokr_vera_are_reported_not_guessed(conv):
    spec = [dict(conv=conv, d_in=5, d_out=7, r=3, adapters=["default"], lora_bias=False)]
    mixed = build_model(spec + [dict(spec[0], conv="peft")])
    opt = loraplus.LoraPlus(torch.optim.SGD, mixed.model, lr=0.1)
    mon = Monitor(opt, mixed.model)
    assert [p.layer for p in mon.pairs] == ["layers.1"]
    reason = f"{_NOT_A_PRODUCT[conv]} factors do not form one B·A product"
    assert mon.unpaired and set(mon.unpaired.values()) == {reason}
    _random_step(mixed.model, opt)
    assert "not monitored: layers.0." in mon.summary() and reason in mon.summary()
    alone = build_model(spec).model
    with pytest.raises(LoraPlusError, match=f"{_NOT_A_PRODUCT[conv]} factors do not form one B·A product"):
        Monitor(loraplus.LoraPlus(torch.optim.SGD, alone, lr=0.1), alone)


@settings(max_examples=25, deadline=None)
@given(lora_models())
def test_every_generated_factor_is_paired_or_reported(gen):
    model = gen.model
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    if all(c in _NOT_A_PRODUCT for c in gen.conventions):
        with pytest.raises(LoraPlusError, match="no A/B factor pair"):
            Monitor(opt, model, rules=gen.rules)
        return
    mon = Monitor(opt, model, rules=gen.rules)
    paired = {p.a_name for p in mon.pairs} | {p.b_name for p in mon.pairs}
    factors = {n for n, r in gen.expected.items() if r in (Role.A, Role.B, Role.EMBEDDING_A, Role.EMBEDDING_B)}
    assert paired | set(mon.unpaired) == factors and not paired & set(mon.unpaired)
    allowed = {"the adapted layer's own bias, not a factor"}
    allowed |= {f"{f} factors do not form one B·A product" for f in _NOT_A_PRODUCT.values()}
    assert set(mon.unpaired.values()) <= allowed
    assert len({p.key for p in mon.pairs}) == len(mon.pairs)
    _random_step(model, opt)
    for rec in mon.records:  # Δ(BA) = B·ΔA + ΔB·A + ΔB·ΔA: triangle inequality
        assert rec["delta_BA"] <= (rec["B_dA"] + rec["dB_A"] + rec["dB_dA"]) * (1 + 1e-4) + 1e-6
    mon.close()


class _MinLoraEmbeddingParam(nn.Module):
    """minLoRA's embedding layout: A (V, r), B (r, D), weight W (V, D) + A @ B."""

    def __init__(self, vocab: int, dim: int, r: int):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(vocab, r))
        self.lora_B = nn.Parameter(torch.randn(r, dim))

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return w + self.lora_A @ self.lora_B


def test_minlora_embedding_is_read_transposed_including_activation_terms():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(11, 6), nn.Linear(6, 2))
    for p in model.parameters():
        p.requires_grad_(False)
    parametrize.register_parametrization(model[0], "weight", _MinLoraEmbeddingParam(11, 6, 3))
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.5)
    mon = Monitor(opt, model, activations=True)
    (pair,) = mon.pairs
    assert (pair.layer, pair.orientation, pair.embedding) == ("0", "transposed", True)
    assert pair.convention == "minLoRA embedding"
    ids = torch.tensor([[1, 2, 3], [3, 4, 10]])
    before = _snapshot(model)
    model(ids).square().sum().backward()
    opt.step()
    after = _snapshot(model)
    _check_records(mon, before, after)
    a0, b0 = before[pair.a_name], before[pair.b_name]
    da, db = after[pair.a_name] - a0, after[pair.b_name] - b0
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    rec = mon.records[0]
    assert _close(rec["act_B_dA"], rms(da[ids.flatten()] @ b0))  # x·ΔA·B: rows of ΔA picked by the ids
    assert _close(rec["act_dB_A"], rms(a0[ids.flatten()] @ db))


# --------------------------------------------------------------------------- real libraries


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 6)
        self.proj = nn.Linear(6, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.embed(tokens)  # (b, t, 8)
        h = h + self.conv(h.unsqueeze(1)).mean(1)
        h = h + self.q(h) + self.proj(torch.relu(self.v(h)))
        return self.head(h).mean(1)


def _peft_model(**cfg):
    torch.manual_seed(0)
    cfg.setdefault("target_modules", ["embed", "conv", "q", "v"])
    cfg.setdefault("r", 2)
    cfg.setdefault("lora_alpha", 3 * cfg["r"])  # s = alpha / r = 3: every ΔW figure must carry it
    return get_peft_model(_Net(), LoraConfig(init_lora_weights="gaussian", **cfg))


def _peft_delta(model, layer: str, adapter: str = "default") -> torch.Tensor:
    mod = model.get_submodule(layer)
    d = mod.get_delta_weight(adapter).detach().clone()
    return d.t() if isinstance(mod.base_layer, nn.Embedding) else d  # PEFT returns (V, D) for embeddings


@pytest.mark.parametrize("dora", [False, True])
def test_real_peft_linear_embedding_conv_match_get_delta_weight(dora):
    model = _peft_model(use_dora=dora, target_modules=["embed", "conv", "q", "v"] if not dora else ["q", "v"])
    with torch.no_grad():  # PEFT zero-inits one factor; make both sides move the output from step 0
        for n, p in model.named_parameters():
            if "lora_B" in n or "lora_embedding_A" in n:
                p.normal_(0, 0.1)
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=8, lr=1e-2)
    mon = Monitor(opt, model, activations=True)
    s = 6 / 2  # lora_alpha / r of _peft_model
    layers = ["base_model.model.q", "base_model.model.v"]
    layers += [] if dora else ["base_model.model.embed", "base_model.model.conv"]
    assert sorted(p.layer for p in mon.pairs) == sorted(layers)
    assert all(p.adapter == "default" for p in mon.pairs)
    assert mon.unpaired == {}  # DoRA magnitudes are not factors
    assert all(("DoRA" in mon.notes.get(p.key, "")) == dora for p in mon.pairs)  # what ΔW means there is said
    before = {lay: _peft_delta(model, lay) for lay in layers}
    snap = _snapshot(model)
    tokens = torch.randint(0, 20, (4, 5))
    model(tokens).square().mean().backward()
    opt.step()
    _check_records(mon, snap, _snapshot(model), scale=s)
    for rec in mon.records:  # PEFT's own get_delta_weight (which applies its scaling) is the ground truth
        delta = _peft_delta(model, rec["layer"]) - before[rec["layer"]]
        assert _close(rec["delta_BA"], _fro(delta)), rec
        assert rec["lr_B"] == pytest.approx(rec["lr_A"] if rec["layer"].endswith("embed") else 8 * rec["lr_A"])
        if rec["layer"].endswith("conv"):
            assert math.isnan(rec["act_B_dA"])  # activation terms: Linear and Embedding adapters only
        else:
            assert rec["act_B_dA"] > 0 and rec["act_dB_A"] > 0


def test_real_peft_multihead_attention_gets_weight_space_terms_only():
    class Attn(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            return self.attn(x, x, x, need_weights=False)[0].sum()

    torch.manual_seed(0)
    model = get_peft_model(Attn(), LoraConfig(target_modules=["attn"], r=2, lora_alpha=8, init_lora_weights="gaussian"))
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    mon = Monitor(opt, model, activations=True)
    assert sorted(p.key for p in mon.pairs) == [
        "base_model.model.attn.base_layer.out_proj[default]",
        "base_model.model.attn[default]",
    ]
    snap = _snapshot(model)
    model(torch.randn(3, 4, 8)).backward()
    opt.step()
    _check_records(mon, snap, _snapshot(model), scale=8 / 2)
    assert all(math.isnan(r["act_dB_A"]) and r["dB_A"] > 0 for r in mon.records)
    assert "activation terms missing for 2 adapters" in mon.summary()


def test_real_peft_activation_terms_use_the_steps_inputs():
    model = _peft_model(target_modules=["q"], lora_dropout=0.0)
    opt = loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.05)
    q = model.base_model.model.q
    seen = []
    probe = q.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    mon = Monitor(opt, model, activations=True, every=2)
    snaps = []
    for step in range(3):
        snaps.append(_snapshot(model))
        seen.clear()
        model(torch.randint(0, 20, (3, 4))).square().mean().backward()
        opt.step()
        opt.zero_grad()
        if step == 2:
            x = seen[0].reshape(-1, 8)
    probe.remove()
    mon.close()
    assert [r["step"] for r in mon.records] == [0, 2]
    name_a = "base_model.model.q.lora_A.default.weight"
    name_b = "base_model.model.q.lora_B.default.weight"
    a0, b0 = snaps[2][name_a], snaps[2][name_b]
    after = _snapshot(model)
    da, db = after[name_a] - a0, after[name_b] - b0
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    s = 6 / 2  # lora_alpha / r of _peft_model
    rec = mon.records[-1]
    assert _close(rec["act_B_dA"], rms(s * x @ da.t() @ b0.t()))
    assert _close(rec["act_dB_A"], rms(s * x @ a0.t() @ db.t()))
    assert _close(rec["act_dB_dA"], rms(s * x @ da.t() @ db.t()))


@pytest.mark.parametrize("n2", [5, 7])  # equal row counts: one batched product; unequal: per adapter
def test_activation_terms_batched_and_per_adapter_agree_with_explicit_products(n2):
    model = tiny_lora_model(layers=2)
    with torch.no_grad():
        for layer in model.layers:
            layer.lora_B["default"].weight.normal_()
    opt = loraplus.LoraPlus(torch.optim.Adam, model, ratio=4, lr=1e-2)
    mon = Monitor(opt, model, activations=True)
    xs = [torch.randn(5, 8), torch.randn(n2, 8)]
    snap = _snapshot(model)
    sum(model.layers[i](xs[i]).square().sum() for i in range(2)).backward()
    opt.step()
    after = _snapshot(model)
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    for i, rec in enumerate(mon.records):
        a0, b0 = snap[f"layers.{i}.lora_A.default.weight"], snap[f"layers.{i}.lora_B.default.weight"]
        da = after[f"layers.{i}.lora_A.default.weight"] - a0
        db = after[f"layers.{i}.lora_B.default.weight"] - b0
        assert _close(rec["act_B_dA"], rms(xs[i] @ da.t() @ b0.t()))
        assert _close(rec["act_dB_A"], rms(xs[i] @ a0.t() @ db.t()))
        assert _close(rec["act_dB_dA"], rms(xs[i] @ da.t() @ db.t()))
    mon.close()


def test_real_loralib_linear_embedding_and_merged_linear():
    torch.manual_seed(0)
    model = nn.Module()
    model.emb = loralib.Embedding(12, 6, r=2, lora_alpha=6)  # s = lora_alpha / r = 3
    model.fc = loralib.Linear(6, 5, r=2, lora_alpha=6)
    model.qkv = loralib.MergedLinear(6, 9, r=2, lora_alpha=2, enable_lora=[True, False, True])
    loralib.mark_only_lora_as_trainable(model)
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    mon = Monitor(opt, model, activations=True)
    assert [(p.layer, p.embedding, p.convention) for p in mon.pairs] == [
        ("emb", True, "loralib/litgpt"),
        ("fc", False, "loralib/litgpt"),
    ]
    assert set(mon.unpaired) == {"qkv.lora_A", "qkv.lora_B"}
    assert "do not chain" in mon.unpaired["qkv.lora_A"]
    snap = _snapshot(model)
    ids = torch.randint(0, 12, (4, 3))
    h = model.emb(ids)
    (model.fc(h).sum() + model.qkv(h).sum()).backward()
    opt.step()
    _check_records(mon, snap, _snapshot(model), scale=3.0)
    emb, fc = mon.records
    assert emb["act_B_dA"] > 0 and emb["act_dB_A"] == 0  # loralib Embedding: A = 0 at init
    assert fc["act_dB_A"] > 0 and fc["act_B_dA"] == 0  # loralib Linear: B = 0 at init
    assert "qkv.lora_A" in mon.summary()


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear])
def test_real_torchtune_lora_and_dora(cls):
    torch.manual_seed(0)
    model = nn.Sequential(cls(8, 6, rank=2, alpha=5.0), nn.ReLU(), cls(6, 4, rank=2, alpha=5.0))  # s = 2.5
    for layer in (model[0], model[2]):
        layer.weight.requires_grad_(False)
        nn.init.normal_(layer.lora_b.weight)
        if cls is DoRALinear:
            layer.initialize_dora_magnitude()
    opt = loraplus.LoraPlus(torch.optim.Adam, model, ratio=4, lr=1e-2)
    mon = Monitor(opt, model, activations=True)
    layout = "torchtune DoRA" if cls is DoRALinear else "torchtune"
    assert [(p.layer, p.convention) for p in mon.pairs] == [("0", layout), ("2", layout)]
    snap = _snapshot(model)
    model(torch.randn(5, 8)).sum().backward()
    opt.step()
    _check_records(mon, snap, _snapshot(model), scale=2.5)
    assert all(r["act_B_dA"] > 0 and r["act_dB_A"] > 0 for r in mon.records)
    if cls is DoRALinear:  # what ΔW means there is said, per layer
        assert set(mon.notes) == {"0", "2"} and all("DoRA" in n for n in mon.notes.values())
        assert "DoRA: ΔW terms are those of the direction's low-rank update s·B·A" in mon.summary()
    else:
        assert mon.notes == {}


class _HandLoRA(nn.Module):
    """A hand-written LoRA layer with its own names, declaring its roles."""

    def __init__(self, d_in, d_out, r):
        super().__init__()
        self.base = nn.Parameter(torch.randn(d_out, d_in), requires_grad=False)
        self.squeeze = nn.Parameter(torch.randn(r, d_in) / d_in**0.5)
        self.expand = nn.Parameter(torch.randn(d_out, r))

    def loraplus_roles(self):
        return {"squeeze": Role.A, "expand": Role.B}

    def forward(self, x):
        return x @ self.base.t() + x @ self.squeeze.t() @ self.expand.t()


def test_hand_written_declared_roles_pair_within_their_module():
    torch.manual_seed(0)
    model = nn.Sequential(_HandLoRA(8, 8, 2), nn.Tanh(), _HandLoRA(8, 3, 2))
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    mon = Monitor(opt, model, activations=True)
    assert [(p.layer, p.convention, p.host) for p in mon.pairs] == [
        ("0", "declared roles", "0"),
        ("2", "declared roles", "2"),
    ]
    snap = _snapshot(model)
    x = torch.randn(6, 8)
    model(x).sum().backward()
    opt.step()
    _check_records(mon, snap, _snapshot(model))
    da = _snapshot(model)["0.squeeze"] - snap["0.squeeze"]
    want = float((x @ da.t() @ snap["0.expand"].t()).double().pow(2).mean().sqrt())
    assert _close(mon.records[0]["act_B_dA"], want)


def test_rules_labelled_factors_pair_in_a_shared_parent_and_ambiguity_is_reported():
    class Layer(nn.Module):
        def __init__(self):
            super().__init__()
            self.my_down = nn.Linear(4, 2, bias=False)
            self.my_up = nn.Linear(2, 4, bias=False)

    class Ambiguous(nn.Module):
        def __init__(self):
            super().__init__()
            self.in1 = nn.Parameter(torch.randn(2, 4))
            self.in2 = nn.Parameter(torch.randn(2, 4))
            self.out1 = nn.Parameter(torch.randn(4, 2))
            self.out2 = nn.Parameter(torch.randn(4, 2))

    model = nn.Module()
    model.layer = Layer()
    model.amb = Ambiguous()
    rules = {"*.my_down.weight": Role.A, "*.my_up.weight": Role.B, "amb.in*": Role.A, "amb.out*": Role.B}
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1, rules=rules)
    mon = Monitor(opt, model, rules=rules)
    assert [(p.layer, p.a_name, p.b_name) for p in mon.pairs] == [
        ("layer", "layer.my_down.weight", "layer.my_up.weight")
    ]
    assert set(mon.unpaired) == {"amb.in1", "amb.in2", "amb.out1", "amb.out2"}
    assert "no unique" in mon.unpaired["amb.in1"]


def test_non_product_families_and_factors_outside_the_optimizer_are_reported():
    model = get_peft_model(_Net(), LoraConfig(target_modules=["q", "v"], r=2))
    a_only = [p for n, p in model.named_parameters() if "lora_A" in n or n.endswith("q.lora_B.default.weight")]
    mon = Monitor(torch.optim.SGD(a_only, lr=0.1), model)
    assert [p.layer for p in mon.pairs] == ["base_model.model.q"]
    assert "is not in the optimizer" in mon.unpaired["base_model.model.v.lora_A.default.weight"]
    from peft import LoHaConfig

    loha = get_peft_model(_Net(), LoHaConfig(target_modules=["q", "v"], r=2))
    with pytest.raises(LoraPlusError, match="LoHa factors do not form one B·A product"):
        Monitor(torch.optim.SGD([p for p in loha.parameters() if p.requires_grad], lr=0.1), loha)


def test_optimizer_built_by_loraplus_is_enough_without_the_model():
    model = tiny_lora_model(layers=3)
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, lr=1e-3)
    with_model, without = Monitor(opt, model), Monitor(opt)
    assert with_model.pairs == [p for p in without.pairs]  # same pairs, same orientation
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    assert with_model.records == without.records
    with_model.close()
    without.close()


def test_accelerate_wrapped_optimizer_is_unwrapped():
    from accelerate import Accelerator

    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, lr=1e-3)
    acc = Accelerator(cpu=True)
    model, wrapped = acc.prepare(model, opt)
    assert wrapped is not opt and wrapped.optimizer is opt
    mon = Monitor(wrapped, model)
    assert mon.optimizer is opt
    acc.backward(model(torch.randn(4, 8)).sum())
    wrapped.step()
    assert [r["step"] for r in mon.records] == [0, 0]
    mon.close()


# --------------------------------------------------------------------------- hooks, numerics


def _train(seed: int, monitor: dict | None, steps: int = 6):
    torch.manual_seed(seed)
    model = _peft_model(target_modules=["embed", "q", "v"], lora_dropout=0.2)  # dropout draws from the RNG
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-2, weight_decay=0.1)
    mon = Monitor(opt, model, **monitor) if monitor is not None else None
    torch.manual_seed(seed + 1)
    losses = []
    for _ in range(steps):
        loss = model(torch.randint(0, 20, (4, 5))).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.detach())
    return model, opt, losses, mon, torch.get_rng_state()


@pytest.mark.parametrize("kwargs", [dict(every=1, activations=True, max_rows=3), dict(every=2)])
def test_monitored_run_equals_unmonitored_run_bit_for_bit(kwargs):
    ref_model, ref_opt, ref_losses, _, ref_rng = _train(0, None)
    model, opt, losses, mon, rng = _train(0, kwargs)
    assert torch.equal(ref_rng, rng)  # the monitor draws no random numbers
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    for (n, p), (n2, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert n == n2 and torch.equal(p, q), n
    s1, s2 = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg"], s2[k]["exp_avg"]) for k in s1)
    assert len(mon.records) == len(mon.pairs) * (6 // kwargs["every"])


def test_close_detaches_every_hook_and_context_manager_closes():
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    hosts = [model.layers[0], model.layers[1]]
    n_pre, n_post = len(opt._optimizer_step_pre_hooks), len(opt._optimizer_step_post_hooks)
    with Monitor(opt, model, every=3, activations=True) as mon:
        assert len(opt._optimizer_step_pre_hooks) == n_pre + 1 and len(opt._optimizer_step_post_hooks) == n_post + 1
        assert all(len(h._forward_pre_hooks) == 1 for h in hosts)  # armed for step 0
        for step in range(4):
            model(torch.randn(2, 8)).sum().backward()
            opt.step()
            armed = (step + 1) % 3 == 0  # hooks exist only before a sampled step
            assert all(len(h._forward_pre_hooks) == int(armed) for h in hosts), step
    assert mon.closed and "closed" in repr(mon)
    assert len(opt._optimizer_step_pre_hooks) == n_pre and len(opt._optimizer_step_post_hooks) == n_post
    assert all(len(h._forward_pre_hooks) == 0 for h in hosts)
    n = len(mon.records)
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    assert len(mon.records) == n == 2 * len(mon.pairs)
    mon.close()  # idempotent


def test_closure_and_gradient_accumulation_inputs_are_captured():
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    mon = Monitor(opt, model, activations=True, max_rows=5)

    def closure():
        opt.zero_grad()
        loss = model(torch.randn(3, 8)).square().mean()
        loss.backward()
        return loss

    opt.step(closure)  # the forward runs inside step(), after the pre-step hook
    for _ in range(2):  # two accumulation forwards: 4 + 4 rows, capped at max_rows
        model(torch.randn(4, 8)).sum().backward()
    with torch.no_grad():
        model(torch.randn(100, 8))  # not captured: no gradient flows from it
    opt.step()
    assert all(r["act_B_dA"] > 0 for r in mon.records if r["step"] == 1)
    assert all(r["act_dB_A"] > 0 for r in mon.records)  # B moved: dB·A·x > 0 on every step
    mon.close()


# --------------------------------------------------------------------------- outputs


@pytest.fixture(scope="module")
def trained():
    model = tiny_lora_model(layers=3)
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=2, gamma=0.5)
    mon = Monitor(opt, model, every=2, activations=True)
    torch.manual_seed(0)
    for _ in range(8):
        model(torch.randn(16, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        sched.step()
    mon.close()
    return mon


def test_history_dict_of_tensors_and_lrs(trained):
    h = trained.to_dict()
    assert h["step"].tolist() == [0, 2, 4, 6]
    assert h["layer"] == ["layers.0[default]", "layers.1[default]", "layers.2[default]"]
    for m in trained.metrics:
        assert h[m].shape == (4, 3) and h[m].dtype == torch.float64
    assert not torch.isnan(h["delta_BA"]).any()
    assert torch.equal(h["B_dA"][0], torch.zeros(3, dtype=torch.float64))  # PEFT init: B = 0 on step 0
    assert h["lr"]["A"].tolist() == [1e-2, 5e-3, 2.5e-3, 1.25e-3]  # lr in force at each sampled step
    assert torch.allclose(h["lr"]["B"], 16 * h["lr"]["A"])
    assert [r["lr_B"] for r in trained.records[::3]] == pytest.approx(h["lr"]["B"].tolist())


def test_csv_and_jsonl_exports_round_trip(trained, tmp_path):
    trained.to_csv(tmp_path / "s.csv")
    rows = list(csv.DictReader(open(tmp_path / "s.csv")))
    assert len(rows) == len(trained.records) == 12
    assert list(rows[0])[:4] == ["step", "layer", "adapter", "layer_group"]
    assert rows[0]["layer_group"] == "layers.*"
    assert float(rows[-1]["act_dB_A"]) == pytest.approx(trained.records[-1]["act_dB_A"])
    trained.to_jsonl(tmp_path / "s.jsonl")
    lines = [json.loads(line) for line in open(tmp_path / "s.jsonl")]
    assert lines == trained.records


def test_plot_writes_a_png(trained, tmp_path):
    fig = trained.plot(tmp_path / "m.png")
    assert (tmp_path / "m.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(fig.axes) == 4 and all(ax.get_yscale() == "log" for ax in fig.axes)
    trained.plot(tmp_path / "w.png", activations=False)


def test_tensorboard_writer_and_log_dir(trained, tmp_path):
    calls = []

    class Writer:
        def add_scalar(self, tag, value, step):
            calls.append((tag, value, step))

    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    mon = Monitor(opt, model, tensorboard=Writer())
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    tags = {t for t, _, _ in calls}
    assert {"loraplus/dB_A/layers.0[default]", "loraplus/median/delta_BA", "loraplus/lr/B"} <= tags
    mon.close()

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    mon = Monitor(opt, model, tensorboard=tmp_path / "tb")
    for _ in range(2):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    mon.close()
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    events = acc.Scalars("loraplus/lr/A")
    assert [e.step for e in events] == [0, 1] and events[0].value == pytest.approx(0.1)


def _explicit_run(steps: int = 8, every: int = 2):
    """A monitored run that also records, by its own hooks, every layer input and the factors around each step."""
    model = tiny_lora_model(layers=3)
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-2)
    mon = Monitor(opt, model, every=every, activations=True)
    inputs: dict[int, torch.Tensor] = {}
    probes = [
        layer.register_forward_pre_hook(lambda m, args, i=i: inputs.__setitem__(i, args[0].detach().clone()))
        for i, layer in enumerate(model.layers)
    ]
    torch.manual_seed(0)
    truth = []  # (step, layer, A-side, B-side) from explicit products
    for step in range(steps):
        before = _snapshot(model)
        model(torch.randn(16, 8)).square().mean().backward()
        opt.step()
        opt.zero_grad()
        after = _snapshot(model)
        for i in range(3):
            a, b = f"layers.{i}.lora_A.default.weight", f"layers.{i}.lora_B.default.weight"
            da, db = after[a] - before[a], after[b] - before[b]
            rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
            truth.append((step, i, rms(inputs[i] @ da.t() @ before[b].t()), rms(inputs[i] @ before[a].t() @ db.t())))
    for h in probes:
        h.remove()
    mon.close()
    return mon, truth


def test_summary_numbers_and_verdict_come_from_explicit_products():
    mon, truth = _explicit_run()
    sampled = [(a, b) for step, _, a, b in truth if step % 2 == 0 and a > 0 and b > 0]
    assert len(sampled) == 9  # step 0 has B = 0 (A-side 0) and is left out: an odd count, one middle value
    a_med = sorted(a for a, _ in sampled)[4]
    b_med = sorted(b for _, b in sampled)[4]
    ratio = sorted(a / b for a, b in sampled)[4]
    row = next(line for line in mon.summary().splitlines() if line.startswith("layers.*"))
    cells = row.split()
    assert [float(c) for c in cells[1:4]] == pytest.approx([a_med, b_med, ratio], rel=5e-3)  # printed to 3 digits
    off = max(ratio, 1 / ratio)
    assert off > 1.05  # so that the two bands below straddle it
    assert mon.summary(band=off * 1.02).splitlines()[3].endswith("balanced")
    side = "A-side dominates" if ratio > 1 else "B-side dominates"
    assert side in mon.summary(band=off / 1.02).splitlines()[3]


# --------------------------------------------------------------------------- errors


def test_errors_say_what_was_wrong(monkeypatch):
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    with pytest.raises(LoraPlusError, match="torch.optim.Optimizer"):
        Monitor(object(), model)
    for bad in (0, -1, 2.5, "10", True):
        with pytest.raises(LoraPlusError, match="every must be a positive int"):
            Monitor(opt, model, every=bad)
    with pytest.raises(LoraPlusError, match="max_rows"):
        Monitor(opt, model, max_rows=0)
    with pytest.raises(LoraPlusError, match="activations=True needs the model"):
        Monitor(opt, activations=True)
    with pytest.raises(LoraPlusError, match="no 'param_names'"):
        Monitor(torch.optim.SGD(model.parameters(), lr=0.1))
    plain = nn.Linear(3, 3)
    with pytest.raises(LoraPlusError, match="no A/B factor pair"):
        Monitor(torch.optim.SGD(plain.parameters(), lr=0.1), plain)
    with pytest.raises(LoraPlusError, match="tensorboard= must be"):
        Monitor(opt, model, tensorboard=42)
    mon = Monitor(opt, model)
    with pytest.raises(LoraPlusError, match="nothing to plot"):
        mon.plot()
    assert "no sampled steps" in mon.summary()
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    with pytest.raises(LoraPlusError, match="activations=True"):
        mon.plot(activations=True)
    with pytest.raises(LoraPlusError, match="band must be"):
        mon.summary(band=1)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    with pytest.raises(LoraPlusError, match="needs matplotlib"):
        mon.plot()
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(LoraPlusError, match="needs the tensorboard package"):
        Monitor(opt, model, tensorboard="runs/x")
    mon.close()


# --------------------------------------------------------------------------- evidence: the paper's width claim


class _Adapter(nn.Module):
    """f(h) = B·A·h with A ~ N(0, 1/n), B ~ N(0, 1) (the paper's toy, §3.2)."""

    def __init__(self, n: int, r: int, g: torch.Generator):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(r, n, generator=g) / n**0.5)
        self.lora_B = nn.Parameter(torch.randn(n, r, generator=g))

    def forward(self, h):
        return h @ self.lora_A.t() @ self.lora_B.t()


class _Toy(nn.Module):
    """f(x) = W_out·ReLU(B·A·ReLU(W_in·x)), d = 5, width n, rank 4; only A and B train."""

    def __init__(self, n: int, d: int = 5, r: int = 4, seed: int = 0):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w_in = nn.Parameter(torch.randn(n, d, generator=g), requires_grad=False)
        self.w_out = nn.Parameter(torch.randn(1, n, generator=g) / n**0.5, requires_grad=False)
        self.adapter = _Adapter(n, r, g)

    def forward(self, x):
        return torch.relu(self.adapter(torch.relu(x @ self.w_in.t()))) @ self.w_out.t()


def _balance(n: int, ratio: float, steps: int = 2) -> float:
    """Median over steps of RMS(B·ΔA·x) / RMS(ΔB·A·x) measured by the Monitor (Adam, full batch)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(256, 5, generator=g)
    y = torch.sin(x.mean(1, keepdim=True))
    model = _Toy(n)
    opt = loraplus.LoraPlus(torch.optim.Adam, model, ratio=ratio, lr=1e-3)
    with Monitor(opt, model, activations=True) as mon:
        for _ in range(steps):
            (model(x) - y).square().mean().backward()
            opt.step()
            opt.zero_grad()
    ratios = torch.tensor([r["act_B_dA"] / r["act_dB_A"] for r in mon.records])
    return float(ratios.median())


def test_width_sweep_shared_lr_drifts_but_ratio_proportional_to_width_stays_in_a_band():
    widths = [64, 128, 256, 512, 1024]
    shared = [_balance(n, ratio=1.0) for n in widths]
    scaled = [_balance(n, ratio=n / 64) for n in widths]
    # one shared lr: the A-side term grows ~linearly in width relative to the B-side term
    assert all(b > a for a, b in zip(shared, shared[1:]))
    assert shared[-1] / shared[0] > 8
    # λ ∝ width (LoRA+): the balance stays within a constant band
    assert max(scaled) / min(scaled) < 3


# --------------------------------------------------------------------------- finding 1: safe to leave attached


def _hook_counts(opt, model):
    return (
        len(opt._optimizer_step_pre_hooks),
        len(opt._optimizer_step_post_hooks),
        [len(layer._forward_pre_hooks) for layer in model.layers],
    )


def test_dropped_monitors_detach_themselves_after_gc():
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    baseline = _hook_counts(opt, model)
    refs = []
    for _epoch in range(3):  # one Monitor per epoch, never closed
        mon = Monitor(opt, model, every=1, activations=True)
        refs.append(weakref.ref(mon))
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
        opt.zero_grad()
    held = mon
    del mon
    gc.collect()
    assert [r() is None for r in refs] == [True, True, False]  # only the one still referenced lives
    assert _hook_counts(opt, model) == (baseline[0] + 1, baseline[1] + 1, [1, 1])  # its hooks only
    assert len(held.records) == len(held.pairs)  # the dropped ones stopped recording: no rows from other steps
    del held
    gc.collect()
    assert refs[-1]() is None
    assert _hook_counts(opt, model) == baseline


def test_close_is_idempotent_and_history_is_bounded_while_sinks_stream_everything(tmp_path):
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    full = Monitor(opt, model, keep=None)
    mon = Monitor(opt, model, keep=3, csv=tmp_path / "m.csv", jsonl=tmp_path / "m.jsonl")
    for _ in range(7):
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    mon.close()
    mon.close()
    full.close()
    assert mon.closed and "closed" in repr(mon)
    assert sorted({r["step"] for r in mon.records}) == [4, 5, 6]  # the last 3 sampled steps
    assert [row["step"] for row in mon.lrs] == [4, 5, 6]
    assert [json.loads(line) for line in open(tmp_path / "m.jsonl")] == full.records  # every step, streamed
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))
    assert [int(r["step"]) for r in rows] == [r["step"] for r in full.records]
    assert float(rows[-1]["delta_B"]) == pytest.approx(full.records[-1]["delta_B"])
    with pytest.raises(LoraPlusError, match="keep must be a positive int"):
        Monitor(opt, model, keep=0)


# --------------------------------------------------------------------------- finding 2: never break training


class _DiskFull:
    """A TensorBoard writer whose disk fills up after a few scalars."""

    def __init__(self, ok_calls: int = 5):
        self.calls = 0
        self.ok_calls = ok_calls

    def add_scalar(self, tag, value, step):
        self.calls += 1
        if self.calls > self.ok_calls:
            raise OSError(28, "No space left on device")

    def flush(self):
        raise OSError(28, "No space left on device")


def _boom(*args, **kwargs):
    raise RuntimeError("boom")


@pytest.mark.parametrize("where", ["sink", "measure", "capture", "snapshot"])
def test_a_failure_while_monitoring_warns_once_detaches_and_leaves_training_bit_identical(where, monkeypatch):
    ref_model, ref_opt, ref_losses, _, _ = _train(0, None)
    kwargs = dict(every=1, activations=True)
    if where == "sink":
        kwargs["tensorboard"] = _DiskFull()
    else:
        target = {"measure": "weight_terms", "capture": "take_rows", "snapshot": "stack_factors"}[where]
        monkeypatch.setattr(f"loraplus._monitor._recorder.{target}", _boom)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, opt, losses, mon, _ = _train(0, kwargs)
        mon.close()  # closing again (the writer's flush fails too) adds no second warning
    ours = [w for w in caught if "loraplus.Monitor" in str(w.message)]
    assert len(ours) == 1, [str(w.message) for w in ours]
    assert issubclass(ours[0].category, RuntimeWarning)
    cause = "OSError: [Errno 28] No space left on device" if where == "sink" else "RuntimeError: boom"
    assert cause in str(ours[0].message) and "training is not affected" in str(ours[0].message)
    assert mon.closed
    # the Monitor's hooks are gone; what is left is the ratio guard's, which LoraPlus attached
    from loraplus._groups._guard import _hook as guard_hook

    assert list(opt._optimizer_step_pre_hooks.values()) == [guard_hook] and loraplus.groups.guard(opt) is not None
    assert len(opt._optimizer_step_post_hooks) == 0
    assert all(torch.equal(a, b) for a, b in zip(ref_losses, losses))
    for (n, p), (_, q) in zip(ref_model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    s1, s2 = ref_opt.state_dict()["state"], opt.state_dict()["state"]
    assert all(torch.equal(s1[k]["exp_avg_sq"], s2[k]["exp_avg_sq"]) for k in s1)


def test_capture_from_concurrent_replica_threads_keeps_exactly_max_rows():
    """nn.DataParallel runs the forward pre-hooks of its replicas in threads: the row budget must hold."""
    model = tiny_lora_model(layers=1)
    with torch.no_grad():
        model.layers[0].lora_B["default"].weight.normal_()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    mon = Monitor(opt, model, activations=True, max_rows=10)
    x = torch.randn(4, 8)
    barrier = threading.Barrier(8)
    losses = []

    def replica():
        barrier.wait()
        losses.append(model.layers[0](x).square().sum())

    threads = [threading.Thread(target=replica) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    sum(losses).backward()
    snap = _snapshot(model)
    opt.step()
    after = _snapshot(model)
    # whatever the thread order: 4 rows, 4 rows, then the 2-row budget left takes x[::2]
    rows = torch.cat([x, x, x[::2]])
    a0, b0 = snap["layers.0.lora_A.default.weight"], snap["layers.0.lora_B.default.weight"]
    da, db = after["layers.0.lora_A.default.weight"] - a0, after["layers.0.lora_B.default.weight"] - b0
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    (rec,) = mon.records
    assert _close(rec["act_B_dA"], rms(rows @ da.t() @ b0.t()))
    assert _close(rec["act_dB_A"], rms(rows @ a0.t() @ db.t()))
    mon.close()


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_layer_inputs_on_another_device_are_moved_to_the_factors():
    model = tiny_lora_model(layers=1)
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    mon = Monitor(opt, model, activations=True)
    x = torch.randn(4, 8)
    hook = next(iter(model.layers[0]._forward_pre_hooks.values()))
    hook(model.layers[0], (x.cuda(),), {})  # as a replica on cuda:0 would
    model.layers[0](x).sum().backward()
    opt.step()
    assert all(r["act_dB_A"] > 0 for r in mon.records) and not mon.notes
    mon.close()


# --------------------------------------------------------------------------- finding 3: units


@pytest.mark.parametrize("rslora", [False, True])
def test_peft_scaling_alpha_over_r_and_rslora_alpha_over_sqrt_r(rslora):
    torch.manual_seed(0)
    r, alpha = 4, 6
    model = get_peft_model(
        _Net(), LoraConfig(r=r, lora_alpha=alpha, use_rslora=rslora, target_modules=["q"], init_lora_weights="gaussian")
    )
    with torch.no_grad():
        model.base_model.model.q.lora_B["default"].weight.normal_(0, 0.1)
    s = alpha / math.sqrt(r) if rslora else alpha / r  # 3.0 or 1.5, from the config
    opt = loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.1)
    mon = Monitor(opt, model, activations=True)
    q = model.base_model.model.q
    x = torch.randn(6, 8)
    before_out = q(x).detach()
    snap = _snapshot(model)
    q(x).square().sum().backward()
    opt.step()
    _check_records(mon, snap, _snapshot(model), scale=s)
    after = _snapshot(model)
    a0, b0 = snap["base_model.model.q.lora_A.default.weight"], snap["base_model.model.q.lora_B.default.weight"]
    a1, b1 = after["base_model.model.q.lora_A.default.weight"], after["base_model.model.q.lora_B.default.weight"]
    # the layer's own forward confirms the test's s: its output changed by s·(B'A' − BA)·x
    assert torch.allclose(q(x).detach() - before_out, s * x @ (b1 @ a1 - b0 @ a0).t(), atol=1e-5)
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    (rec,) = mon.records
    assert _close(rec["act_B_dA"], rms(s * x @ (a1 - a0).t() @ b0.t()))
    assert _close(rec["act_dB_A"], rms(s * x @ a0.t() @ (b1 - b0).t()))
    assert _close(rec["act_dB_dA"], rms(s * x @ (a1 - a0).t() @ (b1 - b0).t()))
    mon.close()


def test_unknown_scaling_is_null_in_records_and_named_in_the_summary(tmp_path):
    model = tiny_lora_model(layers=2)  # PEFT names, but no `scaling` table on the layers
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    mon = Monitor(opt, model, jsonl=tmp_path / "m.jsonl")
    model(torch.randn(2, 8)).sum().backward()
    opt.step()
    mon.close()
    assert [r["scale"] for r in mon.records] == [None, None]
    assert [json.loads(line)["scale"] for line in open(tmp_path / "m.jsonl")] == [None, None]
    assert "scale unknown (ΔW terms are B·A, s = 1) for 2 adapters" in mon.summary()
    assert "layers.0[default], layers.1[default]" in mon.summary()


# --------------------------------------------------------------------------- finding 4: resume


class _Scalars:
    def __init__(self):
        self.steps = []

    def add_scalar(self, tag, value, step):
        if tag == "loraplus/lr/A":
            self.steps.append(step)


def test_a_resumed_monitor_continues_the_step_count_history_and_files(tmp_path):
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
    tb = _Scalars()
    mon = Monitor(opt, model, every=3, activations=True, csv=tmp_path / "m.csv", tensorboard=tb)
    for _ in range(3):  # steps 0, 1, 2
        model(torch.randn(2, 8)).sum().backward()
        opt.step()
    torch.save({"monitor": mon.state_dict(), "model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ck")
    mon.close()
    first_records = mon.records

    ck = torch.load(tmp_path / "ck")  # a new process: fresh model, optimizer and Monitor
    model2 = tiny_lora_model()
    model2.load_state_dict(ck["model"])
    opt2 = loraplus.LoraPlus(torch.optim.SGD, model2, lr=0.1)
    opt2.load_state_dict(ck["opt"])
    mon2 = Monitor(opt2, model2, every=3, activations=True, csv=tmp_path / "m.csv", tensorboard=tb)
    mon2.load_state_dict(ck["monitor"])
    assert mon2.step == 3
    for _ in range(4):  # steps 3..6
        model2(torch.randn(2, 8)).sum().backward()
        opt2.step()
    mon2.close()
    assert mon2.step == 7
    assert sorted({r["step"] for r in mon2.records}) == [0, 3, 6]
    assert mon2.records[: len(first_records)] == first_records
    assert all(r["act_dB_A"] > 0 for r in mon2.records if r["step"] == 3)  # capture armed for the resumed step
    assert tb.steps == [0, 3, 6]  # no TensorBoard step collides
    rows = list(csv.DictReader(open(tmp_path / "m.csv")))  # one header, appended
    assert [int(r["step"]) for r in rows] == [0, 0, 3, 3, 6, 6]
    other = Monitor(loraplus.LoraPlus(torch.optim.SGD, tiny_lora_model(layers=3), lr=0.1))
    with pytest.raises(LoraPlusError, match="monitored other adapters"):
        other.load_state_dict(ck["monitor"])
    with pytest.raises(LoraPlusError, match="same activations= setting"):
        Monitor(opt2, model2).load_state_dict(ck["monitor"])


# --------------------------------------------------------------------------- the pure pieces, alone


@settings(max_examples=30, deadline=None)
@given(
    k=st.integers(1, 3),
    r=st.integers(1, 4),
    n_in=st.integers(1, 6),
    n_out=st.integers(1, 6),
    rows=st.integers(1, 5),
    scale=st.sampled_from([None, 0.5, 3.0, -2.0]),
    seed=st.integers(0, 2**16),
)
def test_measure_functions_equal_explicit_products(k, r, n_in, n_out, rows, scale, seed):
    from loraplus._monitor._measure import StepFactors, activation_terms, weight_terms

    g = torch.Generator().manual_seed(seed)
    a0, a1 = torch.randn(k, r, n_in, generator=g), torch.randn(k, r, n_in, generator=g)
    b0, b1 = torch.randn(k, n_out, r, generator=g), torch.randn(k, n_out, r, generator=g)
    s = torch.full((k,), scale) if scale is not None else None
    got, factors = weight_terms(a0, b0, a1, b1, s)
    x = torch.randn(k, rows, n_in, generator=g)
    acts = activation_terms(x, factors, n_out, s)
    m = 1.0 if scale is None else abs(scale)
    rms = lambda t: float(t.double().pow(2).mean().sqrt())  # noqa: E731
    for j in range(k):
        want = _reference(a0[j], b0[j], a1[j], b1[j], "standard", m)
        assert all(_close(got[j, i].item(), v) for i, v in enumerate(want.values())), (j, got[j], want)
        da, db = a1[j] - a0[j], b1[j] - b0[j]
        xj = x[j]
        explicit = [rms(m * xj @ da.t() @ b0[j].t()), rms(m * xj @ a0[j].t() @ db.t()), rms(m * xj @ da.t() @ db.t())]
        assert all(_close(acts[j, i].item(), v) for i, v in enumerate(explicit)), (acts[j], explicit)
    ids = torch.randint(0, n_in, (1, rows), generator=g)  # an embedding: token ids pick columns of A
    one = StepFactors(factors.a0[:1], factors.da[:1], factors.gb[:1], factors.gdb[:1])
    emb = activation_terms(ids, one, n_out, None if s is None else s[:1], embedding=True)
    onehot = torch.nn.functional.one_hot(ids[0], n_in).float()
    want_emb = rms(m * onehot @ (a1[0] - a0[0]).t() @ b0[0].t())
    assert _close(emb[0, 0].item(), want_emb)
