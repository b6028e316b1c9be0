"""Roles and groups on models built with the real LoRA libraries (PEFT, loralib, torchtune, …)."""

from __future__ import annotations

import loralib
import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.nn.utils import parametrize

import loraplus
from loraplus import LoraPlus, Role, classify, param_groups
from loraplus.testing import assert_loraplus_groups

# The test's own reading of the names these libraries give (REFERENCE.md section 2), written apart
# from loraplus's labeller: (segment, role).
_SEGMENT_ROLES = [
    ("lora_embedding_A", Role.EMBEDDING_A),
    ("lora_embedding_B", Role.EMBEDDING_B),
    ("lora_magnitude_vector", Role.MAGNITUDE),
    ("lora_A", Role.A),
    ("lora_B", Role.B),
    ("lora_a", Role.A),
    ("lora_b", Role.B),
    ("magnitude", Role.MAGNITUDE),
]


def truth(model: nn.Module, norms: tuple[str, ...] = ("norm",)) -> dict:
    """Expected roles and no-decay names of a model built in these tests, from its names."""
    roles, no_decay = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        segs = name.split(".")
        role = next((r for seg, r in _SEGMENT_ROLES if seg in segs), Role.OTHER)
        roles[name] = role
        if role is Role.MAGNITUDE or segs[-1] == "bias" or any(n in segs for n in norms):
            no_decay.add(name)
    return {"expected_roles": roles, "no_decay": no_decay}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(20, 8)
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.q = nn.Linear(8, 8)
        self.v = nn.Linear(8, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.norm = nn.LayerNorm(8)
        self.head = nn.Linear(8, 3)

    def forward(self, tokens):
        h = self.embed(tokens)  # (b, t, 8)
        c = self.conv(h.unsqueeze(1)).mean(1)
        h = h + c + self.q(h) + self.v(h)
        h = h + self.attn(h, h, h, need_weights=False)[0]
        return self.head(self.norm(h)).mean(1)


def _peft(**cfg) -> nn.Module:
    torch.manual_seed(0)
    return get_peft_model(Net(), LoraConfig(**cfg))


def _by_role(model):
    out: dict[Role, list[str]] = {}
    for name, role in classify(model).items():
        out.setdefault(role, []).append(name)
    return out


def _step(model, opt):
    tokens = torch.randint(0, 20, (4, 5), generator=torch.Generator().manual_seed(0))
    loss = model(tokens).pow(2).mean()
    opt.zero_grad()
    loss.backward()
    opt.step()


def test_peft_lora_linear_conv_embedding_mha():
    model = _peft(r=2, target_modules=["q", "v", "conv", "embed", "attn"], init_lora_weights=False)
    roles = _by_role(model)
    assert sorted(roles) == [Role.A, Role.B, Role.EMBEDDING_A, Role.EMBEDDING_B]
    assert "base_model.model.embed.lora_embedding_A.default" in roles[Role.EMBEDDING_A]
    assert "base_model.model.embed.lora_embedding_B.default" in roles[Role.EMBEDDING_B]
    for layer in ("q", "v", "conv", "attn"):
        assert f"base_model.model.{layer}.lora_A.default.weight" in roles[Role.A]
        assert f"base_model.model.{layer}.lora_B.default.weight" in roles[Role.B]
    # the MHA out_proj is adapted too
    assert len(roles[Role.A]) == len(roles[Role.B]) >= 4
    opt = LoraPlus(torch.optim.AdamW, model, 8, lr=1e-3, weight_decay=0.01)
    assert_loraplus_groups(opt, model, ratio=8, lr=1e-3, weight_decay=0.01, **truth(model))
    lrs = {g["role"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"A": 1e-3, "B": 8e-3, "embedding_A": 1e-3, "embedding_B": 1e-3}
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    _step(model, opt)
    # PEFT's MHA layer merges and unmerges LoRA into its frozen base weights on each forward,
    # which leaves rounding noise there; every other frozen tensor must stay bit-identical.
    moved = [
        n
        for n, p in model.named_parameters()
        if not torch.equal(p, before[n]) and not n.startswith("base_model.model.attn.base_layer.")
    ]
    assert moved and all("lora_" in n for n in moved)
    assert "base_model.model.attn.lora_B.default.weight" in moved


def test_peft_dora_rslora_modules_to_save():
    model = _peft(r=2, target_modules=["q", "v"], use_dora=True, use_rslora=True, modules_to_save=["head"])
    roles = classify(model)
    assert roles["base_model.model.q.lora_magnitude_vector.default.weight"] is Role.MAGNITUDE
    assert roles["base_model.model.head.modules_to_save.default.weight"] is Role.OTHER
    assert roles["base_model.model.head.modules_to_save.default.bias"] is Role.OTHER
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, ratio=4, weight_decay=0.1)}
    assert set(groups) == {"A", "B", "magnitude.no_decay", "other", "other.no_decay"}
    assert groups["magnitude.no_decay"]["lr"] == 1e-3  # never multiplied by the ratio
    assert groups["magnitude.no_decay"]["weight_decay"] == 0.0
    assert groups["other"]["param_names"] == ["base_model.model.head.modules_to_save.default.weight"]
    assert groups["other"]["weight_decay"] == 0.1
    opt = LoraPlus(torch.optim.AdamW, model, 4, lr=1e-3, weight_decay=0.1)
    assert_loraplus_groups(opt, model, ratio=4, lr=1e-3, weight_decay=0.1, **truth(model))
    _step(model, opt)


