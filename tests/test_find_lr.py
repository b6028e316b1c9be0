"""loraplus.find_lr: the model is restored bit for bit, the suggestion lands where the test's own
ground truth says (the LoRA+ paper's toy, an in-test reference sweep), and every refusal says what to do.

Ground truth here comes from how the test builds things (its own snapshots, its own training
loops, the committed toy-heatmap JSON), never from calling find_lr's own helpers.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import random
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import loraplus
from loraplus import LoraPlusError, Role, find_lr
from loraplus._find_lr import Phase

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny matrices: one thread is fastest, and the machine is shared."""
    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)


# --------------------------------------------------------------------------- a model with everything to restore


class _Lora(nn.Module):
    """A hand-written LoRA layer: frozen base weight, lora_A / lora_B parameters (B = 0)."""

    def __init__(self, d_in: int, d_out: int, r: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(d_out, d_in) / d_in**0.5, requires_grad=False)
        self.lora_A = nn.Parameter(torch.randn(r, d_in) * 0.3)
        self.lora_B = nn.Parameter(torch.zeros(d_out, r))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight.T + x @ self.lora_A.T @ self.lora_B.T


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inp = _Lora(6, 12, 2)
        self.bn = nn.BatchNorm1d(12)
        self.drop = nn.Dropout(0.2)
        self.mid = _Lora(12, 12, 2)
        self.frozen_bn = nn.BatchNorm1d(12)  # in eval mode: its running stats must not move
        self.head = nn.Linear(12, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.frozen_bn(self.mid(self.drop(torch.relu(self.bn(self.inp(x)))))))


def _net() -> _Net:
    torch.manual_seed(0)
    net = _Net()
    net.train()
    net.frozen_bn.eval()
    net.head.bias.requires_grad_(False)  # a frozen parameter
    net.head.weight.grad = torch.full_like(net.head.weight, 0.5)  # an existing gradient
    return net


def _data(n: int = 6, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)) for _ in range(n)]


def _ce(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return nn.functional.cross_entropy(model(batch[0]), batch[1])


def _snapshot(model: nn.Module) -> dict:
    return {
        "params": [(n, p, p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()],
        "buffers": [(n, b, b.clone()) for n, b in model.named_buffers()],
        "data_ptr": [t.data_ptr() for t in [*model.parameters(), *model.buffers()]],
        "grads": [(n, p.grad, None if p.grad is None else p.grad.clone()) for n, p in model.named_parameters()],
        "training": [(n, m.training) for n, m in model.named_modules()],
        "torch_rng": torch.get_rng_state(),
        "random": random.getstate(),
    }


def _assert_unchanged(model: nn.Module, snap: dict) -> None:
    params = dict(model.named_parameters())
    for name, obj, value, requires_grad in snap["params"]:
        assert params[name] is obj, name
        assert torch.equal(obj, value), name
        assert obj.requires_grad == requires_grad, name
    buffers = dict(model.named_buffers())
    for name, obj, value in snap["buffers"]:
        assert buffers[name] is obj, name
        assert torch.equal(obj, value), name
    for name, grad, value in snap["grads"]:
        assert params[name].grad is grad, name
        if grad is not None:
            assert torch.equal(grad, value), name
    assert [t.data_ptr() for t in [*model.parameters(), *model.buffers()]] == snap["data_ptr"]
    assert [(n, m.training) for n, m in model.named_modules()] == snap["training"]
    assert torch.equal(torch.get_rng_state(), snap["torch_rng"])
    assert random.getstate() == snap["random"]


@pytest.mark.parametrize("offload", [False, True])
def test_the_model_is_left_bit_identical(offload):
    net = _net()
    torch.manual_seed(123)
    random.seed(5)
    snap = _snapshot(net)
    modes = set()

    def loss_fn(model, batch):  # train=False: the probe runs in the modes the model was given
        modes.add((model.training, model.bn.training, model.frozen_bn.training))
        return _ce(model, batch)

    s = find_lr(net, loss_fn, _data(), ratios=(1, 4), max_steps=60, offload=offload, train=False, progress=False)
    assert s.steps_used > 0 and modes == {(True, True, False)}
    _assert_unchanged(net, snap)
    assert net.bn.num_batches_tracked.item() == 0  # train-mode buffers moved during the probe and came back


def test_a_loss_fn_error_propagates_unchanged_and_the_model_is_still_restored():
    net = _net()
    snap = _snapshot(net)
    calls = 0

    def flaky(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        nonlocal calls
        calls += 1
        if calls == 5:
            raise RuntimeError("disk on fire")
        return _ce(model, batch)

    with pytest.raises(RuntimeError, match="disk on fire") as info:
        find_lr(net, flaky, _data(), ratios=(1, 4), max_steps=60, progress=False)
    assert type(info.value) is RuntimeError  # not wrapped, not re-labelled
    _assert_unchanged(net, snap)


def test_a_keyboard_interrupt_restores_the_model_too():
    net = _net()
    snap = _snapshot(net)
    calls = 0

    def interrupted(model, batch):
        nonlocal calls
        calls += 1
        if calls == 30:
            raise KeyboardInterrupt
        return _ce(model, batch)

    with pytest.raises(KeyboardInterrupt):
        find_lr(net, interrupted, _data(), ratios=(1, 4), max_steps=60, progress=False)
    _assert_unchanged(net, snap)


def test_numpy_global_rng_is_restored_after_a_loss_that_draws_from_it():
    """A loss that adds NumPy noise moves NumPy's global RNG on every probe step; afterwards the
    next draw must be the one a run without find_lr gets from the same seed."""
    np = pytest.importorskip("numpy")
    np.random.seed(11)
    expected = np.random.random_sample(8)  # ground truth: the draw right after seeding, no find_lr
    draws = 0

    def noisy(model, batch):
        nonlocal draws
        draws += 1
        noise = torch.from_numpy(np.random.normal(0.0, 1e-3, size=batch[0].shape).astype("float32"))
        return _ce(model, (batch[0] + noise, batch[1]))

    net = _net()
    np.random.seed(11)
    find_lr(net, noisy, _data(), ratios=(1, 4), max_steps=60, progress=False)
    assert draws > 0  # the probe really consumed NumPy randomness
    np.testing.assert_array_equal(np.random.random_sample(8), expected)


def test_a_one_shot_iterator_is_cached_and_cycled():
    net = _net()
    snap = _snapshot(net)
    data = _data(3)
    s = find_lr(net, _ce, iter(data), ratios=(1, 4), max_steps=60, progress=False)
    assert s.steps_used > 0
    _assert_unchanged(net, snap)


# --------------------------------------------------------------------------- the LoRA+ paper's toy


def _toy(seed: int) -> tuple[nn.Module, tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    from benchmarks.studies.toy_heatmap.run import N_TRAIN, draw

    x, y, w_in, w_out, a0, b0 = draw(seed)

    class Toy(nn.Module):  # f(x) = W_out · ReLU(B · A · ReLU(W_in · x)); only A and B train
        def __init__(self) -> None:
            super().__init__()
            self.register_buffer("w_in", w_in.clone())
            self.register_buffer("w_out", w_out.clone())
            self.lora_A = nn.Parameter(a0.clone())
            self.lora_B = nn.Parameter(b0.clone())

        def forward(self, inp: torch.Tensor) -> torch.Tensor:
            return torch.relu(torch.relu(inp @ self.w_in.T) @ self.lora_A.T @ self.lora_B.T) @ self.w_out

    return Toy(), (x[:N_TRAIN], y[:N_TRAIN]), (x[N_TRAIN:], y[N_TRAIN:])


def _mse(model: nn.Module, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
    return ((model(batch[0]) - batch[1]) ** 2).mean()


def test_the_paper_toy_gets_a_near_optimal_cell():
    """Seed 0 of benchmarks/studies/toy_heatmap/results/toy_heatmap_paper.json (float64, full-batch GD, 200 steps): its
    grid's best test loss is the JSON's min over test['200'][0]. Measured: find_lr's suggestion,
    trained the same 200 steps, reaches within 2x of that best cell (1.25x, at ratio 1 and lr 0.019).
    The confirmation runs at ratios 1 and 4 are within 5 % of each other here (0.0212 and 0.0222),
    so which of them wins is not pinned; with the 4x-the-minimum divergence rule, since replaced by
    one that reads losses of any sign, ratio 1's edge sat one lr step lower and ratio 4 won (1.27x)."""
    data = json.loads((ROOT / "benchmarks/studies/toy_heatmap/results/toy_heatmap_paper.json").read_text())
    grid_best = min(v for row in data["test"]["200"][0] for v in row)
    model, train, test = _toy(0)
    s = find_lr(model, _mse, [train], optimizer_cls=torch.optim.SGD, ratios=(1, 4, 16, 64),
                lr_range=(1e-5, 10.0), max_steps=600, progress=False)
    assert s.ratio in (1, 4)
    # the suggestion's nearest grid cell (in log lr) is near-optimal on seed 0: within 2x the grid's best
    grid = data["grid"]
    i_a = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / s.lr)))
    i_b = min(range(len(grid)), key=lambda i: abs(math.log(grid[i] / (s.lr * s.ratio))))
    assert data["test"]["200"][0][i_a][i_b] < 2 * grid_best, (grid[i_a], grid[i_b], s.explain())
    opt = torch.optim.SGD([{"params": [model.lora_A], "lr": s.lr}, {"params": [model.lora_B], "lr": s.lr * s.ratio}])
    for _ in range(200):
        opt.zero_grad()
        _mse(model, train).backward()
        opt.step()
    with torch.no_grad():
        reached = _mse(model, test).item()
    assert reached < 2 * grid_best, (reached, grid_best, s.explain())


# --------------------------------------------------------------------------- against an in-test reference sweep


def _task() -> tuple[nn.Module, list, tuple[torch.Tensor, torch.Tensor]]:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 2))
    model = loraplus.testing.tiny_lora_model(d=8, r=2, layers=2, n_out=2)
    g = torch.Generator().manual_seed(3)
    xs = torch.randn(512, 8, generator=g)
    with torch.no_grad():
        ys = teacher(xs).argmax(1)
    batches = [(xs[i : i + 32], ys[i : i + 32]) for i in range(0, 512, 32)]
    return model, batches, (xs, ys)


