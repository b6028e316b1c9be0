"""loraplus.precondition: the Riemannian and LoRA-FA preconditioners, against PEFT's own optimizers and
against an explicit per-pair loop (``torch.linalg.inv``) written here from how each model was built."""

from __future__ import annotations

import copy
import gc
import subprocess
import sys
import warnings
import weakref

import pytest
import torch
from hypothesis import given, settings
from peft import LoraConfig, get_peft_model
from peft.optimizers import create_lorafa_optimizer, create_riemannian_optimizer
from torch import nn

import loraplus
from loraplus import LoraPlusError, precondition
from loraplus._pairs._pairs import Why
from loraplus.testing import build_model, lora_models

REG = 1e-2


class Net(nn.Module):
    def __init__(self, d: int = 12):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.v = nn.Linear(d, 6)
        self.out = nn.Linear(6, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.q(x))[:, :6] + self.v(x))


def _peft(seed: int = 0, **cfg) -> nn.Module:
    torch.manual_seed(seed)
    cfg = {"r": 4, "lora_alpha": 8, "target_modules": ["q", "v", "out"], "init_lora_weights": False, **cfg}
    return get_peft_model(Net(), LoraConfig(**cfg))


def _batches(n: int, seed: int = 1) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(8, 12, generator=g) for _ in range(n)]


def _run(model: nn.Module, opt: torch.optim.Optimizer, steps: int = 4, accumulate: int = 1) -> None:
    batches = _batches(steps * accumulate)
    for s in range(steps):
        opt.zero_grad(set_to_none=True)
        for x in batches[s * accumulate : (s + 1) * accumulate]:
            model(x).square().mean().backward()
        opt.step()


def _lora_params(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _reference_riemannian(a: torch.Tensor, b: torch.Tensor, ga: torch.Tensor, gb: torch.Tensor, reg: float):
    """Standard-orientation matrices in, preconditioned gradients out (float64, explicit inverses)."""
    a, b, ga, gb = (t.double() for t in (a, b, ga, gb))
    eye = torch.eye(a.shape[0], dtype=torch.float64)
    return torch.linalg.inv(b.T @ b + reg * eye) @ ga, gb @ torch.linalg.inv(a @ a.T + reg * eye)


# ----------------------------------------------------------------------------------------------- PEFT equality
@pytest.mark.parametrize(
    "opt_cls,kw", [(torch.optim.AdamW, {"weight_decay": 0.0}), (torch.optim.SGD, {"momentum": 0.9})]
)
@pytest.mark.parametrize("cfg", [{}, {"use_rslora": True}], ids=["lora", "rslora"])
def test_riemannian_equals_peft_create_riemannian_optimizer(opt_cls, kw, cfg):
    ours, theirs = _peft(**cfg), _peft(**cfg)
    opt = loraplus.LoraPlus(opt_cls, ours, ratio=1, lr=1e-2, **kw)
    precondition(opt, ours, method="riemannian", reg=REG)
    ref = create_riemannian_optimizer(theirs, opt_cls, lr=1e-2, reg=REG, **kw)
    before = _lora_params(ours)
    _run(ours, opt, steps=3)
    _run(theirs, ref, steps=3)
    got, want = _lora_params(ours), _lora_params(theirs)
    assert got.keys() == want.keys()
    for name in got:  # Cholesky vs pinv round differently; (BᵀB + δI)⁻¹ ≤ 1/δ amplifies it step after step
        assert not torch.equal(got[name], before[name]), name
        torch.testing.assert_close(got[name], want[name], rtol=1e-4, atol=1e-5, msg=name)


def test_riemannian_equals_peft_on_a_plain_optimizer_with_gradient_accumulation():
    ours, theirs = _peft(), _peft()
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
    with precondition(opt, ours):
        _run(ours, opt, steps=3, accumulate=3)
    ref = create_riemannian_optimizer(theirs, torch.optim.AdamW, lr=1e-2, weight_decay=0.0)
    _run(theirs, ref, steps=3, accumulate=3)
    for (name, p), q in zip(_lora_params(ours).items(), _lora_params(theirs).values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_half_precision_factors_are_solved_in_float32_like_peft():
    ours, theirs = _peft().to(torch.bfloat16), _peft().to(torch.bfloat16)
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=1e-2)
    precondition(opt, ours)
    ref = create_riemannian_optimizer(theirs, torch.optim.SGD, lr=1e-2)
    for model, o in ((ours, opt), (theirs, ref)):
        o.zero_grad()
        model(_batches(1)[0].bfloat16()).float().square().mean().backward()
    raw = {n: p.grad.clone() for n, p in ours.named_parameters() if p.requires_grad}
    opt.step()
    ref.step()
    for (name, p), q in zip(ours.named_parameters(), theirs.parameters()):
        if p.requires_grad:
            assert p.grad.dtype == torch.bfloat16
            assert not torch.equal(p.grad, raw[name])
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-2, atol=1e-3, msg=name)


# ----------------------------------------------------------------------------------------------- LoRA-FA
def _run_clipped(model: nn.Module, opt: torch.optim.Optimizer, max_norm: float | None, steps: int = 4) -> list[float]:
    """Like ``_run``, with ``clip_grad_norm_`` over every parameter before each step; the norms seen."""
    norms = []
    for x in _batches(steps):
        opt.zero_grad(set_to_none=True)
        model(x).square().mean().backward()
        if max_norm is not None:
            norms.append(float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)))
        opt.step()
    return norms


