"""Adapters beyond LoRA (issue 6): the roles and learning rates of DoRA, AdaLoRA, LoHa, LoKr and
VeRA parameters on real PEFT models, torchtune DoRA, NeMo DoRA names, and generated models in
those naming conventions. docs/adapters.md documents the same table."""

from __future__ import annotations

import peft
import pytest
import torch
from hypothesis import given
from torch import nn
from torchtune.modules.peft import DoRALinear

import loraplus
from loraplus import Role
from loraplus._labels._label import label_parameters
from loraplus.testing import assert_loraplus_groups, lora_models

A, B, CORE, MAG, OTHER = Role.A, Role.B, Role.CORE, Role.MAGNITUDE, Role.OTHER


class TwoLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.up = nn.Linear(64, 128)
        self.down = nn.Linear(128, 64)
        self.head = nn.Linear(64, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.down(torch.relu(self.up(x))))


def peft_model(config: object) -> nn.Module:
    torch.manual_seed(0)
    model = peft.get_peft_model(TwoLayer(), config)
    model.base_model.model.head.requires_grad_(True)  # a trainable head, as with modules_to_save
    return model


# (config, {factor name: (role, family)}, the factor PEFT initialises to zero)
FAMILIES = {
    "dora": (
        lambda: peft.LoraConfig(r=4, target_modules=["up", "down"], use_dora=True),
        {"lora_A": (A, "dora"), "lora_B": (B, "dora"), "lora_magnitude_vector": (MAG, "dora")},
        "lora_B",
    ),
    "adalora": (
        lambda: peft.AdaLoraConfig(init_r=4, target_r=2, target_modules=["up", "down"], total_step=100),
        {"lora_A": (A, "adalora"), "lora_B": (B, "adalora"), "lora_E": (CORE, "adalora")},
        "lora_E",
    ),
    "loha": (
        lambda: peft.LoHaConfig(r=4, target_modules=["up", "down"]),
        {"hada_w1_a": (B, "loha"), "hada_w2_a": (B, "loha"), "hada_w1_b": (A, "loha"), "hada_w2_b": (A, "loha")},
        "hada_w2_b",
    ),
    "lokr": (
        lambda: peft.LoKrConfig(r=2, target_modules=["up", "down"]),
        {"lokr_w1": (CORE, "lokr"), "lokr_w2_a": (B, "lokr"), "lokr_w2_b": (A, "lokr")},
        "lokr_w1",
    ),
    "lokr_decompose_both": (
        lambda: peft.LoKrConfig(r=2, target_modules=["up", "down"], decompose_both=True, decompose_factor=8),
        {"lokr_w1_a": (B, "lokr"), "lokr_w1_b": (A, "lokr"), "lokr_w2_a": (B, "lokr"), "lokr_w2_b": (A, "lokr")},
        "lokr_w1_a",
    ),
    "vera": (
        lambda: peft.VeraConfig(r=4, target_modules=["up", "down"]),
        {"vera_lambda_b": (B, "vera"), "vera_lambda_d": (A, "vera")},
        "vera_lambda_b",
    ),
}


def factor_of(name: str) -> str:
    """`base_model.model.up.hada_w1_a.default` -> `hada_w1_a`."""
    segs = name.split(".")
    i = segs.index("default")
    return segs[i - 1] if segs[i - 1] != "lora_magnitude_vector" or i == len(segs) - 1 else segs[i - 1]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_peft_family_gets_documented_roles_and_families(family: str) -> None:
    make, table, _ = FAMILIES[family]
    model = peft_model(make())
    labels = label_parameters(model)
    seen = set()
    for lab in labels:
        if lab.name.startswith("base_model.model.head."):
            assert lab.role is OTHER
            continue
        factor = factor_of(lab.name)
        assert factor in table, f"unexpected trainable tensor {lab.name}"
        assert (lab.role, lab.family) == table[factor], lab.name
        seen.add(factor)
    assert seen == set(table), f"PEFT {peft.__version__} no longer creates {set(table) - seen}"


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_real_peft_family_zero_init_factor_is_as_documented(family: str) -> None:
    # docs/adapters.md states which factor starts at zero; pin it against the installed PEFT
    make, table, zero = FAMILIES[family]
    model = peft_model(make())
    for name, p in model.named_parameters():
        if p.requires_grad and not name.startswith("base_model.model.head."):
            assert bool((p == 0).all()) == (factor_of(name) == zero), name


