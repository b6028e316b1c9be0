"""Learning-rate schedulers keep the LoRA+ ratio — or, for scalar bounds, need loraplus.per_group.

The property: at every step, each group's lr divided by the A group's lr equals what it was when
the optimizer was built (B/A = λ, other/A as set by role_lr).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as S

import loraplus
from loraplus import Role
from loraplus.testing import tiny_lora_model


def make_opt(ratio: float = 16.0, lr: float = 1e-3, other: float = 0.5) -> torch.optim.Optimizer:
    """SGD with momentum (CyclicLR cycles momentum) over 4 groups: A, B, other, other.no_decay."""
    model = tiny_lora_model()
    return loraplus.LoraPlus(torch.optim.SGD, model, ratio=ratio, lr=lr, role_lr={Role.OTHER: other * lr}, momentum=0.9)


def lrs(opt: torch.optim.Optimizer) -> list[float]:
    return [float(g["lr"]) for g in opt.param_groups]


def relative(opt: torch.optim.Optimizer) -> list[float] | None:
    """Each group's lr over the A group's lr (None once A's lr is exactly 0)."""
    a = float(opt.param_groups[0]["lr"])
    assert opt.param_groups[0]["role"] == "A"
    return None if a == 0 else [x / a for x in lrs(opt)]


def assert_ratios_kept(opt: torch.optim.Optimizer, want: list[float], where: str) -> None:
    got = relative(opt)
    if got is None:  # A reached exactly 0: every group must be 0 too
        assert lrs(opt) == [0.0] * len(want), f"{where}: A's lr is 0 but the groups have {lrs(opt)}"
        return
    for g, x, w in zip(opt.param_groups, got, want):
        assert math.isclose(x, w, rel_tol=1e-9), f"{where}: group {g['name']} has lr/lr(A) = {x}, expected {w}"


# ------------------------------------------------------------------ schedulers that scale every group alike

Factory = Callable[[torch.optim.Optimizer, Any], Any]


def _draw_scheduler(data: st.DataObject, opt: torch.optim.Optimizer, steps: int) -> tuple[str, Any]:
    d = data.draw
    kind = d(
        st.sampled_from(
            [
                "LambdaLR",
                "MultiplicativeLR",
                "StepLR",
                "MultiStepLR",
                "ExponentialLR",
                "LinearLR",
                "ConstantLR",
                "PolynomialLR",
                "CosineAnnealingLR",
                "CosineAnnealingWarmRestarts",
                "SequentialLR",
                "ChainedScheduler",
                "ReduceLROnPlateau",
                "OneCycleLR+per_group",
                "CyclicLR+per_group",
                "ReduceLROnPlateau+per_group",
            ]
        ),
        label="scheduler",
    )
    gamma = d(st.floats(0.3, 0.99), label="gamma")
    t_max = d(st.integers(1, 20), label="T")
    if kind == "LambdaLR":
        warm = d(st.integers(1, 10))
        return kind, S.LambdaLR(opt, lambda t: min(1.0, (t + 1) / warm) * 0.97**t)
    if kind == "MultiplicativeLR":
        return kind, S.MultiplicativeLR(opt, lambda t: gamma)
    if kind == "StepLR":
        return kind, S.StepLR(opt, step_size=t_max, gamma=gamma)
    if kind == "MultiStepLR":
        return kind, S.MultiStepLR(opt, milestones=sorted(d(st.sets(st.integers(1, 30), max_size=4))), gamma=gamma)
    if kind == "ExponentialLR":
        return kind, S.ExponentialLR(opt, gamma=gamma)
    if kind == "LinearLR":
        return kind, S.LinearLR(
            opt, start_factor=d(st.floats(0.01, 1.0)), end_factor=d(st.floats(0.0, 1.0)), total_iters=t_max
        )
    if kind == "ConstantLR":
        return kind, S.ConstantLR(opt, factor=gamma, total_iters=t_max)
    if kind == "PolynomialLR":
        return kind, S.PolynomialLR(opt, total_iters=t_max, power=d(st.floats(0.5, 3.0)))
    if kind == "CosineAnnealingLR":
        return kind, S.CosineAnnealingLR(opt, T_max=t_max, eta_min=0.0)
    if kind == "CosineAnnealingWarmRestarts":
        return kind, S.CosineAnnealingWarmRestarts(opt, T_0=t_max, T_mult=d(st.integers(1, 3)), eta_min=0.0)
    if kind == "SequentialLR":
        warm = S.LinearLR(opt, start_factor=0.1, total_iters=t_max)
        decay = S.CosineAnnealingLR(opt, T_max=steps, eta_min=0.0)
        return kind, S.SequentialLR(opt, [warm, decay], milestones=[t_max])
    if kind == "ChainedScheduler":
        return kind, S.ChainedScheduler([S.ExponentialLR(opt, gamma=gamma), S.StepLR(opt, step_size=t_max, gamma=0.5)])
    if kind == "ReduceLROnPlateau":
        # eps=0: see test_reduce_on_plateau_eps_freezes_small_lrs_first for why the default eps breaks the ratio
        return kind, S.ReduceLROnPlateau(opt, factor=gamma, patience=d(st.integers(0, 3)), min_lr=0.0, eps=0.0)
    if kind == "OneCycleLR+per_group":
        peak = d(st.floats(1e-4, 1e-1))
        return kind, S.OneCycleLR(opt, max_lr=loraplus.per_group(opt, peak), total_steps=steps + 1)
    if kind == "CyclicLR+per_group":
        low = d(st.floats(1e-5, 1e-3))
        return kind, S.CyclicLR(
            opt,
            base_lr=loraplus.per_group(opt, low),
            max_lr=loraplus.per_group(opt, low * 10),
            step_size_up=t_max,
            mode=d(st.sampled_from(["triangular", "triangular2", "exp_range"])),
            gamma=gamma,
        )
    assert kind == "ReduceLROnPlateau+per_group"
    floor = d(st.floats(0.0, 1e-3))
    return kind, S.ReduceLROnPlateau(opt, factor=gamma, patience=0, min_lr=loraplus.per_group(opt, floor), eps=0.0)


@settings(max_examples=120)  # 16 scheduler kinds: several examples each
@given(
    ratio=st.sampled_from([2.0, 4.0, 16.0, 64.0]),
    lr=st.floats(1e-6, 1e-2),
    steps=st.integers(1, 40),
    data=st.data(),
)
def test_every_scheduler_keeps_each_groups_ratio_at_every_step(
    ratio: float, lr: float, steps: int, data: st.DataObject
) -> None:
    opt = make_opt(ratio=ratio, lr=lr)
    want = relative(opt)
    assert want is not None and want[1] == pytest.approx(ratio)
    kind, sched = _draw_scheduler(data, opt, steps)
    assert_ratios_kept(opt, want, f"{kind} at construction")
    metrics = data.draw(st.lists(st.floats(0.0, 10.0), min_size=steps, max_size=steps), label="metrics")
    for t in range(steps):
        opt.step()  # no gradients: parameters stay, only the schedule moves
        if kind.startswith("ReduceLROnPlateau"):
            sched.step(metrics[t])
        else:
            sched.step()
        assert_ratios_kept(opt, want, f"{kind} after step {t + 1}")


# --------------------------------------------------------------------------- the traps, and the fix


def _trace(
    opt: torch.optim.Optimizer, sched: Any, steps: int, metric: Callable[[int], float] | None = None
) -> list[list[float]]:
    out = [lrs(opt)]
    for t in range(steps):
        opt.step()
        sched.step(metric(t)) if metric else sched.step()
        out.append(lrs(opt))
    return out


def test_one_cycle_scalar_max_lr_turns_lora_plus_into_plain_lora() -> None:
    opt = make_opt(ratio=16.0)
    trace = _trace(opt, S.OneCycleLR(opt, max_lr=1e-3, total_steps=20), 19)
    assert all(row[1] == row[0] for row in trace), "the trap: B runs at A's lr at every step"


def test_one_cycle_per_group_max_lr_keeps_the_ratio_and_the_peak() -> None:
    opt = make_opt(ratio=16.0)
    peak = loraplus.per_group(opt, 1e-3)
    assert peak == pytest.approx([1e-3, 16e-3, 0.5e-3, 0.5e-3])
    trace = _trace(opt, S.OneCycleLR(opt, max_lr=peak, total_steps=20), 19)
    assert all(row[1] == pytest.approx(16 * row[0], rel=1e-12) for row in trace)
    assert max(row[0] for row in trace) == pytest.approx(1e-3, rel=1e-2)
    assert max(row[1] for row in trace) == pytest.approx(16e-3, rel=1e-2)


def test_cyclic_scalar_bounds_collapse_the_ratio_and_per_group_keeps_it() -> None:
    opt = make_opt(ratio=8.0)
    trace = _trace(opt, S.CyclicLR(opt, base_lr=1e-4, max_lr=1e-3, step_size_up=5), 12)
    assert all(row[1] == row[0] for row in trace)
    opt = make_opt(ratio=8.0)
    sched = S.CyclicLR(opt, base_lr=loraplus.per_group(opt, 1e-4), max_lr=loraplus.per_group(opt, 1e-3), step_size_up=5)
    assert all(row[1] == pytest.approx(8 * row[0], rel=1e-12) for row in _trace(opt, sched, 12))


def test_reduce_on_plateau_scalar_min_lr_collapses_the_ratio_and_per_group_keeps_it() -> None:
    worse = lambda t: float(t)  # noqa: E731 - a metric that never improves: reduce every step
    opt = make_opt(ratio=16.0)
    trace = _trace(opt, S.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=1e-4), 12, worse)
    assert trace[-1][0] == trace[-1][1] == 1e-4, "the trap: both clamp at the same floor, ratio 1"
    opt = make_opt(ratio=16.0)
    sched = S.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=loraplus.per_group(opt, 1e-4))
    last = _trace(opt, sched, 12, worse)[-1]
    assert last[0] == pytest.approx(1e-4) and last[1] == pytest.approx(16e-4)


