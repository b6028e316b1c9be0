"""loraplus.apply_to_groups and loraplus.apply_to_optimizer: LoRA+ on param groups and optimizers the caller built.

Ground truth comes from how each test built its groups and from the model generator's own
statement of every parameter's role (``GeneratedModel.expected``), never from loraplus's labeller.
Schedulers are checked against a twin optimizer + scheduler that never saw loraplus: at every
step a B factor's lr must be ratio × what its group has in the twin, every other parameter's the same.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as S

import loraplus
from loraplus import LoraPlusError, Role
from loraplus.testing import lora_models, tiny_lora_model

pytestmark = pytest.mark.filterwarnings("ignore:LoRA+ may not do what you expect:UserWarning")

# the keys refine adds; everything else a group carries must reach each of its parameters unchanged
_BOOKKEEPING = {"params", "param_names", "name", "role", "loraplus"}
_SCALED = {"lr", "initial_lr", "max_lr", "min_lr"}


def _is_b(name: str) -> bool:
    return ".lora_B." in name  # tiny_lora_model is PEFT-named


def _trainable(model):
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def _index(params, p) -> int:
    return next(k for k, q in enumerate(params) if q is p)


def _where(groups) -> dict[int, tuple[int, dict]]:
    """{id(param): (group index, group)}; fails if a parameter sits in two groups."""
    out: dict[int, tuple[int, dict]] = {}
    for i, g in enumerate(groups):
        for p in g["params"]:
            assert id(p) not in out, "a parameter is in two groups"
            out[id(p)] = (i, g)
    return out


# --------------------------------------------------------------------------- the property


@st.composite
def _partitions(draw, gm):
    """A random partition of gm's trainable parameters into 1-4 groups with random options."""
    named = _trainable(gm.model)
    k = draw(st.integers(1, min(4, len(named))))
    owner = draw(st.lists(st.integers(0, k - 1), min_size=len(named), max_size=len(named)))
    with_names = draw(st.booleans())
    groups = []
    for i in range(k):
        members = [(n, p) for (n, p), o in zip(named, owner) if o == i]
        if not members:
            continue
        group = {
            "params": [p for _, p in members],
            "lr": draw(st.floats(1e-6, 1e-1)),
            "weight_decay": draw(st.sampled_from([0.0, 1e-4, 0.01, 0.1])),
            "betas": (draw(st.floats(0.5, 0.95)), 0.999),
            "custom": draw(st.text("abcxyz", max_size=3)),  # a key a framework reads
        }
        if draw(st.booleans()):
            group["initial_lr"] = group["lr"] * 2
        if draw(st.booleans()):
            group["name"] = f"g{i}_{draw(st.text('pq', max_size=2))}"
        if with_names:
            group["param_names"] = [n for n, _ in members]
        groups.append(group)
    return groups


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(data=st.data(), gm=lora_models(), ratio=st.floats(1.0, 64.0))
def test_every_parameter_keeps_its_groups_options_and_b_gets_ratio_times_its_lr(data, gm, ratio):
    groups = data.draw(_partitions(gm))
    before = copy.copy([dict(g) for g in groups])
    names = {id(p): n for n, p in gm.model.named_parameters()}
    has_b = any(gm.expected[n] is Role.B for n, _ in _trainable(gm.model))
    if not has_b:
        with pytest.raises(LoraPlusError, match="holds a LoRA B factor"):
            loraplus.apply_to_groups(groups, gm.model, ratio, rules=gm.rules)
        return
    out = loraplus.apply_to_groups(groups, gm.model, ratio, rules=gm.rules)
    assert [dict(g) for g in groups] == before  # the input is not modified
    assert all(g["params"] for g in out)  # no empty groups
    where = _where(out)
    assert len(where) == sum(len(g["params"]) for g in groups)  # every parameter, once
    parents = [g.get("name", f"group{i}") for i, g in enumerate(groups)]
    for i, g in enumerate(groups):
        for j, p in enumerate(g["params"]):
            name = names[id(p)]
            _, got = where[id(p)]
            want_b = gm.expected[name] is Role.B
            factor = ratio if want_b else 1.0
            assert got["name"] == parents[i] + (".B" if want_b else ""), name
            for key, value in g.items():
                if key in _BOOKKEEPING:
                    continue
                if key in _SCALED:
                    assert math.isclose(got[key], value * factor, rel_tol=1e-12), (name, key)
                else:
                    assert got[key] == value, (name, key)
            assert set(got) - _BOOKKEEPING == set(g) - _BOOKKEEPING, name  # no option added or lost
            if "param_names" in g:
                assert got["param_names"][_index(got["params"], p)] == g["param_names"][j]
            else:  # filled in from the model: every parameter here is the model's
                assert got["param_names"][_index(got["params"], p)] == name
    # deterministic order: each parent (if it kept anything) then its sibling, in input order
    order = [g["loraplus"]["parent"] for g in out]
    assert order == sorted(order, key=parents.index)
    assert [g["name"] for g in out] == [
        n for p in parents for n in (p, p + ".B") if any(g["name"] == n for g in out)
    ]


# --------------------------------------------------------------------------- refine, by example


def _decay_split(model, lr=1e-3, **extra):
    decay = [p for n, p in _trainable(model) if p.ndim == 2]
    rest = [p for n, p in _trainable(model) if p.ndim < 2]
    return [{"params": decay, "weight_decay": 0.01, "lr": lr, **extra}, {"params": rest, "weight_decay": 0.0, "lr": lr}]


def test_refine_takes_a_plain_parameter_list_as_one_group():
    model = tiny_lora_model()
    out = loraplus.apply_to_groups((p for p in model.parameters() if p.requires_grad), model, 4, lr=1e-3)
    assert [(g["name"], g.get("lr")) for g in out] == [("group0", None), ("group0.B", 4e-3)]  # parent: the default
    assert all(_is_b(n) == (g["name"] == "group0.B") for g in out for n in g["param_names"])