def _truth(model: nn.Module, table: dict) -> tuple[dict[str, Role], set[str]]:
    """Expected roles and no-decay names, from the test's FAMILIES table and how peft_model() builds."""
    roles, no_decay = {}, set()
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.startswith("base_model.model.head."):
            roles[name] = OTHER
            if name.endswith(".bias"):
                no_decay.add(name)
            continue
        role = table[factor_of(name)][0]
        roles[name] = role
        if role is MAG:
            no_decay.add(name)
    return roles, no_decay


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("ratio", [None, 4.0, 8.0])
def test_real_peft_family_learning_rates(family: str, ratio: float | None) -> None:
    make, table, _ = FAMILIES[family]
    model = peft_model(make())
    lr = 1e-3
    kwargs = {} if ratio is None else {"ratio": ratio}
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, lr=lr, weight_decay=0.01, **kwargs)
    roles, no_decay = _truth(model, table)
    # every family's B factors get the one ratio (4 when left at the default)
    want_ratio = 4.0 if ratio is None else ratio
    assert_loraplus_groups(
        opt, model, ratio=want_ratio, lr=lr, weight_decay=0.01, expected_roles=roles, no_decay=no_decay
    )
    # one step through the real layers moves every adapter tensor that gets a gradient
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model(torch.randn(4, 64)).sum().backward()
    with_grad = {n for n, p in model.named_parameters() if p.requires_grad and p.grad is not None and p.grad.any()}
    opt.step()
    moved = {n for n, p in model.named_parameters() if n in before and not torch.equal(p, before[n])}
    assert with_grad and with_grad <= moved


def test_dora_magnitude_is_exempt_from_decay_and_can_get_its_own_lr() -> None:
    model = peft_model(FAMILIES["dora"][0]())
    groups = loraplus.param_groups(model, lr=1e-3, ratio=4, weight_decay=0.1, role_lr={MAG: 4e-3})
    mag = [g for g in groups if g["role"] == "magnitude"]
    assert [g["name"] for g in mag] == ["magnitude.no_decay"]
    assert mag[0]["weight_decay"] == 0.0 and mag[0]["lr"] == 4e-3
    assert all("lora_magnitude_vector" in n for n in mag[0]["param_names"])


def test_adalora_ranknum_stays_out_of_every_group() -> None:
    model = peft_model(FAMILIES["adalora"][0]())
    assert any("ranknum" in n for n, _ in model.named_parameters())
    names = [n for g in loraplus.param_groups(model, lr=1e-3) for n in g["param_names"]]
    assert not any("ranknum" in n for n in names)


def test_explain_shows_each_family_mapping() -> None:
    model = peft_model(FAMILIES["loha"][0]())
    text = loraplus.explain(model, ratio=4, verbose=True)
    rows = {line.split()[0]: line.split()[1] for line in text.splitlines() if line.startswith("base_model.")}
    table = FAMILIES["loha"][1]
    factors = {n: r for n, r in rows.items() if not n.startswith("base_model.model.head.")}
    assert factors and {n: table[factor_of(n)][0].value for n in factors} == factors


def test_torchtune_dora_roles_and_lrs() -> None:
    torch.manual_seed(0)
    layer = DoRALinear(16, 8, rank=2, alpha=4)
    layer.weight.requires_grad_(False)  # torchtune freezes the base weight via set_trainable_params
    assert loraplus.classify(layer) == {"magnitude": MAG, "lora_a.weight": A, "lora_b.weight": B}
    opt = loraplus.LoraPlus(torch.optim.AdamW, layer, ratio=4, lr=1e-3, weight_decay=0.01)
    lrs = {g["name"]: g["lr"] for g in opt.param_groups}
    assert lrs == {"A": 1e-3, "B": 4e-3, "magnitude.no_decay": 1e-3}
    # same family as PEFT DoRA (the Monitor notes that ΔW excludes DoRA's magnitude and normalisation)
    assert {lab.family for lab in label_parameters(layer)} == {"dora"}
    by_default = {g["name"]: g["lr"] for g in loraplus.param_groups(layer, lr=1e-3)}
    assert by_default["B"] == 4e-3  # the one default ratio, whatever the family


class NemoDoraAdapter(nn.Module):
    """NeMo-style names: `adapter.linear_in`, `adapter.linear_out`, `adapter.weight_magnitude`."""

    def __init__(self) -> None:
        super().__init__()
        self.linear_in = nn.Linear(16, 2, bias=False)
        self.linear_out = nn.Linear(2, 8, bias=False)
        self.weight_magnitude = nn.Parameter(torch.ones(8))


def test_nemo_dora_names() -> None:
    root = nn.Module()
    root.layer = nn.Module()
    root.layer.adapter = NemoDoraAdapter()
    assert loraplus.classify(root) == {
        "layer.adapter.weight_magnitude": MAG,
        "layer.adapter.linear_in.weight": A,
        "layer.adapter.linear_out.weight": B,
    }


NEW_CONVENTIONS = ("peft_adalora", "peft_loha", "peft_lokr", "peft_vera")


@given(lora_models(NEW_CONVENTIONS + ("peft", "peft_dora")))
def test_generated_models_in_new_conventions_get_their_roles(gen) -> None:
    assert loraplus.classify(gen.model, gen.rules) == gen.expected


@given(lora_models(NEW_CONVENTIONS, max_layers=3))
def test_generated_models_in_new_conventions_get_loraplus_groups(gen) -> None:
    opt = loraplus.LoraPlus(torch.optim.SGD, gen.model, ratio=4, lr=0.1, weight_decay=0.0, rules=gen.rules)
    assert_loraplus_groups(opt, gen, ratio=4, lr=0.1, weight_decay=0.0)
