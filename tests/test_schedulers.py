"""Learning-rate schedulers keep the LoRA+ ratio — or, for scalar bounds, need loraplus.scheduler_bounds.

The property: at every step, each group's lr divided by the A group's lr equals what it was when
the optimizer was built (B/A = λ, other/A as set by role_lr).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.optim import lr_scheduler as S
from torch.optim.swa_utils import SWALR
from transformers.optimization import GreedyLR

import loraplus
from loraplus import Role
from loraplus._groups._scheduler_catalog import record_for
from loraplus.schedulers import SCHEDULERS, Fix, SchedulerRecord
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
        return kind, S.OneCycleLR(opt, max_lr=loraplus.scheduler_bounds(opt, peak), total_steps=steps + 1)
    if kind == "CyclicLR+per_group":
        low = d(st.floats(1e-5, 1e-3))
        return kind, S.CyclicLR(
            opt,
            base_lr=loraplus.scheduler_bounds(opt, low),
            max_lr=loraplus.scheduler_bounds(opt, low * 10),
            step_size_up=t_max,
            mode=d(st.sampled_from(["triangular", "triangular2", "exp_range"])),
            gamma=gamma,
        )
    assert kind == "ReduceLROnPlateau+per_group"
    floor = d(st.floats(0.0, 1e-3))
    return kind, S.ReduceLROnPlateau(opt, factor=gamma, patience=0, min_lr=loraplus.scheduler_bounds(opt, floor), eps=0.0)


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
    peak = loraplus.scheduler_bounds(opt, 1e-3)
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
    sched = S.CyclicLR(opt, base_lr=loraplus.scheduler_bounds(opt, 1e-4), max_lr=loraplus.scheduler_bounds(opt, 1e-3), step_size_up=5)
    assert all(row[1] == pytest.approx(8 * row[0], rel=1e-12) for row in _trace(opt, sched, 12))


def test_reduce_on_plateau_scalar_min_lr_collapses_the_ratio_and_per_group_keeps_it() -> None:
    worse = lambda t: float(t)  # noqa: E731 - a metric that never improves: reduce every step
    opt = make_opt(ratio=16.0)
    trace = _trace(opt, S.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=1e-4), 12, worse)
    assert trace[-1][0] == trace[-1][1] == 1e-4, "the trap: both clamp at the same floor, ratio 1"
    opt = make_opt(ratio=16.0)
    sched = S.ReduceLROnPlateau(opt, factor=0.5, patience=0, min_lr=loraplus.scheduler_bounds(opt, 1e-4))
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
    sched = S.CosineAnnealingLR(opt, T_max=10, eta_min=loraplus.scheduler_bounds(opt, 1e-4))  # accepted here ...
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
    eta = loraplus.scheduler_bounds(opt, 1e-4)
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
    assert loraplus.scheduler_bounds(opt, 2e-3) == pytest.approx([2e-3, 8e-3, 1e-3, 1e-3])


def test_per_group_accepts_param_groups_and_an_explicit_reference() -> None:
    groups = loraplus.param_groups(tiny_lora_model(), lr=1e-4, ratio=8)
    assert loraplus.scheduler_bounds(groups, 1e-3) == pytest.approx([1e-3, 8e-3, 1e-3, 1e-3])
    assert loraplus.scheduler_bounds(groups, 1e-3, reference=1e-3) == pytest.approx([1e-4, 8e-4, 1e-4, 1e-4])
    assert loraplus.scheduler_bounds(groups, 0) == [0.0, 0.0, 0.0, 0.0]


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
        loraplus.scheduler_bounds(make_opt(), *args, **kwargs)


def test_per_group_without_an_a_group_asks_for_a_reference() -> None:
    opt = torch.optim.SGD([{"params": [torch.zeros(2, requires_grad=True)], "lr": 0.1}])
    with pytest.raises(loraplus.LoraPlusError, match="no group has role 'A'.*reference="):
        loraplus.scheduler_bounds(opt, 1e-3)
    assert loraplus.scheduler_bounds(opt, 1e-3, reference=0.1) == pytest.approx([1e-3])
    with pytest.raises(loraplus.LoraPlusError, match="optimizer or a list of param groups"):
        loraplus.scheduler_bounds({"lr": 1.0}, 1e-3)


# ------------------------------------------------------------------------- the catalogue, against the packages
#
# For every catalogued scheduler type, two runs, each checked at every step against a reference run of
# the same scheduler on a plain optimizer that never saw loraplus (rates written down by hand here):
#   LoraPlus:  LoraPlus(...) first, then the scheduler, with per-group bounds written out by hand;
#   apply:     a plain optimizer with two groups at different rates and the scheduler (scalar bounds),
#              then loraplus.apply_to_optimizer(..., schedulers=[it]).



Bounds = Callable[[float], Any]  # a bound's plain-LoRA value -> what the scheduler is given


class Halving(S.LRScheduler):
    """A scheduler of the user's own, subclassing only torch's base class."""

    def get_lr(self) -> list[float]:
        return [b * 0.5 ** (self.last_epoch // 3) for b in self.base_lrs]


def _metric(t: int) -> float:
    """Improves for 4 steps, then worsens for 6, and again: reductions, and (GreedyLR) increases."""
    return float([5, 4, 3, 2, 3, 4, 5, 6, 7, 8][t % 10])


# record name -> (build(opt, bound), takes a metric). Bounds: min/max from 1e-4 to 1e-2 around lr 1e-3
CASES: dict[str, tuple[Callable[[torch.optim.Optimizer, Bounds], Any], bool]] = {
    "LRScheduler": (lambda o, b: Halving(o), False),
    "LambdaLR": (lambda o, b: S.LambdaLR(o, lambda t: 1 / (1 + t)), False),
    "MultiplicativeLR": (lambda o, b: S.MultiplicativeLR(o, lambda t: 0.9), False),
    "StepLR": (lambda o, b: S.StepLR(o, step_size=4, gamma=0.5), False),
    "MultiStepLR": (lambda o, b: S.MultiStepLR(o, milestones=[3, 7, 12], gamma=0.3), False),
    "ConstantLR": (lambda o, b: S.ConstantLR(o, factor=0.25, total_iters=5), False),
    "LinearLR": (lambda o, b: S.LinearLR(o, start_factor=0.1, end_factor=0.7, total_iters=9), False),
    "ExponentialLR": (lambda o, b: S.ExponentialLR(o, gamma=0.8), False),
    "PolynomialLR": (lambda o, b: S.PolynomialLR(o, total_iters=15, power=2.0), False),
    "CosineAnnealingLR": (lambda o, b: S.CosineAnnealingLR(o, T_max=11, eta_min=0.0), False),
    "CosineAnnealingWarmRestarts": (lambda o, b: S.CosineAnnealingWarmRestarts(o, T_0=4, T_mult=2), False),
    "CyclicLR": (lambda o, b: S.CyclicLR(o, base_lr=b(1e-4), max_lr=b(1e-2), step_size_up=3, mode="triangular2"), False),
    "OneCycleLR": (lambda o, b: S.OneCycleLR(o, max_lr=b(1e-2), total_steps=25), False),
    "ReduceLROnPlateau": (
        lambda o, b: S.ReduceLROnPlateau(o, factor=0.5, patience=0, min_lr=b(2e-4), eps=0.0),
        True,
    ),
    "SequentialLR": (
        lambda o, b: S.SequentialLR(
            o, [S.LinearLR(o, start_factor=0.1, total_iters=4), S.CosineAnnealingLR(o, T_max=12)], milestones=[4]
        ),
        False,
    ),
    "ChainedScheduler": (
        lambda o, b: S.ChainedScheduler([S.ExponentialLR(o, 0.9), S.StepLR(o, step_size=5, gamma=0.2)]),
        False,
    ),
    "SWALR": (lambda o, b: SWALR(o, swa_lr=b(3e-4), anneal_epochs=6, anneal_strategy="linear"), False),
    "GreedyLR": (
        lambda o, b: GreedyLR(o, factor=0.5, patience=1, min_lr=b(2e-4), max_lr=b(4e-3), reset_start=3, eps=0.0),
        True,
    ),
}

RATIO = 8.0


def test_every_torch_scheduler_class_and_swalr_and_greedylr_has_its_own_record():
    """A torch (or transformers) upgrade that adds a scheduler class fails here until it is catalogued."""
    classes = [getattr(S, n) for n in S.__all__ if isinstance(getattr(S, n), type)]
    assert len(classes) >= 15
    for cls in [*classes, SWALR, GreedyLR]:
        found = record_for(cls)
        assert found is not None and found[1] is cls, f"{cls.__qualname__} has no record of its own"
    assert sorted(CASES) == sorted(r.name for r in SCHEDULERS), "every record needs a case below"
    assert len({r.key for r in SCHEDULERS}) == len(SCHEDULERS)


def test_every_transformers_scheduler_type_builds_a_catalogued_scheduler():
    from transformers import SchedulerType, get_scheduler

    kwargs = {
        SchedulerType.COSINE_WITH_MIN_LR: {"min_lr": 1e-4},
        SchedulerType.COSINE_WARMUP_WITH_MIN_LR: {"min_lr_rate": 0.1},
        SchedulerType.WARMUP_STABLE_DECAY: {"num_decay_steps": 3},
    }
    built = {}
    for kind in SchedulerType:
        opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1e-3)
        sched = get_scheduler(kind, opt, 2, 10, scheduler_specific_kwargs=kwargs.get(kind))
        found = record_for(type(sched))
        assert found is not None and found[1] is type(sched), kind
        built[kind.value] = type(sched).__name__
    assert built["reduce_lr_on_plateau"] == "ReduceLROnPlateau" and built["greedy"] == "GreedyLR"
    assert {v for k, v in built.items() if k not in ("reduce_lr_on_plateau", "greedy")} == {"LambdaLR"}


def _five_groups() -> torch.optim.Optimizer:
    params = [torch.nn.Parameter(torch.zeros(2)) for _ in range(5)]
    return torch.optim.SGD([{"params": [p], "lr": 1e-3 * (i + 1)} for i, p in enumerate(params)], momentum=0.9)


@pytest.mark.parametrize("record", SCHEDULERS, ids=lambda r: r.name)
def test_each_record_says_what_the_real_scheduler_keeps(record: SchedulerRecord):
    """Keys written into the groups, per-group lists (5 groups: no other list has 5 entries), children."""
    build, _ = CASES[record.name]
    opt = _five_groups()
    before = set(opt.param_groups[0])
    sched = build(opt, lambda v: v)
    children = getattr(sched, record.children) if record.children else []
    assert all(isinstance(c, S.LRScheduler) for c in children) and (len(children) > 1) == bool(record.children)
    for g in opt.param_groups:
        written = set(g) - before
        if not children:  # a composite writes nothing itself; the schedulers it drives do
            assert written == {k.name for k in record.group_keys}, record.name
    lists = {k for k, v in vars(sched).items() if isinstance(v, (list, tuple)) and len(v) == 5}
    assert lists == {p.name for p in record.lists}, record.name
    assert record.leaves_mark == bool(set(opt.param_groups[0]) - before), record.name
    for b in record.bounds:
        assert b.argument in inspect.signature(type(sched).__init__).parameters, (record.name, b.argument)
        assert b.stored_as is None or b.stored_as in {p.name for p in (*record.group_keys, *record.lists)}


# (record, argument) -> a scheduler given ``value`` for that argument (5 groups)
WITH_VALUE: dict[tuple[str, str], Callable[[torch.optim.Optimizer, Any], Any]] = {
    ("CosineAnnealingLR", "eta_min"): lambda o, v: S.CosineAnnealingLR(o, T_max=10, eta_min=v),
    ("CosineAnnealingWarmRestarts", "eta_min"): lambda o, v: S.CosineAnnealingWarmRestarts(o, T_0=4, eta_min=v),
    ("CyclicLR", "base_lr"): lambda o, v: S.CyclicLR(o, base_lr=v, max_lr=1.0),
    ("CyclicLR", "max_lr"): lambda o, v: S.CyclicLR(o, base_lr=1e-6, max_lr=v),
    ("OneCycleLR", "max_lr"): lambda o, v: S.OneCycleLR(o, max_lr=v, total_steps=10),
    ("ReduceLROnPlateau", "min_lr"): lambda o, v: S.ReduceLROnPlateau(o, min_lr=v),
    ("SWALR", "swa_lr"): lambda o, v: SWALR(o, swa_lr=v),
    ("GreedyLR", "min_lr"): lambda o, v: GreedyLR(o, min_lr=v),
    ("GreedyLR", "max_lr"): lambda o, v: GreedyLR(o, max_lr=v),
}


def test_each_bounds_fix_matches_what_the_scheduler_accepts():
    """PER_GROUP: a list (one value per group) is accepted and works; LAMBDA_FLOOR: torch rejects a list."""
    bounds = {(r.name, b.argument): b for r in SCHEDULERS for b in r.bounds}
    assert {k for k, b in bounds.items() if b.fix is not Fix.HARMLESS} == set(WITH_VALUE)
    assert all(b.harmless is not None for b in bounds.values() if b.fix is Fix.HARMLESS)
    for (name, argument), build in WITH_VALUE.items():
        opt = _five_groups()
        takes_metric = CASES[name][1]
        try:
            sched = build(opt, [1e-4 * (i + 1) for i in range(5)])
            opt.step()
            sched.step(1.0) if takes_metric else sched.step()
            accepted = True
        except (TypeError, ValueError):
            accepted = False
        assert accepted == (bounds[name, argument].fix is Fix.PER_GROUP), (name, argument)


def _run(opt: torch.optim.Optimizer, ref: torch.optim.Optimizer, scheds: tuple[Any, Any], metric: bool, want, steps=24):
    """Step both runs; at every step each group of ``opt`` must have ``want(name, ref)``."""
    seen = set()
    for t in range(steps):
        seen.add(float(ref.param_groups[0]["lr"]))
        for g in opt.param_groups:
            expected = want(g["name"], ref)
            assert math.isclose(g["lr"], expected, rel_tol=1e-9, abs_tol=1e-15), (t, g["name"], g["lr"], expected)
        for o, sch in zip((opt, ref), scheds):
            o.step()
            sch.step(_metric(t)) if metric else sch.step()
    assert len(seen) >= 2, f"the schedule never moved: {sorted(seen)}"


def _by_role(model: torch.nn.Module) -> dict[str, list[torch.nn.Parameter]]:
    """tiny_lora_model's trainable tensors by what they are (PEFT names; ground truth written here)."""
    out: dict[str, list[torch.nn.Parameter]] = {"A": [], "B": [], "other": [], "other.no_decay": []}
    for n, p in model.named_parameters():
        if p.requires_grad:
            kind = "A" if ".lora_A." in n else "B" if ".lora_B." in n else "other" if p.ndim == 2 else "other.no_decay"
            out[kind].append(p)
    return out