def test_refine_without_lr_uses_lr_argument_only_for_the_sibling():
    model = tiny_lora_model()
    out = loraplus.apply_to_groups([{"params": [p for p in model.parameters() if p.requires_grad]}], model, 4, lr=1e-3)
    assert "lr" not in out[0] and out[1]["lr"] == 4e-3  # the parent keeps the optimizer's default lr
    with pytest.raises(LoraPlusError, match=r"group 0 \('group0'\) has no numeric learning rate"):
        loraplus.apply_to_groups([{"params": [p for p in model.parameters() if p.requires_grad]}], model, 4)


def test_scheduler_bounds_in_the_groups_are_scaled_and_named_keys_kept():
    model = tiny_lora_model()
    groups = _decay_split(model, initial_lr=1e-3, max_lr=1e-2, min_lr=1e-5, base_lr=7.0, layer=3)
    out = {g["name"]: g for g in loraplus.apply_to_groups(groups, model, 8)}
    b = out["group0.B"]
    assert (b["lr"], b["initial_lr"], b["max_lr"], b["min_lr"]) == pytest.approx((8e-3, 8e-3, 8e-2, 8e-5))
    assert b["base_lr"] == 7.0 and b["layer"] == 3 and b["weight_decay"] == 0.01  # not a scaled key
    assert b["role"] == "B" and b["loraplus"] == {"parent": "group0", "scale": 8.0}
    assert out["group0"]["loraplus"] == {"parent": "group0", "scale": 1.0} and "role" not in out["group0"]


def test_foreign_parameters_stay_in_their_group_and_names_are_not_invented():
    model = tiny_lora_model()
    foreign = torch.nn.Parameter(torch.zeros(3))
    groups = [{"params": [foreign, *[p for p in model.parameters() if p.requires_grad]], "lr": 1e-3}]
    out = loraplus.apply_to_groups(groups, model, 4)
    assert out[0]["params"][0] is foreign and "param_names" not in out[0]
    assert [g["name"] for g in out] == ["group0", "group0.B"]


def test_embedding_factors_keep_their_groups_rate_unless_lr_embedding_is_given():
    peft = pytest.importorskip("peft")
    base = torch.nn.Sequential()
    base.add_module("emb", torch.nn.Embedding(10, 8))
    base.add_module("proj", torch.nn.Linear(8, 8))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["emb", "proj"]))
    params = [p for p in model.parameters() if p.requires_grad]
    plain = loraplus.apply_to_groups([{"params": params, "lr": 1e-3}], model, 4)
    assert [g["name"] for g in plain] == ["group0", "group0.B"]  # as LoraPlus: embeddings at the group's lr
    assert not any("embedding" in n for n in plain[1]["param_names"])
    emb = loraplus.apply_to_groups([{"params": params, "lr": 1e-3}], model, 4, lr_embedding=1e-6)
    assert [(g["name"], g["lr"]) for g in emb] == [
        ("group0", 1e-3), ("group0.B", 4e-3), ("group0.embedding_A", 1e-6), ("group0.embedding_B", 1e-6),
    ]  # fmt: skip
    mag = loraplus.apply_to_groups([{"params": params, "lr": 1e-3}], model, 4, role_lr={Role.A: 2e-3})
    assert [(g["name"], g["lr"]) for g in mag] == [("group0", 1e-3), ("group0.A", 2e-3), ("group0.B", 8e-3)]


# --------------------------------------------------------------------------- refusals


def test_a_parameter_in_two_groups_is_refused():
    model = tiny_lora_model()
    b = model.layers[0].lora_B["default"].weight
    with pytest.raises(LoraPlusError, match=r"layers\.0\.lora_B\.default\.weight sits in group 0 \('group0'\) and in group 1"):
        loraplus.apply_to_groups([{"params": [b], "lr": 1e-3}, {"params": [b], "lr": 1e-3}], model)
    with pytest.raises(LoraPlusError, match="sits in group 0 .* twice"):
        loraplus.apply_to_groups([{"params": [b, b], "lr": 1e-3}], model)


def test_groups_without_any_b_factor_of_the_model_are_refused():
    model = tiny_lora_model()
    a_only = [p for n, p in _trainable(model) if not _is_b(n)]
    with pytest.raises(LoraPlusError, match=r"none of the 1 param group\(s\) holds a LoRA B factor of this model"):
        loraplus.apply_to_groups([{"params": a_only, "lr": 1e-3}], model)
    other = tiny_lora_model()  # the B factors of another model
    with pytest.raises(LoraPlusError, match="holds a LoRA B factor"):
        loraplus.apply_to_groups([p for p in other.parameters() if p.requires_grad], model, lr=1e-3)


def test_loraplus_groups_and_refined_groups_are_refused():
    model = tiny_lora_model()
    with pytest.raises(LoraPlusError, match="is a LoRA\\+ 'B' group"):
        loraplus.apply_to_groups(loraplus.param_groups(model, lr=1e-3), model)
    once = loraplus.apply_to_groups(_decay_split(model), model)
    with pytest.raises(LoraPlusError, match="already LoRA\\+-refined"):
        loraplus.apply_to_groups(once, model)


def test_what_is_not_param_groups_is_refused():
    model = tiny_lora_model()
    with pytest.raises(LoraPlusError, match="apply_to_groups takes a list of param groups"):
        loraplus.apply_to_groups(model, model)
    with pytest.raises(LoraPlusError, match="empty list"):
        loraplus.apply_to_groups([], model)
    with pytest.raises(LoraPlusError, match="not a mix"):
        loraplus.apply_to_groups([{"params": []}, next(model.parameters())], model)
    with pytest.raises(LoraPlusError, match="ratio must be a number"):
        loraplus.apply_to_groups(_decay_split(model), model, "4")


# --------------------------------------------------------------------------- named parameters (torch >= 2.6)


