"""Core behaviour: labelling, grouping, the factory, explain, and every error."""

from __future__ import annotations

import copy
import functools
import re
import warnings

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import loraplus
from loraplus import LoraPlus, LoraPlusError, Role, classify, explain, param_groups
from loraplus._labels._label import label_parameters
from loraplus.testing import assert_loraplus_groups, build_model, lora_models, tiny_lora_model

# tiny_lora_model()'s ground truth, from how it is built (two PEFT-named layers, a LayerNorm, a head)
_TINY_TRUTH = {
    "expected_roles": {
        **{f"layers.{i}.lora_{f}.default.weight": Role(f) for i in (0, 1) for f in "AB"},
        "norm.weight": Role.OTHER,
        "norm.bias": Role.OTHER,
        "head.weight": Role.OTHER,
        "head.bias": Role.OTHER,
    },
    "no_decay": {"norm.weight", "norm.bias", "head.bias"},
}

# --------------------------------------------------------------------------- properties over generated models


@given(lora_models())
def test_classify_matches_ground_truth(gen):
    assert classify(gen.model, gen.rules) == gen.expected


# how the ratio is given: left at its default, spelled 4.0, or through role_lr (A's rate overridden)
_RATE_SPELLINGS = [
    ({}, 4.0, 1e-3, None),
    ({"ratio": 4.0}, 4.0, 1e-3, None),
    ({"ratio": 16}, 16.0, 1e-3, None),
    ({"ratio": 1.0}, 1.0, 1e-3, None),
    ({"ratio": 3.5, "role_lr": {Role.A: 2e-3}}, 3.5, 1e-3, {Role.A: 2e-3}),
    ({"ratio": 2.0, "role_lr": {"B": 5e-2, "other": 1e-5}}, 2.0, 1e-3, {"B": 5e-2, "other": 1e-5}),
    ({"lr_embedding": 1e-4, "role_lr": {"magnitude": 7e-4}}, 4.0, 1e-3, {"magnitude": 7e-4}),
]


@given(lora_models(), st.sampled_from(_RATE_SPELLINGS), st.sampled_from([None, 0.0, 0.01]))
def test_every_tensor_gets_its_documented_rate_and_decay(gen, spelling, wd):
    kwargs, ratio, lr, role_lr = spelling
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # role_lr[B] / embedding-only models warn; checked elsewhere
        opt = LoraPlus(torch.optim.AdamW, gen.model, lr=lr, weight_decay=wd, rules=gen.rules, **kwargs)
    emb = kwargs.get("lr_embedding")
    # ground truth from the generator: roles and no-decay names; rates from the documented rule
    assert_loraplus_groups(opt, gen, ratio=ratio, lr=lr, weight_decay=wd, lr_embedding=emb, role_lr=role_lr)
    ids = [id(p) for g in opt.param_groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(gen.expected)
    want_wd = {n: (0.0 if n in gen.no_decay else (0.01 if wd is None else wd)) for n in gen.expected}
    got_wd = {n: g["weight_decay"] for g in opt.param_groups for n in g["param_names"]}
    assert got_wd == want_wd


@given(lora_models())
def test_grouping_is_deterministic_and_model_unchanged(gen):
    model = gen.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hooks = (len(model._forward_hooks), len(model._forward_pre_hooks))
    first = param_groups(model, lr=1e-3, ratio=8, weight_decay=0.1, rules=gen.rules)
    second = param_groups(copy.deepcopy(model), lr=1e-3, ratio=8, weight_decay=0.1, rules=gen.rules)
    strip = lambda gs: [{k: v for k, v in g.items() if k != "params"} for g in gs]  # noqa: E731
    assert strip(first) == strip(second)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert flags == {n: p.requires_grad for n, p in model.named_parameters()}
    assert hooks == (len(model._forward_hooks), len(model._forward_pre_hooks))


def test_group_order_and_names():
    model = build_model(
        [
            {"conv": "peft_dora", "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": True},
            {"conv": "peft_embedding", "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": False},
        ]
    ).model
    groups = param_groups(model, lr=1.0, ratio=4, weight_decay=0.5)
    assert [g["name"] for g in groups] == [
        "A",
        "B",
        "B.no_decay",
        "embedding_A",
        "embedding_B",
        "magnitude.no_decay",
        "other",
        "other.no_decay",
    ]
    by_name = {g["name"]: g for g in groups}
    assert by_name["B.no_decay"]["param_names"] == ["layers.0.lora_B.default.bias"]
    assert by_name["B.no_decay"]["lr"] == 4.0 and by_name["B.no_decay"]["weight_decay"] == 0.0
    assert by_name["embedding_A"]["lr"] == 1.0 and by_name["embedding_B"]["lr"] == 1.0
    assert by_name["magnitude.no_decay"]["lr"] == 1.0
    assert by_name["other"]["weight_decay"] == 0.5


# --------------------------------------------------------------------------- reference comparisons


def _train(model, opt, steps=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 8, generator=g)
        y = torch.randint(0, 2, (16,), generator=g)
        # give B a non-zero start so A's gradient is not zero
        loss = nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return {k: v.clone() for k, v in model.state_dict().items()}


def _nonzero_b(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1, generator=torch.Generator().manual_seed(1))
    return model


@pytest.mark.parametrize("foreach", [True, False])
def test_matches_hand_written_groups_bit_for_bit(foreach):
    m1 = _nonzero_b(tiny_lora_model())
    m2 = copy.deepcopy(m1)
    opt1 = LoraPlus(torch.optim.AdamW, m1, 16, lr=1e-3, weight_decay=0.01, betas=(0.9, 0.99), foreach=foreach)
    named = dict(m2.named_parameters())
    a = [p for n, p in named.items() if ".lora_A." in n]
    b = [p for n, p in named.items() if ".lora_B." in n]
    hand = [
        {"params": a, "lr": 1e-3, "weight_decay": 0.01},
        {"params": b, "lr": 16e-3, "weight_decay": 0.01},
        {"params": [named["head.weight"]], "lr": 1e-3, "weight_decay": 0.01},
        {"params": [named["norm.weight"], named["norm.bias"], named["head.bias"]], "lr": 1e-3, "weight_decay": 0.0},
    ]
    opt2 = torch.optim.AdamW(hand, lr=1e-3, betas=(0.9, 0.99), foreach=foreach)
    s1, s2 = _train(m1, opt1), _train(m2, opt2)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)
    assert not torch.equal(s1["layers.0.lora_B.default.weight"], tiny_lora_model().state_dict()["layers.0.lora_B.default.weight"])