def _train(model: nn.Module, batches: list, lr: float, ratio: float, steps: int) -> float:
    a = [p for n, p in model.named_parameters() if "lora_A" in n]
    b = [p for n, p in model.named_parameters() if "lora_B" in n]
    rest = [p for n, p in model.named_parameters() if p.requires_grad and "lora_" not in n]
    opt = torch.optim.AdamW([{"params": a, "lr": lr}, {"params": b, "lr": lr * ratio}, {"params": rest, "lr": lr}],
                            weight_decay=0.0)
    for k in range(steps):
        opt.zero_grad()
        _ce(model, batches[k % len(batches)]).backward()
        opt.step()
    with torch.no_grad():
        return sum(_ce(model, bt).item() for bt in batches) / len(batches)


def test_the_suggestion_is_close_to_a_reference_sweeps_best():
    steps = 100
    model, batches, _ = _task()
    sweep = {}
    for lr in (1e-3, 3e-3, 1e-2, 3e-2):
        for ratio in (1, 4, 16):
            sweep[lr, ratio] = _train(copy.deepcopy(model), batches, lr, ratio, steps)
    best = min(v for v in sweep.values() if math.isfinite(v))
    s = find_lr(model, _ce, batches, ratios=(1, 4, 16), max_steps=270, weight_decay=0.0, progress=False)
    reached = _train(copy.deepcopy(model), batches, s.lr, s.ratio, steps)
    worst = max(v for v in sweep.values() if math.isfinite(v))
    assert reached < 1.5 * best, (reached, best, sweep, s.explain())  # stated factor: 1.5x the sweep's best
    assert reached < worst


# --------------------------------------------------------------------------- the rule, on a scripted loss curve


def _rises_too_far(smoothed: float, low: float, start: float, spread: float) -> bool:
    """The documented divergence rule: the smoothed loss above its minimum so far by more than 3x
    the larger of the fall from the start to that minimum and the start's spread (differences
    below 1e-12 of the losses' size are rounding)."""
    rounding = 1e-12 * max(abs(start), abs(low), abs(smoothed))
    return smoothed - low > max(3 * max(start - low, spread), rounding)