@pytest.mark.parametrize("max_norm", [None, 0.05])
def test_lorafa_equals_peft_create_lorafa_optimizer(monkeypatch, max_norm):
    import peft.optimizers.lorafa as lorafa

    # PEFT multiplies under bfloat16 autocast when bf16 is available; compare its float32 maths
    monkeypatch.setattr(lorafa, "is_bf16_available", lambda: False)
    ours, theirs = _peft(), _peft()
    a_names = [n for n, _ in ours.named_parameters() if ".lora_A." in n]  # how PEFT names A
    b_names = [n for n, _ in ours.named_parameters() if ".lora_B." in n]
    before = _lora_params(ours)
    ref = create_lorafa_optimizer(theirs, r=4, lora_alpha=8, lr=1e-2)
    for group in ref.param_groups:
        group["eps"] = 1e-12  # PEFT adds eps before bias correction, torch after: make both negligible
    opt = torch.optim.AdamW([p for p in ours.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0, eps=1e-12)
    pre = precondition(opt, ours, method="lorafa")
    assert pre.reg == 1e-8
    params = dict(ours.named_parameters())
    assert [not params[n].requires_grad for n in a_names] == [True] * len(a_names)  # frozen, as PEFT does
    ours_norms = _run_clipped(ours, opt, max_norm)
    theirs_norms = _run_clipped(theirs, ref, max_norm)
    if max_norm is not None:  # clipping was active, and both clipped the same (B-only) gradient norm
        assert min(ours_norms) > max_norm
        torch.testing.assert_close(torch.tensor(ours_norms), torch.tensor(theirs_norms), rtol=1e-5, atol=0)
    theirs_params = dict(theirs.named_parameters())
    for name in a_names:
        assert torch.equal(params[name].detach(), before[name]) and params[name].grad is None, name
    for name in b_names:
        assert not torch.equal(params[name].detach(), before[name]), name
    for name in a_names + b_names:
        torch.testing.assert_close(params[name].detach(), theirs_params[name].detach(), rtol=1e-4, atol=1e-6, msg=name)


def test_lorafa_freezes_a_so_autograd_never_computes_it_and_remove_restores_it():
    model = _peft()
    names = dict(model.named_parameters())
    a_names = [n for n in names if ".lora_A." in n]
    b_names = [n for n in names if ".lora_B." in n]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(_batches(1)[0]).square().mean().backward()  # a gradient from before attaching is dropped
    pre = precondition(opt, model, method="lorafa")
    assert {id(p) for p in pre.frozen} == {id(names[n]) for n in a_names}
    assert all(not names[n].requires_grad and names[n].grad is None for n in a_names)
    opt.zero_grad()
    model(_batches(1)[0]).square().mean().backward()
    assert all(names[n].grad is None for n in a_names)  # never computed, not computed-then-dropped
    assert all(names[n].grad is not None for n in b_names)
    pre.remove()
    assert all(names[n].requires_grad for n in a_names + b_names)
    assert loraplus.pairing.preconditioner(opt) is None


def test_only_lorafa_changes_requires_grad():
    model = _peft()
    names = dict(model.named_parameters())
    a_names = [n for n in names if ".lora_A." in n]
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pre = precondition(opt, model, method="riemannian")
    assert pre.frozen == ()  # only LoRA-FA changes requires_grad
    pre.remove()
    assert all(names[n].requires_grad for n in a_names)


def test_lorafa_divides_by_the_layers_scaling_squared():
    model = _peft(lora_alpha=12)  # s = 12 / 4 = 3
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.0)
    precondition(opt, model, method="lorafa", reg=0.0)
    model(_batches(1)[0]).square().mean().backward()
    layer = model.base_model.model.q
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    raw = b.grad.clone()
    opt.step()
    want = raw.double() @ torch.linalg.inv(a.double() @ a.double().T) / 9.0
    torch.testing.assert_close(b.grad.double(), want, rtol=1e-4, atol=1e-7)
    assert a.grad is None


def test_lorafa_refuses_a_layout_without_scaling():
    gen = build_model([{"conv": "declared", "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"],
                        "lora_bias": False}])
    opt = torch.optim.SGD([p for p in gen.model.parameters() if p.requires_grad], lr=0.1)
    with pytest.raises(LoraPlusError, match="scaling"):
        precondition(opt, gen.model, method="lorafa")


