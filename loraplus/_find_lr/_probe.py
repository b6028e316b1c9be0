"""The probe: an exponential lr range test per ratio, then a confirmation run at each ratio's suggestion.

Design (also in ``docs/find_lr.md``):

1. **Range test**, per ratio, from one restored start: A's lr grows geometrically from
   ``lr_range[0]`` to ``lr_range[1]`` over the ratio's range steps; every other group keeps its
   :func:`loraplus.LoraPlus` rate relative to A (B at ``ratio ×``). The loss is smoothed by a
   bias-corrected exponential moving average (``beta``), whose value lags its input by
   ``beta / (1 - beta)`` steps on average: each smoothed value is read against the lr of that
   many steps earlier. The test stops at divergence (a non-finite loss, or a smoothed loss above
   ``4 ×`` its minimum so far). The ratio's **edge** is the first lr, after the smoothed minimum
   (looked for after the first tenth of the test, where the lr is too small to change anything),
   at which the smoothed loss climbs back above the starting loss (the mean loss of that first
   tenth) or the test diverges; the
   suggested lr is the edge divided by ``safety``. The edge is a large, sharp change and the
   minimum of a fine-tuning range test is a shallow, noisy one, so the edge is the better
   located of the two (docs/find_lr.md has the measurements).
2. **Confirmation**, per ratio, from the same restored start: train at the suggested lr
   (constant) for the ratio's confirmation steps; the ratio whose mean loss over the last
   quarter of them is lowest is chosen (a range test mixes lrs and steps; equal-length runs at
   a fixed lr on the same batches compare ratios fairly). When every confirmation run diverged,
   the lowest smoothed range-test loss decides.
"""

from __future__ import annotations

import inspect
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import LoraPlusError
from .._groups._factory import LoraPlus, _unwrap
from .._groups._lr_free import lr_free_record
from .._numbers import check_number
from .._progress import _progress
from ._restore import Snapshot
from ._suggestion import LrSuggestion, ProbePoint, RatioSummary

__all__ = ["DEFAULT_SAFETY", "DEFAULT_STEPS_PER_RATIO", "MIN_STEPS_PER_RATIO", "find_lr"]

#: Steps per ratio when ``max_steps`` is None: two thirds range test, one third confirmation.
DEFAULT_STEPS_PER_RATIO = 150
#: The smallest budget per ratio ``max_steps`` may give (20 range-test + 10 confirmation steps).
MIN_STEPS_PER_RATIO = 30
#: The range test stops once the smoothed loss exceeds this multiple of its minimum.
DIVERGENCE_FACTOR = 4.0
#: The fraction of the range test, from its start, whose mean loss is the starting loss.
START_FRACTION = 0.1
#: ``safety``'s default. On the two development tasks (benchmarks/find_lr_eval.py's width32 and
#: width64, ratios 1-64, 2 seeds: 16 points) the edge is 1.3x (0.72-1.65x) the best swept peak lr of
#: a warm-up + cosine run; on the paper's toy (full-batch GD, 200 steps) rates above about a third
#: of the edge diverge late in the run. 3 serves both (docs/find_lr.md).
DEFAULT_SAFETY = 3.0


class _Batches:
    """Each probe's batches, in the same order: a re-iterable is iterated afresh (cycling when it
    runs out); a one-shot iterator is cached as it is read, at most ``bound`` batches."""

    def __init__(self, batches: Iterable[Any], bound: int) -> None:
        self._source = batches
        self._oneshot = iter(batches) is batches
        self._cache: list[Any] = []
        self._bound = bound
        self._exhausted = False

    def probe(self) -> Iterator[Any]:
        if not self._oneshot:
            while True:
                empty = True
                for batch in self._source:
                    empty = False
                    yield batch
                if empty:
                    raise LoraPlusError(_EMPTY)
        yield from self._cache
        while not self._exhausted and len(self._cache) < self._bound:
            try:
                batch = next(self._source)  # type: ignore[call-overload]
            except StopIteration:
                self._exhausted = True
                break
            self._cache.append(batch)
            yield batch
        if not self._cache:
            raise LoraPlusError(_EMPTY)
        while True:
            yield from self._cache


_EMPTY = "batches is empty: find_lr needs at least one batch to compute the loss on; pass your training DataLoader or a list of batches"