def _pairs(params_by_torch: dict) -> set[tuple[str, int]]:
    return {(n, id(p)) for g in params_by_torch for n, p in zip(g["param_names"], g["params"], strict=True)}


def _aligned(groups, model) -> None:
    """Every group names its parameters, each with the model's own name for it (ground truth: the model)."""
    truth = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        assert [truth[id(p)] for p in g["params"]] == g["param_names"], g["name"]


def test_refine_takes_named_parameters_as_torch_does():
    """torch optimizers take model.named_parameters() (one group) and groups of (name, param) pairs and
    keep the names as param_names; refine takes the same input, and the names stay with their parameter."""
    model = tiny_lora_model()
    reference = torch.optim.AdamW(model.named_parameters(), lr=1e-3)  # what torch builds from the same input
    out = loraplus.apply_to_groups(model.named_parameters(), model, 4, lr=1e-3)
    assert [g["name"] for g in out] == ["group0", "group0.B"]
    assert _pairs(out) == _pairs(reference.param_groups)
    assert all(_is_b(n) == (g["name"] == "group0.B") for g in out for n in g["param_names"])
    _aligned(out, model)
    torch.optim.AdamW(out, lr=1e-3)  # torch takes the result

    trainable = _trainable(model)
    split = [
        {"params": [(n, p) for n, p in trainable if p.ndim == 2], "weight_decay": 0.01, "lr": 1e-3},
        {"params": [(n, p) for n, p in trainable if p.ndim < 2], "weight_decay": 0.0, "lr": 1e-3},
    ]
    reference = torch.optim.AdamW(copy.deepcopy(split), lr=1e-3).param_groups
    out = loraplus.apply_to_groups(split, model, 4)
    assert [(g["name"], g["lr"], g["weight_decay"]) for g in out] == [
        ("group0", 1e-3, 0.01), ("group0.B", 4e-3, 0.01), ("group1", 1e-3, 0.0),
    ]  # fmt: skip
    for i, ref in enumerate(reference):  # each input group's (name, param) pairs, split between it and its sibling
        mine = [g for g in out if g["loraplus"]["parent"] == f"group{i}"]
        assert {(n, tuple(p.shape)) for n, p in zip(ref["param_names"], ref["params"])} == {
            (n, tuple(p.shape)) for g in mine for n, p in zip(g["param_names"], g["params"], strict=True)
        }
    _aligned(out, model)
    opt = torch.optim.AdamW(out, lr=1e-3)

    built_named = torch.optim.AdamW(model.named_parameters(), lr=1e-3)  # torch turned the pairs into param_names
    loraplus.apply_to_optimizer(built_named, model, 4)
    assert [(g["name"], g["lr"]) for g in built_named.param_groups] == [("group0", 1e-3), ("group0.B", 4e-3)]
    _aligned(built_named.param_groups, model)
    assert [g["param_names"] for g in opt.param_groups] == [g["param_names"] for g in out]


def test_pairs_and_bare_parameters_in_one_group_are_refused_as_torch_refuses():
    model = tiny_lora_model()
    (na, a), (nb, b) = _trainable(model)[:2]
    for mixed in ([(na, a), b], [{"params": [(na, a), b], "lr": 1e-3}]):
        with pytest.raises(ValueError, match="should be with/without names"):
            torch.optim.AdamW(copy.deepcopy(mixed), lr=1e-3)  # torch refuses the same input (and edits it)
        with pytest.raises(LoraPlusError, match=r"mixes \(name, parameter\) pairs \(items \[0\]\) with bare "
                           r"parameters \(items \[1\]\)"):  # fmt: skip
            loraplus.apply_to_groups(mixed, model, lr=1e-3)
    with pytest.raises(LoraPlusError, match=r"item 0 is a tuple of \('Parameter', 'str'\), not a \(name, parameter\)"):
        loraplus.apply_to_groups([(a, na)], model, lr=1e-3)
    with pytest.raises(LoraPlusError, match=r"names its parameters twice.*item 0: param_names 'x', pair"):
        loraplus.apply_to_groups([{"params": [(na, a)], "param_names": ["x"], "lr": 1e-3}], model)


def test_named_groups_next_to_unnamed_ones_get_the_models_names():
    """torch refuses named and unnamed groups in one optimizer; refine names the unnamed ones from the
    model, and refuses when a parameter there is not the model's (it has no name to give)."""
    model = tiny_lora_model()
    trainable = _trainable(model)
    groups = [
        {"params": [(n, p) for n, p in trainable if p.ndim == 2], "lr": 1e-3},
        {"params": [p for n, p in trainable if p.ndim < 2], "lr": 1e-3},
    ]
    with pytest.raises(ValueError, match="with/without names"):
        torch.optim.AdamW(copy.deepcopy(groups))
    out = loraplus.apply_to_groups(groups, model, 4)
    _aligned(out, model)
    torch.optim.AdamW(out)
    groups[1]["params"].append(torch.nn.Parameter(torch.zeros(3)))
    with pytest.raises(LoraPlusError, match=r"group 1 \('group1'\) does not, and holds a parameter that is not"):
        loraplus.apply_to_groups(groups, model, 4)


# --------------------------------------------------------------------------- group names


