"""The probe: an exponential lr range test per ratio, then a confirmation run at each ratio's suggestion.

Design (also in ``docs/find_lr.md``):

1. **Range test**, per ratio, from one restored start: A's lr grows geometrically from
   ``lr_range[0]`` to ``lr_range[1]`` over the ratio's range steps; every other group keeps its
   :func:`loraplus.LoraPlus` rate relative to A (B at ``ratio ×``). The loss is smoothed by a
   bias-corrected exponential moving average (``beta``), whose value lags its input by
   ``beta / (1 - beta)`` steps on average: each smoothed value is read against the lr of that
   many steps earlier. The *start* is the mean loss of the test's first tenth, where the lr is
   too small to change anything. The test stops at divergence: a non-finite loss, or, after the
   first tenth, a smoothed loss that has risen above its minimum so far by more than
   ``DIVERGENCE_RISE ×`` the larger of the fall from the start to that minimum and the spread
   (max − min) of the first tenth's losses. Differences of losses, never ratios: the rule reads
   a loss that can be negative (a shifted loss, a Gaussian NLL, an ELBO) as it reads the same
   loss shifted up. The ratio's **edge** is the first lr, after the smoothed minimum (looked for
   after the first tenth), at which the smoothed loss climbs back above the start or the test
   diverges; the suggested lr is the edge divided by ``safety``. The edge is a large, sharp change and the
   minimum of a fine-tuning range test is a shallow, noisy one, so the edge is the better
   located of the two (docs/find_lr.md has the measurements).
2. **Confirmation**, per ratio, from the same restored start: train at the suggested lr
   (constant) for the ratio's confirmation steps; the ratio whose mean loss over the last
   quarter of them is lowest is chosen (a range test mixes lrs and steps; equal-length runs at
   a fixed lr on the same batches compare ratios fairly). When every confirmation run diverged,
   the lowest smoothed range-test loss decides.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import numbers
import sys
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any, NamedTuple

import torch
from torch import nn

from .._errors import LoraPlusError
from .._groups._build import param_groups
from .._groups._factory import LoraPlus, _unwrap
from .._groups._lr_free import lr_free_record
from .._numbers import check_number
from .._progress import _progress
from .._role import Role, group_role
from ._restore import Snapshot
from ._suggestion import LrSuggestion, Phase, ProbePoint, RatioSummary, Rule

__all__ = ["DEFAULT_LR_RANGE", "DEFAULT_SAFETY", "DEFAULT_STEPS_PER_RATIO", "LAW_EXPONENT", "MIN_STEPS_PER_RATIO", "find_lr"]

#: Steps per ratio when ``max_steps`` is None: two thirds range test, one third confirmation.
DEFAULT_STEPS_PER_RATIO = 150
#: The smallest budget per ratio ``max_steps`` may give (20 range-test + 10 confirmation steps).
MIN_STEPS_PER_RATIO = 30
#: A probe stops once its smoothed loss has risen above its minimum so far by more than this
#: multiple of the larger of the fall from the start to that minimum and the start's spread (for a
#: loss that falls to half its start, 4x the minimum, the rule this replaced, which only a loss
#: bounded below by 0 can use).
DIVERGENCE_RISE = 3.0
#: Relative differences of the smoothed loss below this are rounding, not a rise.
_ROUNDING = 1e-12
#: The fraction of the range test, from its start, whose mean loss is the starting loss.
START_FRACTION = 0.1
#: ``safety``'s default. On the two development tasks (benchmarks/studies/find_lr/evaluate.py's width32 and
#: width64, ratios 1-64, 2 seeds: 16 points) the edge is 1.3x (0.72-1.65x) the best swept peak lr of
#: a warm-up + cosine run; on the paper's toy (full-batch GD, 200 steps) rates above about a third
#: of the edge diverge late in the run. 3 serves both (docs/find_lr.md).
DEFAULT_SAFETY = 3.0
#: ``lr_range``'s default: A's lr at the range test's first and last step.
DEFAULT_LR_RANGE = (1e-6, 1.0)
#: Given plain LoRA's rate (``lora_lr``), ratio λ's A rate is ``lora_lr × λ^-LAW_EXPONENT`` (B's then
#: grows as ``λ^(1 - LAW_EXPONENT)``). Fitted to study v2's best swept rate per ratio: 0.45 and 0.25
#: on MiniLM with B=0 and A=0, 0.79, 0.61, 0.64 and 0.39 on the width family's widths 32-256; their
#: median is 0.53 (benchmarks/studies/find_lr/results/compare/law.json, docs/find_lr.md).
LAW_EXPONENT = 0.5


class _Batches:
    """The batches every probe sees, the same ones in the same order: ``batches`` is iterated once,
    whatever it is (a list, a shuffling ``DataLoader``, a generator), and each batch is kept as it
    is read, at most ``bound`` (the most one probe takes); every probe replays them, and cycles
    them when the source ran out first.

    Iterating a re-iterable afresh per probe would give each probe other batches wherever the order
    comes from state the snapshot cannot restore (a ``DataLoader``'s own ``generator``, a sampler
    seeded by epoch); reading it once cannot. The iterator is made at the first batch, inside the
    first probe, so the RNG draws a ``DataLoader`` makes there are undone by the restore.
    """

    def __init__(self, batches: Iterable[Any], bound: int) -> None:
        self._source = batches
        self._reader: Iterator[Any] | None = None
        self._cache: list[Any] = []
        self._bound = bound
        self._exhausted = False

    def probe(self) -> Iterator[Any]:
        yield from self._cache
        while not self._exhausted and len(self._cache) < self._bound:
            if self._reader is None:
                self._reader = iter(self._source)
            try:
                batch = next(self._reader)
            except StopIteration:
                self._exhausted = True
                break
            self._cache.append(batch)
            yield batch
        self._reader = None  # read to the bound or to the end: let a DataLoader's workers go
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


#: The keywords of :func:`loraplus.param_groups`, the options that decide each group's rate.
_GROUPING = frozenset(inspect.signature(param_groups).parameters) - {"model", "lr", "ratio"}


def _follows(model: nn.Module, ratio: float, lr: float, kwargs: dict[str, Any]) -> tuple[list[dict[str, Any]], list[bool]]:
    """The LoRA+ groups at ``lr`` and whether each one's rate follows A's (B at ``ratio ×``, every role
    at A's rate) or is a rate of its own (``role_lr``, ``lr_embedding``): a second grouping at twice
    the rate tells, without guessing. Pure: labels the model, builds no optimizer, changes nothing."""
    grouping = {k: v for k, v in kwargs.items() if k in _GROUPING}
    once = param_groups(model, lr=lr, ratio=ratio, **grouping)
    twice = param_groups(model, lr=2 * lr, ratio=ratio, **grouping)
    return once, [math.isclose(float(t["lr"]), 2 * float(g["lr"]), rel_tol=1e-9) for g, t in zip(once, twice)]


def _check_swept(groups: Sequence[dict[str, Any]], follows: Sequence[bool], role_lr: Any) -> None:
    """Refuse a ``role_lr`` that fixes A's or B's rate: the range test would then sweep nothing its
    suggestion reports (with A fixed, B is fixed too, at ``ratio ×`` it)."""
    if not any(Role(g["role"]) in (Role.A, Role.B) for g, f in zip(groups, follows) if not f):
        return
    given = {Role.coerce(k): float(v) for k, v in dict(role_lr or {}).items()}  # validated by the grouping
    named = [role for role in (Role.A, Role.B) if role in given]
    shown = ", ".join(f"loraplus.Role.{role.name}: {given[role]:g}" for role in named)
    raise LoraPlusError(
        f"role_lr fixes the learning rate of the {' and '.join(r.name for r in named)} factors ({shown}), but "
        "find_lr searches for A's rate and B's ratio to it: with it fixed the range test sweeps nothing that its "
        f"suggestion reports. Drop {' and '.join(f'loraplus.Role.{r.name}' for r in named)} from role_lr and pass "
        "the suggestion as LoraPlus(lr=s.lr, ratio=s.ratio); other roles in role_lr (e.g. loraplus.Role.OTHER) "
        "keep their rate during the probe"
    )


class _Built(NamedTuple):
    """One probe's optimizer, each group's rate at the lr it was built with, and whether that rate
    follows A's (B at ``ratio ×``, every role at A's rate) or is a rate of its own."""

    optimizer: Any
    base: list[float]
    follows: list[bool]


def _build(optimizer_cls: Any, model: nn.Module, ratio: float, lr: float, kwargs: dict[str, Any]) -> _Built:
    """The probe's optimizer, each group's rate at ``lr`` and whether that rate follows A's.

    Which groups follow A's rate is read before the optimizer is built: building it may change the
    model (``precondition="lorafa"`` freezes A), and only one optimizer is built per probe."""
    _, follows = _follows(model, ratio, lr, kwargs)
    try:
        opt = LoraPlus(optimizer_cls, model, ratio=ratio, lr=lr, guard=None, **kwargs)  # the probe sets the rates
    except LoraPlusError as err:
        raise LoraPlusError(
            f"find_lr could not build its probe optimizer (it needs one that takes per-group lr, as LoraPlus builds): {err}"
        ) from err
    groups = getattr(opt, "param_groups", None)
    if (
        not groups
        or len(groups) != len(follows)
        or any("lr" not in g for g in groups)
        or not any(group_role(g) is Role.B for g in groups)
    ):
        raise LoraPlusError(
            f"{type(opt).__name__} did not keep the per-group learning rates LoraPlus gave it (groups with "
            "'lr' and 'role'), so B cannot get ratio x A's rate; use an optimizer that takes per-group lr "
            "(e.g. torch.optim.AdamW)"
        )
    return _Built(opt, [float(g["lr"]) for g in groups], follows)


class _Start(NamedTuple):
    """What a probe's divergence rule measures a rise against: ``level``, the mean loss of the range
    test's first tenth (the start), and ``spread``, the max - min of those losses (their noise)."""

    level: float
    spread: float