# ----------------------------------------------------------------------------------------------- every layout
def _factors(conv: str, layer: nn.Module, adapters: list[str]) -> list[tuple[nn.Parameter, nn.Parameter, bool]]:
    """(A, B, transposed) as each convention stores them (written from testing.py's builders)."""
    if conv in ("peft", "peft_dora"):
        return [(layer.lora_A[a].weight, layer.lora_B[a].weight, False) for a in adapters]
    if conv == "peft_embedding":
        return [(layer.lora_embedding_A[a], layer.lora_embedding_B[a], False) for a in adapters]
    if conv in ("loralib", "loralib_embedding"):
        return [(layer.lora_A, layer.lora_B, False)]
    if conv in ("torchtune", "torchtune_dora"):
        return [(layer.lora_a.weight, layer.lora_b.weight, False)]
    if conv in ("diffusers", "kohya", "nemo"):
        names = {"diffusers": ("down", "up"), "kohya": ("lora_down", "lora_up"), "nemo": ("linear_in", "linear_out")}
        down, up = names[conv]
        return [(getattr(layer, down).weight, getattr(layer, up).weight, False)]
    if conv == "deepspeed_chat":
        return [(layer.lora_right_weight, layer.lora_left_weight, True)]
    if conv == "minlora":
        par = layer.parametrizations.weight[0]
        return [(par.lora_A, par.lora_B, False)]
    if conv == "declared":
        return [(layer.squeeze, layer.expand, False)]
    if conv == "handwritten":
        return [(layer.lora_A.weight, layer.lora_B.weight, False)]
    if conv == "raw_named":
        return [(layer.w_in, layer.w_out, False)]
    return []  # LoHa, LoKr, VeRA, AdaLoRA: not one B·A product