def test_a_name_already_taken_is_refused_with_both_groups_named():
    model = tiny_lora_model()
    trainable = _trainable(model)
    one = [p for n, p in trainable if n == "head.bias"]  # not a B factor: it stays in its group
    others = [p for n, p in trainable if n != "head.bias"]  # the B factors among them move to a sibling
    cases = {
        "dec.B": ([("dec", others), ("dec.B", one)], r"the B sibling of input group 0 \(named 'dec'\) and input "
                  r"group 1 \(named 'dec.B'\)"),
        "group0.B": ([(None, others), ("group0.B", one)], r"the B sibling of input group 0 \(unnamed, so 'group0'\) "
                     r"and input group 1 \(named 'group0.B'\)"),
        "group1": ([("group1", others), (None, one)], r"input group 0 \(named 'group1'\) and input group 1 "
                   r"\(unnamed, so 'group1'\)"),
        "x": ([("x", others), ("x", one)], r"input group 0 \(named 'x'\) and input group 1 \(named 'x'\)"),
    }  # fmt: skip
    for taken, (spec, where) in cases.items():
        groups = [{"params": ps, "lr": 1e-3, **({} if n is None else {"name": n})} for n, ps in spec]
        with pytest.raises(LoraPlusError, match=rf"apply_to_groups would give two groups the name '{taken}': {where}"):
            loraplus.apply_to_groups(groups, model, 4)
        opt = torch.optim.AdamW(copy.copy(groups))
        before = [dict(g) for g in opt.param_groups]
        with pytest.raises(LoraPlusError, match=rf"apply_to_optimizer would give two groups the name '{taken}'"):
            loraplus.apply_to_optimizer(opt, model, 4)
        assert [dict(g) for g in opt.param_groups] == before  # nothing changed


_NAMES = st.sampled_from([None, "dec", "dec.B", "group0", "group0.B", "group1", "group1.B", "x"])


@settings(max_examples=80, deadline=None)
@given(names=st.lists(_NAMES, min_size=1, max_size=3), owner=st.lists(st.integers(0, 2), min_size=8, max_size=8))
def test_group_names_come_out_unique_or_refine_refuses(names, owner):
    """Expected names from the test's own grouping: '<name or group<i>>' for a group keeping any
    non-B parameter, then '<name>.B' when it holds a B factor; a repeated one must be refused."""
    model = tiny_lora_model()
    trainable = _trainable(model)
    assert len(trainable) == len(owner)
    members = [[(n, p) for (n, p), o in zip(trainable, owner) if o % len(names) == i] for i in range(len(names))]
    kept = [(name, ms) for name, ms in zip(names, members) if ms]
    groups = [{"params": [p for _, p in ms], "lr": 1e-3, **({} if nm is None else {"name": nm})} for nm, ms in kept]
    expected = []
    for i, (nm, ms) in enumerate(kept):
        base = f"group{i}" if nm is None else nm
        expected += [base] * any(not _is_b(n) for n, _ in ms) + [base + ".B"] * any(_is_b(n) for n, _ in ms)
    if len(set(expected)) < len(expected):
        with pytest.raises(LoraPlusError, match="would give two groups the name"):
            loraplus.apply_to_groups(groups, model, 4)
    else:
        assert [g["name"] for g in loraplus.apply_to_groups(groups, model, 4)] == expected


def _opt(model, **kw):
    return torch.optim.AdamW(_decay_split(model), **kw)


def test_apply_twice_is_refused():
    model = tiny_lora_model()
    opt = loraplus.apply_to_optimizer(_opt(model), model, 4)
    with pytest.raises(LoraPlusError, match="loraplus.apply_to_optimizer was already called on this optimizer"):
        loraplus.apply_to_optimizer(opt, model, 4)


def test_existing_state_stays_with_each_parameter():
    """torch keys state by parameter: Adagrad's initial sums (and momenta after a step) move with their
    parameter to its new group, the very same objects."""
    model = tiny_lora_model()
    opt = torch.optim.Adagrad(_decay_split(model), lr=0.1, initial_accumulator_value=0.5)
    model(torch.randn(4, 8)).sum().backward()
    opt.step()
    before = {id(p): opt.state[p] for g in opt.param_groups for p in g["params"]}
    loraplus.apply_to_optimizer(opt, model)
    after = {id(p): opt.state[p] for g in opt.param_groups for p in g["params"]}
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    opt.step()  # and it keeps stepping
    opt.state[object()] = {}
    with pytest.raises(LoraPlusError, match="already called"):
        loraplus.apply_to_optimizer(opt, model)


def test_state_not_keyed_by_a_parameter_is_refused():
    model = tiny_lora_model()
    opt = _opt(model)
    opt.state["step"] = 3
    with pytest.raises(LoraPlusError, match=r"1 entr\(y/ies\) not keyed by one of its parameters \(e.g. str\)"):
        loraplus.apply_to_optimizer(opt, model)
    assert "loraplus" not in opt.param_groups[0]  # nothing changed


def test_apply_refuses_a_parameter_in_two_groups_and_no_b_factor():
    model = tiny_lora_model()
    opt = _opt(model)
    opt.param_groups[1]["params"].append(opt.param_groups[0]["params"][0])  # torch checks this only when adding
    with pytest.raises(LoraPlusError, match="sits in group 0 .* and in group 1"):
        loraplus.apply_to_optimizer(opt, model)
    a_only = torch.optim.SGD([p for n, p in _trainable(model) if not _is_b(n)], lr=0.1)
    with pytest.raises(LoraPlusError, match="apply_to_optimizer: none of the 1 param group"):
        loraplus.apply_to_optimizer(a_only, model)


def test_apply_refuses_an_attached_scheduler_it_was_not_given():
    model = tiny_lora_model()
    opt = _opt(model, lr=1e-3)
    S.LinearLR(opt, start_factor=0.5)
    with pytest.raises(LoraPlusError, match=r"carry 'initial_lr'.*schedulers=\[scheduler\]"):
        loraplus.apply_to_optimizer(opt, model)
    loraplus.apply_to_optimizer(opt, model, schedulers=[])  # said explicitly: nothing to extend


def test_apply_refuses_a_scheduler_of_another_optimizer_or_a_stale_one():
    model = tiny_lora_model()
    opt, other = _opt(model, lr=1e-3), _opt(tiny_lora_model(), lr=1e-3)
    with pytest.raises(LoraPlusError, match=r"schedulers\[0\] \(LinearLR\) is attached to another optimizer"):
        loraplus.apply_to_optimizer(opt, model, schedulers=[S.LinearLR(other)])
    stale = S.LinearLR(opt)
    stale.base_lrs = stale.base_lrs[:1]
    with pytest.raises(LoraPlusError, match=r"has 1 base_lrs for 2 param groups"):
        loraplus.apply_to_optimizer(opt, model, schedulers=[stale])