def _check_optimizer(optimizer_cls: Any, ratios: Sequence[float]) -> None:
    if not callable(optimizer_cls):
        raise LoraPlusError(f"optimizer_cls must be an optimizer class, got {type(optimizer_cls).__name__}")
    target = _unwrap(optimizer_cls)
    shown = getattr(target, "__name__", repr(target))
    record = lr_free_record(target)
    if record is not None:  # a learning-rate-free optimizer: its record says what it does with the ratio
        behaviour = record.per_group_lr
        if behaviour.refused and any(r != 1 for r in ratios):
            raise LoraPlusError(
                f"find_lr compares ratios {', '.join(f'{r:g}' for r in ratios)}, but {record.shown} (measured on "
                f"{record.distribution} {record.version}) {behaviour.described}; use {record.instead} "
                "(see docs/compatibility.md)"
            )
        warnings.warn(
            f"{record.shown} adapts its own step size: the lr find_lr probes is a multiplier on its estimate d, "
            "not a learning rate; read the suggestion as a scale, or use a fixed-rate optimizer such as "
            "torch.optim.AdamW",
            UserWarning,
            stacklevel=3,
        )
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return
    var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if "lr" not in params and not var_kw:
        raise LoraPlusError(
            f"{shown} takes no learning rate (its constructor has no lr parameter), so there is nothing for "
            "find_lr to find; use an optimizer with a per-group lr such as torch.optim.AdamW"
        )


def _build(
    optimizer_cls: Any, model: nn.Module, ratio: float, lr: float, kwargs: dict[str, Any]
) -> tuple[Any, list[float], list[bool]]:
    """The probe's optimizer, each group's rate at ``lr`` and whether that rate follows A's."""
    # which groups follow A's lr (A, B, and every role at A's rate) and which keep a rate of their own
    # (role_lr overrides, lr_embedding): a grouping at twice the rate tells, without guessing. It is built
    # first and without preconditioning: the groups are the same, and LoRA-FA's freeze (while the probe's
    # optimizer is alive) would hide the A factors from a second grouping
    plain = {k: v for k, v in kwargs.items() if k not in ("precondition", "precondition_reg")}
    try:
        twice = [float(g["lr"]) for g in LoraPlus(optimizer_cls, model, ratio=ratio, lr=2 * lr, guard=None, **plain).param_groups]
        opt = LoraPlus(optimizer_cls, model, ratio=ratio, lr=lr, guard=None, **kwargs)  # the probe sets the rates
    except LoraPlusError as err:
        raise LoraPlusError(
            f"find_lr could not build its probe optimizer (it needs one that takes per-group lr, as LoraPlus builds): {err}"
        ) from err
    groups = getattr(opt, "param_groups", None)
    if not groups or any("lr" not in g for g in groups) or not any(g.get("role") == "B" for g in groups):
        raise LoraPlusError(
            f"{type(opt).__name__} did not keep the per-group learning rates LoraPlus gave it (groups with "
            "'lr' and 'role'), so B cannot get ratio x A's rate; use an optimizer that takes per-group lr "
            "(e.g. torch.optim.AdamW)"
        )
    base = [float(g["lr"]) for g in groups]
    follows = [math.isclose(t, 2 * b, rel_tol=1e-9) for t, b in zip(twice, base)]
    return opt, base, follows


def _loss(loss_fn: Callable[[nn.Module, Any], torch.Tensor], model: nn.Module, batch: Any, first: bool) -> torch.Tensor:
    loss = loss_fn(model, batch)
    if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
        shape = tuple(loss.shape) if isinstance(loss, torch.Tensor) else type(loss).__name__
        raise LoraPlusError(
            f"loss_fn must return a scalar loss tensor, got {shape}; reduce it, e.g. return loss.mean()"
        )
    if not loss.requires_grad:
        raise LoraPlusError(
            "loss_fn returned a loss that does not require grad (computed under torch.no_grad(), detached, "
            "or with every adapter frozen); return the loss you would call backward() on"
        )
    if first and not math.isfinite(loss.item()):
        raise LoraPlusError(
            f"the loss is {loss.item()} at the first step, before any update: the model or the data produce it, "
            "not the learning rate; check the inputs and the loss function"
        )
    return loss