@pytest.mark.parametrize("record", SCHEDULERS, ids=lambda r: r.name)
def test_loraplus_then_the_scheduler_with_per_group_bounds_keeps_b_at_ratio_times_a(record: SchedulerRecord):
    build, metric = CASES[record.name]
    lr, other = 1e-3, 5e-3
    opt = loraplus.LoraPlus(
        torch.optim.SGD, tiny_lora_model(), ratio=RATIO, lr=lr, role_lr={Role.OTHER: other}, momentum=0.9
    )
    names = [g["name"] for g in opt.param_groups]
    assert names == ["A", "B", "other", "other.no_decay"]
    # the reference: plain LoRA (B at A's rate), the other groups at their own rate, bounds scaled by hand
    parts = _by_role(tiny_lora_model())
    rates = {"A": lr, "B": lr, "other": other, "other.no_decay": other}
    ref = torch.optim.SGD([{"params": parts[n], "lr": rates[n]} for n in names], momentum=0.9)
    mine = build(opt, lambda v: [v, RATIO * v, v * other / lr, v * other / lr])
    theirs = build(ref, lambda v: [v, v, v * other / lr, v * other / lr])
    for b in record.bounds:  # the same lists, from loraplus.scheduler_bounds
        if b.fix is Fix.PER_GROUP:
            assert loraplus.scheduler_bounds(opt, 1e-2) == pytest.approx([1e-2, RATIO * 1e-2, 5e-2, 5e-2])
    index = {n: i for i, n in enumerate(names)}
    _run(opt, ref, (mine, theirs), metric, lambda n, r: r.param_groups[index[n]]["lr"] * (RATIO if n == "B" else 1))