def test_apply_returns_the_optimizer_and_explain_prints_it():
    model = tiny_lora_model()
    opt = _opt(model, lr=1e-3)
    assert loraplus.apply_to_optimizer(opt, model, 16) is opt
    text = loraplus.explain(opt)
    assert "group0.B" in text and "0.016" in text and "layers.0.lora_B.default.weight" in text
    assert [g["name"] for g in opt.param_groups] == ["group0", "group0.B", "group1"]


# --------------------------------------------------------------------------- schedulers attached before apply


def _twins(make_sched, ratio=8.0, opt_cls=torch.optim.SGD, **opt_kw):
    """(optimizer + scheduler with LoRA+ applied, the same pair without it, model)."""
    out = []
    for _ in range(2):
        model = tiny_lora_model()
        opt = opt_cls(_decay_split(model, lr=1e-2), **opt_kw)
        sched = make_sched(opt)
        out.append((model, opt, sched))
    (model, opt, sched), (_, ref, ref_sched) = out
    loraplus.apply_to_optimizer(opt, model, ratio, schedulers=[sched])
    return model, opt, sched, ref, ref_sched


def _check_steps(model, opt, sched, ref, ref_sched, ratio=8.0, steps=12, metric=None):
    parent = {"group0": 0, "group0.B": 0, "group1": 1}
    for step in range(steps):
        for g in opt.param_groups:
            want = ref.param_groups[parent[g["name"]]]["lr"] * (ratio if g["name"].endswith(".B") else 1.0)
            assert math.isclose(g["lr"], want, rel_tol=1e-9, abs_tol=1e-15), (step, g["name"], g["lr"], want)
        opt.step(), ref.step()
        if metric is None:
            sched.step(), ref_sched.step()
        else:
            sched.step(metric(step)), ref_sched.step(metric(step))
    assert len(sched.get_last_lr()) == len(opt.param_groups)


def _hf(name):
    transformers = pytest.importorskip("transformers")
    return getattr(transformers, name)


SCHEDULERS = {
    "LambdaLR": lambda o: S.LambdaLR(o, lambda t: 1 / (1 + t)),
    "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, T_max=10),
    "OneCycleLR-scalar-max_lr": lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=20),
    "SequentialLR": lambda o: S.SequentialLR(
        o, [S.LinearLR(o, start_factor=0.1, total_iters=3), S.CosineAnnealingLR(o, T_max=8)], milestones=[3]
    ),
    "ChainedScheduler": lambda o: S.ChainedScheduler([S.ExponentialLR(o, 0.9), S.LambdaLR(o, lambda t: 1 + t)]),
    "CyclicLR-lists": lambda o: S.CyclicLR(o, base_lr=[1e-3, 2e-3], max_lr=[1e-2, 3e-2], step_size_up=3),
    "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, T_0=4),
    "transformers-linear-warmup": lambda o: _hf("get_linear_schedule_with_warmup")(o, 2, 12),
    "transformers-cosine-warmup": lambda o: _hf("get_cosine_schedule_with_warmup")(o, 2, 12),
}


@pytest.mark.parametrize("kind", sorted(SCHEDULERS))
def test_a_scheduler_attached_before_apply_keeps_the_ratio_at_every_step(kind):
    momentum = {"momentum": 0.9} if kind.startswith("CyclicLR") else {}
    model, opt, sched, ref, ref_sched = _twins(SCHEDULERS[kind], **momentum)
    if hasattr(sched, "base_lrs"):
        assert sched.base_lrs[1] == pytest.approx(8 * sched.base_lrs[0])
    _check_steps(model, opt, sched, ref, ref_sched)


def test_one_cycle_bounds_live_in_the_groups_and_are_scaled():
    model, opt, sched, ref, ref_sched = _twins(lambda o: S.OneCycleLR(o, max_lr=0.1, total_steps=20), opt_cls=torch.optim.AdamW)
    b = opt.param_groups[1]
    assert (b["max_lr"], b["initial_lr"], b["min_lr"]) == pytest.approx(
        tuple(8 * ref.param_groups[0][k] for k in ("max_lr", "initial_lr", "min_lr"))
    )
    assert b["max_momentum"] == ref.param_groups[0]["max_momentum"]  # not a rate: copied
    _check_steps(model, opt, sched, ref, ref_sched, steps=20)


def test_reduce_on_plateau_per_group_floors_are_extended():
    model, opt, sched, ref, ref_sched = _twins(
        lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=0, min_lr=[1e-3, 1e-4], eps=0.0)
    )
    assert sched.min_lrs == pytest.approx([1e-3, 8e-3, 1e-4])
    _check_steps(model, opt, sched, ref, ref_sched, steps=15, metric=lambda t: 1.0)  # never improves: floors reached


def test_scheduler_state_dict_round_trips_after_apply():
    model, opt, sched, _, _ = _twins(SCHEDULERS["LambdaLR"])
    for _ in range(3):
        opt.step(), sched.step()
    fresh_model, fresh_opt, fresh_sched, _, _ = _twins(SCHEDULERS["LambdaLR"])
    fresh_sched.load_state_dict(sched.state_dict())
    assert fresh_sched.base_lrs == sched.base_lrs and fresh_sched.last_epoch == 3


# --------------------------------------------------------------------------- groups at different rates (layer-wise decay)
# Every example above gives all groups one rate, so a sibling scaled by the first group's rate or by a
# global lr would pass them. Here the three groups hold one LoRA layer each at 1e-3, 3e-4 and 5e-5
# (top layer first, as layer-wise decay lists them) and the optimizer's own lr (2e-3) is none of them.
# Every expected number below is ratio (4) × the parent's number, multiplied out by hand.