def test_reduce_on_plateau_eps_freezes_small_lrs_first() -> None:
    """Trap: a group's lr is only reduced if the drop exceeds eps (1e-8); A's smaller lr stops first."""
    worse = lambda t: float(t)  # noqa: E731
    opt = make_opt(ratio=16.0, lr=1e-6)
    last = _trace(opt, S.ReduceLROnPlateau(opt, factor=0.1, patience=0), 6, worse)[-1]
    assert last[0] == pytest.approx(1e-8) and last[1] / last[0] < 2, "default eps: A froze at 1e-8, B kept falling"
    opt = make_opt(ratio=16.0, lr=1e-6)
    last = _trace(opt, S.ReduceLROnPlateau(opt, factor=0.1, patience=0, eps=0.0), 6, worse)[-1]
    assert last[1] / last[0] == pytest.approx(16.0)


def test_cosine_scalar_eta_min_shrinks_the_ratio_and_a_list_is_rejected() -> None:
    opt = make_opt(ratio=16.0)
    trace = _trace(opt, S.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4), 10)
    assert trace[-1][0] == pytest.approx(1e-4) and trace[-1][1] == pytest.approx(1e-4), "ratio ends at 1"
    opt = make_opt(ratio=16.0)
    sched = S.CosineAnnealingLR(opt, T_max=10, eta_min=loraplus.per_group(opt, 1e-4))  # accepted here ...
    opt.step()
    with pytest.raises(TypeError):  # ... but rejected at the first step
        sched.step()


