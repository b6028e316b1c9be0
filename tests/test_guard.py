"""The ratio guard: before every step, each group still trains at the rate LoRA+ gave it.

Expected rates come from how each test builds the model and its groups (A at ``LR``, B at
``RATIO * LR``, hand-written parent groups at their own rates), never from the guard's relations.
"""

from __future__ import annotations

import gc
import math
import warnings
import weakref

import pytest
import torch
from torch import nn

import loraplus
from loraplus._groups._guard import Cause

LR, RATIO = 1e-3, 4.0


def _model() -> nn.Module:
    torch.manual_seed(0)
    return loraplus.testing.tiny_lora_model()


def _grads(model: nn.Module) -> None:
    for p in model.parameters():
        if p.requires_grad:
            p.grad = torch.full_like(p, 0.01)


def _rates(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: float(g["lr"]) for g in opt.param_groups}


def _quiet_steps(opt: torch.optim.Optimizer, model: nn.Module, n: int, sched=None, metric=None) -> None:
    """``n`` steps that must raise no warning at all (the guard's included)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for k in range(n):
            _grads(model)
            opt.step()
            if sched is not None:
                sched.step(*(() if metric is None else (metric(k),)))


# --- attachment ---------------------------------------------------------------------------------------------


def test_loraplus_attaches_a_guard_by_default_and_none_attaches_nothing():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR)
    g = loraplus.groups.guard(opt)
    assert g is not None and g.active
    # the tiny model's groups are A, B, other, other.no_decay: every non-A group follows A
    assert {(r.group, r.reference, r.factor) for r in g.relations} == {
        ("B", "A", RATIO), ("other", "A", 1.0), ("other.no_decay", "A", 1.0)
    }
    assert loraplus.groups.guard(loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR, guard=None)) is None
    g.remove()
    assert loraplus.groups.guard(opt) is None and not g.active
    g.remove()  # idempotent


@pytest.mark.parametrize("bad", ["warning", "RAISE", True, 1, "none"])
def test_an_unknown_guard_mode_is_refused(bad):
    with pytest.raises(loraplus.LoraPlusError, match="guard must be 'warn', 'raise' or None"):
        loraplus.LoraPlus(torch.optim.AdamW, _model(), RATIO, lr=LR, guard=bad)
    with pytest.raises(loraplus.LoraPlusError, match="guard must be"):
        loraplus.apply_to_optimizer(torch.optim.SGD(_model().parameters(), lr=LR), _model(), RATIO, guard=bad)


def test_apply_attaches_a_guard_that_follows_each_sibling_s_own_parent():
    model = _model()
    a_b = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim == 2]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and p.ndim < 2]
    opt = torch.optim.SGD([{"params": a_b, "lr": 3e-3, "name": "dec"}, {"params": rest, "lr": 5e-4, "name": "nd"}])
    loraplus.apply_to_optimizer(opt, model, RATIO, guard="raise")
    g = loraplus.groups.guard(opt)
    assert [(r.group, r.reference, r.factor) for r in g.relations] == [("dec.B", "dec", RATIO)]
    _quiet_steps(opt, model, 3)
    # the parents may follow schedules of their own (layer-wise decay): only siblings are tied
    opt.param_groups[2]["lr"] = 1e-5
    _quiet_steps(opt, model, 1)
    opt.param_groups[0]["lr"] = 1e-3  # parent moved, its sibling did not: 4 × 1e-3 expected, 1.2e-2 found
    with pytest.raises(loraplus.LoraPlusError, match=r"group 'dec\.B' \(B parameters\) has lr=0\.012 .* 4 × the lr of group 'dec' \(0\.001\) = 0\.004"):
        opt.step()


def test_the_trainer_mixin_passes_its_guard_mode_to_apply(tmp_path):
    transformers = pytest.importorskip("transformers")
    from loraplus.integrations.transformers import LoraPlusTrainer

    args = transformers.TrainingArguments(str(tmp_path), optim="sgd", learning_rate=0.1, report_to="none", use_cpu=True)
    for mode, expected in (("raise", "raise"), (None, None)):
        trainer = LoraPlusTrainer(model=_model(), args=args, loraplus_ratio=RATIO, loraplus_guard=mode)
        found = loraplus.groups.guard(trainer.create_optimizer())
        assert (found.mode.value if found else None) == expected
    with pytest.raises(loraplus.LoraPlusError, match="guard must be"):
        LoraPlusTrainer(model=_model(), args=args, loraplus_guard="loud")


# --- what breaks the ratio is found, once, with the cause and the fix ---------------------------------------


def test_one_rate_written_into_every_group_warns_once_naming_group_rates_cause_and_fix():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR)
    _quiet_steps(opt, model, 2)
    for g in opt.param_groups:  # what Lightning's lr finder and many hand-written warm-ups do
        g["lr"] = 5e-4
    with pytest.warns(UserWarning) as caught:
        for _ in range(3):
            _grads(model)
            opt.step()
    ours = [w for w in caught if "ratio broken" in str(w.message)]
    assert len(ours) == 1  # once, not at every step
    text = str(ours[0].message)
    assert "group 'B' (B parameters) has lr=0.0005" in text and "4 × the lr of group 'A' (0.0005) = 0.002" in text
    assert "one rate into every group" in text and "Fix:" in text and "before step 2" in text
    g = loraplus.groups.guard(opt)
    assert g.violation.cause is Cause.ONE_RATE and g.violations == 3


def test_raise_mode_refuses_before_the_step_so_no_parameter_moves():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, RATIO, lr=LR, guard="raise")
    opt.param_groups[1]["lr"] = LR  # B at A's rate
    _grads(model)
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(loraplus.LoraPlusError, match="group 'B'"):
        opt.step()
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


@pytest.mark.parametrize(
    "make, cause",
    [
        # one scalar peak for every group: OneCycleLR writes it into each group's max_lr and lr
        (lambda opt: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=1e-2, total_steps=20), Cause.SCALAR_BOUND),
        # one scalar cycle: every group starts at base_lr
        (lambda opt: torch.optim.lr_scheduler.CyclicLR(opt, base_lr=1e-4, max_lr=1e-2, step_size_up=5), Cause.SCALAR_BOUND),
        # SWALR with a scalar swa_lr anneals every group to it
        (lambda opt: torch.optim.swa_utils.SWALR(opt, swa_lr=1e-2, anneal_epochs=3), Cause.SCALAR_BOUND),
        # a scalar floor: every group decays towards the same eta_min, the ratio drifts
        (lambda opt: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=10, eta_min=1e-4), Cause.UNKNOWN),
    ],
    ids=["OneCycleLR-scalar", "CyclicLR-scalar", "SWALR-scalar", "CosineAnnealingLR-eta_min"],
)
def test_schedulers_with_one_bound_for_every_group_are_caught(make, cause):
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, RATIO, lr=LR, guard="raise")
    sched = make(opt)
    with pytest.raises(loraplus.LoraPlusError, match="ratio broken") as err:
        for _ in range(12):
            _grads(model)
            opt.step()
            sched.step()
    g = loraplus.groups.guard(opt)
    assert g.violations == 1 and g.violation.cause is cause
    assert g.violation.relation.group == "B" and "Fix:" in str(err.value)


def test_scheduler_floor_reached_by_every_group_reads_as_one_rate():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, RATIO, lr=LR)
    sched = torch.optim.lr_scheduler.ReduceLROnPlateau(opt, factor=0.1, patience=0, min_lr=1e-5)
    with pytest.warns(UserWarning, match="ratio broken"):
        for _ in range(6):
            _grads(model)
            opt.step()
            sched.step(1.0)  # a flat loss: reduce at every step down to the one floor
    assert loraplus.groups.guard(opt).violation.cause is Cause.ONE_RATE


# --- no false alarms ----------------------------------------------------------------------------------------


def _schedulers():
    S = torch.optim.lr_scheduler
    return {
        "LambdaLR": lambda o: S.LambdaLR(o, lambda k: 1 / (k + 1)),
        "MultiplicativeLR": lambda o: S.MultiplicativeLR(o, lambda k: 0.9),
        "StepLR": lambda o: S.StepLR(o, 3, 0.5),
        "MultiStepLR": lambda o: S.MultiStepLR(o, [2, 5], 0.3),
        "ConstantLR": lambda o: S.ConstantLR(o, 0.5, 4),
        "LinearLR": lambda o: S.LinearLR(o, 0.1, 1.0, 5),
        "ExponentialLR": lambda o: S.ExponentialLR(o, 0.8),
        "PolynomialLR": lambda o: S.PolynomialLR(o, 10, 2.0),
        "CosineAnnealingLR": lambda o: S.CosineAnnealingLR(o, 10),
        "CosineAnnealingWarmRestarts": lambda o: S.CosineAnnealingWarmRestarts(o, 4, 2),
        "SequentialLR": lambda o: S.SequentialLR(o, [S.LinearLR(o, 0.1, 1.0, 3), S.CosineAnnealingLR(o, 9)], [3]),
        "ChainedScheduler": lambda o: S.ChainedScheduler([S.ConstantLR(o, 0.5, 3), S.ExponentialLR(o, 0.9)]),
        "OneCycleLR-per-group": lambda o: S.OneCycleLR(o, max_lr=loraplus.scheduler_bounds(o, 1e-2), total_steps=20),
        "CyclicLR-per-group": lambda o: S.CyclicLR(
            o, base_lr=loraplus.scheduler_bounds(o, 1e-4), max_lr=loraplus.scheduler_bounds(o, 1e-2), step_size_up=4
        ),
        "ReduceLROnPlateau-min_lr-0": lambda o: S.ReduceLROnPlateau(o, factor=0.5, patience=2),
        "SWALR-per-group": lambda o: torch.optim.swa_utils.SWALR(o, swa_lr=loraplus.scheduler_bounds(o, 1e-2), anneal_epochs=4),
    }


@pytest.mark.parametrize("name", list(_schedulers()))
def test_schedulers_that_keep_the_ratio_raise_no_alarm_over_twenty_steps(name):
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, RATIO, lr=LR, guard="raise")
    sched = _schedulers()[name](opt)
    metric = (lambda k: 1.0) if name.startswith("ReduceLROnPlateau") else None
    seen = set()
    for _ in range(20):
        _quiet_steps(opt, model, 1, sched, metric)
        rates = _rates(opt)
        seen.add(rates["A"])
        assert math.isclose(rates["B"], RATIO * rates["A"], rel_tol=1e-9)
    assert len(seen) >= 2, f"{name} never moved the rate: the check above proved nothing"


def test_transformers_schedules_raise_no_alarm():
    transformers = pytest.importorskip("transformers")
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR, guard="raise")
    sched = transformers.get_cosine_with_min_lr_schedule_with_warmup(opt, 3, 20, min_lr_rate=0.1)
    _quiet_steps(opt, model, 20, sched)
    assert loraplus.groups.guard(opt).violations == 0


def test_a_group_added_later_is_not_followed():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, RATIO, lr=LR, guard="raise")
    extra = nn.Parameter(torch.zeros(3))
    opt.add_param_group({"params": [extra], "param_names": ["extra"], "lr": 0.5, "name": "new"})
    _quiet_steps(opt, model, 2)


# --- through state_dict and load_state_dict -----------------------------------------------------------------


def test_a_resumed_optimizer_keeps_its_guard_and_the_guard_reads_the_loaded_rates():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR, guard="raise")
    sched = torch.optim.lr_scheduler.LinearLR(opt, 0.2, 1.0, 5)
    _quiet_steps(opt, model, 3, sched)
    saved = opt.state_dict()

    fresh = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR, guard="raise")
    loraplus.load_optimizer_state(fresh, saved)  # replaces every group dict with the saved one
    assert _rates(fresh)["A"] == pytest.approx(LR * (0.2 + 3 * 0.8 / 5))
    _quiet_steps(fresh, model, 2)

    broken = dict(saved, param_groups=[dict(g) for g in saved["param_groups"]])
    broken["param_groups"][1]["lr"] = broken["param_groups"][0]["lr"]  # a checkpoint with B at A's rate
    other = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR, guard="raise")
    other.load_state_dict(broken)
    _grads(model)
    with pytest.raises(loraplus.LoraPlusError, match="group 'B'"):
        other.step()


def test_groups_are_followed_by_name_when_their_order_changes():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, RATIO, lr=LR, guard="raise")
    opt.param_groups.reverse()  # B is no longer at index 1, A no longer at 0
    _quiet_steps(opt, model, 1)
    next(g for g in opt.param_groups if g["name"] == "B")["lr"] = 123.0
    with pytest.raises(loraplus.LoraPlusError, match="group 'B' .* has lr=123"):
        opt.step()


def test_a_tensor_lr_on_the_cpu_is_read():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR, guard="raise")
    for g in opt.param_groups:  # what users do for torch.compile'd steps: rates held in tensors
        g["lr"] = torch.tensor(g["lr"])
    _quiet_steps(opt, model, 1)
    opt.param_groups[1]["lr"].fill_(LR)
    with pytest.raises(loraplus.LoraPlusError, match="group 'B'"):
        opt.step()


# --- it holds nothing --------------------------------------------------------------------------------------


def test_the_guard_does_not_keep_the_optimizer_alive():
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, RATIO, lr=LR)
    ref = weakref.ref(opt)
    g = loraplus.groups.guard(opt)
    gc.disable()
    try:
        del opt
        assert ref() is None  # freed by reference counting alone: no cycle through the guard
    finally:
        gc.enable()
    assert g.relations  # the handle the user kept is still usable


def test_the_guard_reads_only_the_group_dicts():
    """A CUDA-free stand-in for 'no tensor work': a tensor lr on a device other than the CPU is never read."""
    model = _model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, RATIO, lr=LR, guard="raise")
    opt.param_groups[1]["lr"] = torch.tensor(LR, device="meta")  # reading it would fail loudly
    assert loraplus.groups.guard(opt).check(opt) == []
    opt.param_groups[2]["lr"] = 7.0  # the groups it can read are still checked
    assert [v.relation.group for v in loraplus.groups.guard(opt).check(opt)] == ["other"]


# --- the Trainer --------------------------------------------------------------------------------------------


def test_a_trainer_run_with_warm_up_and_decay_keeps_the_ratio_and_a_rewriting_callback_is_refused(tmp_path):
    transformers = pytest.importorskip("transformers")
    import test_trainer as T

    from loraplus.integrations.transformers import LoraPlusTrainer

    class OneRate(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            if state.global_step == 3:
                for g in optimizer.param_groups:
                    g["lr"] = 1e-4

    seen: list[dict[str, float]] = []

    class Record(transformers.TrainerCallback):
        def on_step_end(self, args, state, control, optimizer=None, **kwargs):
            seen.append({g["name"]: g["lr"] for g in optimizer.param_groups})

    def trainer(out, callbacks):
        return LoraPlusTrainer(
            model=T._model(), args=T._args(out, max_steps=6, warmup_steps=2, save_strategy="no"),
            train_dataset=T._Tokens(), callbacks=callbacks, loraplus_ratio=RATIO, loraplus_guard="raise",
        )  # fmt: skip

    kept = trainer(tmp_path / "kept", [Record()])
    kept.train()
    assert type(kept.optimizer).__name__ == "AcceleratedOptimizer" and loraplus.groups.guard(kept.optimizer).violations == 0
    assert len({s["group0"] for s in seen}) >= 4  # warm-up and decay both moved the rate
    assert all(s["group0.B"] == pytest.approx(RATIO * s["group0"], rel=1e-12) for s in seen)
    with pytest.raises(loraplus.LoraPlusError, match=r"group 'group0\.B' \(B parameters\) has lr=0\.0001"):
        trainer(tmp_path / "broken", [OneRate()]).train()
