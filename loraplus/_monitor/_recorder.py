"""Recording: the Monitor's hooks on the optimizer and on the adapted layers, and what they capture.

:class:`Recorder` copies the adapter factors right before a sampled ``optimizer.step()``,
captures the adapted layers' inputs of the forwards in between (thread-safe: ``nn.DataParallel``
runs them in replica threads), measures the step right after it with the pure functions of
``_measure.py`` and hands the values to its owner. It holds its owner weakly: the owner's
finalizer detaches it, so a dropped Monitor leaves no hook behind. Any exception inside a hook
is caught, the recorder detaches, and the owner is told (it warns once); the optimizer step is
never affected.
"""

from __future__ import annotations

import math
import threading
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn

from .._pairs._pairs import Pair, stack_factors
from ._measure import ACTIVATION_METRICS, WEIGHT_METRICS, StepFactors, activation_terms, take_rows, weight_terms

__all__ = ["Recorder"]


@dataclass(frozen=True)
class _Bucket:
    """Adapters whose factors have equal shapes, dtypes, devices and orientation: measured as one batch."""

    indices: tuple[int, ...]
    a: tuple[torch.Tensor, ...]
    b: tuple[torch.Tensor, ...]
    transposed: bool
    scale: torch.Tensor | None  # (k,), None when every scale is 1
    out_features: int


def _buckets(pairs: Sequence[Pair], scales: Sequence[float]) -> list[_Bucket]:
    found: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(pairs):
        a, b = p.a_matrix(), p.b_matrix()
        found.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, a.device, b.dtype, p.transposed), []).append(i)
    out = []
    for idx in found.values():
        s = [scales[i] for i in idx]
        out.append(
            _Bucket(
                tuple(idx),
                cast("tuple[torch.Tensor, ...]", tuple(pairs[i].a for i in idx)),  # set: a_matrix() ran above
                cast("tuple[torch.Tensor, ...]", tuple(pairs[i].b for i in idx)),
                pairs[idx[0]].transposed,
                None if all(v == 1.0 for v in s) else torch.tensor(s, dtype=torch.float64),
                pairs[idx[0]].b_matrix().shape[0],
            )
        )
    return out


def _take(f: StepFactors, idx: Sequence[int]) -> StepFactors:
    i = list(idx)
    return StepFactors(f.a0[i], f.da[i], f.gb[i], f.gdb[i])


