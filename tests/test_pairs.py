"""loraplus.pairs: which A goes with which B, their orientation and the layer's scaling, per layout.

Every expectation is written here from how the test built the model (names, shapes, alpha and
rank), never read back from the code under test.
"""

from __future__ import annotations

import math

import loralib
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn.utils import parametrize

import loraplus
from loraplus import pairs
from loraplus.testing import CONVENTION_NAMES, build_model

#: (A suffix, B suffix, orientation, kind) of each convention's layer in testing.build_model
#: ({a}: the adapter name); None: not a B·A product (listed in .unpaired).
LAYOUT: dict[str, tuple[str, str, str, str] | None] = {
    "peft": ("lora_A.{a}.weight", "lora_B.{a}.weight", "standard", "linear"),
    "peft_dora": ("lora_A.{a}.weight", "lora_B.{a}.weight", "standard", "linear"),
    "peft_embedding": ("lora_embedding_A.{a}", "lora_embedding_B.{a}", "standard", "embedding"),
    "peft_adalora": None,
    "peft_loha": None,
    "peft_lokr": None,
    "peft_vera": None,
    "loralib": ("lora_A", "lora_B", "standard", "linear"),
    "loralib_embedding": ("lora_A", "lora_B", "standard", "embedding"),
    "torchtune": ("lora_a.weight", "lora_b.weight", "standard", "linear"),
    "torchtune_dora": ("lora_a.weight", "lora_b.weight", "standard", "linear"),
    "diffusers": ("down.weight", "up.weight", "standard", "linear"),
    "kohya": ("lora_down.weight", "lora_up.weight", "standard", "linear"),
    "nemo": ("linear_in.weight", "linear_out.weight", "standard", "linear"),
    "deepspeed_chat": ("lora_right_weight", "lora_left_weight", "transposed", "linear"),
    "minlora": ("parametrizations.weight.0.lora_A", "parametrizations.weight.0.lora_B", "standard", "linear"),
    "declared": ("squeeze", "expand", "standard", "linear"),
    "handwritten": ("lora_A.weight", "lora_B.weight", "standard", "linear"),
    "raw_named": ("w_in", "w_out", "standard", "linear"),  # found through the rules= the generator gives
}
NON_PRODUCT = {"peft_adalora": "AdaLoRA", "peft_loha": "LoHa", "peft_lokr": "LoKr", "peft_vera": "VeRA"}


def test_the_table_covers_every_convention():
    assert set(LAYOUT) == set(CONVENTION_NAMES)


@pytest.mark.parametrize("wrapper,prefix", [("none", ""), ("ddp", "module."), ("compile", "_orig_mod.")])
@pytest.mark.parametrize("conv", CONVENTION_NAMES)
def test_every_convention_pairs_in_model_order(conv, wrapper, prefix):
    adapters = ["default", "task_x"] if conv.startswith("peft") else ["default"]
    specs = [{"conv": conv, "d_in": 5, "d_out": 7, "r": r, "adapters": adapters, "lora_bias": False} for r in (2, 3)]
    gen = build_model(specs, wrapper=wrapper, tie_head=True)
    found = pairs(gen.model, gen.rules)
    layout = LAYOUT[conv]
    if layout is None:
        assert len(found) == 0
        factors = [n for n, role in gen.expected.items() if role in (loraplus.Role.A, loraplus.Role.B)]
        assert factors and {u.name for u in found.unpaired} == set(factors)
        assert all(NON_PRODUCT[conv] in u.reason and not u.missing_partner for u in found.unpaired)
        return
    a_fmt, b_fmt, orientation, kind = layout
    one_adapter = conv not in ("peft", "peft_dora", "peft_embedding")
    expected = [
        (f"layers.{i}", "" if one_adapter else a, f"{prefix}layers.{i}.{a_fmt.format(a=a)}",
         f"{prefix}layers.{i}.{b_fmt.format(a=a)}", orientation, kind, r)
        for i, r in enumerate((2, 3))
        for a in (adapters if not one_adapter else ["default"])
    ]
    got = [(p.layer, p.adapter, p.a_name, p.b_name, p.orientation, p.kind, p.rank) for p in found]
    assert got == expected
    assert found.unpaired == ()
    params = dict(gen.model.named_parameters())
    for p, (_, _, a_name, b_name, _, _, r) in zip(found, expected):
        assert p.a is params[a_name] and p.b is params[b_name]
        d_in = 5 + 3 if kind == "embedding" else 5  # testing.py gives embeddings a vocabulary of d_in + 3
        assert p.a_matrix().shape == (r, d_in) and p.b_matrix().shape == (7, r)
        g = torch.randn_like(p.a)
        want = g.T if orientation == "transposed" else g
        assert torch.equal(p.a_matrix(g), want)