@pytest.mark.parametrize("record", SCHEDULERS, ids=lambda r: r.name)
def test_the_scheduler_then_apply_keeps_b_at_ratio_times_its_parent(record: SchedulerRecord):
    """Scalar bounds here: apply scales what the scheduler keeps per group (eta_min stays 0, see the table)."""
    build, metric = CASES[record.name]
    runs = []
    for _ in range(2):
        model = tiny_lora_model()
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        opt = torch.optim.SGD(
            [
                {"params": [p for n, p in named if p.ndim == 2], "lr": 1e-3},  # A, B and the head
                {"params": [p for n, p in named if p.ndim < 2], "lr": 1e-2},  # norm and biases
            ],
            momentum=0.9,
        )
        runs.append((model, opt, build(opt, lambda v: v)))
    (model, opt, sched), (_, ref, ref_sched) = runs
    loraplus.apply_to_optimizer(opt, model, RATIO, schedulers=[sched])
    parent = {"group0": 0, "group0.B": 0, "group1": 1}
    _run(
        opt, ref, (sched, ref_sched), metric,
        lambda n, r: r.param_groups[parent[n]]["lr"] * (RATIO if n.endswith(".B") else 1),
    )


def test_swalr_with_a_scalar_swa_lr_turns_lora_plus_into_plain_lora_and_per_group_keeps_it():
    opt = make_opt(ratio=16.0)
    last = _trace(opt, SWALR(opt, swa_lr=1e-4, anneal_epochs=5), 8)[-1]
    assert last[0] == last[1] == pytest.approx(1e-4), "the trap: every group anneals to the one swa_lr"
    opt = make_opt(ratio=16.0)
    last = _trace(opt, SWALR(opt, swa_lr=loraplus.scheduler_bounds(opt, 1e-4), anneal_epochs=5), 8)[-1]
    assert last == pytest.approx([1e-4, 16e-4, 0.5e-4, 0.5e-4])  # other groups were built at 0.5 x A's lr