_LAYERWISE = {"top": 1e-3, "mid": 3e-4, "bottom": 5e-5}  # group -> lr; top holds layers.2, norm, head
_DEFAULT_LR = 2e-3


def _layerwise_groups(model, **keys_per_group):
    p = dict(model.named_parameters())
    members = {
        "top": ["layers.2.lora_A.default.weight", "layers.2.lora_B.default.weight", "norm.weight", "norm.bias",
                "head.weight", "head.bias"],
        "mid": ["layers.1.lora_A.default.weight", "layers.1.lora_B.default.weight"],
        "bottom": ["layers.0.lora_A.default.weight", "layers.0.lora_B.default.weight"],
    }  # fmt: skip
    return [
        {"params": [p[n] for n in names], "name": g, "lr": _LAYERWISE[g], **keys_per_group.get(g, {})}
        for g, names in members.items()
    ]


def _rates(groups, *keys):
    return {g["name"]: tuple(g[k] for k in keys) for g in groups}


def test_refine_scales_each_sibling_by_its_own_parents_rates():
    model = tiny_lora_model(layers=3)
    bounds = {  # initial_lr = lr, max_lr = 10 × lr, as a scheduler-bounded layer-wise recipe would set them
        "top": {"initial_lr": 1e-3, "max_lr": 1e-2},
        "mid": {"initial_lr": 3e-4, "max_lr": 3e-3},
        "bottom": {"initial_lr": 5e-5, "max_lr": 5e-4},
    }
    out = loraplus.apply_to_groups(_layerwise_groups(model, **bounds), model, 4, lr=_DEFAULT_LR)
    assert [g["name"] for g in out] == ["top", "top.B", "mid", "mid.B", "bottom", "bottom.B"]
    got = _rates(out, "lr", "initial_lr", "max_lr")
    want = {
        "top": (1e-3, 1e-3, 1e-2), "top.B": (4e-3, 4e-3, 4e-2),
        "mid": (3e-4, 3e-4, 3e-3), "mid.B": (1.2e-3, 1.2e-3, 1.2e-2),
        "bottom": (5e-5, 5e-5, 5e-4), "bottom.B": (2e-4, 2e-4, 2e-3),
    }  # fmt: skip
    assert got.keys() == want.keys()
    for name, rates in want.items():
        assert got[name] == pytest.approx(rates, rel=1e-12), name
    assert [g["loraplus"]["parent"] for g in out] == ["top", "top", "mid", "mid", "bottom", "bottom"]


def test_apply_scales_each_sibling_and_its_scheduler_entry_by_its_own_parent():
    """LinearLR(start_factor=0.5) attached before apply: each group starts at half its rate and reaches it after
    4 steps; a sibling must follow ratio × its parent at every step, in the groups and in the scheduler."""
    model = tiny_lora_model(layers=3)
    opt = torch.optim.AdamW(_layerwise_groups(model), lr=_DEFAULT_LR)
    sched = S.LinearLR(opt, start_factor=0.5, total_iters=4)
    loraplus.apply_to_optimizer(opt, model, 4, schedulers=[sched])
    names = ["top", "top.B", "mid", "mid.B", "bottom", "bottom.B"]
    assert [g["name"] for g in opt.param_groups] == names
    full = [1e-3, 4e-3, 3e-4, 1.2e-3, 5e-5, 2e-4]  # each group's rate once warmed up: initial_lr and base_lrs
    assert [g["initial_lr"] for g in opt.param_groups] == pytest.approx(full, rel=1e-12)
    assert sched.base_lrs == pytest.approx(full, rel=1e-12)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([5e-4, 2e-3, 1.5e-4, 6e-4, 2.5e-5, 1e-4], rel=1e-12)
    for _ in range(4):
        opt.step()
        sched.step()
    assert [g["lr"] for g in opt.param_groups] == pytest.approx(full, rel=1e-12)


def test_apply_scales_one_cycle_bounds_per_parent():
    """OneCycleLR with a max_lr per group writes max_lr, initial_lr (max / 25) and min_lr (initial / 1e4) into
    each group; each sibling gets 4 × its own parent's three."""
    model = tiny_lora_model(layers=3)
    opt = torch.optim.AdamW(_layerwise_groups(model), lr=_DEFAULT_LR)
    sched = S.OneCycleLR(opt, max_lr=[1e-2, 3e-3, 5e-4], total_steps=10)
    loraplus.apply_to_optimizer(opt, model, 4, schedulers=[sched])
    got = _rates(opt.param_groups, "max_lr", "initial_lr", "min_lr", "lr")
    want = {
        "top": (1e-2, 4e-4, 4e-8, 4e-4), "top.B": (4e-2, 1.6e-3, 1.6e-7, 1.6e-3),
        "mid": (3e-3, 1.2e-4, 1.2e-8, 1.2e-4), "mid.B": (1.2e-2, 4.8e-4, 4.8e-8, 4.8e-4),
        "bottom": (5e-4, 2e-5, 2e-9, 2e-5), "bottom.B": (2e-3, 8e-5, 8e-9, 8e-5),
    }  # fmt: skip
    assert got.keys() == want.keys()
    for name, rates in want.items():
        assert got[name] == pytest.approx(rates, rel=1e-12), name


# --------------------------------------------------------------------------- wrappers and checkpoints


def test_apply_reaches_through_accelerates_wrapper():
    accelerate = pytest.importorskip("accelerate")
    accelerator = accelerate.Accelerator(cpu=True)
    model = tiny_lora_model()
    opt = torch.optim.AdamW(_decay_split(model), lr=1e-3)
    sched = S.LinearLR(opt, start_factor=0.1, total_iters=4)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    assert loraplus.apply_to_optimizer(opt, model, 4, schedulers=[sched]) is opt
    assert [g["name"] for g in opt.param_groups] == ["group0", "group0.B", "group1"]
    assert opt.optimizer.param_groups is opt.param_groups
    assert sched.scheduler.base_lrs == pytest.approx([1e-3, 4e-3, 1e-3])