def _start(losses: Sequence[float]) -> _Start:
    return _Start(sum(losses) / len(losses), max(losses) - min(losses))


def _diverged(smoothed: float, best: float, start: _Start) -> bool:
    """The smoothed loss rose above its minimum so far by more than ``DIVERGENCE_RISE ×`` the larger
    of the fall from the start to that minimum and the start's spread. Only differences of losses
    enter: a loss shifted by any constant, negative ones included, diverges at the same step."""
    scale = max(start.level - best, start.spread)
    rounding = _ROUNDING * max(abs(start.level), abs(best), abs(smoothed))
    return smoothed - best > max(DIVERGENCE_RISE * scale, rounding)


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
    built: _Built, lrs: Sequence[float],
    lr0: float, ratio: float, phase: Phase, beta: float, check_first: bool, tick: Callable[[int], None],
    start: _Start | None, n_head: int,
) -> list[ProbePoint]:
    """Train one probe from the current state: step k at A's lr ``lrs[k]``; stops at divergence.

    ``start`` is what a rise is measured against; ``None`` (the range test): the first ``n_head``
    losses, from which step on the rise rule applies (before it, only a non-finite loss diverges)."""
    opt, base, follows = built.optimizer, built.base, built.follows
    points: list[ProbePoint] = []
    avg, best = 0.0, math.inf
    stream = batches.probe()
    for k, lr in enumerate(lrs, start=1):
        for g, b, f in zip(opt.param_groups, base, follows):
            g["lr"] = b * (lr / lr0) if f else b
        loss = _loss(loss_fn, model, next(stream), check_first and k == 1)
        value = float(loss.item())
        if not math.isfinite(value):
            points.append(_point(ratio, phase, lr, k, value, math.inf, True))
            break
        avg = beta * avg + (1 - beta) * value
        smoothed = avg / (1 - beta**k)
        if start is not None and _diverged(smoothed, best, start):
            points.append(_point(ratio, phase, lr, k, value, smoothed, True))
            break
        best = min(best, smoothed)
        points.append(_point(ratio, phase, lr, k, value, smoothed, False))
        if start is None and k == n_head:
            start = _start([p.loss for p in points])
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
    lr_range: tuple[float, float] | None = None,
    safety: float | None = None,
    lora_lr: float | None = None,
    beta: float = 0.9,
    train: bool = True,
    offload: bool = False,
    progress: bool | None = None,
    **optimizer_kwargs: Any,
) -> LrSuggestion:
    """Suggest A's learning rate and the B/A ratio for ``model`` with a short probe per ratio.

    For each ratio: an exponential lr range test, whose edge (where the loss climbs back above
    its start) divided by ``safety`` is the ratio's suggestion (without an edge: the lower of the
    minimum's lr divided by ``safety`` and the lr where the loss fell fastest), then a confirmation
    run at that lr; the ratio with the lowest confirmation loss wins (see ``docs/find_lr.md``).
    Given plain LoRA's rate (``lora_lr``), there is no range test: ratio λ's rate is
    ``lora_lr × λ^-1/2``; one ratio then takes no step at all, several are compared by
    confirmation runs that take each ratio's whole budget. The rules
    compare losses by their differences only, so a loss that can be negative (a shifted loss, a
    Gaussian NLL, an ELBO) gets the suggestion of the same loss shifted up.
    Every probe starts from the model as given, restored in place from one snapshot; the
    probe's optimizer (built by :func:`loraplus.LoraPlus`, so embeddings and weight decay follow
    the library's rules) is discarded after each probe. Groups whose rate follows A's (B at
    ``ratio ×``, heads and norms at A's rate) are scaled with it; groups given a rate of their own
    through ``optimizer_kwargs`` (``lr_embedding``, ``role_lr`` for roles other than A and B) keep
    it throughout.

    **The model is left exactly as it was found** — trainable parameter values, buffers (the same
    tensor objects), ``requires_grad``, every module's ``training`` flag, every ``.grad`` (the
    original tensor or None) and the torch CPU/CUDA, ``random`` and NumPy RNG states — also when
    ``loss_fn`` raises, on a refusal and on KeyboardInterrupt (the error propagates unchanged).
    The snapshot is taken before anything can change the model, building the probe's optimizer
    included (``precondition="lorafa"`` freezes A there).

    Args:
        model: the model with its LoRA adapters attached (CPU or CUDA; nothing is moved).
        loss_fn: ``loss_fn(model, batch)`` returns the scalar loss tensor to minimise.
        batches: training batches: a list, a ``DataLoader`` (shuffling or not), a generator. It
            is iterated once and its batches kept as they are read, at most as many as one range
            test takes (two thirds of ``max_steps // len(ratios)``); every probe replays them in
            the same order, cycling them when ``batches`` has fewer.
        optimizer_cls: an optimizer taking per-group ``lr`` (default AdamW).
        ratios: the B/A ratios to probe, each positive and finite.
        max_steps: total optimizer steps over all probes (default ``150 × len(ratios)``); each
            ratio gets ``max_steps // len(ratios)``, at least 30: two thirds range test, one
            third confirmation.
        lr_range: A's lr at the first and last range-test step (default ``(1e-6, 1.0)``).
        safety: the suggested lr is the range test's edge divided by this (default 3; how it was
            set is in docs/find_lr.md).
        lora_lr: the rate plain LoRA (ratio 1) trains well at, when you have one: ratio λ's A rate
            is then ``lora_lr × λ^-1/2`` (``LAW_EXPONENT``, fitted to study v2's swept rates; B's is
            ``lora_lr × λ^1/2``), with no range test, so ``lr_range`` and ``safety`` are refused
            beside it. With one ratio the probe takes no step and does not touch the model.
        beta: the loss smoothing factor (bias-corrected EMA).
        train: put the model in train mode (``model.train()``) for every probe, as a training loop
            does, so dropout is on (default); a model from ``from_pretrained`` is in eval mode, and
            probed so it gets the rate of a model without dropout. ``False`` probes in the modes the
            model has (for submodules you keep in eval, e.g. a frozen batch norm). Either way every
            module's mode is restored afterwards.
        offload: keep the snapshot on the CPU instead of on the parameters' devices.
        progress: a progress bar on stderr (tqdm when installed); default: only when stderr is a terminal.
        **optimizer_kwargs: passed to :func:`loraplus.LoraPlus` (``weight_decay``, ``betas``,
            ``lr_embedding``, ``precondition``, …); not ``lr`` or ``ratio``, and no ``role_lr`` for
            A or B: their rates are what the probe finds.

    Returns:
        An :class:`LrSuggestion`: ``.lr``, ``.ratio``, ``.table``, ``.steps_used``, ``.explain()``, ``.plot()``.

    Raises:
        LoraPlusError: on a model without adapters, empty batches, a non-scalar loss or one that is
            not finite before any update, an optimizer without per-group lr, a ``role_lr`` that
            fixes A's or B's rate, bad ``ratios``, ``max_steps``, ``lr_range``, ``safety``, ``lora_lr``,
            ``beta`` or ``train``, ``lr_range`` or ``safety`` beside ``lora_lr``, and when every
            confirmation run at ``lora_lr``'s rates diverges.

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
    if lora_lr is not None:
        lora_lr = check_number("lora_lr", lora_lr)
        unused = [f"{k}={v!r}" for k, v in (("lr_range", lr_range), ("safety", safety)) if v is not None]
        if unused:
            raise LoraPlusError(
                f"{' and '.join(unused)} read the range test, which lora_lr= skips (each ratio's rate comes from "
                "lora_lr); drop them, or drop lora_lr to run the range test"
            )
    lo, hi = DEFAULT_LR_RANGE if lr_range is None else lr_range
    lo = check_number("lr_range[0]", lo)
    hi = check_number("lr_range[1]", hi)
    if not lo < hi:
        raise LoraPlusError(f"lr_range must be (low, high) with low < high, got {tuple(lr_range or ())!r}")
    safety = DEFAULT_SAFETY if safety is None else check_number("safety", safety)
    beta = check_number("beta", beta, allow_zero=True)
    if beta >= 1:
        raise LoraPlusError(f"beta must be in [0, 1), got {beta!r}")
    for key in ("lr", "ratio", "params", "guard"):
        if key in optimizer_kwargs:
            raise LoraPlusError(f"do not pass {key}= to find_lr: it is what the probe sets (use lr_range= and ratios=)")
    if not isinstance(train, bool):
        raise LoraPlusError(f"train must be True (probe in train mode) or False (in the modes given), got {train!r}")
    _check_optimizer(optimizer_cls, ratio_list)
    # labelling errors (no adapters, ...) and a role_lr that fixes A or B surface here; labelling
    # changes nothing, so this needs no snapshot
    _check_swept(*_follows(model, ratio_list[0], lo, optimizer_kwargs), optimizer_kwargs.get("role_lr"))
    per = int(max_steps) // n
    if lora_lr is not None:
        law = [_law(ratio, lora_lr) for ratio in ratio_list]
        if n == 1:  # nothing to compare: the law is the answer, and the model is not touched
            return LrSuggestion(lr=law[0].suggested_lr, ratio=law[0].ratio, table=(), per_ratio=tuple(law),
                                steps_used=0, reason=f"the only ratio; its lr is lora_lr x ratio^-{LAW_EXPONENT:g}",
                                lag=_lag(beta))
        # no range test: each ratio's whole budget confirms its law rate
        n_range, n_confirm = 0, per
    else:
        n_confirm = per // 3
        n_range = per - n_confirm
    n_head = _head(n_range or n_confirm)
    range_lrs = [lo * (hi / lo) ** (k / (n_range - 1)) for k in range(n_range)]
    stream = _Batches(batches, n_range or n_confirm)
    if progress is None:
        progress = sys.stderr.isatty()
    bar = _progress(n * (n_range + n_confirm), "find_lr", progress)
    # the snapshot comes before anything that changes the model: building a probe's optimizer can
    # (precondition="lorafa" freezes A), train=True does, and so does every step
    snapshot = Snapshot(model, offload=offload)
    table: list[ProbePoint] = []
    # each ratio's range test (or law rate) and the start its confirmation measures a rise against
    # (None under the law: the confirmation's own first steps, as a range test's)
    ranged: list[tuple[RatioSummary, _Start | None]] = []
    per_ratio: list[RatioSummary] = []
    try:
        if lora_lr is not None:
            ranged = [(s, None) for s in law]
        for i, ratio in enumerate(ratio_list if lora_lr is None else ()):
            _fresh(snapshot, model, train)
            bar.set_description(f"find_lr ratio {ratio:g}: range test")
            built = _build(optimizer_cls, model, ratio, lo, optimizer_kwargs)
            pts = _run(model, loss_fn, stream, built, range_lrs, lo, ratio, Phase.RANGE, beta, i == 0, bar.update,
                       None, n_head)
            del built  # the optimizer and its state go with each probe
            table += pts
            if not any(not p.diverged for p in pts):
                raise LoraPlusError(
                    f"the range test at ratio {ratio:g} diverged at its first step (lr {lo:g}); lower lr_range[0]"
                )
            start = _start([p.loss for p in pts if not p.diverged][:n_head])
            ranged.append((_read_range(ratio, pts, range_lrs, beta, safety, start, n_head), start))
        # steps the range tests left unused (they stop at divergence) fund confirmation retries
        spare = int(max_steps) - sum(r.steps for r, _ in ranged) - n * n_confirm
        for i, (summary, start) in enumerate(ranged):
            ratio, lr = summary.ratio, summary.suggested_lr
            taken = halvings = 0
            while True:
                _fresh(snapshot, model, train)
                bar.set_description(f"find_lr ratio {ratio:g}: confirmation")
                built = _build(optimizer_cls, model, ratio, lr, optimizer_kwargs)
                # from the same start on the same first batches as the range test: its start is this run's too
                pts = _run(model, loss_fn, stream, built, [lr] * n_confirm, lr, ratio, Phase.CONFIRM, beta,
                           start is None and i == 0, bar.update, start, n_head)
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
            per_ratio.append(dataclasses.replace(summary, suggested_lr=lr, halvings=halvings, confirm_loss=loss,
                                              steps=summary.steps + taken))
    finally:
        snapshot.restore()
        bar.close()
    at = "lora_lr x ratio^-" + f"{LAW_EXPONENT:g}" if lora_lr is not None else "suggested"
    if any(math.isfinite(s.confirm_loss) for s in per_ratio):
        chosen = min(per_ratio, key=lambda s: (s.confirm_loss, s.ratio))
        reason = (
            f"lowest mean loss over the last {max(1, n_confirm // 4)} of {n_confirm} confirmation steps at each "
            f"ratio's {at} lr, all from the same start"
        )
    elif lora_lr is None:
        chosen = min(per_ratio, key=lambda s: (math.inf if s.best_smoothed is None else s.best_smoothed, s.ratio))
        reason = ("every confirmation run diverged, also after halving the lr while the budget allowed; chosen by "
                  "the lowest smoothed loss of the range tests: raise safety or max_steps")
    else:
        raise LoraPlusError(
            f"every confirmation run diverged at its rate lora_lr x ratio^-{LAW_EXPONENT:g} (lora_lr={lora_lr:g}, "
            f"ratios {', '.join(f'{r:g}' for r in ratio_list)}): lora_lr is too high for this model and data; "
            "pass the rate plain LoRA trains well at, or drop lora_lr to run the range test"
        )
    notes = []
    for s in per_ratio if lora_lr is None else ():
        if s.lr_at_best == range_lrs[0]:
            notes.append(f"ratio {s.ratio:g}: the loss was lowest at the start of the range; lower lr_range[0]")
        if s.edge_lr is None:
            notes.append(
                f"ratio {s.ratio:g}: the loss did not climb back above its start within lr_range, so the "
                "suggestion is the lower of the lr at the minimum divided by safety and the lr where the loss "
                "fell fastest; raise lr_range[1] to find the edge"
            )
    steps_used = sum(1 for p in table if not p.diverged)
    return LrSuggestion(lr=chosen.suggested_lr, ratio=chosen.ratio, table=tuple(table), per_ratio=tuple(per_ratio),
                        steps_used=steps_used, reason=reason, notes=tuple(notes), lag=_lag(beta))

def _fresh(snapshot: Snapshot, model: nn.Module, train: bool) -> None:
    """Put the model back as it was found, grads detached, then in train mode when ``train``."""
    snapshot.restore()
    snapshot.clear_grads()
    if train:
        model.train()


def _point(ratio: float, phase: Phase, lr: float, step: int, loss: float, smoothed: float, diverged: bool) -> ProbePoint:
    return ProbePoint(ratio=ratio, phase=phase, lr=lr, step=step, loss=loss, smoothed=smoothed, diverged=diverged)


def _head(n_range: int) -> int:
    """How many of the range test's first steps make its start."""
    return max(1, math.ceil(START_FRACTION * n_range))


