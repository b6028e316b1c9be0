"""Every public entry point validates its numbers the same way: NumPy scalars are accepted (and stored
as plain floats), tensors are refused with what to pass instead, and computed rates must stay finite.

Expected rates are written from the numbers the test passes, never read back from the library."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import loraplus
from loraplus import LoraPlusError
from loraplus.compat import create_loraplus_optimizer
from loraplus.testing import tiny_lora_model

LR = np.float32(1e-3)
RATIO = np.int64(8)


def _rates(opt: torch.optim.Optimizer) -> dict[str, float]:
    return {g["name"]: g["lr"] for g in opt.param_groups}


def _a_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for n, p in model.named_parameters() if ".lora_A." in n]


def test_loraplus_takes_numpy_scalars_for_every_number_and_stores_floats():
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, lr=LR, ratio=RATIO, weight_decay=np.float64(0.05))
    assert _rates(opt) == {"A": float(LR), "B": float(LR) * 8, "other": float(LR), "other.no_decay": float(LR)}
    assert all(type(g["lr"]) is float and type(g["weight_decay"]) is float for g in opt.param_groups)
    assert {g["name"]: g["weight_decay"] for g in opt.param_groups}["other"] == 0.05


def test_role_lr_and_lr_embedding_take_numpy_scalars():
    model = tiny_lora_model()
    groups = loraplus.param_groups(model, lr=1e-3, ratio=4, role_lr={"B": np.float32(0.5)},
                                   lr_embedding=np.float16(1e-4))
    assert {g["name"]: g["lr"] for g in groups}["B"] == 0.5
    assert all(type(g["lr"]) is float for g in groups)


def test_per_group_refine_and_apply_take_numpy_scalars():
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.AdamW, model, lr=1e-3, ratio=16)
    assert loraplus.scheduler_bounds(opt, np.float32(0.5)) == [0.5, 8.0, 0.5, 0.5]  # A, B, other, other.no_decay

    model = tiny_lora_model()
    refined = loraplus.apply_to_groups([{"params": list(model.parameters()), "lr": np.float32(0.25)}], model, ratio=np.int32(4))
    assert sorted(g["lr"] for g in refined) == [0.25, 1.0]
    parent, sibling = refined  # the parent keeps the user's own value; the B sibling is a computed float
    assert parent["lr"] is refined[0]["lr"] and type(sibling["lr"]) is float

    model = tiny_lora_model()
    opt = loraplus.apply_to_optimizer(torch.optim.SGD(model.parameters(), lr=0.5), model, ratio=np.float64(2.0))
    assert sorted(g["lr"] for g in opt.param_groups) == [0.5, 1.0]


def test_precondition_and_the_factory_take_a_numpy_damping():
    model = tiny_lora_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    pre = loraplus.precondition(opt, model, reg=np.float32(0.25))
    assert pre.reg == 0.25 and type(pre.reg) is float
    pre.remove()
    model = tiny_lora_model()
    opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1, precondition="riemannian", precondition_reg=np.float64(0.5))
    found = loraplus.pairing.preconditioner(opt)
    assert found is not None and found.reg == 0.5


def test_compat_and_monitor_take_numpy_scalars():
    model = tiny_lora_model()
    opt = create_loraplus_optimizer(model, torch.optim.AdamW, lr=LR, loraplus_lr_ratio=RATIO,
                                    loraplus_weight_decay=np.float32(0.0))
    assert sorted({g["lr"] for g in opt.param_groups}) == [float(LR), float(LR) * 8]
    monitor = loraplus.Monitor(opt, model, every=np.int64(2))
    assert monitor.every == 2 and type(monitor.every) is int
    monitor.close()


TENSOR_CALLS = {
    "LoraPlus lr": lambda m, t: loraplus.LoraPlus(torch.optim.AdamW, m, lr=t),
    "LoraPlus ratio": lambda m, t: loraplus.LoraPlus(torch.optim.AdamW, m, lr=1e-3, ratio=t),
    "param_groups weight_decay": lambda m, t: loraplus.param_groups(m, lr=1e-3, weight_decay=t),
    "role_lr": lambda m, t: loraplus.param_groups(m, lr=1e-3, role_lr={"B": t}),
    "apply_to_groups ratio": lambda m, t: loraplus.apply_to_groups([{"params": list(m.parameters()), "lr": 0.1}], m, ratio=t),
    "precondition reg": lambda m, t: loraplus.precondition(torch.optim.SGD(m.parameters(), lr=0.1), m, reg=t),
    "compat lr": lambda m, t: create_loraplus_optimizer(m, torch.optim.AdamW, lr=t, loraplus_lr_ratio=4),
}


@pytest.mark.parametrize("call", sorted(TENSOR_CALLS))
def test_a_tensor_number_is_refused_with_what_to_pass(call):
    with pytest.raises(LoraPlusError, match=r"float\(value\)"):
        TENSOR_CALLS[call](tiny_lora_model(), torch.tensor(1e-3))


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -1.0, "1e-3", True])
def test_the_damping_is_refused_when_not_a_finite_non_negative_number(bad):
    model = tiny_lora_model()
    with pytest.raises(LoraPlusError, match="reg"):
        loraplus.precondition(torch.optim.SGD(model.parameters(), lr=0.1), model, reg=bad)


def test_zero_damping_is_allowed():
    model = tiny_lora_model()
    assert loraplus.precondition(torch.optim.SGD(model.parameters(), lr=0.1), model, reg=0).reg == 0.0


@pytest.mark.parametrize("lr,ratio", [(1e300, 1e10), (np.float64(1e200), np.float64(1e200))])
def test_an_overflowing_b_rate_is_refused(lr, ratio):
    with pytest.raises(LoraPlusError, match=r"lr × ratio .* = inf"):
        loraplus.LoraPlus(torch.optim.AdamW, tiny_lora_model(), lr=lr, ratio=ratio)


def test_a_vanishing_b_rate_is_refused():
    with pytest.raises(LoraPlusError, match="not a usable learning rate"):
        loraplus.param_groups(tiny_lora_model(), lr=1e-300, ratio=1e-300)