def _assert_divergence_as_documented(s, n_head: int) -> None:
    """Every point of s.table is flagged diverged exactly when the rule says: a non-finite loss, or,
    after the range test's first n_head steps, a rise too far; the start (mean) and spread (max -
    min) are those of the range test's first n_head losses, for its confirmation runs too; each
    probe (a confirmation retry too) tracks its own minimum, and stops at the first divergence."""
    for r in {p.ratio for p in s.table}:
        head = [p.loss for p in s.table if p.ratio == r and p.phase is Phase.RANGE][:n_head]
        start, spread = sum(head) / len(head), max(head) - min(head)
        for phase in (Phase.RANGE, Phase.CONFIRM):
            low = math.inf
            for p in (p for p in s.table if p.ratio == r and p.phase == phase):
                if p.step == 1:
                    low = math.inf
                ruled = phase is Phase.CONFIRM or p.step > n_head
                blown = not math.isfinite(p.loss) or (ruled and _rises_too_far(p.smoothed, low, start, spread))
                assert p.diverged == blown, p
                low = min(low, p.smoothed)


class _Scripted(nn.Module):
    """One trainable lora_A / lora_B pair whose loss the test writes: under plain SGD the loss's
    gradient on A[0, 0] is 1, so A[0, 0] falls by exactly the lr of each step and the distance
    travelled, d, is the sum of the lrs so far; the loss *value* is ``curve(d)``."""

    def __init__(self) -> None:
        super().__init__()
        self.lora_A = nn.Parameter(torch.zeros(2, 3, dtype=torch.float64))
        self.lora_B = nn.Parameter(torch.zeros(3, 2, dtype=torch.float64))


def _scripted_loss(curve):
    def loss_fn(model: nn.Module, batch: object) -> torch.Tensor:
        a = model.lora_A[0, 0]
        d = -a.detach().item()  # starts at 0, grows by each step's lr
        return a - a.detach() + curve(d)

    return loss_fn


def _reference_reading(lrs: list[float], curve, beta: float = 0.9, noise=None):
    """The documented rule, written out: the loss before step k is curve(sum of the earlier lrs)
    (plus noise[k - 1], cycled, when given); a bias-corrected EMA; the start is the mean loss of
    the first tenth, its spread their max - min; the test stops at NaN or, after the first tenth,
    when the smoothed loss rises above its minimum so far by more than 3x the larger of the fall
    from the start to that minimum and the spread; the minimum is looked for after the first
    tenth; the edge is the first step from the minimum on whose smoothed loss is above the start,
    or that diverged; each read at the lr of round(beta / (1 - beta)) steps earlier."""
    lag = round(beta / (1 - beta))
    n_head = math.ceil(0.1 * len(lrs))
    d, avg, low, smoothed, raw = 0.0, 0.0, math.inf, [], []
    start = spread = None
    for k, lr in enumerate(lrs, start=1):
        value = curve(d) + (0.0 if noise is None else noise[(k - 1) % len(noise)])
        if not math.isfinite(value):
            smoothed.append(math.inf)
            break
        avg = beta * avg + (1 - beta) * value
        sm = avg / (1 - beta**k)
        smoothed.append(sm)
        raw.append(value)
        if start is not None and _rises_too_far(sm, low, start, spread):
            break
        low = min(low, sm)
        if k == n_head:
            start, spread = sum(raw) / n_head, max(raw) - min(raw)
        d += lr
    start = sum(raw[:n_head]) / n_head
    i_min = min(range(n_head, len(raw)), key=lambda i: smoothed[i])  # after the start window
    i_edge = next((i for i in range(i_min, len(smoothed)) if smoothed[i] > start), None)
    at = lambda i: lrs[max(0, i - lag)]  # noqa: E731
    return start, at(i_min), None if i_edge is None else at(i_edge)


def _range_lrs(lo: float, hi: float, n: int) -> list[float]:
    return [lo * (hi / lo) ** (k / (n - 1)) for k in range(n)]


def _dip(d: float) -> float:
    """1.1 at the start, settling to 1 over the first tenth (so the start's mean differs from its
    first value), down to 0.5 at d = 0.1, back above the start from about d = 0.3, NaN from d = 3."""
    if d > 3:
        return math.nan
    return 1.0 + 0.1 * math.exp(-d / 2e-5) - 0.5 * math.exp(-(math.log(max(d, 1e-12) / 0.1) ** 2)) + max(0.0, d - 0.3) * 4


def test_the_suggestion_is_the_edge_over_safety_as_documented():
    lrs = _range_lrs(1e-5, 1.0, 100)
    start, at_min, edge = _reference_reading(lrs, _dip)
    assert edge is not None and at_min < edge  # the script has a dip and an edge
    s = find_lr(_Scripted(), _scripted_loss(_dip), [None], optimizer_cls=torch.optim.SGD, ratios=(1,),
                max_steps=150, lr_range=(1e-5, 1.0), safety=2.5, progress=False)
    (row,) = s.per_ratio
    assert row.start_loss == pytest.approx(start, rel=1e-12)
    assert row.lr_at_best == pytest.approx(at_min, rel=1e-12)
    assert row.edge_lr == pytest.approx(edge, rel=1e-12)
    assert row.halvings == 0
    assert s.lr == row.suggested_lr == pytest.approx(edge / 2.5, rel=1e-12)
    assert s.lag == 9
    _assert_divergence_as_documented(s, 10)


def test_an_easy_first_batch_is_not_taken_for_the_minimum():
    """Seen on the width family: the first batch's loss far below the rest made the bias-corrected
    average's first value the minimum, and the next ordinary batch the 'edge'."""

    def lucky_first(d: float) -> float:
        return 0.6 if d == 0 else _dip(d)

    lrs = _range_lrs(1e-5, 1.0, 100)
    start, at_min, edge = _reference_reading(lrs, lucky_first)
    _, _, edge_plain = _reference_reading(lrs, _dip)
    assert edge == pytest.approx(edge_plain, rel=0.5) and at_min > lrs[9]  # the lucky batch changes neither
    s = find_lr(_Scripted(), _scripted_loss(lucky_first), [None], optimizer_cls=torch.optim.SGD, ratios=(1,),
                max_steps=150, lr_range=(1e-5, 1.0), progress=False)
    (row,) = s.per_ratio
    assert row.start_loss == pytest.approx(start, rel=1e-12)
    assert row.lr_at_best == pytest.approx(at_min, rel=1e-12) and row.edge_lr == pytest.approx(edge, rel=1e-12)
    _assert_divergence_as_documented(s, 10)