def _train(model, opt, steps):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x, y = torch.randn(4, 8, generator=gen), torch.randn(4, 2, generator=gen)
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        opt.zero_grad()


def test_an_apply_built_optimizer_saves_and_loads_into_a_fresh_one():
    def build(seed=0, **kw):
        model = tiny_lora_model(seed=seed)
        with torch.no_grad():
            for n, p in model.named_parameters():
                if _is_b(n):
                    p.normal_(0, 0.1)
        return model, loraplus.apply_to_optimizer(torch.optim.AdamW(_decay_split(model), lr=1e-3), model, 8, **kw)

    model, opt = build()
    _train(model, opt, 3)
    saved, weights = copy.deepcopy(opt.state_dict()), copy.deepcopy(model.state_dict())
    _train(model, opt, 2)

    fresh_model, fresh = build(seed=1)
    fresh_model.load_state_dict(weights)
    loraplus.load_optimizer_state(fresh, saved)
    assert [g["name"] for g in fresh.param_groups] == [g["name"] for g in opt.param_groups]
    assert all("loraplus" in g for g in fresh.param_groups)
    _train(fresh_model, fresh, 2)
    for (n, p), q in zip(model.named_parameters(), fresh_model.parameters()):
        torch.testing.assert_close(p, q, msg=n)

    with pytest.raises(LoraPlusError, match="does not match this optimizer's param groups"):
        loraplus.load_optimizer_state(build(lr_embedding=None, role_lr={Role.A: 2e-3})[1], saved)


def test_apply_on_an_optimizer_with_tensor_learning_rates():
    model = tiny_lora_model()
    opt = torch.optim.Adam(_decay_split(model, lr=torch.tensor(1e-3)))
    loraplus.apply_to_optimizer(opt, model, 4)
    assert isinstance(opt.param_groups[1]["lr"], torch.Tensor)
    assert opt.param_groups[1]["lr"].item() == pytest.approx(4e-3)
    assert opt.param_groups[0]["lr"].item() == pytest.approx(1e-3)  # the parent's tensor is not shared and scaled


# --------------------------------------------------------------------------- each attached scheduler, once


def _norm_at_1e2(model):
    """Two groups: the matrices (A, B, head) at 1e-3 and the norm/bias vectors at 1e-2."""
    named = _trainable(model)
    return [
        {"params": [p for n, p in named if p.ndim == 2], "lr": 1e-3},
        {"params": [p for n, p in named if p.ndim < 2], "lr": 1e-2},
    ]


@pytest.mark.parametrize(
    "listing",
    ["children and parent", "parent twice", "chained and a child"],
)
def test_a_scheduler_listed_twice_or_also_reached_through_its_parent_is_extended_once(listing):
    runs = []
    for _ in range(2):
        model = tiny_lora_model()
        opt = torch.optim.SGD(_norm_at_1e2(model), lr=1e-3)
        if listing == "chained and a child":
            a, b = S.ExponentialLR(opt, 0.9), S.LambdaLR(opt, lambda t: 1 / (1 + t))
            top = S.ChainedScheduler([a, b])
            given = [top, b]
        else:
            a, b = S.LinearLR(opt, start_factor=0.5, total_iters=2), S.CosineAnnealingLR(opt, T_max=10)
            top = S.SequentialLR(opt, [a, b], milestones=[2])
            given = [a, b, top] if listing == "children and parent" else [top, top]
        runs.append((model, opt, top, given))
    (model, opt, top, given), (_, ref, ref_top, _) = runs
    loraplus.apply_to_optimizer(opt, model, 8, schedulers=given)
    assert len(top.get_last_lr()) == 3
    _check_steps(model, opt, top, ref, ref_top, steps=14)
    assert opt.param_groups[2]["lr"] == pytest.approx(ref.param_groups[1]["lr"])  # the norm group: not 8e-3


def test_swalr_built_before_apply_keeps_b_at_ratio_times_its_parent():
    from torch.optim.swa_utils import SWALR

    model, opt, sched, ref, ref_sched = _twins(lambda o: SWALR(o, swa_lr=1e-3, anneal_epochs=3))
    assert [g["swa_lr"] for g in opt.param_groups] == pytest.approx([1e-3, 8e-3, 1e-3])
    _check_steps(model, opt, sched, ref, ref_sched, steps=8)
    assert opt.param_groups[1]["lr"] == pytest.approx(8e-3)  # annealed to ratio x the parent's swa_lr


@pytest.mark.parametrize("given", [None, "none", "another one"])
def test_an_attached_reduce_on_plateau_that_is_not_passed_is_refused_at_apply(given):
    """It writes nothing into the groups; without this, torch fails at its first reduction, hours in."""
    model = tiny_lora_model()
    opt = torch.optim.SGD(_norm_at_1e2(model), lr=1e-3)
    plateau = S.ReduceLROnPlateau(opt, min_lr=[0.0, 1e-5])
    plateau.state_dict()  # Python now keeps its attributes in a __dict__: found through that too
    schedulers = None if given is None else [] if given == "none" else [S.StepLR(opt, 3)]
    with pytest.raises(LoraPlusError, match=r"not in schedulers= \(ReduceLROnPlateau\).*schedulers=\[scheduler"):
        loraplus.apply_to_optimizer(opt, model, 8, schedulers=schedulers)
    assert len(opt.param_groups) == 2, "refused before anything changed"
    loraplus.apply_to_optimizer(opt, model, 8, schedulers=[plateau, *(schedulers or [])])
    assert plateau.min_lrs == pytest.approx([0.0, 0.0, 1e-5])