def test_ratio_one_equals_plain_adamw_bit_for_bit():
    m1 = _nonzero_b(tiny_lora_model())
    m2 = copy.deepcopy(m1)
    opt1 = LoraPlus(torch.optim.AdamW, m1, 1.0, lr=1e-3, weight_decay=0.0)
    opt2 = torch.optim.AdamW([p for p in m2.parameters() if p.requires_grad], lr=1e-3, weight_decay=0.0)
    s1, s2 = _train(m1, opt1, steps=8), _train(m2, opt2, steps=8)
    assert all(torch.equal(s1[k], s2[k]) for k in s1)


def test_b_moves_ratio_times_faster_on_first_adam_step():
    m1 = _nonzero_b(tiny_lora_model())
    m16 = copy.deepcopy(m1)
    start = {k: v.clone() for k, v in m1.state_dict().items()}
    s1 = _train(m1, LoraPlus(torch.optim.Adam, m1, 1.0, lr=1e-4), steps=1)
    s16 = _train(m16, LoraPlus(torch.optim.Adam, m16, 16.0, lr=1e-4), steps=1)
    key_b, key_a = "layers.1.lora_B.default.weight", "layers.1.lora_A.default.weight"
    d1, d16 = s1[key_b] - start[key_b], s16[key_b] - start[key_b]
    assert torch.allclose(d16, 16 * d1, rtol=1e-3, atol=1e-9)
    assert torch.allclose(s16[key_a] - start[key_a], s1[key_a] - start[key_a], rtol=1e-3, atol=1e-9)


# --------------------------------------------------------------------------- the factory


def test_returns_genuine_instance_and_passes_kwargs_through():
    model = tiny_lora_model()
    opt = LoraPlus(torch.optim.AdamW, model, lr=2e-4, betas=(0.8, 0.95), eps=1e-6, amsgrad=True)
    assert type(opt) is torch.optim.AdamW
    assert all(g["betas"] == (0.8, 0.95) and g["eps"] == 1e-6 and g["amsgrad"] for g in opt.param_groups)
    assert opt.defaults["lr"] == 2e-4
    assert {g["role"]: g["lr"] for g in opt.param_groups}["B"] == loraplus.DEFAULT_RATIO * 2e-4


def test_accepts_partial_factories():
    model = tiny_lora_model()
    factory = functools.partial(torch.optim.SGD, momentum=0.9)
    opt = LoraPlus(factory, model, 4, lr=0.1)
    assert isinstance(opt, torch.optim.SGD)
    assert_loraplus_groups(opt, model, ratio=4, lr=0.1, weight_decay=0.0, **_TINY_TRUTH)
    assert all(g["momentum"] == 0.9 for g in opt.param_groups)


def test_role_lr_and_lr_embedding_overrides():
    model = build_model(
        [
            {"conv": "peft_dora", "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": False},
            {"conv": "peft_embedding", "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": False},
        ]
    ).model
    groups = param_groups(model, lr=1e-3, ratio=8, lr_embedding=5e-4, role_lr={Role.MAGNITUDE: 2e-3, "other": 1e-5})
    lrs = {g["role"]: g["lr"] for g in groups}
    assert lrs == {
        "A": 1e-3,
        "B": 8e-3,
        "embedding_A": 5e-4,
        "embedding_B": 5e-4,
        "magnitude": 2e-3,
        "other": 1e-5,
    }