# ----------------------------------------------------------------------------------------------- real PEFT
class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.q = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.head = nn.Linear(8, 3)


@pytest.mark.parametrize("rslora", [False, True])
def test_real_peft_linear_conv_embedding_mha_with_scaling(rslora):
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=4, lora_alpha=12, use_rslora=rslora,
                                             target_modules=["embed", "conv", "q", "attn"]))
    s = 12 / math.sqrt(4) if rslora else 12 / 4
    found = pairs(model)
    pre = "base_model.model."
    by_layer = {p.layer[len(pre):]: p for p in found}  # PEFT's own prefix is part of the layer name
    # PEFT wraps MultiheadAttention's out_proj in a LoRA Linear of its own, inside base_layer (registered
    # before the attention's own adapter, so it comes first in model order)
    assert list(by_layer) == ["embed", "conv", "q", "attn.base_layer.out_proj", "attn"]
    emb, conv, q, attn = by_layer["embed"], by_layer["conv"], by_layer["q"], by_layer["attn"]
    out_proj = by_layer["attn.base_layer.out_proj"]
    assert out_proj.a.shape == (4, 8) and out_proj.b.shape == (8, 4)
    assert (emb.a_name, emb.b_name, emb.kind) == (f"{pre}embed.lora_embedding_A.default",
                                                  f"{pre}embed.lora_embedding_B.default", "embedding")
    assert (conv.a_name, conv.kind, conv.a.shape, conv.b.shape) == (
        f"{pre}conv.lora_A.default.weight", "conv", (4, 1, 3, 3), (4, 4, 1, 1))
    assert conv.a_matrix().shape == (4, 9) and conv.b_matrix().shape == (4, 4)
    assert (q.a_name, q.b_name, q.kind, q.orientation) == (
        f"{pre}q.lora_A.default.weight", f"{pre}q.lora_B.default.weight", "linear", "standard")
    assert attn.a.shape == (4, 8) and attn.b.shape == (3 * 8, 4)  # PEFT adapts MHA's packed in_proj
    for p in found:
        assert p.adapter == "default" and p.rank == 4
        assert p.scaling == pytest.approx(s), p.key


def test_real_peft_two_adapters_keep_their_own_scaling():
    torch.manual_seed(0)
    model = get_peft_model(nn.Sequential(nn.Linear(6, 6)), LoraConfig(r=2, lora_alpha=4, target_modules=["0"]))
    model.add_adapter("other", LoraConfig(r=3, lora_alpha=9, target_modules=["0"]))
    for n, p in model.named_parameters():
        if "lora_" in n:
            p.requires_grad_(True)
    got = {(p.adapter, p.rank, p.scaling) for p in pairs(model)}
    assert got == {("default", 2, 2.0), ("other", 3, 3.0)}


# ----------------------------------------------------------------------------------------------- loralib, torchtune
def test_loralib_linear_embedding_and_merged_linear():
    torch.manual_seed(0)
    model = nn.Module()
    model.lin = loralib.Linear(6, 5, r=2, lora_alpha=8)
    model.emb = loralib.Embedding(10, 4, r=3, lora_alpha=6)
    model.qkv = loralib.MergedLinear(6, 9, r=2, lora_alpha=4, enable_lora=[True, False, True])
    loralib.mark_only_lora_as_trainable(model)
    found = pairs(model)
    assert [(p.layer, p.a_name, p.b_name, p.kind, p.scaling) for p in found] == [
        ("lin", "lin.lora_A", "lin.lora_B", "linear", 8 / 2),
        ("emb", "emb.lora_A", "emb.lora_B", "embedding", 6 / 3),
    ]
    assert {u.name for u in found.unpaired} == {"qkv.lora_A", "qkv.lora_B"}
    assert all("merged" in u.reason for u in found.unpaired)


@pytest.mark.parametrize("cls_name", ["LoRALinear", "DoRALinear"])
def test_torchtune_lora_and_dora_linear(cls_name):
    from torchtune.modules import peft as tt

    torch.manual_seed(0)
    model = nn.Module()
    model.proj = getattr(tt, cls_name)(in_dim=6, out_dim=5, rank=2, alpha=16)
    for n, p in model.named_parameters():
        p.requires_grad_("lora_" in n or "magnitude" in n)
    (p,) = pairs(model)
    assert (p.layer, p.adapter, p.a_name, p.b_name, p.convention) == (
        "proj", "", "proj.lora_a.weight", "proj.lora_b.weight", {"LoRALinear": "torchtune", "DoRALinear": "torchtune DoRA"}[cls_name])
    assert p.scaling == 16 / 2 and p.rank == 2