class Recorder:
    """Hooks and capture for a set of A/B pairs on one optimizer.

    Args:
        owner: the object told about each measured step (``owner._on_step(step, values)``) and about
            a failure (``owner._on_failure(error, when)``); held weakly.
        optimizer: the ``torch.optim.Optimizer`` to hook.
        pairs: the monitored pairs (their ``a``, ``b`` are the live parameters).
        scales: the scaling s per pair included in the ΔW terms (1.0 where unknown).
        hosts: per pair, the module whose input is the layer input (``None``: no activation terms).
        every: sample every n-th step; ``activations``: also capture inputs; ``max_rows``: rows kept per layer.
    """

    def __init__(
        self,
        owner: Any,
        optimizer: torch.optim.Optimizer,
        pairs: Sequence[Pair],
        scales: Sequence[float],
        hosts: Sequence[nn.Module | None],
        *,
        every: int,
        activations: bool,
        max_rows: int,
    ) -> None:
        self._owner = weakref.ref(owner)
        self.every, self.activations, self.max_rows = every, activations, max_rows
        self.step = 0
        self.n = len(pairs)
        self.metrics = WEIGHT_METRICS + (ACTIVATION_METRICS if activations else ())
        self.keys = [p.key for p in pairs]
        self.in_features: list[int | None] = [None if p.embedding else p.a_matrix().shape[1] for p in pairs]
        self.buckets = _buckets(pairs, scales)
        self.notes: dict[str, str] = {}  # adapter key -> why its activation terms are missing
        self._hosts: dict[int, tuple[nn.Module, list[int]]] = {}
        for i, host in enumerate(hosts):
            if host is not None:
                self._hosts.setdefault(id(host), (host, []))[1].append(i)
        self._lock = threading.Lock()
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._captured: dict[int, list[torch.Tensor]] = {}
        self._fwd_handles: list[Any] = []
        self.attached = True
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        self._arm_if_sampled()

    # ------------------------------------------------------------------ lifecycle

    def detach(self) -> None:
        """Remove every hook (step and forward). Idempotent."""
        with self._lock:
            self.attached = False
            handles, self._handles = self._handles, []
            fwd, self._fwd_handles = self._fwd_handles, []
            self._snapshot, self._captured = None, {}
        for h in handles + fwd:
            h.remove()

    def sampled(self, step: int) -> bool:
        return step % self.every == 0

    def set_step(self, step: int) -> None:
        """Continue counting from ``step`` (a resumed run); re-arms the input capture for it."""
        self._disarm()
        self.step = step
        if self.attached:
            self._arm_if_sampled()

    def _fail(self, err: BaseException, when: str) -> None:
        with self._lock:  # several replica threads may fail at once: only the first one reports
            first, self.attached = self.attached, False
        self.detach()
        owner = self._owner()
        if first and owner is not None:
            owner._on_failure(err, when)

    # ------------------------------------------------------------------ input capture

    def _arm_if_sampled(self) -> None:
        if not (self.activations and self.sampled(self.step)):
            return
        with self._lock:
            self._captured = {}
        for host, indices in self._hosts.values():
            self._fwd_handles.append(host.register_forward_pre_hook(self._capture_hook(indices), with_kwargs=True))

    def _disarm(self) -> None:
        with self._lock:
            fwd, self._fwd_handles = self._fwd_handles, []
            self._captured = {}
        for h in fwd:
            h.remove()

    def _capture_hook(self, indices: list[int]) -> Callable[..., None]:
        ref = weakref.ref(self)

        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            rec = ref()
            if rec is not None and torch.is_grad_enabled():
                try:
                    rec._capture(indices, args, kwargs)
                except Exception as err:  # a side tool never breaks the forward
                    rec._fail(err, "capturing a layer input")
            return None

        return capture

    def _capture(self, indices: Sequence[int], args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> None:
        x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
        if not isinstance(x, torch.Tensor):
            return
        with self._lock:  # replica threads of nn.DataParallel run this concurrently; take_rows copies detached rows
            if not self.attached:
                return
            for i in indices:
                parts = self._captured.setdefault(i, [])
                room = self.max_rows - sum(t.shape[0] for t in parts)
                if room <= 0:
                    continue
                rows = take_rows(x, room, self.in_features[i])
                if isinstance(rows, str):
                    self.notes[self.keys[i]] = rows
                else:
                    parts.append(rows)

    @staticmethod
    def _inputs(captured: Mapping[int, list[torch.Tensor]], i: int, device: torch.device) -> torch.Tensor | None:
        """The rows captured for adapter i, on the factors' device (inputs from several devices are moved)."""
        parts = captured.get(i)
        if not parts:
            return None
        parts = [t.to(device) for t in parts]
        return parts[0] if len(parts) == 1 else torch.cat(parts)

    # ------------------------------------------------------------------ step hooks

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self.sampled(self.step):
            return None
        try:
            with torch.no_grad():
                self._snapshot = [
                    (stack_factors(b.a, b.transposed), stack_factors(b.b, b.transposed)) for b in self.buckets
                ]
        except Exception as err:
            self._fail(err, f"copying the factors before step {self.step}")
        return None

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        step = self.step
        self.step += 1
        try:
            if self._snapshot is not None:
                with self._lock:
                    snapshot, captured = self._snapshot, self._captured
                    self._snapshot, self._captured = None, {}
                owner = self._owner()
                if owner is None:  # the owner is being collected: its finalizer detaches us
                    return None
                values = self._measure(snapshot, captured)
                self._disarm()
                owner._on_step(step, values)
            if self.attached:
                self._arm_if_sampled()
        except Exception as err:
            self._fail(err, f"recording step {step}")
        return None

    def _measure(
        self, snapshot: Sequence[tuple[torch.Tensor, torch.Tensor]], captured: Mapping[int, list[torch.Tensor]]
    ) -> torch.Tensor:
        """(adapters, metrics) float64 on the CPU for the step just taken; NaN where a term is missing."""
        values = torch.full((self.n, len(self.metrics)), math.nan, dtype=torch.float64)
        order: list[int] = []
        parts: list[torch.Tensor] = []
        act_order: list[int] = []
        act_parts: list[torch.Tensor] = []
        with torch.no_grad():
            for bucket, (a0, b0) in zip(self.buckets, snapshot):
                a1, b1 = stack_factors(bucket.a, bucket.transposed), stack_factors(bucket.b, bucket.transposed)
                scale = None if bucket.scale is None else bucket.scale.to(a0.device)
                vals, factors = weight_terms(a0, b0, a1, b1, scale)
                parts.append(vals.to("cpu", torch.float64))
                order.extend(bucket.indices)
                if self.activations:
                    for idx, terms in self._activation_terms(bucket, factors, scale, captured):
                        act_order.extend(idx)
                        act_parts.append(terms.to("cpu", torch.float64))
            values[order, : len(WEIGHT_METRICS)] = torch.cat(parts)  # one host sync for every weight metric
            if act_parts:
                values[act_order, len(WEIGHT_METRICS) :] = torch.cat(act_parts)
        if self.activations:
            measured = set(act_order)
            for _, indices in self._hosts.values():
                for i in indices:
                    if i not in measured:
                        self.notes.setdefault(
                            self.keys[i],
                            "no input captured: the layer did not run a forward with gradients before this step",
                        )
        return values

    def _activation_terms(
        self,
        bucket: _Bucket,
        factors: StepFactors,
        scale: torch.Tensor | None,
        captured: Mapping[int, list[torch.Tensor]],
    ) -> list[tuple[list[int], torch.Tensor]]:
        """(adapter indices, (m, 3) terms) for a bucket's adapters with captured inputs; equal row counts batched."""
        device = factors.a0.device
        rows = {j: x for j, i in enumerate(bucket.indices) if (x := self._inputs(captured, i, device)) is not None}
        out = []
        dense = [j for j in rows if self.in_features[bucket.indices[j]] is not None]
        if dense and len(dense) == len(rows) and len({rows[j].shape[0] for j in dense}) == 1:
            x = torch.stack([rows[j] for j in dense])
            s = None if scale is None else scale[dense]
            terms = activation_terms(x, _take(factors, dense), bucket.out_features, s)
            return [([bucket.indices[j] for j in dense], terms)]
        for j, x in rows.items():
            emb = self.in_features[bucket.indices[j]] is None
            s = None if scale is None else scale[j : j + 1]
            terms = activation_terms(x[None], _take(factors, [j]), bucket.out_features, s, embedding=emb)
            out.append(([bucket.indices[j]], terms))
        return out