def test_peft_lora_bias():
    model = _peft(r=2, target_modules=["q", "v"], lora_bias=True)
    groups = {g["name"]: g for g in param_groups(model, lr=1e-3, ratio=4, weight_decay=0.1)}
    assert set(groups) == {"A", "B", "B.no_decay"}
    assert groups["B.no_decay"]["param_names"] == [
        "base_model.model.q.lora_B.default.bias",
        "base_model.model.v.lora_B.default.bias",
    ]
    assert groups["B.no_decay"]["lr"] == 4e-3 and groups["B.no_decay"]["weight_decay"] == 0.0
    _step(model, LoraPlus(torch.optim.AdamW, model, 4, lr=1e-3, weight_decay=0.1))


def test_peft_two_active_adapters():
    torch.manual_seed(0)
    model = get_peft_model(Net(), LoraConfig(r=2, target_modules=["q", "v"]), adapter_name="task_a")
    model.add_adapter("task_b", LoraConfig(r=3, target_modules=["q"]))
    model.base_model.set_adapter(["task_a", "task_b"])
    roles = classify(model)
    assert roles["base_model.model.q.lora_A.task_a.weight"] is Role.A
    assert roles["base_model.model.q.lora_B.task_b.weight"] is Role.B
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert set(roles) == trainable and len(trainable) == 6
    opt = LoraPlus(torch.optim.AdamW, model, 16, lr=1e-4)
    assert_loraplus_groups(opt, model, ratio=16, lr=1e-4, weight_decay=0.01, **truth(model))


def test_peft_sources_come_from_the_tuner_layer():
    """PEFT layers are recognised by module type, before the name table."""
    from loraplus._labels._label import label_parameters

    model = _peft(r=2, target_modules=["q"])
    sources = {lab.name: lab.source for lab in label_parameters(model)}
    assert sources["base_model.model.q.lora_A.default.weight"] == "PEFT Linear.lora_A"


def test_loralib_layers():
    torch.manual_seed(0)
    model = nn.Module()
    model.fc = loralib.Linear(8, 8, r=2)
    model.qkv = loralib.MergedLinear(8, 24, r=2, enable_lora=[True, False, True])
    model.emb = loralib.Embedding(20, 8, r=2)
    model.conv = loralib.Conv2d(1, 4, 3, r=2)
    model.head = nn.Linear(8, 2)
    loralib.mark_only_lora_as_trainable(model, bias="lora_only")
    roles = classify(model)
    assert roles["fc.lora_A"] is Role.A and roles["fc.lora_B"] is Role.B
    assert roles["qkv.lora_A"] is Role.A and roles["qkv.lora_B"] is Role.B
    assert roles["emb.lora_A"] is Role.EMBEDDING_A and roles["emb.lora_B"] is Role.EMBEDDING_B
    assert roles["conv.lora_A"] is Role.A and roles["conv.lora_B"] is Role.B
    # bias="lora_only" trains the biases of adapted layers: other, no decay
    groups = {g["name"]: g["param_names"] for g in param_groups(model, lr=1e-3, weight_decay=0.1)}
    assert set(groups["other.no_decay"]) == {"fc.bias", "qkv.bias"}  # loralib leaves ConvLoRA's inner bias frozen
    opt = LoraPlus(torch.optim.AdamW, model, 8, lr=1e-3)
    x = torch.randn(2, 8)
    loss = model.fc(x).sum() + model.qkv(x.unsqueeze(0)).sum() + model.emb(torch.tensor([1, 2])).sum()
    loss.backward()
    opt.step()