def _run(
    model: nn.Module, loss_fn: Callable[..., torch.Tensor], batches: _Batches,
    built: tuple[Any, list[float], list[bool]], lrs: Sequence[float],
    lr0: float, ratio: float, phase: str, beta: float, check_first: bool, tick: Callable[[int], None],
) -> list[ProbePoint]:
    """Train one probe from the current state: step k at A's lr ``lrs[k]``; stops at divergence."""
    opt, base, follows = built
    points: list[ProbePoint] = []
    avg, best = 0.0, math.inf
    stream = batches.probe()
    for k, lr in enumerate(lrs, start=1):
        for g, b, f in zip(opt.param_groups, base, follows):
            g["lr"] = b * (lr / lr0) if f else b
        loss = _loss(loss_fn, model, next(stream), check_first and k == 1)
        value = float(loss.item())
        if not math.isfinite(value):
            points.append(ProbePoint(ratio, phase, lr, k, value, math.inf, True))
            break
        avg = beta * avg + (1 - beta) * value
        smoothed = avg / (1 - beta**k)
        if smoothed > DIVERGENCE_FACTOR * best:
            points.append(ProbePoint(ratio, phase, lr, k, value, smoothed, True))
            break
        best = min(best, smoothed)
        points.append(ProbePoint(ratio, phase, lr, k, value, smoothed, False))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        tick(1)
    return points