def test_weight_decay_none_leaves_optimizer_default():
    model = tiny_lora_model()
    opt = LoraPlus(torch.optim.AdamW, model, lr=1e-3)
    wds = {g["name"]: g["weight_decay"] for g in opt.param_groups}
    assert wds == {"A": 0.01, "B": 0.01, "other": 0.01, "other.no_decay": 0.0}  # AdamW's default 1e-2


# --------------------------------------------------------------------------- rules and the declared protocol


def test_user_rules_glob_regex_callable_and_precedence():
    class Custom(nn.Module):
        def __init__(self):
            super().__init__()
            self.base = nn.Linear(4, 4).requires_grad_(False)
            self.p_in = nn.Parameter(torch.zeros(2, 4))
            self.p_out = nn.Parameter(torch.zeros(4, 2))
            self.lora_A = nn.Parameter(torch.zeros(2, 4))  # would be A by convention (its partner exists, frozen)
            self.lora_B = nn.Parameter(torch.zeros(4, 2), requires_grad=False)
            self.gate = nn.Parameter(torch.zeros(4))

    model = nn.Sequential(Custom())
    with pytest.raises(LoraPlusError, match="found A factors but no B"):
        classify(model) and param_groups(model, lr=1.0)
    rules = [
        ("*.p_in", Role.A),
        (re.compile(r"p_out$"), "B"),
        lambda name, p, m: Role.OTHER if name.endswith("lora_A") else None,
    ]
    roles = classify(model, rules=rules)
    assert roles == {"0.p_in": Role.A, "0.p_out": Role.B, "0.lora_A": Role.OTHER, "0.gate": Role.OTHER}
    assert classify(model, rules={"*.gate": Role.MAGNITUDE})["0.gate"] is Role.MAGNITUDE


def test_conflicting_user_rules_raise():
    model = tiny_lora_model()
    with pytest.raises(LoraPlusError, match=r"matched by user rules with different roles.*'\*lora_A\*' -> A.*-> B"):
        classify(model, rules=[("*lora_A*", Role.A), ("layers.0.*", Role.B)])
    # agreeing rules are fine
    classify(model, rules=[("*lora_A*", Role.A), ("layers.*.lora_A.*", "a")])


def test_declared_protocol_wins_over_names():
    class Swapped(nn.Module):
        """Names that look like PEFT but mean the opposite; the module says so."""

        def __init__(self):
            super().__init__()
            self.lora_A = nn.Parameter(torch.zeros(4, 2))
            self.lora_B = nn.Parameter(torch.zeros(2, 4))

        def loraplus_roles(self):
            return {"lora_A": Role.B, "lora_B": "A"}

    roles = classify(nn.Sequential(Swapped()))
    assert roles == {"0.lora_A": Role.B, "0.lora_B": Role.A}
    # but user rules win over the declaration
    assert classify(nn.Sequential(Swapped()), rules={"0.lora_A": Role.A, "0.lora_B": Role.B})["0.lora_A"] is Role.A


def test_declared_protocol_bad_declarations():
    class Bad(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(2))

        def loraplus_roles(self):
            return {"nope": Role.A}

    with pytest.raises(LoraPlusError, match=r"Bad.loraplus_roles\(\) at '0' names 'nope', which is not a parameter"):
        classify(nn.Sequential(Bad()))

    class Bad2(Bad):
        def loraplus_roles(self):
            return ["w"]

    with pytest.raises(LoraPlusError, match="must return a mapping"):
        classify(nn.Sequential(Bad2()))

    class Bad3(Bad):
        def loraplus_roles(self):
            return {"w": "Q"}

    with pytest.raises(LoraPlusError, match="unknown role 'Q'"):
        classify(nn.Sequential(Bad3()))


# --------------------------------------------------------------------------- the name table


class _Holder(nn.Module):
    """Builds a module tree whose parameter names are exactly the given dotted names."""

    def __init__(self, names):
        super().__init__()
        for name in names:
            *path, leaf = name.split(".")
            mod = self
            for seg in path:
                if seg not in mod._modules:
                    mod.add_module(seg, nn.Module())
                mod = mod._modules[seg]
            mod.register_parameter(leaf, nn.Parameter(torch.zeros(2, 2)))