def test_beta_sets_the_lag_the_lrs_are_read_at():
    lrs = _range_lrs(1e-5, 1.0, 100)
    for beta, lag in ((0.0, 0), (0.5, 1), (0.8, 4)):
        _, _, edge = _reference_reading(lrs, _dip, beta=beta)
        s = find_lr(_Scripted(), _scripted_loss(_dip), [None], optimizer_cls=torch.optim.SGD, ratios=(1,),
                    max_steps=150, lr_range=(1e-5, 1.0), beta=beta, progress=False)
        assert s.lag == lag and s.per_ratio[0].edge_lr == pytest.approx(edge, rel=1e-12), beta


def test_without_an_edge_the_minimum_stands_in_and_a_note_says_so():
    def falling(d: float) -> float:  # a minimum at d = 0.01, then back towards the start but never above it
        return 1.0 - 0.3 * math.exp(-(math.log(max(d, 1e-12) / 0.01) ** 2))

    lrs = _range_lrs(1e-5, 1e-2, 100)
    _, at_min, edge = _reference_reading(lrs, falling)
    assert edge is None and at_min < lrs[-1 - 9] / 2  # the minimum is well inside the range
    s = find_lr(_Scripted(), _scripted_loss(falling), [None], optimizer_cls=torch.optim.SGD, ratios=(1,),
                max_steps=150, lr_range=(1e-5, 1e-2), progress=False)
    assert s.per_ratio[0].edge_lr is None
    assert s.lr == pytest.approx(at_min / loraplus._find_lr._probe.DEFAULT_SAFETY, rel=1e-12)
    assert any("did not climb back" in n and "raise lr_range[1]" in n for n in s.notes)


def _cliff(d: float) -> float:
    return math.nan if d > 0.05 else 1.0 - 4 * d


def _confirm_attempts(s) -> list:
    return [p for p in s.table if p.phase is Phase.CONFIRM and p.step == 1]


def test_a_confirmation_that_diverges_is_retried_at_half_the_lr():
    # at a constant lr c the loss before confirmation step k is at d = (k - 1) c: the 50-step run
    # diverges iff 49 c > 0.05. The range test stops at the cliff, so its unused steps fund a retry.
    s = find_lr(_Scripted(), _scripted_loss(_cliff), [None], optimizer_cls=torch.optim.SGD, ratios=(1,),
                max_steps=150, lr_range=(1e-6, 1.0), safety=1.2, progress=False)
    (row,) = s.per_ratio
    first = row.edge_lr / 1.2
    expected = next(h for h in range(20) if 49 * first / 2**h <= 0.05)
    assert expected == 1  # the script makes the first confirmation, and only it, diverge
    attempts = _confirm_attempts(s)
    assert [p.lr for p in attempts] == pytest.approx([first, first / 2], rel=1e-12)
    assert row.halvings == 1 and s.lr == row.suggested_lr == pytest.approx(first / 2, rel=1e-12)
    assert math.isfinite(row.confirm_loss) and "lowest mean loss" in s.reason
    assert s.steps_used <= 150


def test_retries_stop_when_the_budget_is_spent_and_the_reason_says_so():
    # safety 1: the first retry diverges too (49 c / 2 > 0.05), and a third attempt does not fit in 150 steps
    s = find_lr(_Scripted(), _scripted_loss(_cliff), [None], optimizer_cls=torch.optim.SGD, ratios=(1,),
                max_steps=150, lr_range=(1e-6, 1.0), safety=1.0, progress=False)
    (row,) = s.per_ratio
    assert 49 * row.edge_lr / 2 > 0.05
    attempts = _confirm_attempts(s)
    assert len(attempts) == 2 and row.halvings == 1 and row.confirm_loss == math.inf
    assert all(any(p.diverged for p in s.table if p.phase is Phase.CONFIRM and p.lr == a.lr) for a in attempts)
    assert "every confirmation run diverged" in s.reason and s.steps_used <= 150


# --------------------------------------------------------------------------- the record


class _Counting(torch.optim.AdamW):
    steps = 0

    def step(self, closure=None):  # type: ignore[override]
        type(self).steps += 1
        return super().step(closure)


def test_the_table_is_consistent_and_explain_and_plot_work(tmp_path):
    _Counting.steps = 0
    net = _net()
    s = find_lr(net, _ce, _data(), optimizer_cls=_Counting, ratios=(1, 4), max_steps=90,
                lr_range=(1e-4, 1e3), progress=False)
    assert s.steps_used == _Counting.steps == sum(not p.diverged for p in s.table)
    assert s.steps_used <= 90
    assert {p.ratio for p in s.table} == {1.0, 4.0}
    for p in s.table:  # every point that diverged is flagged, and only those stop a probe
        if not math.isfinite(p.loss) or not math.isfinite(p.smoothed):
            assert p.diverged
    _assert_divergence_as_documented(s, 3)  # the first tenth of 30 range-test steps
    ranges = [p for p in s.table if p.phase is Phase.RANGE]
    assert any(p.diverged for p in ranges)  # lr up to 1e3 must blow up
    for r in (1.0, 4.0):
        pts = [p for p in ranges if p.ratio == r]
        assert [p.step for p in pts] == list(range(1, len(pts) + 1))
        assert all(q.lr > p.lr for p, q in zip(pts, pts[1:]))  # geometric growth
        assert sum(p.diverged for p in pts) <= 1 and all(not p.diverged for p in pts[:-1])  # a probe stops at divergence
    text = s.explain()
    chosen = [line for line in text.splitlines() if "<- chosen" in line]
    assert len(chosen) == 1 and chosen[0].split()[0] == f"{s.ratio:g}"
    assert "because" in text or "lowest" in text
    png = s.plot(tmp_path / "x.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.lr = 1.0  # type: ignore[misc]


# --------------------------------------------------------------------------- refusals


def _refused(match: str, *args, **kwargs) -> str:
    net = _net()
    snap = _snapshot(net)
    kwargs.setdefault("progress", False)
    with pytest.raises(LoraPlusError, match=match) as info:
        find_lr(net, *(args or (_ce, _data())), **kwargs)
    _assert_unchanged(net, snap)
    return str(info.value)


def test_a_non_scalar_loss_is_refused_with_the_fix():
    msg = _refused("scalar", lambda m, b: nn.functional.cross_entropy(m(b[0]), b[1], reduction="none"), _data())
    assert "(32,)" in msg and "mean()" in msg


def test_a_nan_loss_before_any_update_is_refused():
    msg = _refused("first step", lambda m, b: _ce(m, b) * float("nan"), _data())
    assert "before any update" in msg and "not the learning rate" in msg


def test_a_loss_without_grad_is_refused():
    def detached(m, b):
        return _ce(m, b).detach()

    assert "does not require grad" in _refused("grad", detached, _data())


def test_empty_batches_are_refused():
    assert "at least one batch" in _refused("empty", _ce, [])
    assert "at least one batch" in _refused("empty", _ce, iter([]))


def test_a_model_without_adapters_is_refused_with_the_librarys_labelling_message():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 2))
    with pytest.raises(LoraPlusError, match="no LoRA adapter parameters found") as info:
        find_lr(model, lambda m, b: m(b).sum(), [torch.randn(2, 4)], progress=False)
    assert "rules=" in str(info.value)  # says how to label the factors