def test_torchtune_lora_and_dora():
    from torchtune.modules.peft import DoRALinear, LoRALinear, get_adapter_params, set_trainable_params

    model = nn.Module()
    model.q_proj = LoRALinear(8, 8, rank=2, alpha=4)
    model.v_proj = DoRALinear(8, 8, rank=2, alpha=4)
    set_trainable_params(model, get_adapter_params(model))
    roles = classify(model)
    assert roles == {
        "q_proj.lora_a.weight": Role.A,
        "q_proj.lora_b.weight": Role.B,
        "v_proj.magnitude": Role.MAGNITUDE,
        "v_proj.lora_a.weight": Role.A,
        "v_proj.lora_b.weight": Role.B,
    }
    from loraplus._labels._label import label_parameters

    assert {lab.source for lab in label_parameters(model)} == {
        "torchtune LoRALinear.lora_a", "torchtune LoRALinear.lora_b", "torchtune DoRALinear.lora_a",
        "torchtune DoRALinear.lora_b", "torchtune DoRALinear.magnitude",
    }
    opt = LoraPlus(torch.optim.AdamW, model, 4, lr=1e-3, weight_decay=0.01)
    assert_loraplus_groups(opt, model, ratio=4, lr=1e-3, weight_decay=0.01, **truth(model))
    assert {g["name"] for g in opt.param_groups} == {"A", "B", "magnitude.no_decay"}


class _MinLoRA(nn.Module):
    """A minLoRA-style parametrization (the package itself is not on PyPI)."""

    def __init__(self, fan_in, fan_out, r, transposed=False):
        super().__init__()
        shape_a, shape_b = ((fan_in, r), (r, fan_out)) if transposed else ((r, fan_in), (fan_out, r))
        self.lora_A = nn.Parameter(torch.randn(*shape_a) * 0.1)
        self.lora_B = nn.Parameter(torch.zeros(*shape_b))
        self.transposed = transposed

    def forward(self, w):
        return w + (self.lora_A @ self.lora_B if self.transposed else self.lora_B @ self.lora_A)


def test_minlora_style_parametrizations_including_transposed_embedding():
    model = nn.Module()
    model.fc = nn.Linear(8, 6)
    model.emb = nn.Embedding(20, 8)
    parametrize.register_parametrization(model.fc, "weight", _MinLoRA(8, 6, 2))
    parametrize.register_parametrization(model.emb, "weight", _MinLoRA(20, 8, 2, transposed=True))
    for name, p in model.named_parameters():
        p.requires_grad_("lora_" in name)
    roles = classify(model)
    assert roles == {
        "fc.parametrizations.weight.0.lora_A": Role.A,
        "fc.parametrizations.weight.0.lora_B": Role.B,
        "emb.parametrizations.weight.0.lora_A": Role.EMBEDDING_A,
        "emb.parametrizations.weight.0.lora_B": Role.EMBEDDING_B,
    }
    opt = LoraPlus(torch.optim.SGD, model, 8, lr=0.1)
    (model.fc(torch.randn(2, 8)).sum() + model.emb(torch.tensor([3])).sum()).backward()
    opt.step()


def test_hand_written_declared_roles():
    class MyLoRA(nn.Module):
        def __init__(self, d, r):
            super().__init__()
            self.w = nn.Parameter(torch.randn(d, d), requires_grad=False)
            self.left = nn.Parameter(torch.zeros(d, r))
            self.right = nn.Parameter(torch.randn(r, d) * 0.1)

        def loraplus_roles(self):
            return {"right": loraplus.Role.A, "left": loraplus.Role.B}

        def forward(self, x):
            return x @ (self.w + self.left @ self.right).T

    model = nn.Sequential(MyLoRA(8, 2), nn.ReLU(), MyLoRA(8, 2))
    opt = LoraPlus(torch.optim.AdamW, model, 16, lr=1e-3)
    roles = {"0.right": Role.A, "2.right": Role.A, "0.left": Role.B, "2.left": Role.B}
    assert_loraplus_groups(opt, model, ratio=16, lr=1e-3, weight_decay=0.01, expected_roles=roles, no_decay=())
    assert [g["param_names"] for g in opt.param_groups] == [["0.right", "2.right"], ["0.left", "2.left"]]


@pytest.mark.parametrize("wrapper", ["ddp_like", "compile"])
def test_peft_under_wrappers(wrapper):
    model = _peft(r=2, target_modules=["q", "v"])
    if wrapper == "compile":
        wrapped = torch.compile(model)
        prefix = "_orig_mod."
    else:

        class DDPLike(nn.Module):
            def __init__(self, m):
                super().__init__()
                self.module = m

        wrapped = DDPLike(model)
        prefix = "module."
    roles = classify(wrapped)
    assert roles[prefix + "base_model.model.q.lora_A.default.weight"] is Role.A
    assert roles[prefix + "base_model.model.v.lora_B.default.weight"] is Role.B