@pytest.mark.parametrize(
    "name, role",
    [
        ("base_model.model.layers.0.q_proj.lora_A.default.weight", Role.A),
        ("base_model.model.layers.0.q_proj.lora_B.default_0.weight", Role.B),
        ("base_model.model.layers.0.q_proj.lora_B.my_task.bias", Role.B),
        ("base_model.model.embed.lora_embedding_A.default", Role.EMBEDDING_A),
        ("base_model.model.embed.lora_embedding_B.default", Role.EMBEDDING_B),
        ("layers.0.q.lora_magnitude_vector.default.weight", Role.MAGNITUDE),
        ("h.0.attn.c_attn.lora_A", Role.A),
        ("h.0.attn.c_attn.lora_B", Role.B),
        ("layers.0.attn.q_proj.lora_a.weight", Role.A),
        ("layers.0.attn.q_proj.lora_b.weight", Role.B),
        ("unet.down_blocks.0.attn.to_q.lora_down.weight", Role.A),
        ("unet.up_blocks.1.attn.to_q.lora_up.weight", Role.B),
        ("layers.0.mlp.lora_right_weight", Role.A),
        ("layers.0.mlp.lora_left_weight", Role.B),
        ("q.hada_w1_a.default", Role.B),
        ("q.hada_w1_b.default", Role.A),
        ("q.vera_lambda_b.default", Role.B),
        ("q.vera_lambda_d.default", Role.A),
        # wrappers, anywhere
        ("module._fsdp_wrapped_module.layers.0.q.lora_A.default._fsdp_wrapped_module.weight", Role.A),
        ("_orig_mod.layers.0._checkpoint_wrapped_module.q.lora_B.default.weight", Role.B),
        # trailing segments, never substrings
        ("unet.down_blocks.0.resnets.0.conv1.weight", Role.OTHER),
        ("unet.up_blocks.0.attentions.0.proj.weight", Role.OTHER),
        ("layers.0.q.lora_down_a.weight", Role.OTHER),
        ("layers.0.q.lora_Bx.default.weight", Role.OTHER),
        ("my_lora_B", Role.OTHER),
        ("blocks.0.mlp.up.weight", Role.OTHER),  # `up` without a `down` sibling
        ("layers.0.magnitude", Role.OTHER),  # torchtune's magnitude only next to lora_a
    ],
)
def test_conventions_table(name, role):
    built = [name] + [n for n in [_partner(name)] if n]
    labels = {lab.name: lab.role for lab in label_parameters(_Holder(built))}
    assert labels[name] == role


# a factor's partner, by the libraries' own naming (REFERENCE.md section 2): built beside it, as they are
_PARTNERS = {
    "lora_A": "lora_B", "lora_B": "lora_A", "lora_embedding_A": "lora_embedding_B",
    "lora_embedding_B": "lora_embedding_A", "lora_a": "lora_b", "lora_b": "lora_a", "lora_down": "lora_up",
    "lora_up": "lora_down", "lora_right_weight": "lora_left_weight", "lora_left_weight": "lora_right_weight",
}


def _partner(name):
    segs = name.split(".")
    for i in range(len(segs) - 1, -1, -1):
        if segs[i] in _PARTNERS:
            return ".".join(segs[:i] + [_PARTNERS[segs[i]]] + segs[i + 1 :])
    return None


def test_a_factor_without_its_partner_attribute_is_not_an_adapter():
    for name in ["h.0.attn.c_attn.lora_A", "q.lora_B.default.weight", "x.lora_up.weight", "m.lora_right_weight"]:
        assert classify(_Holder([name, "other.weight"])) == {name: Role.OTHER, "other.weight": Role.OTHER}


def _pair_module(first: str, second: str, d_in: int, r: int, d_out: int, bias: bool = False) -> nn.Module:
    holder = nn.Module()
    holder.add_module(first, nn.Linear(d_in, r, bias=bias))
    holder.add_module(second, nn.Linear(r, d_out, bias=bias))
    root = nn.Module()
    root.ad = holder
    return root


@pytest.mark.parametrize("down, up", [("down", "up"), ("linear_in", "linear_out")])
def test_generic_sibling_names_count_only_as_a_rank_bottleneck(down, up):
    # in -> 4 -> out with 4 below both: an adapter
    roles = classify(_pair_module(down, up, 32, 4, 24))
    assert roles == {f"ad.{down}.weight": Role.A, f"ad.{up}.weight": Role.B}
    # an expanding pair, a square pair, a rank not below in, mismatched ranks: ordinary layers
    for d_in, r, d_out in [(32, 64, 32), (32, 32, 32), (4, 4, 32), (32, 4, 4)]:
        roles = classify(nn.Sequential(_pair_module(down, up, d_in, r, d_out, bias=True), _lora_layer()))
        assert roles[f"0.ad.{down}.weight"] is Role.OTHER and roles[f"0.ad.{up}.weight"] is Role.OTHER, (d_in, r, d_out)
    mismatched = nn.Module()
    mismatched.add_module(down, nn.Linear(32, 4, bias=False))
    mismatched.add_module(up, nn.Linear(5, 32, bias=False))
    assert set(classify(nn.Sequential(mismatched, _lora_layer())).values()) == {Role.OTHER, Role.A, Role.B}
    assert classify(nn.Sequential(mismatched, _lora_layer()))[f"0.{down}.weight"] is Role.OTHER