@pytest.mark.parametrize("conv", [c for c in loraplus.testing.CONVENTION_NAMES])
def test_every_layout_matches_an_explicit_per_pair_inverse(conv):
    adapters = ["default", "other"] if conv.startswith("peft") else ["default"]
    specs = [{"conv": conv, "d_in": d, "d_out": 5, "r": r, "adapters": adapters, "lora_bias": False}
             for d, r in ((6, 2), (6, 2), (4, 3))]  # two layers share a bucket, one does not
    gen = build_model(specs, wrapper="compile")
    torch.manual_seed(0)
    trainable = [p for p in gen.model.parameters() if p.requires_grad]
    for p in trainable:
        nn.init.normal_(p)
        p.grad = torch.randn_like(p)
    raw = {id(p): p.grad.clone() for p in trainable}
    value = {id(p): p.detach().clone() for p in trainable}
    opt = torch.optim.SGD(trainable, lr=0.1)
    layers = gen.model._orig_mod.layers
    expected_pairs = [f for layer in layers for f in _factors(conv, layer, adapters)]
    if expected_pairs:
        pre = precondition(opt, gen.model, rules=gen.rules)
        assert [(p.a, p.b) for p in pre.pairs] == [(a, b) for a, b, _ in expected_pairs]
    else:
        with pytest.raises(LoraPlusError, match="no A/B pair"):
            precondition(opt, gen.model, rules=gen.rules)
        return
    opt.step()
    done = set()
    for a, b, transposed in expected_pairs:
        std = (lambda t: t.T) if transposed else (lambda t: t)
        want_a, want_b = _reference_riemannian(
            std(value[id(a)]), std(value[id(b)]), std(raw[id(a)]), std(raw[id(b)]), REG
        )
        torch.testing.assert_close(std(a.grad).double(), want_a, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(std(b.grad).double(), want_b, rtol=1e-4, atol=1e-5)
        done |= {id(a), id(b)}
    for p in trainable:  # heads, norms, DoRA magnitudes, biases: untouched
        if id(p) not in done:
            assert torch.equal(p.grad, raw[id(p)])


def test_peft_conv_and_embedding_adapters_match_an_explicit_loop():
    torch.manual_seed(0)
    net = nn.Module()
    net.embed, net.conv = nn.Embedding(20, 6), nn.Conv2d(3, 5, 3)
    model = get_peft_model(net, LoraConfig(r=2, target_modules=["embed", "conv"], init_lora_weights=False))
    base = model.base_model.model
    emb_a, emb_b = base.embed.lora_embedding_A["default"], base.embed.lora_embedding_B["default"]
    conv_a, conv_b = base.conv.lora_A["default"].weight, base.conv.lora_B["default"].weight
    assert conv_a.shape == (2, 3, 3, 3) and conv_b.shape == (5, 2, 1, 1)
    trainable = [emb_a, emb_b, conv_a, conv_b]
    for p in trainable:
        p.grad = torch.randn_like(p)
    raw = [p.grad.clone() for p in trainable]
    opt = torch.optim.SGD(trainable, lr=0.0)
    pre = precondition(opt, model)
    assert [p.kind for p in pre.pairs] == ["embedding", "conv"]
    opt.step()
    want_ea, want_eb = _reference_riemannian(emb_a.detach(), emb_b.detach(), raw[0], raw[1], REG)
    want_ca, want_cb = _reference_riemannian(conv_a.detach().reshape(2, 27), conv_b.detach().reshape(5, 2),
                                             raw[2].reshape(2, 27), raw[3].reshape(5, 2), REG)
    torch.testing.assert_close(emb_a.grad.double(), want_ea, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(emb_b.grad.double(), want_eb, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(conv_a.grad.reshape(2, 27).double(), want_ca, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(conv_b.grad.reshape(5, 2).double(), want_cb, rtol=1e-4, atol=1e-6)


def test_zero_damping_on_peft_s_zero_b_falls_back_to_the_pseudo_inverse():
    """PEFT's init has B = 0, so with reg = 0 BᵀB is singular: Cholesky fails and the solve must fall
    back to the pseudo-inverse (0 for a zero matrix), as PEFT's pinv does, instead of writing NaN."""
    model = _peft(init_lora_weights=True)
    named = dict(model.named_parameters())
    assert all(not p.any() for n, p in named.items() if ".lora_B." in n)  # how PEFT initialised it
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    precondition(opt, model, reg=0.0)
    model(_batches(1)[0]).square().mean().backward()
    raw = {n: p.grad.clone() for n, p in named.items() if p.grad is not None}
    opt.step()
    for name, p in named.items():
        assert torch.isfinite(p).all() and (p.grad is None or torch.isfinite(p.grad).all()), name
        if ".lora_A." in name:  # pinv(0) = 0: A's gradient (itself 0, as B = 0) stays 0
            assert not p.grad.any(), name
        if ".lora_B." in name:  # A is random, so A·Aᵀ is invertible: g_B (A Aᵀ)⁻¹, no damping
            a = named[name.replace(".lora_B.", ".lora_A.")].detach().double()
            want = raw[name].double() @ torch.linalg.inv(a @ a.T)
            torch.testing.assert_close(p.grad.double(), want, rtol=1e-4, atol=1e-6, msg=name)


def test_a_hand_computed_rank_one_pair():
    layer = nn.Module()
    layer.lora_A = nn.Parameter(torch.tensor([[2.0, 0.0]]))  # A Aᵀ = 4
    layer.lora_B = nn.Parameter(torch.tensor([[1.0], [1.0]]))  # Bᵀ B = 2
    layer.lora_A.grad = torch.tensor([[1.0, 3.0]])
    layer.lora_B.grad = torch.tensor([[5.0], [-1.0]])
    opt = torch.optim.SGD(layer.parameters(), lr=0.0)
    precondition(opt, layer, reg=0.5)
    opt.step()
    torch.testing.assert_close(layer.lora_A.grad, torch.tensor([[1.0, 3.0]]) / 2.5)
    torch.testing.assert_close(layer.lora_B.grad, torch.tensor([[5.0], [-1.0]]) / 4.5)


# ----------------------------------------------------------------------------------------------- composition
def test_composes_with_loraplus_ratios():
    model = _peft()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.1)
    precondition(opt, model)
    model(_batches(1)[0]).square().mean().backward()
    layer = model.base_model.model.v
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a0, b0, ga, gb = a.detach().clone(), b.detach().clone(), a.grad.clone(), b.grad.clone()
    opt.step()
    want_a, want_b = _reference_riemannian(a0, b0, ga, gb, REG)
    torch.testing.assert_close((a.detach() - a0).double(), -0.1 * want_a, rtol=1e-4, atol=1e-7)
    torch.testing.assert_close((b.detach() - b0).double(), -0.4 * want_b, rtol=1e-4, atol=1e-7)


def test_a_side_without_gradient_is_skipped_and_the_other_still_preconditioned():
    model = _peft()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    precondition(opt, model)
    model(_batches(1)[0]).square().mean().backward()
    layer = model.base_model.model.q
    a, b = layer.lora_A["default"].weight, layer.lora_B["default"].weight
    a.grad = None
    gb, a0 = b.grad.clone(), a.detach().clone()
    opt.step()
    assert a.grad is None and torch.equal(a.detach(), a0)
    _, want_b = _reference_riemannian(a0, b.detach(), torch.zeros_like(a0), gb, REG)
    torch.testing.assert_close(b.grad.double(), want_b, rtol=1e-4, atol=1e-7)
    opt.zero_grad(set_to_none=True)
    opt.step()  # no gradient at all: nothing to do, nothing raised


@pytest.mark.parametrize("how", ["positional", "keyword"])
def test_closures_get_their_gradients_preconditioned(how):
    ours, theirs = _peft(), _peft()
    x = _batches(1)[0]
    opt = torch.optim.SGD([p for p in ours.parameters() if p.requires_grad], lr=0.1)
    precondition(opt, ours)

    def closure():
        opt.zero_grad()
        loss = ours(x).square().mean()
        loss.backward()
        return loss

    loss = opt.step(closure) if how == "positional" else opt.step(closure=closure)
    assert loss is not None
    ref = create_riemannian_optimizer(theirs, torch.optim.SGD, lr=0.1)
    theirs(x).square().mean().backward()
    ref.step()
    for p, q in zip(_lora_params(ours).values(), _lora_params(theirs).values()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


def test_remove_and_context_manager_restore_raw_steps():
    model = _peft()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with precondition(opt, model) as pre:
        assert pre.active
        with pytest.raises(LoraPlusError, match="already preconditioned"):
            precondition(opt, model)
    assert not pre.active
    model(_batches(1)[0]).square().mean().backward()
    raw = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    opt.step()
    assert all(torch.equal(p.grad, g) for p, g in zip([p for p in model.parameters() if p.requires_grad], raw))
    precondition(opt, model).remove()  # attaching again after remove() is fine


def test_the_optimizer_owns_a_preconditioner_attached_by_loraplus_and_it_is_removable():
    model = _peft()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.1, precondition="riemannian")
    pre = loraplus.pairing.preconditioner(opt)
    assert isinstance(pre, loraplus.pairing.Preconditioner) and pre.active and pre.method == "riemannian"
    del pre
    gc.collect()
    pre = loraplus.pairing.preconditioner(opt)  # dropping the handle did not detach it: the optimizer owns it
    assert pre is not None and pre.active
    pre.remove()
    assert loraplus.pairing.preconditioner(opt) is None and not pre.active
    model(_batches(1)[0]).square().mean().backward()
    raw = [p.grad.clone() for p in model.parameters() if p.requires_grad]
    opt.step()  # raw gradients again
    assert all(torch.equal(p.grad, g) for p, g in zip([p for p in model.parameters() if p.requires_grad], raw))
    again = precondition(opt, model, method="lorafa", reg=1e-3)  # a new one may be attached after remove()
    assert loraplus.pairing.preconditioner(opt) is again
    assert loraplus.pairing.preconditioner(torch.optim.SGD(model.parameters(), lr=0.1)) is None


@pytest.mark.parametrize("method", ["riemannian", "lorafa"])
def test_hooks_hold_the_preconditioner_weakly_and_nothing_keeps_the_optimizer_alive(method):
    model = _peft()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pre = precondition(opt, model, method=method)  # LoRA-FA's finalizer must hold neither of them
    gc.collect()
    holders = [id(r) for r in gc.get_referrers(pre) if r is not sys._getframe()]
    assert holders == [id(vars(opt))]  # the optimizer's attribute is its one strong holder (not the hook)
    pre_ref, opt_ref = weakref.ref(pre), weakref.ref(opt)
    gc.disable()
    try:
        del opt  # the handle holds the optimizer weakly, and no cycle is left for the collector
        assert opt_ref() is None and pre_ref() is pre
        del pre
        assert pre_ref() is None
    finally:
        gc.enable()


# ----------------------------------------------------------------------------------------------- LoRA-FA lifecycle
def _names(model: nn.Module, segment: str) -> list[str]:
    return [n for n, _ in model.named_parameters() if segment in n]  # PEFT's names say which factor


@pytest.mark.parametrize("cycle", [False, True], ids=["dropped", "collected-from-a-cycle"])
def test_lorafa_freeze_is_undone_when_its_optimizer_is_collected_so_a_second_loraplus_works(cycle):
    """An lr sweep builds LoraPlus(..., precondition="lorafa") again on the same model. Once the first optimizer
    is gone its A factors must be trainable again (they stayed frozen: "found B factors but no A factor")."""
    model = _peft()
    params = dict(model.named_parameters())
    a_names, b_names = _names(model, ".lora_A."), _names(model, ".lora_B.")
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-2, precondition="lorafa")
    assert not any(params[n].requires_grad for n in a_names)
    if cycle:
        opt.itself = opt  # only the cyclic collector can free it
    opt_ref = weakref.ref(opt)
    gc.disable()
    try:
        del opt  # without a cycle, dropping the last reference is enough: no collector run
        assert (opt_ref() is not None) == cycle
        assert all(params[n].requires_grad for n in a_names) != cycle
    finally:
        gc.enable()
    gc.collect()
    assert opt_ref() is None
    assert all(params[n].requires_grad for n in a_names + b_names)
    again = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-2)
    lrs = {id(p): g["lr"] for g in again.param_groups for p in g["params"]}
    assert [lrs[id(params[n])] for n in a_names] == [1e-2] * len(a_names)  # lr, as passed
    assert [lrs[id(params[n])] for n in b_names] == [4e-2] * len(b_names)  # ratio 4 × lr
    model(_batches(1)[0]).square().mean().backward()
    assert all(params[n].grad is not None for n in a_names)  # A trains again


def test_a_model_whose_a_factors_a_live_lorafa_optimizer_froze_is_refused_with_the_way_out():
    """Refused, not reference-counted: a second optimizer would train the model with A frozen by the first."""
    model = _peft()
    params = dict(model.named_parameters())
    a_names = _names(model, ".lora_A.")
    first = loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.1, precondition="lorafa")
    attempts = {
        "LoraPlus": lambda: loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.1),
        "LoraPlus lorafa": lambda: loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1, precondition="lorafa"),
        "precondition lorafa": lambda: precondition(torch.optim.SGD(model.parameters(), lr=0.1), model, method="lorafa"),
        "precondition riemannian": lambda: precondition(torch.optim.SGD(model.parameters(), lr=0.1), model),
    }
    for what, attempt in attempts.items():
        with pytest.raises(LoraPlusError, match="frozen by the LoRA-FA preconditioner of an optimizer that is still "
                           r"alive \(SGD at 0x[0-9a-f]+\); drop that optimizer first") as err:
            attempt()
        assert a_names[0] in str(err.value), what
    assert not any(params[n].requires_grad for n in a_names)  # the refused calls changed nothing
    loraplus.pairing.preconditioner(first).remove()
    second = loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.1, precondition="lorafa")  # after remove()
    assert {id(p) for p in loraplus.pairing.preconditioner(second).frozen} == {id(params[n]) for n in a_names}