def find_lr(
    model: nn.Module,
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    batches: Iterable[Any],
    *,
    optimizer_cls: Callable[..., Any] = torch.optim.AdamW,
    ratios: Sequence[float] = (1, 4, 16),
    max_steps: int | None = None,
    lr_range: tuple[float, float] = (1e-6, 1.0),
    safety: float = DEFAULT_SAFETY,
    beta: float = 0.9,
    offload: bool = False,
    progress: bool | None = None,
    **optimizer_kwargs: Any,
) -> LrSuggestion:
    """Suggest A's learning rate and the B/A ratio for ``model`` with a short probe per ratio.

    For each ratio: an exponential lr range test, whose edge (where the loss climbs back above
    its start) divided by ``safety`` is the ratio's suggestion, then a confirmation run at that
    lr; the ratio with the lowest confirmation loss wins (see ``docs/find_lr.md``).
    Every probe starts from the model as given, restored in place from one snapshot; the
    probe's optimizer (built by :func:`loraplus.LoraPlus`, so embeddings and weight decay follow
    the library's rules) is discarded after each probe. Groups whose rate follows A's (B at
    ``ratio ×``, heads and norms at A's rate) are scaled with it; groups given a rate of their own
    through ``optimizer_kwargs`` (``role_lr``, ``lr_embedding``) keep it throughout.

    **The model is left exactly as it was found** — trainable parameter values, buffers (the same
    tensor objects), ``requires_grad``, every module's ``training`` flag, every ``.grad`` (the
    original tensor or None) and the torch CPU/CUDA, ``random`` and NumPy RNG states — also when
    ``loss_fn`` raises or on KeyboardInterrupt (the error propagates unchanged). The probe runs in
    the model's current train/eval mode.

    Args:
        model: the model with its LoRA adapters attached (CPU or CUDA; nothing is moved).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss tensor to minimise.
        batches: training batches. A re-iterable (list, DataLoader) is iterated afresh for each
            probe and cycled; a one-shot iterator (a generator) is cached as it is read, at most
            as many batches as one range test takes, and the cache is cycled.
        optimizer_cls: an optimizer taking per-group ``lr`` (default AdamW).
        ratios: the B/A ratios to probe, each positive and finite.
        max_steps: total optimizer steps over all probes (default ``150 × len(ratios)``); each
            ratio gets ``max_steps // len(ratios)``, at least 30: two thirds range test, one
            third confirmation.
        lr_range: A's lr at the first and last range-test step.
        safety: the suggested lr is the range test's edge divided by this (default 3; how it was
            set is in docs/find_lr.md).
        beta: the loss smoothing factor (bias-corrected EMA).
        offload: keep the snapshot on the CPU instead of on the parameters' devices.
        progress: a progress bar on stderr (tqdm when installed); default: only when stderr is a terminal.
        **optimizer_kwargs: passed to :func:`loraplus.LoraPlus` (``weight_decay``, ``betas``,
            ``lr_embedding``, …); not ``lr`` or ``ratio``.

    Returns:
        An :class:`LrSuggestion`: ``.lr``, ``.ratio``, ``.table``, ``.steps_used``, ``.explain()``, ``.plot()``.

    Raises:
        LoraPlusError: on a model without adapters, empty batches, a non-scalar loss or one that is
            not finite before any update, an optimizer without per-group lr, bad ``ratios``,
            ``max_steps``, ``lr_range``, ``safety`` or ``beta``.

    Warns:
        UserWarning: for a learning-rate-free optimizer that keeps per-group rates (its record in
            docs/compatibility.md): the probed lr is a multiplier on its step-size estimate. Those
            that crash on or ignore different per-group rates are refused (LoraPlusError) when a
            ratio other than 1 is asked for.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> data = [(torch.randn(16, 8), torch.randint(0, 2, (16,))) for _ in range(4)]
        >>> def loss_fn(m, batch):
        ...     return torch.nn.functional.cross_entropy(m(batch[0]), batch[1])
        >>> s = loraplus.find_lr(model, loss_fn, data, ratios=(1, 4), max_steps=60, progress=False)
        >>> s.ratio in (1, 4) and s.lr > 0 and s.steps_used <= 60
        True
    """
    ratio_list = _check_ratios(ratios)
    n = len(ratio_list)
    if max_steps is None:
        max_steps = DEFAULT_STEPS_PER_RATIO * n
    if isinstance(max_steps, bool) or not isinstance(max_steps, numbers.Integral) or max_steps < MIN_STEPS_PER_RATIO * n:
        raise LoraPlusError(
            f"max_steps must be an integer of at least {MIN_STEPS_PER_RATIO} per ratio "
            f"({MIN_STEPS_PER_RATIO * n} for {n} ratios), got {max_steps!r}; pass None for the default "
            f"({DEFAULT_STEPS_PER_RATIO} per ratio)"
        )
    lo = check_number("lr_range[0]", lr_range[0])
    hi = check_number("lr_range[1]", lr_range[1])
    if not lo < hi:
        raise LoraPlusError(f"lr_range must be (low, high) with low < high, got {tuple(lr_range)!r}")
    safety = check_number("safety", safety)
    beta = check_number("beta", beta, allow_zero=True)
    if beta >= 1:
        raise LoraPlusError(f"beta must be in [0, 1), got {beta!r}")
    for key in ("lr", "ratio", "params", "guard"):
        if key in optimizer_kwargs:
            raise LoraPlusError(f"do not pass {key}= to find_lr: it is what the probe sets (use lr_range= and ratios=)")
    _check_optimizer(optimizer_cls, ratio_list)
    per = int(max_steps) // n
    n_confirm = per // 3
    n_range = per - n_confirm
    range_lrs = [lo * (hi / lo) ** (k / (n_range - 1)) for k in range(n_range)]
    # labelling errors (no adapters, ...) surface here, before anything is touched
    _build(optimizer_cls, model, ratio_list[0], lo, optimizer_kwargs)
    stream = _Batches(batches, n_range)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _progress(n * (n_range + n_confirm), "find_lr", progress)
    snapshot = Snapshot(model, offload=offload)
    table: list[ProbePoint] = []
    ranged: list[RatioSummary] = []  # each ratio's range test; its confirmation fills in the rest
    per_ratio: list[RatioSummary] = []
    try:
        for i, ratio in enumerate(ratio_list):
            snapshot.restore()
            snapshot.clear_grads()
            bar.set_description(f"find_lr ratio {ratio:g}: range test")
            built = _build(optimizer_cls, model, ratio, lo, optimizer_kwargs)
            pts = _run(model, loss_fn, stream, built, range_lrs, lo, ratio, "range", beta, i == 0, bar.update)
            del built  # the optimizer and its state go with each probe
            table += pts
            if not any(not p.diverged for p in pts):
                raise LoraPlusError(
                    f"the range test at ratio {ratio:g} diverged at its first step (lr {lo:g}); lower lr_range[0]"
                )
            ranged.append(_read_range(ratio, pts, range_lrs, beta, safety))
        # steps the range tests left unused (they stop at divergence) fund confirmation retries
        spare = int(max_steps) - sum(r.steps for r in ranged) - n * n_confirm
        for summary in ranged:
            ratio, lr = summary.ratio, summary.suggested_lr
            taken = halvings = 0
            while True:
                snapshot.restore()
                snapshot.clear_grads()
                bar.set_description(f"find_lr ratio {ratio:g}: confirmation")
                built = _build(optimizer_cls, model, ratio, lr, optimizer_kwargs)
                pts = _run(model, loss_fn, stream, built, [lr] * n_confirm, lr, ratio, "confirm", beta, False, bar.update)
                del built  # the optimizer and its state go with each probe
                table += pts
                used = sum(1 for p in pts if not p.diverged)
                taken += used
                diverged = any(p.diverged for p in pts)
                if not diverged or (n_confirm - used) + spare < n_confirm:
                    break
                spare -= used  # the retry takes the rest of this attempt's steps and `used` spare ones
                lr, halvings = lr / 2, halvings + 1
            tail = [p.loss for p in pts[-max(1, n_confirm // 4):]]
            loss = math.inf if diverged else sum(tail) / len(tail)
            per_ratio.append(summary._replace(suggested_lr=lr, halvings=halvings, confirm_loss=loss,
                                              steps=summary.steps + taken))
    finally:
        snapshot.restore()
        bar.close()
    if any(math.isfinite(s.confirm_loss) for s in per_ratio):
        chosen = min(per_ratio, key=lambda s: (s.confirm_loss, s.ratio))
        reason = (
            f"lowest mean loss over the last {max(1, n_confirm // 4)} of {n_confirm} confirmation steps at each "
            "ratio's suggested lr, all from the same start"
        )
    else:
        chosen = min(per_ratio, key=lambda s: (s.best_smoothed, s.ratio))
        reason = ("every confirmation run diverged, also after halving the lr while the budget allowed; chosen by "
                  "the lowest smoothed loss of the range tests: raise safety or max_steps")
    notes = []
    for s in per_ratio:
        if s.lr_at_best == range_lrs[0]:
            notes.append(f"ratio {s.ratio:g}: the loss was lowest at the start of the range; lower lr_range[0]")
        if s.edge_lr is None:
            notes.append(
                f"ratio {s.ratio:g}: the loss did not climb back above its start within lr_range, so the "
                "suggestion is the lr at the minimum divided by safety; raise lr_range[1] to find the edge"
            )
    steps_used = sum(1 for p in table if not p.diverged)
    return LrSuggestion(chosen.suggested_lr, chosen.ratio, tuple(table), tuple(per_ratio), steps_used, reason,
                        tuple(notes), _lag(beta))


def _lag(beta: float) -> int:
    """The mean lag of a bias-corrected EMA with factor ``beta``, in steps."""
    return round(beta / (1 - beta))


def _read_range(ratio: float, pts: list[ProbePoint], lrs: Sequence[float], beta: float, safety: float) -> RatioSummary:
    """One ratio's range test read: its lag-corrected minimum and edge, and the suggestion."""
    delay = _lag(beta)

    def lr_of(p: ProbePoint) -> float:  # the lr the smoothed value at p reflects
        return lrs[max(0, p.step - 1 - delay)]

    ok = [p for p in pts if not p.diverged]
    n_head = max(1, math.ceil(START_FRACTION * len(lrs)))
    head = ok[:n_head]
    start = sum(p.loss for p in head) / len(head)
    # the minimum is looked for after the start window: there the lr is too small to have changed
    # anything, and the smoothed loss of the first few steps is one or two batches' loss
    at = min(ok[n_head:] or ok, key=lambda p: p.smoothed)
    edge = next((p for p in pts[at.step - 1 :] if p.diverged or p.smoothed > start), None)
    diverged = next((p.lr for p in pts if p.diverged), None)
    edge_lr = None if edge is None else lr_of(edge)
    # without an edge the range test gives no stability bound; its minimum, always below the edge,
    # stands in for it
    suggested = (lr_of(at) if edge_lr is None else edge_lr) / safety
    return RatioSummary(ratio, suggested, at.smoothed, lr_of(at), start, edge_lr, diverged, 0, math.nan, len(ok))


def _check_ratios(ratios: Any) -> list[float]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise LoraPlusError(f"ratios must be a sequence of positive numbers such as (1, 4, 16), got {ratios!r}")
    out = [check_number(f"ratios[{i}]", r) for i, r in enumerate(ratios)]
    if not out:
        raise LoraPlusError("ratios is empty: give at least one B/A ratio to probe, e.g. ratios=(1, 4, 16)")
    return list(dict.fromkeys(out))