def test_plain_down_up_model_is_not_a_lora_model():
    """Finding: a model with no adapter at all (down/up Linear 32x32) was accepted and `up` ran at 4x lr."""
    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            self.down = nn.Linear(32, 32)
            self.up = nn.Linear(32, 32)

    with pytest.raises(LoraPlusError, match="no LoRA adapter parameters found"):
        LoraPlus(torch.optim.AdamW, nn.Sequential(Block(), Block()), lr=1e-3)


def _lora_layer() -> nn.Module:
    layer = nn.Module()
    layer.lora_A = nn.Linear(8, 2, bias=False)
    layer.lora_B = nn.Linear(2, 8, bias=False)
    return layer


def test_torchtune_and_nemo_magnitudes_need_their_factors_beside_them():
    roles = classify(_Holder(["q.lora_a.weight", "q.lora_b.weight", "q.magnitude"]))
    assert roles["q.magnitude"] is Role.MAGNITUDE
    nemo = _pair_module("linear_in", "linear_out", 32, 4, 32)
    nemo.ad.weight_magnitude = nn.Parameter(torch.ones(32))
    assert classify(nemo)["ad.weight_magnitude"] is Role.MAGNITUDE
    alone = nn.Sequential(_lora_layer())
    alone.weight_magnitude = nn.Parameter(torch.ones(32))
    assert classify(alone)["weight_magnitude"] is Role.OTHER


def test_tied_parameters_appear_once():
    gen = build_model(
        [{"conv": "peft", "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": False}],
        tie_head=True,
    )
    groups = param_groups(gen.model, lr=1.0)
    names = [n for g in groups for n in g["param_names"]]
    assert "head.weight" in names and "lm_head.weight" not in names
    assert len(names) == len(set(names))


# --------------------------------------------------------------------------- weight decay defaults


def test_default_no_decay_biases_norms_magnitudes():
    class LlamaRMSNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(4))

    root = tiny_lora_model()
    root.rms = LlamaRMSNorm()
    root.ln_f = nn.Module()
    root.ln_f.weight = nn.Parameter(torch.ones(4))
    root.input_layernorm = nn.Module()
    root.input_layernorm.scale = nn.Parameter(torch.ones(4))
    root.torch_rms = nn.RMSNorm(4)
    root.gn = nn.GroupNorm(2, 4)
    root.q_bias = nn.Parameter(torch.zeros(4))
    root.normal_head = nn.Linear(4, 4, bias=False)  # "normal" is not a norm
    groups = {g["name"]: g["param_names"] for g in param_groups(root, lr=1.0, weight_decay=0.1)}
    assert set(groups["other.no_decay"]) == {
        "norm.weight",
        "norm.bias",
        "head.bias",
        "rms.weight",
        "ln_f.weight",
        "input_layernorm.scale",
        "torch_rms.weight",
        "gn.weight",
        "gn.bias",
        "q_bias",
    }
    assert set(groups["other"]) == {"head.weight", "normal_head.weight"}


def test_norm_names_count_only_as_whole_words_and_1d_parameters_keep_decay():
    """The norm-name rule reads whole name parts (``norm``, ``ln``, ``layernorm``, ``rmsnorm`` between
    ``_``, digits or the ends): ``normal_scale``, ``kiln_weight`` and ``enormous`` are no norms. Being
    1-D decides nothing: a LayerScale ``gamma`` decays."""
    root = tiny_lora_model()
    for leaf in ("normal_scale", "kiln_weight", "enormous", "norm_weight", "ln_1", "pre_rmsnorm"):
        setattr(root, leaf, nn.Parameter(torch.ones(4)))  # raw 1-D parameters of the root module
    for attr in ("enorm", "kiln", "post_ln", "qk_norm"):  # modules holding one raw 1-D parameter
        holder = nn.Module()
        holder.scale = nn.Parameter(torch.ones(4))
        setattr(root, attr, holder)
    root.ls1 = nn.Module()
    root.ls1.gamma = nn.Parameter(torch.full((4,), 1e-5))
    groups = {g["name"]: set(g["param_names"]) for g in param_groups(root, lr=1.0, weight_decay=0.1)}
    decays = {"normal_scale", "kiln_weight", "enormous", "enorm.scale", "kiln.scale", "ls1.gamma"}
    exempt = {"norm_weight", "ln_1", "pre_rmsnorm", "post_ln.scale", "qk_norm.scale"}
    assert decays <= groups["other"] and not decays & groups["other.no_decay"]
    assert exempt <= groups["other.no_decay"] and not exempt & groups["other"]


def test_user_no_decay_rules():
    model = tiny_lora_model()
    groups = param_groups(
        model,
        lr=1.0,
        weight_decay=0.1,
        no_decay=["*.lora_A.*", lambda name, p, m: False if name == "head.bias" else None],
    )
    names = {g["name"]: g["param_names"] for g in groups}
    assert names["A.no_decay"] == ["layers.0.lora_A.default.weight", "layers.1.lora_A.default.weight"]
    assert "head.bias" in names["other"]
    with pytest.raises(LoraPlusError, match="no_decay entries must be"):
        param_groups(model, lr=1.0, no_decay=[3])


