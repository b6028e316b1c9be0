"""Learning-rate-free optimizers (Prodigy, D-Adaptation) measured on the real packages, and what
LoraPlus and find_lr do with them (issue #24).

The expected behaviour of every class is written here by hand, from reading each package's
``step()`` and measuring it below; the record table in ``loraplus/_groups/_lr_free.py`` must agree.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.metadata
import io
import re
import warnings
from pathlib import Path

import dadaptation
import prodigyopt
import prodigyplus
import pytest
import pytorch_optimizer
import torch

import loraplus
from loraplus import LoraPlusError
from loraplus._groups._lr_free import LR_FREE_OPTIMIZERS, PerGroupLr, lr_free_record, lr_free_table
from loraplus.testing import tiny_lora_model

ROOT = Path(__file__).resolve().parent.parent
PPSF = prodigyplus.ProdigyPlusScheduleFree
RATIO = 4.0  # a power of two: ratio × an update is exact in floating point

#: step() raises RuntimeError when groups have different non-zero lrs (read in each step(): the max
#: of the group lrs is taken, then any other non-zero lr raises).
RAISES = [prodigyopt.Prodigy, dadaptation.DAdaptAdam, dadaptation.DAdaptSGD, dadaptation.DAdaptLion]
#: step() multiplies d by param_groups[0]["lr"] for every group.
FIRST_GROUP = [
    dadaptation.DAdaptAdaGrad,
    dadaptation.DAdaptAdan,
    pytorch_optimizer.Prodigy,
    pytorch_optimizer.DAdaptAdam,
    pytorch_optimizer.DAdaptSGD,
    pytorch_optimizer.DAdaptAdaGrad,
    pytorch_optimizer.DAdaptAdan,
    pytorch_optimizer.DAdaptLion,
]
#: each group keeps its own d (split_groups=True, the default) and multiplies it by its own lr.
OWN_D = [PPSF]


def _id(cls: type) -> str:
    return f"{cls.__module__.partition('.')[0]}.{cls.__name__}"


def _quiet(fn, *args, **kwargs):
    """prodigyplus prints its notes; keep the test output clean."""
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()):
        warnings.simplefilter("ignore")
        return fn(*args, **kwargs)


def _two_factor_steps(cls, lr_a: float, lr_b: float, steps: int, **kwargs) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """A and B: same shape, same (zero) start, the same constant gradient at every step (a linear
    loss, so the gradient does not depend on where the parameters are); A in group 0 at ``lr_a``,
    B in group 1 at ``lr_b``. Returns each step's (ΔA, ΔB)."""
    grad = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.75, 1.5])
    a = torch.nn.Parameter(torch.zeros(6))
    b = torch.nn.Parameter(torch.zeros(6))
    opt = _quiet(cls, [{"params": [a], "lr": lr_a}, {"params": [b], "lr": lr_b}], lr=lr_a, **kwargs)
    out = []
    for _ in range(steps):
        before_a, before_b = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = grad.clone(), grad.clone()
        _quiet(opt.step)
        out.append((a.detach() - before_a, b.detach() - before_b))
    return out


# ----------------------------------------------------------------------------- the packages, measured


@pytest.mark.parametrize("cls", RAISES, ids=_id)
def test_these_raise_at_step_when_group_lrs_differ(cls):
    with pytest.raises(RuntimeError, match="different lr values in different parameter groups"):
        _two_factor_steps(cls, 1.0, RATIO, steps=1)
    (da, db), *_ = _two_factor_steps(cls, 1.0, 1.0, steps=1)  # the same optimizer at one rate steps fine
    assert torch.equal(da, db)


@pytest.mark.parametrize("cls", FIRST_GROUP, ids=_id)
def test_these_move_b_exactly_as_a_whatever_b_s_lr(cls):
    """B at 4× A's lr moves exactly as A does, for several steps: group 0's lr is used for both.

    A and B start equal and get identical gradients, so every per-parameter statistic is identical;
    had the optimizer honoured B's lr, B would move 4× as far.
    """
    steps = _two_factor_steps(cls, 1.0, RATIO, steps=4)
    assert any(da.abs().max() > 0 for da, _ in steps)
    for da, db in steps:
        assert torch.equal(db, da)