class _OneGroupOnly(torch.optim.Optimizer):
    """Refuses more than one param group, as LBFGS does (not an LBFGS subclass)."""

    def __init__(self, params, lr=1.0):
        super().__init__(params, {"lr": lr})
        if len(self.param_groups) != 1:
            raise ValueError("this optimizer doesn't support per-parameter options (parameter groups)")


class _NoLr(torch.optim.Optimizer):
    def __init__(self, params, momentum=0.9):
        super().__init__(params, {"momentum": momentum})


def test_optimizers_without_per_group_lr_are_refused():
    assert "per-group" in _refused("per-group|param groups|per-parameter", optimizer_cls=torch.optim.LBFGS)
    msg = _refused("per-group|param groups|per-parameter", optimizer_cls=_OneGroupOnly)
    assert "find_lr" in msg
    assert "no learning rate" in _refused("no lr parameter", optimizer_cls=_NoLr)


@pytest.mark.parametrize(
    ("kwargs", "needle"),
    [
        ({"ratios": ()}, "ratios is empty"),
        ({"ratios": (1, 0)}, "ratios[1] must be positive"),
        ({"ratios": (1, -4)}, "ratios[1] must be positive"),
        ({"ratios": (1, float("inf"))}, "ratios[1] must be finite"),
        ({"ratios": (float("nan"),)}, "must be finite"),
        ({"ratios": "16"}, "sequence of positive numbers"),
        ({"ratios": (1, 4), "max_steps": 59}, "at least 30 per ratio (60 for 2 ratios)"),
        ({"max_steps": 10.5}, "integer"),
        ({"max_steps": True}, "integer"),
        ({"lr_range": (1e-2, 1e-3)}, "low < high"),
        ({"lr_range": (0, 1)}, "lr_range[0] must be positive"),
        ({"safety": 0}, "safety must be positive"),
        ({"beta": 1.0}, "beta must be in [0, 1)"),
        ({"lr": 1e-3}, "do not pass lr="),
        ({"train": 1}, "train must be True"),
        ({"train": "eval"}, "train must be True"),
    ],
)
def test_bad_arguments_are_refused_before_anything_runs(kwargs, needle):
    msg = _refused(".", **kwargs)
    assert needle in msg, msg


def test_groups_with_a_rate_of_their_own_keep_it():
    seen: list[float] = []

    class Spy(torch.optim.AdamW):
        def step(self, closure=None):  # type: ignore[override]
            seen.extend(g["lr"] for g in self.param_groups if g["role"] == "other")
            return super().step(closure)

    find_lr(_net(), _ce, _data(), optimizer_cls=Spy, ratios=(1,), max_steps=30, lr_range=(1e-5, 1e-2),
            role_lr={loraplus.Role.OTHER: 3e-4}, progress=False)
    assert seen and set(seen) == {3e-4}  # the head's fixed rate is not swept


def test_a_one_shot_iterator_is_read_at_most_one_range_test_long():
    read = 0

    def endless():
        nonlocal read
        g = torch.Generator().manual_seed(0)
        while True:
            read += 1
            yield torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)

    s = find_lr(_net(), _ce, endless(), ratios=(1, 4), max_steps=60, progress=False)
    n_range = max(p.step for p in s.table if p.phase is Phase.RANGE)
    assert read <= 20 and n_range <= 20  # 30 steps per ratio: 20 range-test, 10 confirmation


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_models_are_restored_in_place():
    net = _net().cuda()
    net.head.weight.grad = torch.full_like(net.head.weight, 0.5)
    data = [(x.cuda(), y.cuda()) for x, y in _data()]
    snap = _snapshot(net)
    cuda_rng = torch.cuda.get_rng_state()
    find_lr(net, _ce, data, ratios=(1, 4), max_steps=60, progress=False)
    _assert_unchanged(net, snap)
    assert torch.equal(torch.cuda.get_rng_state(), cuda_rng)
    find_lr(net, _ce, data, ratios=(1,), max_steps=30, offload=True, progress=False)
    _assert_unchanged(net, snap)