# --------------------------------------------------------------------------- errors


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"lr": "1e-4"}, r"lr must be a number, got the string '1e-4'.*float\('1e-4'\)"),
        ({"lr": 0.0}, "lr must be positive, got 0.0"),
        ({"lr": -1e-3}, "lr must be positive"),
        ({"lr": float("nan")}, "lr must be finite"),
        ({"lr": True}, "lr must be a real number, got bool"),
        ({"lr": 1e-3, "ratio": float("inf")}, "ratio must be finite"),
        ({"lr": 1e-3, "ratio": 0}, "ratio must be positive"),
        ({"lr": 1e-3, "ratio": "16"}, "ratio must be a number, got the string '16'"),
        ({"lr": 1e-3, "lr_embedding": "1e-6"}, "lr_embedding must be a number"),
        ({"lr": 1e-3, "weight_decay": -0.1}, "weight_decay must be non-negative"),
        ({"lr": 1e-3, "role_lr": {"B": "1"}}, r"role_lr\['B'\] must be a number"),
        ({"lr": 1e-3, "role_lr": {"beta": 1.0}}, "unknown role 'beta'"),
        ({"lr": 1e-3, "rules": [("x",)]}, r"cannot use \('x',\) as a rule"),
        ({"lr": 1e-3, "rules": [(3, Role.A)]}, "a rule's pattern must be a glob string or a compiled regex"),
        ({"lr": 1e-3, "rules": 5}, "rules must be a mapping"),
    ],
)
def test_bad_options(kwargs, message):
    with pytest.raises(LoraPlusError, match=message):
        LoraPlus(torch.optim.AdamW, tiny_lora_model(), **kwargs)


def test_ratio_below_one_warns():
    with pytest.warns(UserWarning, match="ratio=0.5 < 1"):
        groups = param_groups(tiny_lora_model(), lr=1.0, ratio=0.5)
    assert {g["role"]: g["lr"] for g in groups}["B"] == 0.5


def _sgd(model):
    return torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=1.0)


@pytest.mark.parametrize(
    "call, than",
    [
        (lambda m, r: param_groups(m, lr=1.0, ratio=r), "A"),
        (lambda m, r: LoraPlus(torch.optim.SGD, m, r, lr=1.0), "A"),
        (lambda m, r: explain(m, ratio=r), "A"),
        (lambda m, r: loraplus.apply_to_groups([p for p in m.parameters() if p.requires_grad], m, r, lr=1.0), "their group"),
        (lambda m, r: loraplus.apply_to_optimizer(_sgd(m), m, r, schedulers=[]), "their group"),
    ],
    ids=["param_groups", "LoraPlus", "explain", "refine", "apply"],
)
def test_ratio_below_one_warns_once_per_call_at_the_callers_line(call, than):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        call(tiny_lora_model(), 0.5)
        call(tiny_lora_model(), 1.0)
    below = [w for w in caught if "< 1" in str(w.message)]
    assert [str(w.message) for w in below] == [
        f"ratio=0.5 < 1 gives the B factors a smaller learning rate than {than}; LoRA+ uses ratio >= 1 "
        "(the paper recommends 2-16)"
    ]
    assert below[0].category is UserWarning and below[0].filename == __file__  # the user's line, not loraplus's


def test_no_trainable_parameters():
    model = tiny_lora_model().requires_grad_(False)
    with pytest.raises(LoraPlusError, match="no trainable parameters"):
        LoraPlus(torch.optim.AdamW, model, lr=1e-3)


def test_no_adapters_found_says_what_was_found_and_how_to_fix():
    model = nn.Sequential(nn.Linear(4, 4), nn.LayerNorm(4))
    with pytest.raises(LoraPlusError) as err:
        LoraPlus(torch.optim.AdamW, model, lr=1e-3)
    msg = str(err.value)
    assert "no LoRA adapter parameters found among 4 trainable tensors: other: 4" in msg
    assert "First trainable names: 0.weight, 0.bias, 1.weight, 1.bias" in msg
    assert "PEFT" in msg and "DeepSpeed-Chat" in msg and "NeMo" in msg and "rules=" in msg


def test_a_without_b_and_the_reverse():
    model = tiny_lora_model()
    for p_name, p in model.named_parameters():
        if ".lora_B." in p_name:
            p.requires_grad_(False)
    with pytest.raises(LoraPlusError, match=r"found A factors but no B factor \(A: 2, other: 4\)"):
        LoraPlus(torch.optim.AdamW, model, lr=1e-3)
    model = tiny_lora_model()
    for p_name, p in model.named_parameters():
        if ".lora_A." in p_name:
            p.requires_grad_(False)
    with pytest.raises(LoraPlusError, match="found B factors but no A factor"):
        LoraPlus(torch.optim.AdamW, model, lr=1e-3)