def test_prodigy_plus_with_a_shared_d_moves_b_exactly_ratio_times_a():
    """ProdigyPlusScheduleFree(split_groups=False): B's step is exactly 4× A's, at every step.

    Why exactly: with split_groups=False one d is estimated from all groups and copied to each, and
    a group's step is that d times the group's own lr. A and B start at zero and get the same
    gradient at every step (the loss is linear), so their second moments, RMS clipping and
    normalised updates are identical; the schedule-free averaging weight is dlr²/Σdlr², where B's 4²
    cancels. Every quantity that differs is multiplied by 4, a power of two, so no rounding differs:
    ΔB == 4·ΔA bit for bit. ``d_limiter=False`` lets d grow fast, so d really changes over the steps.
    """
    steps = _two_factor_steps(PPSF, 1.0, RATIO, steps=6, split_groups=False, d_limiter=False)
    assert all(da.abs().max() > 0 for da, _ in steps)
    for da, db in steps:
        assert torch.equal(db, RATIO * da)


def test_dadaptation_adam_layer_scale_moves_b_exactly_ratio_times_a():
    """dadaptation.DAdaptAdam refuses different lrs but takes a per-group ``layer_scale`` r.

    Why exactly: one d is shared by all groups and r multiplies only the group's momentum
    increment (and its share of d's numerator); the second moment, from the same gradients, is
    identical for A and B. So with one lr, r = 4 on B's group and the same gradient at every step,
    ΔB == 4·ΔA bit for bit (4 is a power of two).
    """
    grad = torch.tensor([0.5, -1.0, 0.25, 2.0, -0.75, 1.5])
    a, b = torch.nn.Parameter(torch.zeros(6)), torch.nn.Parameter(torch.zeros(6))
    opt = dadaptation.DAdaptAdam([{"params": [a]}, {"params": [b], "layer_scale": RATIO}], lr=1.0)
    for _ in range(5):
        before_a, before_b = a.detach().clone(), b.detach().clone()
        a.grad, b.grad = grad.clone(), grad.clone()
        opt.step()
        da = a.detach() - before_a
        assert da.abs().max() > 0 and torch.equal(b.detach() - before_b, RATIO * da)
    assert opt.param_groups[0]["d"] > 1e-6  # d really adapted meanwhile (d0, its start, is 1e-6)


def test_the_dadaptation_adam_record_suggests_layer_scale():
    with pytest.raises(LoraPlusError, match=r"layer_scale=ratio on the B group"):
        loraplus.LoraPlus(dadaptation.DAdaptAdam, tiny_lora_model(), ratio=RATIO, lr=1.0)


def test_prodigy_plus_default_estimates_d_per_group_so_the_ratio_drifts():
    """With its default split_groups=True each group estimates its own d from its own displacement.
    Step 1 is exactly 4× (both d are d0); after that B's larger displacement raises d_B above d_A,
    and B's step grows past 4× A's (measured: far past it within a few steps without the limiter)."""
    steps = _two_factor_steps(PPSF, 1.0, RATIO, steps=6, d_limiter=False)
    assert torch.equal(steps[0][1], RATIO * steps[0][0])
    da, db = steps[-1]
    assert (db / da).min() > 2 * RATIO


# ----------------------------------------------------------------------------- the record table agrees


@pytest.mark.parametrize(
    ("cls", "behaviour"),
    [(c, PerGroupLr.RAISES) for c in RAISES]
    + [(c, PerGroupLr.FIRST_GROUP) for c in FIRST_GROUP]
    + [(c, PerGroupLr.OWN_D) for c in OWN_D],
    ids=lambda x: _id(x) if isinstance(x, type) else x.name,
)
def test_each_record_says_what_was_measured(cls, behaviour):
    record = lr_free_record(cls)
    assert record is not None and record.per_group_lr is behaviour
    assert record.behaviour({}) is behaviour


def test_prodigy_plus_record_knows_the_shared_d_option():
    record = lr_free_record(PPSF)
    assert record is not None
    assert record.behaviour({"split_groups": False}) is PerGroupLr.SHARED_D
    assert record.behaviour({"split_groups": True}) is PerGroupLr.OWN_D