def test_a_scheduler_attached_to_the_wrapper_is_found_too():
    accelerate = pytest.importorskip("accelerate")
    model = tiny_lora_model()
    opt = accelerate.optimizer.AcceleratedOptimizer(torch.optim.SGD(_norm_at_1e2(model), lr=1e-3))
    plateau = S.ReduceLROnPlateau(opt)
    with pytest.raises(LoraPlusError, match=r"\(ReduceLROnPlateau\)"):
        loraplus.apply_to_optimizer(opt, model, 8, schedulers=[])
    loraplus.apply_to_optimizer(opt, model, 8, schedulers=[plateau])


def test_a_dropped_scheduler_kept_only_by_a_reference_cycle_does_not_count():
    model = tiny_lora_model()
    opt = torch.optim.SGD(_norm_at_1e2(model), lr=1e-3)
    dropped = S.ReduceLROnPlateau(opt)
    dropped.me = dropped  # a cycle: only the garbage collector frees it
    del dropped
    loraplus.apply_to_optimizer(opt, model, 8, schedulers=[])


class _Floors:
    """A hand-rolled scheduler, no torch base class: one floor per group."""

    def __init__(self, optimizer, floor):
        self.optimizer, self.floors = optimizer, [floor] * len(optimizer.param_groups)

    def step(self):
        for g, f in zip(self.optimizer.param_groups, self.floors):
            g["lr"] = max(g["lr"] * 0.5, f)

    def get_last_lr(self):
        return [g["lr"] for g in self.optimizer.param_groups]


def test_an_unknown_scheduler_type_is_refused_until_a_record_describes_it():
    from loraplus.schedulers import Carry, PerGroup, SchedulerRecord

    runs = []
    for _ in range(2):
        model = tiny_lora_model()
        opt = torch.optim.SGD(_norm_at_1e2(model), lr=1e-3)
        runs.append((model, opt, _Floors(opt, 2e-4)))
    (model, opt, sched), (_, ref, ref_sched) = runs
    with pytest.raises(LoraPlusError, match=r"schedulers\[0\] \(.*_Floors\) is not a scheduler loraplus knows.*scheduler_records=\[loraplus.schedulers.SchedulerRecord.for_type\(_Floors"):
        loraplus.apply_to_optimizer(opt, model, 8, schedulers=[sched])
    record = SchedulerRecord.for_type(_Floors, lists=[PerGroup("floors", Carry.SCALED)])
    loraplus.apply_to_optimizer(opt, model, 8, schedulers=[sched], scheduler_records=[record])
    _check_steps(model, opt, sched, ref, ref_sched, steps=10)
    assert opt.param_groups[1]["lr"] == pytest.approx(8 * 2e-4)  # B's own floor
    with pytest.raises(LoraPlusError, match="scheduler_records takes loraplus.schedulers.SchedulerRecord"):
        loraplus.apply_to_optimizer(torch.optim.SGD(_norm_at_1e2(model)), model, schedulers=[], scheduler_records=["floors"])


class _StepWithFloors(S.StepLR):
    def __init__(self, optimizer, floor):
        self.floors = [floor] * len(optimizer.param_groups)
        super().__init__(optimizer, step_size=2, gamma=0.5)

    def get_lr(self):
        return [max(lr, f) for lr, f in zip(super().get_lr(), self.floors)]


class _MyStepLR(S.StepLR):
    pass


def test_a_subclass_is_handled_as_its_catalogued_base_unless_it_keeps_lists_the_base_does_not():
    model, opt, sched, ref, ref_sched = _twins(lambda o: _MyStepLR(o, step_size=3, gamma=0.5))
    _check_steps(model, opt, sched, ref, ref_sched)
    model = tiny_lora_model()
    opt = torch.optim.SGD(_norm_at_1e2(model), lr=1e-3)
    sched = _StepWithFloors(opt, 1e-4)
    with pytest.raises(LoraPlusError, match=r"handled as its base class StepLR, but it also keeps floors"):
        loraplus.apply_to_optimizer(opt, model, 8, schedulers=[sched])
    from loraplus.schedulers import SCHEDULERS, Carry, PerGroup, SchedulerRecord

    step_lr = next(r for r in SCHEDULERS if r.name == "StepLR")
    mine = SchedulerRecord.for_type(_StepWithFloors, lists=(*step_lr.lists, PerGroup("floors", Carry.SCALED)))
    loraplus.apply_to_optimizer(opt, model, 8, schedulers=[sched], scheduler_records=[mine])
    assert sched.floors == pytest.approx([1e-4, 8e-4, 1e-4])


def test_refine_groups_says_for_each_output_group_its_parent_factor_and_role():
    from loraplus._groups._refine import RefinedGroup, refine_groups

    model = tiny_lora_model()
    dec = [p for p in model.parameters() if p.requires_grad and p.ndim == 2]  # A, B and the head's weight
    rest = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]  # norm and head biases: no factor
    out = refine_groups([{"params": dec, "lr": 1e-3, "name": "dec"}, {"params": rest, "lr": 2e-3}], model, 4,
                        role_lr={Role.A: 5e-4})
    # A moves at 5e-4 / 1e-3 = 0.5 of its parent; B at ratio × A's rate, 4 × 5e-4 / 1e-3 = 2
    assert [(r.group["name"], r.parent, r.scale, r.role) for r in out.out] == [
        ("dec", 0, 1.0, None), ("dec.A", 0, 0.5, Role.A), ("dec.B", 0, 2.0, Role.B), ("group1", 1, 1.0, None)
    ]
    assert all(isinstance(r, RefinedGroup) for r in out.out)
    assert [id(g) for g in out.groups] == [id(r.group) for r in out.out]
    assert [r.group["loraplus"] for r in out.out] == [
        {"parent": "dec", "scale": 1.0}, {"parent": "dec", "scale": 0.5}, {"parent": "dec", "scale": 2.0},
        {"parent": "group1", "scale": 1.0},
    ]