def test_lbfgs_rejected_before_building():
    with pytest.raises(LoraPlusError, match="LBFGS does not support per-parameter options"):
        LoraPlus(torch.optim.LBFGS, tiny_lora_model(), lr=1.0)
    with pytest.raises(LoraPlusError, match="LBFGS does not support"):
        LoraPlus(functools.partial(torch.optim.LBFGS, max_iter=3), tiny_lora_model(), lr=1.0)


def test_optimizer_errors_get_context():
    with pytest.raises(LoraPlusError, match=r"AdamW could not be built over the LoRA\+ groups \[A \(2 tensors\).*TypeError"):
        LoraPlus(torch.optim.AdamW, tiny_lora_model(), lr=1e-3, not_an_option=1)
    with pytest.raises(LoraPlusError, match="optimizer_cls must be an optimizer class"):
        LoraPlus("AdamW", tiny_lora_model(), lr=1e-3)
    with pytest.raises(LoraPlusError, match="do not pass params="):
        LoraPlus(torch.optim.AdamW, tiny_lora_model(), lr=1e-3, params=[])
    with pytest.raises(LoraPlusError, match="expected a torch.nn.Module, got dict"):
        LoraPlus(torch.optim.AdamW, {}, lr=1e-3)


def test_error_is_a_value_error():
    assert issubclass(LoraPlusError, ValueError)


# --------------------------------------------------------------------------- explain


def test_explain_model_and_optimizer():
    model = tiny_lora_model()
    text = explain(model, lr=2e-4, ratio=16, weight_decay=0.01, verbose=True)
    assert "LoRA+ groups (ratio 16, lr 0.0002)" in text
    assert re.search(r"^B\s+B\s+0\.0032\s+0\.01\s+2\s+32\s+layers\.0\.lora_B\.default\.weight$", text, re.M)
    assert "tensors per role: A 2, B 2, other 4" in text
    assert "frozen (not in the optimizer): 4 tensors" in text
    assert re.search(r"^head\.bias\s+other\s+no\s+not an adapter factor$", text, re.M)
    rel = explain(model, ratio=8)
    assert re.search(r"^B\s+B\s+8·lr\s+default", rel, re.M)
    opt = LoraPlus(torch.optim.AdamW, model, 16, lr=2e-4, weight_decay=0.01)
    text = explain(opt, verbose=True)
    assert text.startswith("AdamW param groups")
    assert re.search(r"^B\s+B\s+0\.0032\s+0\.01\s+2\s+32", text, re.M)
    with pytest.raises(LoraPlusError, match="explain\\(\\) takes a model or an optimizer"):
        explain(42)


@pytest.mark.parametrize(
    "option",
    [{"lr": 2e-4}, {"ratio": 16}, {"ratio": loraplus.DEFAULT_RATIO}, {"lr_embedding": 1e-4}, {"role_lr": {"A": 1e-4}},
     {"weight_decay": 0.0}, {"rules": {"*lora_B*": "B"}}, {"no_decay": "norm"}],
)
def test_explain_refuses_grouping_options_with_an_optimizer_instead_of_ignoring_them(option):
    model = tiny_lora_model()
    opt = LoraPlus(torch.optim.AdamW, model, 16, lr=2e-4)
    (name,) = option
    with pytest.raises(LoraPlusError, match=rf"explain\(\) got {name}= with an optimizer \(AdamW\).*already built.*"
                       rf"explain\(optimizer\) without them.*explain\(model, {name}=\.\.\.\)"):
        explain(opt, **option)
    assert explain(opt, verbose=True).startswith("AdamW param groups")  # verbose applies to both
    assert explain(model).startswith(f"LoRA+ groups (ratio {loraplus.DEFAULT_RATIO:g}, ")  # the model's default


PUBLIC_API = {
    "DEFAULT_RATIO", "LoraPlus", "LoraPlusError", "Monitor", "Role", "apply_to_groups", "apply_to_optimizer",
    "classify", "explain", "find_lr", "load_optimizer_state", "pairs", "param_groups", "precondition",
    "scheduler_bounds",
}


def test_public_api_is_exactly_the_documented_names():
    assert set(loraplus.__all__) == PUBLIC_API
    assert len(loraplus.__all__) == len(PUBLIC_API)
    for name in loraplus.__all__:
        assert hasattr(loraplus, name)
    # a plain float: no sentinel subclass whose spelling changes behaviour
    assert type(loraplus.DEFAULT_RATIO) is float and loraplus.DEFAULT_RATIO == 4.0


def test_no_heavy_imports_at_runtime():
    import subprocess
    import sys

    code = "import sys, loraplus; bad = [m for m in ('transformers', 'peft', 'hypothesis') if m in sys.modules]; print(bad)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == "[]"