def cosine_with_floor(opt: torch.optim.Optimizer, T_max: int, floor: float) -> S.LambdaLR:
    """The documented replacement for CosineAnnealingLR(eta_min>0): a LambdaLR whose factor decays
    from 1 to ``floor`` (eta_min / lr), so every group ends at ``floor`` times its own lr."""
    return S.LambdaLR(opt, lambda t: floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(t, T_max) / T_max)))


def test_cosine_floor_recipe_matches_per_group_cosine_annealing() -> None:
    opt = make_opt(ratio=16.0)
    base = lrs(opt)
    eta = loraplus.per_group(opt, 1e-4)
    trace = _trace(opt, cosine_with_floor(opt, T_max=10, floor=1e-4 / 1e-3), 14)
    for t, row in enumerate(trace):
        want = [e + (b - e) * 0.5 * (1 + math.cos(math.pi * min(t, 10) / 10)) for b, e in zip(base, eta)]
        assert row == pytest.approx(want, rel=1e-12)
    assert trace[-1][:2] == pytest.approx([1e-4, 16e-4])


# ---------------------------------------------------------------------------------------- per_group


def test_per_group_uses_the_start_lr_once_a_scheduler_has_moved_it() -> None:
    opt = make_opt(ratio=4.0)
    sched = S.ExponentialLR(opt, gamma=0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    assert loraplus.per_group(opt, 2e-3) == pytest.approx([2e-3, 8e-3, 1e-3, 1e-3])


def test_per_group_accepts_param_groups_and_an_explicit_reference() -> None:
    groups = loraplus.param_groups(tiny_lora_model(), lr=1e-4, ratio=8)
    assert loraplus.per_group(groups, 1e-3) == pytest.approx([1e-3, 8e-3, 1e-3, 1e-3])
    assert loraplus.per_group(groups, 1e-3, reference=1e-3) == pytest.approx([1e-4, 8e-4, 1e-4, 1e-4])
    assert loraplus.per_group(groups, 0) == [0.0, 0.0, 0.0, 0.0]


@pytest.mark.parametrize(
    ("args", "kwargs", "match"),
    [
        (("1e-3",), {}, "string"),
        ((-1.0,), {}, "non-negative"),
        ((float("nan"),), {}, "finite"),
        ((1e-3,), {"reference": 0}, "positive"),
    ],
)
def test_per_group_rejects_bad_numbers(args: tuple, kwargs: dict, match: str) -> None:
    with pytest.raises(loraplus.LoraPlusError, match=match):
        loraplus.per_group(make_opt(), *args, **kwargs)


def test_per_group_without_an_a_group_asks_for_a_reference() -> None:
    opt = torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)], "lr": 0.1}])
    with pytest.raises(loraplus.LoraPlusError, match="no group has role 'A'.*reference="):
        loraplus.per_group(opt, 1e-3)
    assert loraplus.per_group(opt, 1e-3, reference=0.1) == pytest.approx([1e-3])
    with pytest.raises(loraplus.LoraPlusError, match="optimizer or a list of param groups"):
        loraplus.per_group({"lr": 1.0}, 1e-3)