def test_the_table_names_exactly_the_measured_classes_and_each_exists_in_its_package():
    """Completeness: every record's class is importable where the record says, from an installed
    distribution, exported under the name users write; and every class measured here has a record."""
    recorded = []
    for record in LR_FREE_OPTIMIZERS:
        module = importlib.import_module(record.module)
        cls = getattr(module, record.qualname)
        assert isinstance(cls, type) and issubclass(cls, torch.optim.Optimizer), record
        assert record.cls() is cls
        top, _, name = record.shown.partition(".")
        assert getattr(importlib.import_module(top), name) is cls
        assert importlib.metadata.version(record.distribution)
        recorded.append(cls)
    assert len(recorded) == len(set(recorded))
    assert set(recorded) == set(RAISES + FIRST_GROUP + OWN_D)


def test_records_match_by_class_not_by_name():
    class Prodigy(torch.optim.SGD):  # same name, another class: not recognised
        pass

    class MyProdigy(prodigyopt.Prodigy):  # a subclass keeps its parent's step(): recognised
        pass

    assert lr_free_record(Prodigy) is None
    assert lr_free_record(torch.optim.AdamW) is None
    assert lr_free_record(MyProdigy) is lr_free_record(prodigyopt.Prodigy)
    assert lr_free_record("Prodigy") is None


# ----------------------------------------------------------------------------- LoraPlus


@pytest.mark.parametrize("cls", RAISES + FIRST_GROUP, ids=_id)
def test_loraplus_refuses_optimizers_that_crash_on_or_ignore_the_ratio(cls):
    measured = "raises RuntimeError" if cls in RAISES else "first group's lr for every group"
    with pytest.raises(LoraPlusError) as info:
        loraplus.LoraPlus(cls, tiny_lora_model(), ratio=RATIO, lr=1.0)
    msg = str(info.value)
    assert msg.startswith(_id(cls) + " (measured on ")
    assert measured in msg and "A 1, B 4" in msg and "ProdigyPlusScheduleFree(split_groups=False)" in msg


@pytest.mark.parametrize(
    "factory",
    [
        functools.partial(prodigyopt.Prodigy, d_coef=0.5),
        functools.partial(functools.partial(pytorch_optimizer.DAdaptAdam), weight_decay=0.0),
        lambda groups, **kw: dadaptation.DAdaptAdan(groups, **kw),
    ],
    ids=["partial", "nested-partial", "lambda"],
)
def test_loraplus_refuses_them_behind_a_factory(factory):
    with pytest.raises(LoraPlusError, match="LoRA\\+ cannot work with it"):
        loraplus.LoraPlus(factory, tiny_lora_model(), ratio=RATIO, lr=1.0)


@pytest.mark.parametrize("cls", [prodigyopt.Prodigy, dadaptation.DAdaptAdaGrad, pytorch_optimizer.DAdaptAdam], ids=_id)
def test_at_ratio_1_every_group_has_one_rate_and_they_are_accepted(cls):
    """ratio=1 (the plain-LoRA baseline) gives every group one lr: nothing for them to get wrong."""
    model = tiny_lora_model()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = loraplus.LoraPlus(cls, model, ratio=1, lr=1.0)
    assert {g["lr"] for g in opt.param_groups} == {1.0}
    model(torch.randn(4, 8)).sum().backward()
    opt.step()  # prodigyopt would raise here if the rates differed


def test_loraplus_warns_for_prodigy_plus_default_and_not_with_a_shared_d():
    with pytest.warns(UserWarning, match=r"estimates d per group.*d_B/d_A.*split_groups=False"):
        _loraplus_quiet(PPSF)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt = _loraplus_quiet(PPSF, split_groups=False)
        _loraplus_quiet(functools.partial(PPSF, split_groups=False))
    assert [g["lr"] for g in opt.param_groups] == [1.0, RATIO, 1.0, 1.0]  # A, B, other, other.no_decay


def test_loraplus_with_prodigy_plus_shared_d_keeps_b_at_ratio_times_a_over_steps():
    """On the tiny LoRA model: with split_groups=False every group carries the same d after each
    step, and each group's rate is that d times its lr, so B's is ratio × A's."""
    torch.manual_seed(0)
    model = tiny_lora_model()
    opt = _loraplus_quiet(PPSF, model=model, split_groups=False)
    x, y = torch.randn(32, 8), torch.randint(0, 2, (32,))
    for _ in range(5):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        _quiet(opt.step)
    by_role = {g["role"]: g for g in opt.param_groups}
    assert len({g["d"] for g in opt.param_groups}) == 1
    assert by_role["B"]["d"] * by_role["B"]["lr"] == RATIO * by_role["A"]["d"] * by_role["A"]["lr"]