# ----------------------------------------------------------------------------------------------- scaling per layout
class KohyaLoRAModule(nn.Module):
    def __init__(self, d_in, d_out, dim, alpha):
        super().__init__()
        self.lora_dim = dim
        self.lora_down = nn.Linear(d_in, dim, bias=False)
        self.lora_up = nn.Linear(dim, d_out, bias=False)
        self.register_buffer("alpha", torch.tensor(float(alpha)))
        self.scale = alpha / dim


class DiffusersLoRALinearLayer(nn.Module):
    def __init__(self, d_in, d_out, rank, network_alpha):
        super().__init__()
        self.down = nn.Linear(d_in, rank, bias=False)
        self.up = nn.Linear(rank, d_out, bias=False)
        self.rank, self.network_alpha = rank, network_alpha


class NemoAdapter(nn.Module):
    def __init__(self, d_in, d_out, dim, alpha):
        super().__init__()
        self.linear_in = nn.Linear(d_in, dim, bias=False)
        self.linear_out = nn.Linear(dim, d_out, bias=False)
        self.dim, self.alpha = dim, alpha


class DeepSpeedChatLoRA(nn.Module):
    def __init__(self, d_in, d_out, lora_dim, lora_scaling):
        super().__init__()
        self.lora_right_weight = nn.Parameter(torch.randn(d_in, lora_dim))
        self.lora_left_weight = nn.Parameter(torch.zeros(lora_dim, d_out))
        self.lora_scaling = lora_scaling / lora_dim  # as DeepSpeed-Chat's LinearLayer_LoRA stores it


class MinLoRAParametrization(nn.Module):
    def __init__(self, d_in, d_out, rank, alpha):
        super().__init__()
        self.lora_A = nn.Parameter(torch.randn(rank, d_in))
        self.lora_B = nn.Parameter(torch.zeros(d_out, rank))
        self.scale = alpha / rank

    def forward(self, w):
        return w + self.scale * self.lora_B @ self.lora_A


def test_scaling_is_read_per_layout():
    model = nn.Module()
    model.kohya = KohyaLoRAModule(6, 5, dim=4, alpha=2)
    model.diffusers = DiffusersLoRALinearLayer(6, 5, rank=4, network_alpha=8)
    model.diffusers_no_alpha = DiffusersLoRALinearLayer(6, 5, rank=4, network_alpha=None)
    model.nemo = NemoAdapter(6, 5, dim=4, alpha=32)
    model.dschat = DeepSpeedChatLoRA(6, 5, lora_dim=4, lora_scaling=1)
    model.minlora = nn.Linear(6, 5)
    model.minlora.requires_grad_(False)
    parametrize.register_parametrization(model.minlora, "weight", MinLoRAParametrization(6, 5, rank=4, alpha=4))
    model.minlora.parametrizations.weight.original.requires_grad_(False)
    got = {p.layer: (p.convention, p.orientation, p.scaling) for p in pairs(model)}
    assert got == {
        "kohya": ("kohya/mmpretrain", "standard", 2 / 4),
        "diffusers": ("diffusers", "standard", 8 / 4),
        "diffusers_no_alpha": ("diffusers", "standard", 1.0),
        "nemo": ("NeMo", "standard", 32 / 4),
        "dschat": ("DeepSpeed-Chat", "transposed", 1 / 4),
        "minlora": ("minLoRA", "standard", 4 / 4),
    }


def test_unknown_scaling_is_none_and_bad_input_is_refused():
    gen = build_model([{"conv": "declared", "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"],
                        "lora_bias": False}])
    assert [p.scaling for p in pairs(gen.model)] == [None]
    with pytest.raises(loraplus.LoraPlusError, match="nn.Module"):
        pairs("not a model")  # type: ignore[arg-type]


def test_a_factor_without_partner_is_listed_with_the_reason():
    model = nn.Module()
    model.layer = nn.Module()
    model.layer.lora_A = nn.Parameter(torch.randn(2, 4))
    model.layer.lora_B = nn.Parameter(torch.zeros(4, 2), requires_grad=False)  # frozen by mistake
    found = pairs(model)
    assert len(found) == 0
    ((u,),) = [found.unpaired]
    assert u.name == "layer.lora_A" and u.missing_partner