def _lag(beta: float) -> int:
    """The mean lag of a bias-corrected EMA with factor ``beta``, in steps."""
    return round(beta / (1 - beta))


def _read_range(ratio: float, pts: list[ProbePoint], lrs: Sequence[float], beta: float, safety: float,
                start: _Start, n_head: int) -> RatioSummary:
    """One ratio's range test read: its lag-corrected minimum and edge, and the suggestion. Every
    comparison is between losses (no multiple of a loss), so a shifted loss reads the same."""
    delay = _lag(beta)

    def lr_of(p: ProbePoint) -> float:  # the lr the smoothed value at p reflects
        return lrs[max(0, p.step - 1 - delay)]

    ok = [p for p in pts if not p.diverged]
    # the minimum is looked for after the start window: there the lr is too small to have changed
    # anything, and the smoothed loss of the first few steps is one or two batches' loss
    at = min(ok[n_head:] or ok, key=lambda p: p.smoothed)
    edge = next((p for p in pts[at.step - 1 :] if p.diverged or p.smoothed > start.level), None)
    diverged = next((p.lr for p in pts if p.diverged), None)
    edge_lr = None if edge is None else lr_of(edge)
    # the steepest fall of the smoothed loss from the start window to the minimum; the lrs are
    # geometric, so a fall per step is a fall per log-lr, read at the step's own lr (as the
    # steepest-slope finders read it)
    window = ok[max(0, n_head - 1) : at.step]
    falls = [(b.smoothed - a.smoothed, b.step) for a, b in zip(window, window[1:])]
    steepest_lr = lrs[min(falls)[1] - 1] if falls and min(falls)[0] < 0 else None
    if edge_lr is not None:
        rule, suggested = Rule.EDGE, edge_lr / safety
    elif steepest_lr is not None and steepest_lr < lr_of(at) / safety:
        # no edge: the range test gives no stability bound. A loss that starts far above where it
        # ends (an untrained head, a large initial error) falls over most of the range and keeps its
        # minimum near the top, so the minimum alone lands far too high there (docs/find_lr.md)
        rule, suggested = Rule.STEEPEST, steepest_lr
    else:
        rule, suggested = Rule.MINIMUM, lr_of(at) / safety
    return RatioSummary(ratio=ratio, rule=rule, suggested_lr=suggested, best_smoothed=at.smoothed,
                        lr_at_best=lr_of(at), steepest_lr=steepest_lr, start_loss=start.level, edge_lr=edge_lr,
                        diverged_at=diverged, halvings=0, confirm_loss=math.nan, steps=len(ok))


def _law(ratio: float, lora_lr: float) -> RatioSummary:
    """A ratio's rate from plain LoRA's: ``lora_lr × ratio^-LAW_EXPONENT``; no range test."""
    return RatioSummary(ratio=ratio, rule=Rule.LAW, suggested_lr=lora_lr * ratio**-LAW_EXPONENT, best_smoothed=None,
                        lr_at_best=None, steepest_lr=None, start_loss=None, edge_lr=None, diverged_at=None,
                        halvings=0, confirm_loss=math.nan, steps=0)

def _check_ratios(ratios: Any) -> list[float]:
    if isinstance(ratios, (str, bytes)) or not isinstance(ratios, Iterable):
        raise LoraPlusError(f"ratios must be a sequence of positive numbers such as (1, 4, 16), got {ratios!r}")
    out = [check_number(f"ratios[{i}]", r) for i, r in enumerate(ratios)]
    if not out:
        raise LoraPlusError("ratios is empty: give at least one B/A ratio to probe, e.g. ratios=(1, 4, 16)")
    return list(dict.fromkeys(out))