def test_collection_restores_only_what_lorafa_froze_also_after_the_model_is_gone(monkeypatch):
    unraisable: list = []
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)  # an exception in a finalizer lands here
    model = _peft()
    params = dict(model.named_parameters())
    user_frozen, *lorafa_frozen = _names(model, ".lora_A.")
    params[user_frozen].requires_grad_(False)  # frozen by the user before: not LoRA-FA's to restore
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with pytest.warns(UserWarning, match="no A factor"):  # that layer's B is left alone
        pre = precondition(opt, model, method="lorafa")
    assert {id(p) for p in pre.frozen} == {id(params[n]) for n in lorafa_frozen}
    factors = {n: params[n] for n in [user_frozen, *lorafa_frozen]}
    model_ref = weakref.ref(model)
    del pre, params, model
    gc.collect()
    assert model_ref() is None  # the model went first; the optimizer still holds the factors
    del opt
    gc.collect()
    assert not factors[user_frozen].requires_grad
    assert all(factors[n].requires_grad for n in lorafa_frozen)
    assert unraisable == []


def test_remove_restores_once_so_a_later_collection_keeps_the_users_own_freeze():
    model = _peft()
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    pre = precondition(opt, model, method="lorafa")
    first, *rest = pre.frozen
    pre.remove()
    assert first.requires_grad and all(p.requires_grad for p in rest)
    first.requires_grad_(False)  # the user's own decision, after remove()
    del pre, opt
    gc.collect()
    assert not first.requires_grad and all(p.requires_grad for p in rest)