def test_lorafa_probes_at_several_ratios_and_leaves_every_a_factor_trainable():
    """LoRA-FA freezes A while its optimizer lives, and a second optimizer on a model whose A factors a live
    LoRA-FA optimizer froze is refused: each probe must be built while no earlier one is alive."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, target_modules=["0", "2"]))
    before = {n: p.requires_grad for n, p in model.named_parameters()}
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 8, generator=gen), torch.randn(4, 4, generator=gen)) for _ in range(5)]
    s = loraplus.find_lr(model, lambda m, b: ((m(b[0]) - b[1]) ** 2).mean(), batches, ratios=(1, 4),
                         max_steps=60, precondition="lorafa", progress=False)  # fmt: skip
    assert [r.ratio for r in s.per_ratio] == [1, 4]
    assert {n: p.requires_grad for n, p in model.named_parameters()} == before
    assert sum(before[n] for n in before if "lora_A" in n) == 2


# --------------------------------------------------------------------------- bad input (issue #25)


def _noisy_scripted_loss(curve):
    """As _scripted_loss, plus the batch: each batch is a number added to the loss."""

    def loss_fn(model: nn.Module, batch: float) -> torch.Tensor:
        a = model.lora_A[0, 0]
        return a - a.detach() + curve(-a.detach().item()) + batch

    return loss_fn


def _flat_dip(d: float) -> float:
    """1 until the lr matters, down to 0.5 at d = 0.1, back above 1 from about d = 0.3, NaN from d = 3."""
    if d > 3:
        return math.nan
    return 1.0 - 0.5 * math.exp(-(math.log(max(d, 1e-12) / 0.1) ** 2)) + max(0.0, d - 0.3) * 4


_SCRIPTED = {"optimizer_cls": torch.optim.SGD, "ratios": (1,), "max_steps": 150, "lr_range": (1e-5, 1.0),
             "safety": 2.5, "progress": False}


def _points(s) -> list[tuple]:
    return [(p.phase, p.lr, p.step, p.diverged) for p in s.table]


def test_a_negative_loss_gets_the_suggestion_of_the_same_loss_shifted_up():
    """A loss that can be negative (a shifted loss, a Gaussian NLL, an ELBO): the rule read
    'smoothed > 4 x its minimum' as divergence at step 2, and suggested 1e-30 x a rate."""
    lrs = _range_lrs(1e-5, 1.0, 100)
    start, at_min, edge = _reference_reading(lrs, _dip)
    plain = find_lr(_Scripted(), _scripted_loss(_dip), [None], **_SCRIPTED)
    low = find_lr(_Scripted(), _scripted_loss(lambda d: _dip(d) - 10.0), [None], **_SCRIPTED)
    assert plain.lr == pytest.approx(edge / 2.5, rel=1e-12)  # the documented reading of the curve
    assert low.lr == pytest.approx(plain.lr, rel=1e-12) and low.ratio == plain.ratio
    (row,), (row_low,) = plain.per_ratio, low.per_ratio
    assert row_low.edge_lr == pytest.approx(edge, rel=1e-12)
    assert row_low.lr_at_best == pytest.approx(at_min, rel=1e-12)
    assert row_low.start_loss == pytest.approx(start - 10.0, rel=1e-12)
    assert row_low.diverged_at == row.diverged_at and row_low.halvings == row.halvings == 0
    assert _points(low) == _points(plain)  # every probe stops at the same step, confirmation included
    assert low.notes == plain.notes
    _assert_divergence_as_documented(low, 10)


def test_a_shifted_real_loss_gets_the_same_suggestion():
    kwargs = {"ratios": (1, 4), "max_steps": 90, "lr_range": (1e-4, 1e3), "progress": False}
    plain = find_lr(_net(), _ce, _data(), **kwargs)
    low = find_lr(_net(), lambda m, b: _ce(m, b) - 3.0, _data(), **kwargs)
    assert all(p.loss < 0 for p in low.table if p.phase is Phase.RANGE and p.step <= 10)
    assert any(p.diverged for p in plain.table)  # lr up to 1e3: the rule is exercised
    assert (low.lr, low.ratio) == (plain.lr, plain.ratio)
    assert _points(low) == _points(plain)


def test_easy_first_batches_do_not_stop_the_range_test_before_the_dip():
    """The start's spread bounds the rise rule from below: the first tenth's batches here are
    easier than the rest, so the loss sits above the start from the first tenth on, and a rise
    measured against the fall alone (nearly 0 there) would read that as divergence."""
    rng = random.Random(0)
    noise = [rng.gauss(0.0, 0.05) - (0.08 if k < 10 else 0.0) for k in range(100)]  # 10 = the first tenth
    lrs = _range_lrs(1e-5, 1.0, 100)
    curve = lambda d: _flat_dip(d) - 10.0  # noqa: E731 - negative too, as the rule must read it
    start, at_min, edge = _reference_reading(lrs, curve, noise=noise)
    assert lrs[20] < at_min < edge  # the reference reaches the dip, far past the first tenth
    s = find_lr(_Scripted(), _noisy_scripted_loss(curve), noise, **_SCRIPTED)
    (row,) = s.per_ratio
    assert row.best_smoothed < 0.7 - 10.0  # the minimum found is the dip's
    assert row.start_loss == pytest.approx(start, rel=1e-12)
    assert row.lr_at_best == pytest.approx(at_min, rel=1e-12) and row.edge_lr == pytest.approx(edge, rel=1e-12)
    _assert_divergence_as_documented(s, 10)


def test_an_exactly_flat_start_is_not_read_as_a_rise():
    """A full-batch float64 loss that the first lrs do not move: its smoothed value jitters by an
    ulp around the start (spread 0, fall 0), which is rounding, not divergence."""

    def flat_then_dip(d: float) -> float:
        return 0.3 if d < 1e-3 else 0.3 * _flat_dip(d)

    lrs = _range_lrs(1e-5, 1.0, 100)
    _, at_min, edge = _reference_reading(lrs, flat_then_dip)
    assert lrs[20] < at_min < edge
    s = find_lr(_Scripted(), _scripted_loss(flat_then_dip), [None], **_SCRIPTED)
    (row,) = s.per_ratio
    assert row.lr_at_best == pytest.approx(at_min, rel=1e-12) and row.edge_lr == pytest.approx(edge, rel=1e-12)
    _assert_divergence_as_documented(s, 10)


def _vee(d: float) -> float:
    """Down from 1 to 0.8 at d = 0.05, then up steeply; NaN from d = 2."""
    if d > 2:
        return math.nan
    return 1.0 - 4 * d if d <= 0.05 else 0.8 + 20 * (d - 0.05)


def test_a_confirmation_run_measures_its_rise_from_its_range_tests_start():
    """safety 1: the confirmation runs fall, turn and rise; they diverge by the rule (not at a NaN),
    measured from the range test's start (a run's own first tenth has fallen already)."""
    s = find_lr(_Scripted(), _scripted_loss(_vee), [None], **{**_SCRIPTED, "safety": 1.0})
    blown = [p for p in s.table if p.phase is Phase.CONFIRM and p.diverged]
    assert blown and all(math.isfinite(p.loss) for p in blown) and s.per_ratio[0].halvings >= 1
    _assert_divergence_as_documented(s, 10)


def test_an_eval_mode_model_is_probed_in_train_mode_and_left_in_eval_mode():
    """from_pretrained returns a model in eval mode: probed so, dropout was off (issue #25: a rate ~4x low)."""
    net = _net()
    net.eval()
    snap = _snapshot(net)
    seen = set()

    def loss_fn(model, batch):
        seen.add(tuple(m.training for m in model.modules()))
        return _ce(model, batch)

    find_lr(net, loss_fn, _data(), ratios=(1, 4), max_steps=60, progress=False)
    assert seen == {(True,) * len(list(net.modules()))}  # dropout and batch norm in train mode
    _assert_unchanged(net, snap)  # every module's flag back to eval


def test_train_false_probes_in_the_modes_given():
    net = _net()
    net.eval()
    seen = set()

    def loss_fn(model, batch):
        seen.add(tuple(m.training for m in model.modules()))
        return _ce(model, batch)

    find_lr(net, loss_fn, _data(), ratios=(1,), max_steps=30, train=False, progress=False)
    assert seen == {(False,) * len(list(net.modules()))}


def _indexed(n: int = 64) -> TensorDataset:
    g = torch.Generator().manual_seed(2)
    return TensorDataset(torch.randn(n, 6, generator=g), torch.randint(0, 3, (n,), generator=g), torch.arange(n))


def _per_probe(s, seen: list) -> list[list]:
    """Split the batches loss_fn saw into probes: one loss_fn call per table point, in order."""
    assert len(seen) == len(s.table)
    probes: list[list] = []
    for point, batch in zip(s.table, seen):
        if point.step == 1:
            probes.append([])
        probes[-1].append(batch)
    return probes


def test_a_shuffling_dataloader_gives_every_probe_the_same_batches():
    """A DataLoader with its own generator (how reproducible loaders are built) reshuffled at each
    probe's fresh iteration, from a generator the snapshot does not hold: each ratio saw other batches."""
    loader = DataLoader(_indexed(), batch_size=8, shuffle=True, generator=torch.Generator().manual_seed(0))
    seen: list[tuple[int, ...]] = []

    def loss_fn(model, batch):
        seen.append(tuple(batch[2].tolist()))
        return _ce(model, batch[:2])

    s = find_lr(_net(), loss_fn, loader, ratios=(1, 4), max_steps=60, progress=False)
    probes = _per_probe(s, seen)
    longest = max(probes, key=len)
    assert len(probes) >= 4 and len(longest) > 8  # two ratios, each a range test longer than one epoch
    assert all(probe == longest[: len(probe)] for probe in probes)  # the same batches in the same order
    assert longest[8:16] == longest[:8]  # one epoch, read once, then cycled


def test_a_dataloader_leaves_the_rng_as_it_was():
    """Its iterator draws from the torch RNG when made; that was done before the snapshot."""
    loader = DataLoader(_indexed(), batch_size=8, shuffle=True)
    net = _net()
    torch.manual_seed(7)
    before = torch.get_rng_state()
    find_lr(net, lambda m, b: _ce(m, b[:2]), loader, ratios=(1,), max_steps=30, progress=False)
    assert torch.equal(torch.get_rng_state(), before)


class _CountingLoader:
    """A re-iterable of n batches that counts how often it is iterated and how many batches it yields."""

    def __init__(self, n: int) -> None:
        self.n, self.iterations, self.read = n, 0, 0

    def __iter__(self):
        self.iterations += 1
        g = torch.Generator().manual_seed(0)
        for _ in range(self.n):
            self.read += 1
            yield torch.randn(32, 6, generator=g), torch.randint(0, 3, (32,), generator=g)


@pytest.mark.parametrize("n", [3, 100])
def test_a_re_iterable_is_iterated_once_and_read_at_most_one_range_test_long(n):
    loader = _CountingLoader(n)
    s = find_lr(_net(), _ce, loader, ratios=(1, 4), max_steps=60, progress=False)
    assert max(p.step for p in s.table) == 20  # 30 steps per ratio: 20 range-test, 10 confirmation
    assert loader.iterations == 1 and loader.read == min(n, 20)


@pytest.mark.parametrize(
    ("role_lr", "named"),
    [({Role.A: 1e-3}, "A"), ({"b": 1e-2}, "B"), ({Role.A: 1e-3, Role.B: 1e-2, Role.OTHER: 1e-4}, "A and B")],
)
def test_a_role_lr_that_fixes_a_or_b_is_refused_with_the_fix(role_lr, named):
    """role_lr={Role.A: x} fixes A's rate, and B's at ratio x it: the range test swept nothing and
    the 'suggestion' was the first lr of the range over safety."""
    msg = _refused("role_lr fixes", role_lr=role_lr)
    assert f"of the {named} factors" in msg and "sweeps nothing" in msg
    assert f"Drop {' and '.join(f'loraplus.Role.{r}' for r in named.split(' and '))} from role_lr" in msg


def _fa_net() -> _Net:
    net = _net()
    net.inp.scaling = net.mid.scaling = 1.0  # LoRA-FA divides by the LoRA scaling s²
    return net


def _nan_start(model, batch):
    return _ce(model, batch) * float("nan")


def _fails_at_once(model, batch):
    raise RuntimeError("tokenizer missing")


@pytest.mark.parametrize(
    ("loss_fn", "error", "match"),
    [(_nan_start, LoraPlusError, "first step"), (_fails_at_once, RuntimeError, "tokenizer missing"), (_ce, None, "")],
)
def test_lorafa_leaves_requires_grad_as_it_was(loss_fn, error, match):
    """precondition="lorafa" freezes A when the probe's optimizer is built; that was done before
    the snapshot, so A stayed frozen after a refusal (and a second grouping found no A at all)."""
    net = _fa_net()
    snap = _snapshot(net)
    assert net.inp.lora_A.requires_grad and net.mid.lora_A.requires_grad
    kwargs = {"ratios": (1,), "max_steps": 30, "lr_range": (1e-4, 1.0), "precondition": "lorafa", "progress": False}
    if error is None:
        s = find_lr(net, loss_fn, _data(), **kwargs)
        assert s.steps_used > 0
    else:
        with pytest.raises(error, match=match):
            find_lr(net, loss_fn, _data(), **kwargs)
    _assert_unchanged(net, snap)


# --------------------------------------------------------------------------- no edge: a loss far above where it ends


def _far_task():
    """The built-in demo's task, made small: a pre-trained MLP whose LoRA adapters must learn a
    rotated teacher, so the loss starts several times above where training takes it and no rate in
    the range makes it climb back above its start (the full demo: ~25 at first, ~1.1 trained)."""
    from loraplus._demo._config import MLP_PRESETS
    from loraplus._demo._mlp import _MlpTask

    cfg = dataclasses.replace(MLP_PRESETS["quick"], width=64, depth=2, pretrain_steps=300, batch=64)
    task = _MlpTask(cfg, lambda k: None)
    g = torch.Generator().manual_seed(100)
    batches = []
    for _ in range(150):
        idx = torch.randint(0, len(task.x), (cfg.batch,), generator=g)
        batches.append((task.x[idx], task.y[idx]))
    return task, batches, (task.x_val, task.y_val)


def _train_far(task, lr: float, batches: list, held: tuple[torch.Tensor, torch.Tensor]) -> float:
    """The test's own loop: constant-lr AdamW on every adapter factor (ratio 1), then the held-out loss."""
    model = task.model(0)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0)
    for batch in batches:
        loss = _ce(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        out = _ce(model, held).item()
    return out if math.isfinite(out) else math.inf


def test_without_an_edge_a_loss_far_above_its_end_gets_the_steepest_fall_near_a_sweeps_best():
    """The demo's failure: no edge, the loss falls over most of the range, its minimum sits near
    the top, and minimum / 3 landed far above the best rate (the suggestion before this rule)."""
    task, batches, held = _far_task()
    grid = [2.0**k for k in range(-13, -1)]
    finals = {lr: _train_far(task, lr, batches, held) for lr in grid}
    best = min(grid, key=finals.__getitem__)
    model = task.model(0)
    start = _ce(model, held).item()
    assert start > 3 * finals[best]  # the setting: a loss far above where it ends
    s = find_lr(model, _ce, batches, ratios=(1,), max_steps=150, lr_range=(1e-5, 1.0), weight_decay=0.0,
                progress=False)
    (row,) = s.per_ratio
    assert row.edge_lr is None and row.rule is loraplus._find_lr.Rule.STEEPEST
    assert abs(math.log2(s.lr / best)) <= 1, (s.lr, best, finals)  # within one x2 step of the sweep's best
    assert row.lr_at_best / 3 > 4 * best  # the minimum / safety it replaces misses by more than x4 here
    assert finals[best] <= min(finals.values())


# --------------------------------------------------------------------------- lora_lr: the λ^-1/2 law


def _never_called(model: nn.Module, batch: object) -> torch.Tensor:
    raise AssertionError("find_lr(lora_lr=..., one ratio) must not compute a loss")


@pytest.mark.parametrize("ratio, lora_lr, expected", [(1, 1e-3, 1e-3), (4, 1e-3, 5e-4), (16, 2e-4, 5e-5)])
def test_lora_lr_with_one_ratio_is_the_law_and_touches_nothing(ratio, lora_lr, expected):
    model = _net()
    snap = _snapshot(model)
    s = find_lr(model, _never_called, [], ratios=(ratio,), lora_lr=lora_lr, progress=False)
    assert s.lr == pytest.approx(expected, rel=1e-12) and s.ratio == ratio  # A at lora_lr / sqrt(ratio)
    assert s.lr * s.ratio == pytest.approx(lora_lr * ratio**0.5, rel=1e-12)  # B at lora_lr * sqrt(ratio)
    assert s.steps_used == 0 and s.table == ()
    assert s.per_ratio[0].rule is loraplus._find_lr.Rule.LAW and s.per_ratio[0].edge_lr is None
    _assert_unchanged(model, snap)
    assert "lora_lr" in s.explain() or "x ratio^-0.5" in s.explain()


def test_lora_lr_with_several_ratios_confirms_each_law_rate_with_the_whole_budget():
    model = _net()
    snap = _snapshot(model)
    s = find_lr(model, _ce, _data(), ratios=(1, 4, 16), lora_lr=4e-3, max_steps=90, progress=False)
    _assert_unchanged(model, snap)
    assert [r.ratio for r in s.per_ratio] == [1, 4, 16]
    assert [r.suggested_lr for r in s.per_ratio] == pytest.approx([4e-3, 2e-3, 1e-3], rel=1e-12)
    assert all(p.phase is Phase.CONFIRM for p in s.table)
    for r in (1, 4, 16):  # each ratio: one 30-step confirmation run at its law rate, from the same start
        pts = [p for p in s.table if p.ratio == r]
        assert [p.step for p in pts] == list(range(1, 31)) and {p.lr for p in pts} == {4e-3 / r**0.5}
    assert s.steps_used == 90
    first = {r: [p.loss for p in s.table if p.ratio == r][0] for r in (1, 4, 16)}
    assert first[1] == first[4] == first[16]  # the same start and the same first batch
    tails = {r.ratio: r.confirm_loss for r in s.per_ratio}
    expect = {r: sum(p.loss for p in s.table if p.ratio == r and p.step > 30 - 7) / 7 for r in (1, 4, 16)}
    assert tails == pytest.approx(expect, rel=1e-12)
    assert s.ratio == min(expect, key=lambda r: (expect[r], r)) and s.lr == pytest.approx(4e-3 / s.ratio**0.5)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"lora_lr": 0}, "lora_lr must be positive"),
        ({"lora_lr": -1e-3}, "lora_lr must be positive"),
        ({"lora_lr": float("nan")}, "lora_lr must be finite"),
        ({"lora_lr": 1e-3, "lr_range": (1e-6, 1.0)}, "lr_range=(1e-06, 1.0) read the range test, which lora_lr= skips"),
        ({"lora_lr": 1e-3, "safety": 3}, "safety=3 read the range test"),
    ],
)
def test_lora_lr_refusals_say_why(kwargs, needle):
    msg = _refused(".", **kwargs)
    assert needle in msg, msg


def test_lora_lr_whose_every_confirmation_diverges_is_refused_and_the_model_restored():
    model = _net()
    snap = _snapshot(model)
    with pytest.raises(LoraPlusError, match="every confirmation run diverged at its rate lora_lr"):
        find_lr(model, _ce, _data(), ratios=(1, 4), lora_lr=1e12, max_steps=60, progress=False)
    _assert_unchanged(model, snap)