def test_warnings_free_on_normal_use():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        LoraPlus(torch.optim.AdamW, tiny_lora_model(), 16, lr=1e-3, weight_decay=0.01)


# --------------------------------------------------------------------------- review regressions


def test_every_family_gets_one_ratio_and_one_b_group():
    """Finding: per-family default ratios made `ratio=4.0` differ from the default and changed the groups."""
    layers = [
        {"conv": conv, "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": False}
        for conv in ("peft", "peft_dora", "peft_loha", "peft_vera", "torchtune_dora")
    ]
    model = build_model(layers, head=False, norm=False).model
    default = param_groups(model, lr=1.0)
    spelled = param_groups(model, lr=1.0, ratio=4.0)
    strip = lambda gs: [{k: v for k, v in g.items() if k != "params"} for g in gs]  # noqa: E731
    assert strip(default) == strip(spelled)
    b_groups = [g for g in default if g["role"] == "B"]
    assert [g["name"] for g in b_groups] == ["B"] and b_groups[0]["lr"] == 4.0
    # the B factors of all five families, by how the model was built
    assert len(b_groups[0]["params"]) == 1 + 1 + 2 + 1 + 1


def test_rules_may_be_lists_as_loaded_from_yaml():
    roles = classify(tiny_lora_model(), [["*.lora_A.*", "A"], ["*.lora_B.*", "B"]])
    assert roles["layers.0.lora_A.default.weight"] is Role.A


def test_explain_refuses_absolute_rates_shown_relative():
    with pytest.raises(LoraPlusError, match="role_lr and lr_embedding are absolute learning rates: pass lr="):
        explain(tiny_lora_model(), role_lr={"other": 1e-4})
    assert "0.0001" in explain(tiny_lora_model(), lr=1e-3, role_lr={"other": 1e-4})


def test_public_helpers_raise_loraplus_error():
    from loraplus.compat import create_loraplus_optimizer, peft_param_groups
    from loraplus.testing import lora_models

    model = tiny_lora_model()
    groups = param_groups(model, lr=1.0)
    with pytest.raises(LoraPlusError, match="needs where="):
        loraplus.groups.split_groups(groups, None)
    with pytest.raises(LoraPlusError, match="takes a list of param groups"):
        loraplus.groups.split_groups(model, lambda n, p: True)
    with pytest.raises(LoraPlusError, match=r"group\(s\) \[0\] are not dicts"):
        loraplus.groups.split_groups([{"lr": 1.0}], lambda n, p: True)
    opt = LoraPlus(torch.optim.AdamW, model, lr=1.0)
    with pytest.raises(LoraPlusError, match="'param_groups' must be a list of dicts"):
        loraplus.load_optimizer_state(opt, {"state": {}, "param_groups": None})
    with pytest.raises(LoraPlusError, match="expected a torch.nn.Module, got dict"):
        peft_param_groups({}, lr=1.0, loraplus_lr_ratio=2.0)
    with pytest.raises(LoraPlusError, match=r"could not be built over PEFT's LoRA\+ groups \[groupA \(3 tensors\).*\]: TypeError"):
        create_loraplus_optimizer(model, torch.optim.AdamW, lr=1.0, loraplus_lr_ratio=2.0, bogus=1)
    with pytest.raises(LoraPlusError, match="conventions must be a non-empty subset"):
        lora_models(("nope",))
    with pytest.raises(LoraPlusError, match="unknown wrapper 'x'"):
        build_model([], wrapper="x")
    with pytest.raises(LoraPlusError, match="model must be an nn.Module"):
        assert_loraplus_groups([], "x")


def test_group_roles_are_read_through_role_and_written_as_before():
    from loraplus._role import group_role

    assert [group_role(g) for g in ({"role": "B"}, {"role": "b"}, {"role": Role.A}, {"role": "embedding_a"})] == [
        Role.B, Role.B, Role.A, Role.EMBEDDING_A
    ]
    assert [group_role(g) for g in ({}, {"role": None}, {"role": "decoder"}, {"role": 3})] == [None] * 4
    model = tiny_lora_model()
    opt = LoraPlus(torch.optim.SGD, model, lr=1e-3, ratio=4)
    # what users see is unchanged: the plain strings, not Role members' reprs
    assert [g["role"] for g in opt.param_groups] == ["A", "B", "other", "other"]
    assert all(type(g["role"]) is str for g in opt.param_groups)
    # readers compare through Role: a hand-written lower-case role is the same role
    groups = [{"params": [p], "lr": lr, "role": role} for p, lr, role in zip(
        [p for p in model.parameters() if p.requires_grad][:2], [1e-3, 4e-3], ["a", "b"])]
    assert loraplus.scheduler_bounds(torch.optim.SGD(groups, lr=1e-3), 1.0) == [1.0, 4.0]
    with pytest.raises(LoraPlusError, match="is a LoRA\\+ 'B' group"):
        loraplus.apply_to_groups(groups, model)