def _loraplus_quiet(factory, model=None, **kwargs):
    with contextlib.redirect_stdout(io.StringIO()):
        return loraplus.LoraPlus(factory, model or tiny_lora_model(), ratio=RATIO, lr=1.0, **kwargs)


# ----------------------------------------------------------------------------- apply


def test_apply_refuses_them_before_changing_the_optimizer():
    """prodigyopt crashes at step() once apply has split B into a group at 4× the rate."""
    model = tiny_lora_model()
    opt = prodigyopt.Prodigy(model.parameters(), lr=1.0)
    before = [dict(g) for g in opt.param_groups]
    with pytest.raises(LoraPlusError, match=r"prodigyopt.Prodigy \(measured on .*group0 1, group0.B 4"):
        loraplus.apply_to_optimizer(opt, model, ratio=RATIO, schedulers=[])
    assert opt.param_groups == before


def test_apply_on_prodigy_plus_built_with_one_group_keeps_its_shared_d():
    """Built over one group, ProdigyPlusScheduleFree turns split_groups off itself (one d); apply's
    B sibling keeps that option, so d stays shared and nothing is warned."""
    model = tiny_lora_model()
    opt = _quiet(PPSF, model.parameters(), lr=1.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        loraplus.apply_to_optimizer(opt, model, ratio=RATIO, schedulers=[])
    assert [(g["name"], g["lr"], g["split_groups"]) for g in opt.param_groups] == [
        ("group0", 1.0, False), ("group0.B", RATIO, False),
    ]


# ----------------------------------------------------------------------------- find_lr


def _find_lr(optimizer_cls, ratios, calls, **kwargs):
    data = [(torch.randn(16, 8), torch.randint(0, 2, (16,))) for _ in range(4)]

    def loss_fn(model, batch):
        calls.append(1)
        return torch.nn.functional.cross_entropy(model(batch[0]), batch[1])

    return loraplus.find_lr(
        tiny_lora_model(), loss_fn, data, optimizer_cls=optimizer_cls, ratios=ratios,
        max_steps=30 * len(ratios), lr_range=(1e-3, 10.0), progress=False, **kwargs,
    )


@pytest.mark.parametrize("factory", [prodigyopt.Prodigy, functools.partial(pytorch_optimizer.Prodigy, d_coef=0.5)], ids=["prodigyopt", "partial"])
def test_find_lr_refuses_them_before_probing_when_a_ratio_is_not_1(factory):
    calls: list[int] = []
    with pytest.raises(LoraPlusError, match=r"find_lr compares ratios 1, 4, but .*Prodigy \(measured on .*split_groups=False"):
        _find_lr(factory, (1, 4), calls)
    assert not calls  # refused before a single loss was computed


def test_find_lr_runs_prodigy_plus_with_a_shared_d_and_says_the_probed_lr_is_a_multiplier():
    calls: list[int] = []
    with pytest.warns(UserWarning, match="ProdigyPlusScheduleFree adapts its own step size.*multiplier"):
        with warnings.catch_warnings():
            warnings.filterwarnings("error", message=".*d_B/d_A")  # shared d: LoraPlus has nothing to warn about
            suggestion = _find_lr(functools.partial(PPSF, split_groups=False), (1, 4), calls)
    assert calls and suggestion.ratio in (1, 4)


def test_find_lr_warns_that_the_probed_lr_is_a_multiplier_for_a_refused_optimizer_at_ratio_1():
    calls: list[int] = []
    with pytest.warns(UserWarning, match="prodigyopt.Prodigy adapts its own step size"):
        _find_lr(prodigyopt.Prodigy, (1,), calls)
    assert calls


# ----------------------------------------------------------------------------- docs


def test_the_compatibility_page_shows_the_records_table():
    page = (ROOT / "docs" / "compatibility.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```text\n(.*?)\n```", page, re.S)
    assert lr_free_table() in blocks