def test_per_group_docstring_names_every_bound_it_is_for():
    import re

    doc = " ".join((loraplus.scheduler_bounds.__doc__ or "").split())
    for rec in SCHEDULERS:
        for b in rec.bounds:
            if b.fix is Fix.PER_GROUP:  # named as ``Class(argument=, ...)``
                calls = re.findall(rf"\b{rec.name}\(([^)]*)\)", doc)
                assert any(f"{b.argument}=" in c for c in calls), (rec.name, b.argument)
            elif b.fix is Fix.LAMBDA_FLOOR:  # named as what accepts no list
                assert re.search(rf"\b{rec.name}\b[^.]*no list for ``{b.argument}``", doc), (rec.name, b.argument)


def test_the_compatibility_page_shows_the_catalogue_as_rendered():
    from pathlib import Path

    from loraplus.schedulers import scheduler_table

    page = (Path(__file__).resolve().parents[1] / "docs" / "compatibility.md").read_text(encoding="utf-8")
    begin, end = "<!-- scheduler table: generated by loraplus.schedulers.scheduler_table() -->\n", "\n<!-- end of scheduler table -->"
    assert begin in page and end in page
    shown = page.split(begin, 1)[1].split(end, 1)[0]
    assert shown == scheduler_table(), (
        "docs/compatibility.md's scheduler table differs from the catalogue; paste the output of\n"
        "python -c 'from loraplus.schedulers import scheduler_table; print(scheduler_table())'"
    )


def test_per_group_measures_against_the_rate_the_schedule_started_from():
    """After a scheduler has moved every lr by 1/8, an explicit reference still means the start rates."""
    opt = make_opt(ratio=4.0, lr=1e-3)  # A 1e-3, B 4e-3, other groups 0.5e-3
    sched = S.ExponentialLR(opt, gamma=0.5)
    for _ in range(3):
        opt.step()
        sched.step()
    assert lrs(opt)[0] == pytest.approx(1e-3 / 8)
    assert loraplus.scheduler_bounds(opt, 2e-3, reference=1e-3) == pytest.approx([2e-3, 8e-3, 1e-3, 1e-3])