def test_a_model_saved_while_lorafa_is_attached_loads_without_a_live_freeze(tmp_path):
    model = _peft()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, ratio=4, lr=0.1, precondition="lorafa")
    torch.save(model, tmp_path / "model.pt")  # pickles each parameter's attributes, the freeze's among them
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    a = [p for n, p in loaded.named_parameters() if ".lora_A." in n]
    assert a and not any(p.requires_grad for p in a)  # saved as it was: frozen
    for p in a:
        p.requires_grad_(True)
    loraplus.LoraPlus(torch.optim.SGD, loaded, ratio=4, lr=0.1)  # no live LoRA-FA owns the loaded factors
    assert loraplus.pairing.preconditioner(opt).active


def test_interpreter_exit_with_a_live_lorafa_optimizer_is_quiet():
    script = (
        "import torch, loraplus\n"
        "model = loraplus.testing.tiny_lora_model()\n"
        "for layer in model.layers:\n"
        "    layer.scaling = {'default': 2.0}\n"
        "opt = loraplus.LoraPlus(torch.optim.AdamW, model, lr=1e-3, precondition='lorafa')\n"
        "opt.itself = opt\n"  # alive until exit, and in a cycle
        "print('ok')\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False)
    assert (done.returncode, done.stdout, done.stderr) == (0, "ok\n", "")


def test_non_product_adapters_are_left_alone_with_a_warning():
    specs = [{"conv": c, "d_in": 4, "d_out": 4, "r": 2, "adapters": ["default"], "lora_bias": False}
             for c in ("peft", "peft_loha")]
    gen = build_model(specs)
    trainable = [p for p in gen.model.parameters() if p.requires_grad]
    for p in trainable:
        p.grad = torch.randn_like(p)
    raw = {n: p.grad.clone() for n, p in gen.model.named_parameters() if p.requires_grad}
    opt = torch.optim.SGD(trainable, lr=0.1)
    with pytest.warns(UserWarning, match="not preconditioned.*LoHa"):
        pre = precondition(opt, gen.model)
    assert {u.name for u in pre.skipped} == {n for n in raw if ".hada_" in n}
    assert {u.why for u in pre.skipped} == {Why.NOT_A_PRODUCT}
    opt.step()
    for n, p in gen.model.named_parameters():
        if p.requires_grad:
            assert torch.equal(p.grad, raw[n]) == (".hada_" in n or "head" in n or "norm" in n), n


def test_pairs_the_optimizer_does_not_hold_are_skipped_as_records_that_say_why():
    model = _peft()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    lora = {n for n in named if ".lora_" in n}
    only_q = [p for n, p in named.items() if ".q." in n]
    with pytest.warns(UserWarning, match="4 adapter factors are not preconditioned"):
        pre = precondition(torch.optim.SGD(only_q, lr=0.1), model)
    assert {u.name for u in pre.skipped} == {n for n in lora if ".q." not in n}  # v's and out's factors
    assert all(isinstance(u, loraplus.pairing.Unpaired) and u.why is Why.NOT_HELD for u in pre.skipped)
    assert {u.name: u.role for u in pre.skipped} == {
        n: loraplus.Role.A if ".lora_A." in n else loraplus.Role.B for n in lora if ".q." not in n
    }
    assert {u.reason for u in pre.skipped} == {"the optimizer does not hold these factors"}
    pre.remove()

    model = _peft()
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    no_v_b = [p for n, p in named.items() if not (".v." in n and ".lora_B." in n)]
    with pytest.warns(UserWarning, match="2 adapter factors are not preconditioned"):
        pre = precondition(torch.optim.SGD(no_v_b, lr=0.1), model, method="lorafa")
    assert [(u.name, u.why, u.reason) for u in pre.skipped] == [
        (n, Why.NOT_HELD, "the optimizer does not hold B") for n in named if ".v.lora_" in n
    ]
    pre.remove()

    class Embedded(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(10, 12)
            self.q = nn.Linear(12, 12)

    torch.manual_seed(0)
    model = get_peft_model(Embedded(), LoraConfig(r=2, target_modules=["embed", "q"], init_lora_weights=False))
    named = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with pytest.warns(UserWarning, match="2 adapter factors are not preconditioned"):
        pre = precondition(torch.optim.SGD([p for n, p in named.items() if ".q." in n], lr=0.1), model)
    # PEFT names an embedding adapter's factors lora_embedding_A / lora_embedding_B
    assert {u.name: (u.role, u.why) for u in pre.skipped} == {
        n: (loraplus.Role.EMBEDDING_A if "lora_embedding_A" in n else loraplus.Role.EMBEDDING_B, Why.NOT_HELD)
        for n in named if ".embed." in n
    }
    pre.remove()


# ----------------------------------------------------------------------------------------------- refusals
def test_invalid_calls_are_refused_with_the_reason():
    model = _peft()
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(LoraPlusError, match="method must be one of"):
        precondition(torch.optim.SGD(params, lr=0.1), model, method="shampoo")
    with pytest.raises(LoraPlusError, match="reg must be"):
        precondition(torch.optim.SGD(params, lr=0.1), model, reg=-1.0)
    with pytest.raises(LoraPlusError, match="LBFGS"):
        precondition(torch.optim.LBFGS(params), model)
    with pytest.raises(LoraPlusError, match="torch.optim.Optimizer"):
        precondition(object(), model)  # type: ignore[arg-type]
    other = _peft(seed=3)
    with pytest.raises(LoraPlusError, match="no A/B pair of the model is held by the optimizer"):
        precondition(torch.optim.SGD([p for p in other.parameters() if p.requires_grad], lr=0.1), model)


def test_method_records_carry_peft_defaults_and_an_unknown_name_lists_the_valid_ones():
    import inspect
    import re

    from peft.optimizers.lorafa import LoraFAOptimizer

    from loraplus._pairs._methods import LORAFA, RIEMANNIAN, method_named

    # ground truth: PEFT's own defaults (create_riemannian_optimizer's reg=, LoraFAOptimizer's delta)
    assert RIEMANNIAN.default_reg == inspect.signature(create_riemannian_optimizer).parameters["reg"].default
    delta = re.search(r"delta = ([0-9.e+-]+)", inspect.getsource(LoraFAOptimizer.step))
    assert delta is not None and LORAFA.default_reg == float(delta.group(1))
    assert method_named("riemannian") is RIEMANNIAN and method_named("lorafa") is LORAFA
    model = _peft()
    params = [p for p in model.parameters() if p.requires_grad]
    for bad in ("LoRA-FA", "Riemannian", "", None):
        with pytest.raises(LoraPlusError, match=r"method must be one of 'riemannian', 'lorafa', got"):
            precondition(torch.optim.SGD(params, lr=0.1), model, method=bad)  # type: ignore[arg-type]


def test_default_reg_is_a_read_only_view_of_the_method_records():
    from loraplus._pairs._methods import METHODS
    from loraplus._pairs._precondition import DEFAULT_REG

    assert dict(DEFAULT_REG) == {"riemannian": 1e-2, "lorafa": 1e-8} == {m.name: m.default_reg for m in METHODS}
    with pytest.raises(TypeError):
        DEFAULT_REG["riemannian"] = 1.0  # type: ignore[index]
    with pytest.raises(AttributeError):
        METHODS[0].default_reg = 1.0  # type: ignore[misc]
    model = _peft()
    pre = precondition(torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1), model)
    assert pre.reg == 1e-2


def test_sharded_factors_are_refused(tmp_path):
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        model = copy.deepcopy(_peft())
        for module in model.modules():
            if isinstance(module, nn.Linear) and any(p.requires_grad for p in module.parameters()):
                fully_shard(module)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        with pytest.raises(LoraPlusError, match="sharded factors.*DTensor"):
            precondition(opt, model)
        from torch.distributed.fsdp import FullyShardedDataParallel

        fsdp1 = FullyShardedDataParallel(_peft(), device_id=torch.device("cpu"), use_orig_params=True)
        opt = torch.optim.SGD([p for p in fsdp1.parameters() if p.requires_grad], lr=0.1)
        with pytest.raises(LoraPlusError, match="sharded factors.*FSDP"):
            precondition(opt, fsdp1)

        class Sharded(FullyShardedDataParallel):  # recognised by type, not by its class name
            pass

        inner = nn.Sequential(_peft())
        inner[0] = Sharded(inner[0], device_id=torch.device("cpu"), use_orig_params=True)
        opt = torch.optim.SGD([p for p in inner.parameters() if p.requires_grad], lr=0.1)
        with pytest.raises(LoraPlusError, match=r"sharded factors: 0 is wrapped in FSDP \(FullyShardedDataParallel\)"):
            precondition(opt, inner)
    finally:
        dist.destroy_process_group()


def test_fsdp_flat_parameters_are_refused():
    from torch.distributed.fsdp._flat_param import FlatParameter

    flat = FlatParameter(torch.zeros(64), requires_grad=True)  # FSDP1 (use_orig_params=False) holds these
    assert type(flat) is nn.Parameter  # what FlatParameter() returns: its class name says nothing
    holder = nn.Module()
    holder.flat = flat
    with pytest.raises(LoraPlusError, match="cannot precondition sharded factors: the factors are FSDP flat parameters"):
        precondition(torch.optim.SGD([flat], lr=0.1), holder)


def test_deepspeed_zero_optimizers_are_refused():
    class DeepSpeedZeroOptimizer:  # what deepspeed.initialize returns: not a torch.optim.Optimizer
        param_groups: list = []

    with pytest.raises(LoraPlusError, match="DeepSpeed"):
        precondition(DeepSpeedZeroOptimizer(), _peft())  # type: ignore[arg-type]


def test_no_warning_and_no_state_on_a_plain_lora_model():
    model = _peft()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pre = precondition(opt, model)
    _run(model, opt, steps=1)
    assert not hasattr(pre, "state_dict")
    assert len(pre.pairs) == 3 and pre.skipped == ()


def test_a_bucket_where_only_some_pairs_have_gradients():
    specs = [{"conv": "peft", "d_in": 6, "d_out": 5, "r": 2, "adapters": ["default"], "lora_bias": False}] * 3
    gen = build_model(specs, head=False, norm=False, frozen_extra=False)
    torch.manual_seed(0)
    layers = gen.model.layers
    factors = [(layer.lora_A["default"].weight, layer.lora_B["default"].weight) for layer in layers]
    for a, b in factors:
        nn.init.normal_(a)
        nn.init.normal_(b)
        a.grad, b.grad = torch.randn_like(a), torch.randn_like(b)
    factors[1][0].grad = None  # one A of the bucket has no gradient
    raw = [(a.grad if a.grad is None else a.grad.clone(), b.grad.clone()) for a, b in factors]
    opt = torch.optim.SGD(gen.model.parameters(), lr=0.0)
    pre = precondition(opt, gen.model)
    assert len(pre._buckets) == 1
    opt.step()
    for (a, b), (ga, gb) in zip(factors, raw):
        want_a, want_b = _reference_riemannian(a.detach(), b.detach(), torch.zeros_like(a) if ga is None else ga,
                                               gb, REG)
        if ga is None:
            assert a.grad is None
        else:
            torch.testing.assert_close(a.grad.double(), want_a, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(b.grad.double(), want_b, rtol=1e-4, atol=1e-6)


def test_loraplus_precondition_keyword_is_the_one_call_form():
    ours, theirs = _peft(), _peft()
    opt = loraplus.LoraPlus(torch.optim.AdamW, ours, ratio=1, lr=1e-2, weight_decay=0.0, precondition="riemannian")
    with pytest.raises(LoraPlusError, match="already preconditioned"):
        precondition(opt, ours)
    _run(ours, opt, steps=3)
    _run(theirs, create_riemannian_optimizer(theirs, torch.optim.AdamW, lr=1e-2, weight_decay=0.0), steps=3)
    for p, q in zip(_lora_params(ours).values(), _lora_params(theirs).values()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5)
    with pytest.raises(LoraPlusError, match="precondition_reg"):
        loraplus.LoraPlus(torch.optim.AdamW, ours, lr=1e-2, precondition_reg=1e-3)


def test_ddp_bucket_view_gradients_are_rewritten_in_place(tmp_path):
    """DDP(gradient_as_bucket_view=True) makes every .grad a view of its reduction bucket: the hook must write
    into those views (not rebind .grad), and the result must equal the unwrapped model's."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        plain, wrapped_inner = _peft(), _peft()
        wrapped = DDP(wrapped_inner, gradient_as_bucket_view=True)
        opt_w = torch.optim.AdamW([p for p in wrapped.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        pre = precondition(opt_w, wrapped)
        assert all(p.a_name.startswith("module.") for p in pre.pairs)
        opt_p = torch.optim.AdamW([p for p in plain.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.0)
        precondition(opt_p, plain)
        _run(wrapped, opt_w, steps=3)
        _run(plain, opt_p, steps=3)
        for p, q in zip(_lora_params(wrapped_inner).values(), _lora_params(plain).values()):
            torch.testing.assert_close(p, q)
    finally:
        dist.destroy_process_group()


def test_a_torch_compiled_model_is_paired_like_the_plain_one():
    model = _peft()
    compiled = torch.compile(model)  # compiles lazily: nothing runs here
    opt = torch.optim.SGD([p for p in compiled.parameters() if p.requires_grad], lr=0.1)
    pre = precondition(opt, compiled)
    assert [(p.a, p.b) for p in pre.pairs] == [(p.a, p.b) for p in loraplus.pairs(model)]
    assert [p.layer for p in pre.pairs] == [p.layer for p in loraplus.pairs(model)]


@settings(max_examples=30, deadline=None)
@given(lora_models(max_layers=3))
def test_every_generated_model_preconditions_exactly_its_product_factors(gen):
    """With δ huge, (M + δI)⁻¹ ≈ I/δ: each A/B factor of a product adapter gets its gradient divided by δ,
    every other trainable tensor keeps it. Which tensors are factors comes from the generator."""
    factors = {n for pair in gen.pairs for n in pair}  # the A/B pairs the generator built
    named = {n: p for n, p in gen.model.named_parameters() if p.requires_grad}
    torch.manual_seed(0)
    for p in named.values():
        p.grad = torch.randn_like(p)
    raw = {n: p.grad.clone() for n, p in named.items()}
    opt = torch.optim.SGD(list(named.values()), lr=0.0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not factors:
            with pytest.raises(LoraPlusError, match="no A/B pair"):
                precondition(opt, gen.model, reg=1e9, rules=gen.rules)
            return
        precondition(opt, gen.model, reg=1e9, rules=gen.rules)
    opt.step()
    for n, p in named.items():
        if n in factors:
            torch.testing.assert_close(p.grad, raw[n] / 1e9, rtol=1e-4, atol=0.0, msg=n)
        else:
            assert torch.equal(p.grad, raw[n]), n
