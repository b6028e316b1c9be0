"""Diagnostics: record how each adapter's A and B factors change during training.

The :class:`Monitor` pairs every A factor with its B factor (one pair per adapted layer and
adapter name) using the same role engine as :func:`loraplus.LoraPlus`, snapshots the factors
right before ``optimizer.step()`` on sampled steps and measures, right after it, the paper's
update terms (Hayou et al. 2024): with ΔA, ΔB the applied updates,

    Δ(BA) = B·ΔA + ΔB·A + ΔB·ΔA        (δ¹ = B·ΔA·x, δ² = ΔB·A·x, δ³ = ΔB·ΔA·x)

LoRA+ works when the A-side term δ¹ and the B-side term δ² are of the same order.

Every norm is computed from r×r Gram matrices (``‖X·Y‖² = ⟨XᵀX, YYᵀ⟩``), so the cost per layer
is O((in + out)·r²) and no (out, in) matrix is ever formed.
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ._errors import LoraPlusError
from ._pairs import Pair, pair_labels, stack_factors as _stack, std_factor as _std
from ._roles import Label, Role, RuleSpec, label_parameters, named_modules_map

__all__ = ["Monitor"]

#: Weight-space metrics, in record order.
WEIGHT_METRICS = ("norm_A", "norm_B", "delta_A", "delta_B", "B_dA", "dB_A", "dB_dA", "delta_BA")
#: Activation-space metrics (RMS over entries of the layer output change), ``activations=True``.
ACTIVATION_METRICS = ("act_B_dA", "act_dB_A", "act_dB_dA")


@dataclass
class _Entry:
    pair: Pair
    a: torch.Tensor
    b: torch.Tensor


def _cat(parts: Sequence[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(list(parts))


def _act_from_grams(
    u: torch.Tensor, v: torch.Tensor, gb: torch.Tensor, gdb: torch.Tensor, entries: int
) -> torch.Tensor:
    """(m, 3) RMS of B·ΔA·x, ΔB·A·x, ΔB·ΔA·x from U = X·ΔAᵀ, V = X·Aᵀ (m, N, r) and BᵀB, ΔBᵀΔB (m, r, r)."""
    gu, gv = u.transpose(1, 2) @ u, v.transpose(1, 2) @ v
    sq = torch.stack([(gu * gb).sum((1, 2)), (gv * gdb).sum((1, 2)), (gu * gdb).sum((1, 2))], dim=1)
    return sq.clamp_min(0).div(max(1, entries)).sqrt()


def _labels_from_groups(optimizer: torch.optim.Optimizer) -> list[Label]:
    labels: list[Label] = []
    holder = nn.Module()  # no model: names and roles come from the groups
    for i, g in enumerate(optimizer.param_groups):
        names = g.get("param_names")
        role = g.get("role")
        if names is None or role is None:
            raise LoraPlusError(
                f"param group {i} of {type(optimizer).__name__} has no 'param_names'/'role', so the monitor cannot "
                "tell A from B without the model; pass the model: loraplus.Monitor(optimizer, model)"
            )
        for name, p in zip(names, g["params"]):
            labels.append(Label(name, p, Role.coerce(role), None, f"group {g.get('name', i)}", holder))
    return labels


def _unwrap_optimizer(optimizer: Any) -> Any:
    """The torch optimizer inside wrappers that expose it as ``.optimizer`` (accelerate)."""
    for _ in range(8):
        if hasattr(optimizer, "_optimizer_step_pre_hooks"):
            break
        inner = getattr(optimizer, "optimizer", None)
        if inner is None or inner is optimizer:
            break
        optimizer = inner
    return optimizer


def _check_every(every: Any) -> int:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise LoraPlusError(f"every must be a positive int (record every n-th optimizer step), got {every!r}")
    return every


def _fmt(x: float) -> str:
    return "nan" if x != x else f"{x:.3g}"


class Monitor:
    """Record how each LoRA adapter's A and B factors change at every ``every``-th optimizer step.

    Attaches to the optimizer with ``register_step_pre_hook``/``register_step_post_hook``
    (removed by :meth:`close`, or at the end of a ``with`` block). On a sampled step it copies
    the adapter factors (and nothing else) before ``optimizer.step()`` and records, per adapter
    and from the applied updates ΔA, ΔB, the Frobenius norms ``norm_A``, ``norm_B`` (before the
    step), ``delta_A``, ``delta_B``, ``B_dA`` = ‖B·ΔA‖, ``dB_A`` = ‖ΔB·A‖, ``dB_dA`` = ‖ΔB·ΔA‖,
    ``delta_BA`` = ‖Δ(BA)‖ (all with ΔW = B·A read as the (out, in) matrix the layer applies,
    whatever the library's storage), and the learning rates ``lr_A``, ``lr_B`` of the factors'
    groups. Training numerics are untouched: a monitored run equals an unmonitored one bit for bit.

    With ``activations=True`` it also records the activation-space terms ``act_B_dA`` =
    RMS(B·ΔA·x), ``act_dB_A`` = RMS(ΔB·A·x) and ``act_dB_dA`` = RMS(ΔB·ΔA·x) (root mean square
    over all output entries) on the inputs x of the sampled step: forward pre-hooks on the
    adapted layers are registered right after the previous step (or at construction) and
    removed after the sampled step, and capture the inputs of every grad-enabled forward in
    between — i.e. the forward (or the gradient-accumulation forwards, or the closure) whose
    gradients that step applies. At most ``max_rows`` input rows per layer are kept (an evenly
    strided subset, cloned, so no RNG is used and in-place edits cannot corrupt them). x is the
    adapted layer's input, before any LoRA dropout; embeddings use their token ids.

    Args:
        optimizer: a ``torch.optim.Optimizer`` (any subclass), built by :func:`loraplus.LoraPlus` or
            not; wrappers exposing it as ``.optimizer`` (accelerate's ``AcceleratedOptimizer``) are
            unwrapped.
        model: the model; optional when the optimizer was built by LoraPlus (its groups carry
            ``param_names`` and ``role``), required for ``activations=True``.
        every: record every n-th ``optimizer.step()`` call (0-based, starting with the first).
        activations: also record the activation-space terms (needs ``model``).
        max_rows: input rows kept per layer and step for the activation terms.
        rules: role rules, as for :func:`loraplus.LoraPlus` (only used with ``model``).
        tensorboard: a ``SummaryWriter`` (anything with ``add_scalar``) or a log directory;
            every record is written there as it is made.

    Attributes:
        pairs: the monitored adapters (:class:`Pair`), in model order.
        unpaired: ``{parameter name: reason}`` for adapter factors that could not be paired.
        records: one flat dict per sampled step and adapter (``step``, ``layer``, ``adapter``,
            ``layer_group``, metrics, ``lr_A``, ``lr_B``).
        lrs: one dict per sampled step: ``{"step": s, <group name>: lr, ...}``.

    Raises:
        LoraPlusError: on a bad argument, or when no A/B pair is found.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=16, lr=1e-3)
        >>> with loraplus.Monitor(opt, model, every=2, activations=True) as mon:
        ...     for _ in range(4):
        ...         loss = model(torch.randn(16, 8)).square().mean()
        ...         loss.backward(); opt.step(); opt.zero_grad()
        >>> [p.key for p in mon.pairs]
        ['layers.0[default]', 'layers.1[default]']
        >>> sorted({r["step"] for r in mon.records}), mon.records[-1]["dB_A"] > 0
        ([0, 2], True)
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        model: nn.Module | None = None,
        *,
        every: int = 1,
        activations: bool = False,
        max_rows: int = 1024,
        rules: RuleSpec | None = None,
        tensorboard: Any = None,
    ) -> None:
        optimizer = _unwrap_optimizer(optimizer)
        if not hasattr(optimizer, "_optimizer_step_pre_hooks") or not hasattr(optimizer, "param_groups"):
            raise LoraPlusError(
                f"Monitor needs a torch.optim.Optimizer (it attaches with register_step_pre_hook), "
                f"got {type(optimizer).__name__}"
            )
        self.every = _check_every(every)
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise LoraPlusError(f"max_rows must be a positive int, got {max_rows!r}")
        self.max_rows = max_rows
        self.activations = bool(activations)
        if model is not None and not isinstance(model, nn.Module):
            raise LoraPlusError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self.activations and model is None:
            raise LoraPlusError(
                "activations=True needs the model (to hook its adapted layers): Monitor(opt, model, ...)"
            )
        self.optimizer = optimizer
        self.model = model
        modules = named_modules_map(model) if model is not None else {}
        if model is not None:
            labels = label_parameters(model, rules, modules=modules)
        else:
            labels = _labels_from_groups(optimizer)
        pairs, unpaired = pair_labels(labels, modules)

        # keep only pairs whose factors this optimizer updates
        where: dict[int, int] = {}
        for gi, g in enumerate(optimizer.param_groups):
            for p in g["params"]:
                where.setdefault(id(p), gi)
        by_name = {lab.name: lab.param for lab in labels}
        self._entries: list[_Entry] = []
        self._group_of: list[tuple[int, int]] = []
        for pair in pairs:
            a, b = by_name[pair.a_name], by_name[pair.b_name]
            if id(a) not in where or id(b) not in where:
                missing = pair.a_name if id(a) not in where else pair.b_name
                unpaired[pair.a_name] = unpaired[pair.b_name] = f"{missing!r} is not in the optimizer"
                continue
            self._entries.append(_Entry(pair, a, b))
            self._group_of.append((where[id(a)], where[id(b)]))
        self.pairs: list[Pair] = [e.pair for e in self._entries]
        self.unpaired: dict[str, str] = unpaired
        if not self._entries:
            shown = "; ".join(f"{n}: {r}" for n, r in list(unpaired.items())[:5]) or "no adapter factors found"
            raise LoraPlusError(
                f"Monitor found no A/B factor pair to monitor ({shown}). Pass rules= (or the model) so that "
                "each adapted layer has one A and one B factor"
            )
        self._hosts: dict[int, nn.Module | None] = {}
        self._notes: dict[str, str] = {}  # adapter key -> why its activation terms are missing
        if self.activations:
            for i, e in enumerate(self._entries):
                host = modules.get(e.pair.host)
                if isinstance(getattr(host, "base_layer", host), nn.MultiheadAttention) or e.a.dim() > 2:
                    # MHA takes (query, key, value); conv inputs are not rows of in-features
                    self._notes[e.pair.key] = "activation terms are measured for Linear and Embedding adapters only"
                    host = None
                self._hosts[i] = host

        # shape buckets: factors of equal shapes are stacked and measured with one batched matmul
        buckets: dict[tuple[Any, ...], list[int]] = {}
        for i, e in enumerate(self._entries):
            t = e.pair.orientation == "transposed"
            a, b = _std(e.a, t), _std(e.b, t)
            buckets.setdefault((tuple(a.shape), tuple(b.shape), a.dtype, a.device, b.dtype, t), []).append(i)
        self._buckets = list(buckets.values())
        self._bucket_factors = [
            (
                [self._entries[i].a for i in bucket],
                [self._entries[i].b for i in bucket],
                self._entries[bucket[0]].pair.orientation == "transposed",
            )
            for bucket in self._buckets
        ]
        self._out_dims = [_std(e.b, e.pair.orientation == "transposed").shape[0] for e in self._entries]
        self._in_dims = [_std(e.a, e.pair.orientation == "transposed").shape[1] for e in self._entries]
        self._static = [
            {"layer": e.pair.layer, "adapter": e.pair.adapter, "layer_group": e.pair.layer_group}
            for e in self._entries
        ]

        self.records: list[dict[str, Any]] = []
        self.lrs: list[dict[str, Any]] = []
        self.step = 0  # optimizer.step() calls seen so far
        self._snapshot: list[tuple[torch.Tensor, torch.Tensor]] | None = None
        self._captured: dict[int, list[torch.Tensor]] = {}
        self._fwd_handles: list[Any] = []
        self._writer, self._own_writer = self._open_writer(tensorboard)
        self._handles = [
            optimizer.register_step_pre_hook(self._pre_step),
            optimizer.register_step_post_hook(self._post_step),
        ]
        self.closed = False
        if self.activations and self._sampled(0):
            self._arm()

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Detach every hook (step and forward); flush (and close, if it made it) the TensorBoard writer.

        Recorded data stays available. Calling it again does nothing.
        """
        if getattr(self, "closed", True):
            return
        for h in self._handles:
            h.remove()
        self._disarm()
        self._snapshot = None
        if self._writer is not None:
            if self._own_writer:
                self._writer.close()
            elif callable(getattr(self._writer, "flush", None)):
                self._writer.flush()
        self.closed = True

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "attached"
        return (
            f"Monitor({len(self.pairs)} adapters, every={self.every}, activations={self.activations}, "
            f"{len(self.records)} records, {state})"
        )

    def _sampled(self, step: int) -> bool:
        return step % self.every == 0

    @staticmethod
    def _open_writer(tensorboard: Any) -> tuple[Any, bool]:
        if tensorboard is None:
            return None, False
        if callable(getattr(tensorboard, "add_scalar", None)):
            return tensorboard, False
        if isinstance(tensorboard, (str, os.PathLike)):
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as err:
                raise LoraPlusError(
                    f"tensorboard= needs the tensorboard package ({err}); pip install tensorboard "
                    "(or loraplus[tensorboard])"
                ) from None
            return SummaryWriter(log_dir=os.fspath(tensorboard)), True
        raise LoraPlusError(
            f"tensorboard= must be a SummaryWriter (anything with add_scalar) or a log directory, "
            f"got {type(tensorboard).__name__}"
        )

    # ------------------------------------------------------------------ activation capture

    def _arm(self) -> None:
        """Register forward pre-hooks on the adapted layers for the next (sampled) step."""
        self._captured = {}
        seen: dict[int, list[int]] = {}
        for i, host in self._hosts.items():
            if host is None:
                self._notes.setdefault(self._entries[i].pair.key, "adapted layer module not found")
                continue
            seen.setdefault(id(host), []).append(i)
            if len(seen[id(host)]) == 1:
                hook = self._make_capture(seen[id(host)])
                self._fwd_handles.append(host.register_forward_pre_hook(hook, with_kwargs=True))

    def _disarm(self) -> None:
        for h in self._fwd_handles:
            h.remove()
        self._fwd_handles = []

    def _make_capture(self, indices: list[int]) -> Any:
        def capture(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            if not torch.is_grad_enabled():
                return None
            x = args[0] if args else next((v for v in kwargs.values() if isinstance(v, torch.Tensor)), None)
            if not isinstance(x, torch.Tensor):
                return None
            with torch.no_grad():
                for i in indices:
                    rows = self._rows(i, x)
                    if rows is not None:
                        self._captured.setdefault(i, []).append(rows)
            return None

        return capture

    def _rows(self, i: int, x: torch.Tensor) -> torch.Tensor | None:
        e = self._entries[i]
        captured = self._captured.get(i)
        room = self.max_rows - (sum(t.shape[0] for t in captured) if captured else 0)
        if room <= 0:
            return None
        if e.pair.embedding:
            if x.is_floating_point() or x.is_complex():
                self._notes[e.pair.key] = f"embedding input is {x.dtype}, expected token ids"
                return None
            flat = x.detach().reshape(-1)
        else:
            n_in = self._in_dims[i]
            if x.dim() < 1 or x.shape[-1] != n_in:
                self._notes[e.pair.key] = (
                    f"layer input of shape {tuple(x.shape)} does not end in the adapter's in-features {n_in}"
                )
                return None
            flat = x.detach().reshape(-1, x.shape[-1])
        n = flat.shape[0]
        if n > room:
            flat = flat[:: math.ceil(n / room)][:room]
        return flat.clone()

    # ------------------------------------------------------------------ step hooks

    def _pre_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        if not self._sampled(self.step):
            return None
        with torch.no_grad():
            snap: list[tuple[torch.Tensor, torch.Tensor]] = []
            for a_list, b_list, t in self._bucket_factors:
                snap.append((_stack(a_list, t), _stack(b_list, t)))
        self._snapshot = snap
        return None

    def _post_step(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        step = self.step
        self.step += 1
        if self._snapshot is not None:
            try:
                self._record(step)
            finally:
                self._snapshot = None
                self._captured = {}
                self._disarm()
        if self.activations and self._sampled(self.step) and not self.closed:
            self._arm()
        return None

    def _record(self, step: int) -> None:
        assert self._snapshot is not None
        n = len(self._entries)
        values: list[list[float]] = [[] for _ in range(n)]
        with torch.no_grad():
            parts: list[torch.Tensor] = []
            order: list[int] = []
            grams: list[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = []
            for bucket, (a_list, b_list, t), (a0, b0) in zip(self._buckets, self._bucket_factors, self._snapshot):
                a1, b1 = _stack(a_list, t), _stack(b_list, t)
                work = torch.float64 if a0.dtype == torch.float64 else torch.float32
                a0, b0, a1, b1 = (z.to(work) for z in (a0, b0, a1, b1))
                da, db = a1 - a0, b1 - b0
                r = a0.shape[1]
                x = torch.cat([b0, db], dim=2)  # (k, out, 2r)
                y = torch.cat([da, a1, a0], dim=1)  # (k, 3r, in)
                gx = x.transpose(1, 2) @ x  # (k, 2r, 2r)
                gy = y @ y.transpose(1, 2)  # (k, 3r, 3r)
                gb, gdb = gx[:, :r, :r], gx[:, r:, r:]
                gda, ga0 = gy[:, :r, :r], gy[:, 2 * r :, 2 * r :]

                def inner(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
                    return (p * q).sum(dim=(1, 2))

                def trace(p: torch.Tensor) -> torch.Tensor:
                    return p.diagonal(dim1=1, dim2=2).sum(-1)

                sq = torch.stack(
                    [
                        trace(ga0),
                        trace(gb),
                        trace(gda),
                        trace(gdb),
                        inner(gb, gda),
                        inner(gdb, ga0),
                        inner(gdb, gda),
                        inner(gx, gy[:, : 2 * r, : 2 * r]),
                    ],
                    dim=1,
                )
                parts.append(sq.clamp_min(0).sqrt().to("cpu", torch.float64))
                order.extend(bucket)
                if self.activations:
                    grams.append((bucket, a0, da, gb, gdb))
            flat = torch.cat(parts).tolist()  # one host sync for every weight metric
            for i, row in zip(order, flat):
                values[i] = row
            acts = self._activation_terms(grams) if self.activations else {}

        lr_row: dict[str, Any] = {"step": step}
        group_lrs = [float(g["lr"]) for g in self.optimizer.param_groups]
        for gi, g in enumerate(self.optimizer.param_groups):
            lr_row[str(g.get("name", f"group{gi}"))] = group_lrs[gi]
        self.lrs.append(lr_row)
        new: list[dict[str, Any]] = []
        missing = (math.nan,) * len(ACTIVATION_METRICS)
        for i, static in enumerate(self._static):
            ga, gb_ = self._group_of[i]
            rec: dict[str, Any] = {"step": step, **static}
            rec.update(zip(WEIGHT_METRICS, values[i]))
            if self.activations:
                rec.update(zip(ACTIVATION_METRICS, acts.get(i, missing)))
            rec["lr_A"] = group_lrs[ga]
            rec["lr_B"] = group_lrs[gb_]
            new.append(rec)
        self.records.extend(new)
        if self._writer is not None:
            self._write_tensorboard(step, new, lr_row)

    def _activation_terms(
        self, grams: Sequence[tuple[list[int], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]]
    ) -> dict[int, tuple[float, float, float]]:
        """RMS of B·ΔA·x, ΔB·A·x, ΔB·ΔA·x per adapter, from the captured inputs and the r×r Grams.

        ‖X·ΔAᵀ·Bᵀ‖² = ⟨UᵀU, BᵀB⟩ with U = X·ΔAᵀ (N, r): again only r×r products. Adapters of one
        shape bucket whose inputs have the same number of rows are measured with batched matmuls.
        """
        out: dict[int, torch.Tensor] = {}
        for bucket, a0, da, gb, gdb in grams:
            rows = {j: _cat(self._captured[i]) for j, i in enumerate(bucket) if i in self._captured}
            if not rows:
                continue
            dense = [j for j in rows if not self._entries[bucket[j]].pair.embedding]
            if len(dense) == len(rows) and len({rows[j].shape[0] for j in dense}) == 1:
                idx = torch.tensor(dense, device=a0.device)
                x = torch.stack([rows[j] for j in dense]).to(a0.dtype)  # (m, N, in)
                u = x @ da[idx].transpose(1, 2)  # (m, N, r)
                v = x @ a0[idx].transpose(1, 2)
                terms = _act_from_grams(u, v, gb[idx], gdb[idx], x.shape[1] * self._out_dims[bucket[0]])
                for j, row in zip(dense, terms):
                    out[bucket[j]] = row
                continue
            for j, x in rows.items():
                if self._entries[bucket[j]].pair.embedding:
                    u, v = da[j][:, x].t(), a0[j][:, x].t()  # one-hot inputs select columns
                else:
                    x = x.to(a0.dtype)
                    u, v = x @ da[j].t(), x @ a0[j].t()  # (N, r)
                n = x.shape[0] * self._out_dims[bucket[0]]
                out[bucket[j]] = _act_from_grams(u[None], v[None], gb[j : j + 1], gdb[j : j + 1], n)[0]
        for i, host in self._hosts.items():
            if host is not None and i not in out:
                self._notes.setdefault(
                    self._entries[i].pair.key,
                    "no input captured: the layer did not run a forward with gradients before this step",
                )
        if not out:
            return {}
        keys = list(out)
        flat = torch.stack([out[k] for k in keys]).to("cpu", torch.float64).tolist()
        return {k: tuple(v) for k, v in zip(keys, flat)}  # type: ignore[misc]

    def _write_tensorboard(self, step: int, records: Sequence[dict[str, Any]], lr_row: Mapping[str, Any]) -> None:
        w = self._writer
        metrics = WEIGHT_METRICS + (ACTIVATION_METRICS if self.activations else ())
        for rec in records:
            key = f"{rec['layer']}[{rec['adapter']}]" if rec["adapter"] else rec["layer"]
            for m in metrics:
                w.add_scalar(f"loraplus/{m}/{key}", rec[m], step)
        for m in metrics:
            vals = [rec[m] for rec in records if rec[m] == rec[m]]
            if vals:
                w.add_scalar(f"loraplus/median/{m}", float(torch.tensor(vals).median()), step)
        for name, lr in lr_row.items():
            if name != "step":
                w.add_scalar(f"loraplus/lr/{name}", lr, step)

    # ------------------------------------------------------------------ outputs

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric names every record carries."""
        return WEIGHT_METRICS + (ACTIVATION_METRICS if self.activations else ())

    def to_dict(self) -> dict[str, Any]:
        """The history as tensors: ``{"step": (S,), "layer": [L names], <metric>: (S, L), "lr": {group: (S,)}}``.

        Rows are sampled steps, columns adapters (``Pair.key`` order); float64, NaN where missing.

        Example:
            >>> import torch, loraplus
            >>> model = loraplus.testing.tiny_lora_model()
            >>> opt = loraplus.LoraPlus(torch.optim.SGD, model, lr=0.1)
            >>> mon = loraplus.Monitor(opt, model)
            >>> model(torch.randn(4, 8)).sum().backward(); opt.step(); mon.close()
            >>> h = mon.to_dict(); h["step"].tolist(), tuple(h["B_dA"].shape)
            ([0], (1, 2))
        """
        keys = [p.key for p in self.pairs]
        col = {k: j for j, k in enumerate(keys)}
        steps = sorted({rec["step"] for rec in self.records})
        row = {s: i for i, s in enumerate(steps)}
        out: dict[str, Any] = {"step": torch.tensor(steps, dtype=torch.long), "layer": keys}
        for m in self.metrics:
            out[m] = torch.full((len(steps), len(keys)), math.nan, dtype=torch.float64)
        for rec in self.records:
            k = f"{rec['layer']}[{rec['adapter']}]" if rec["adapter"] else rec["layer"]
            for m in self.metrics:
                out[m][row[rec["step"]], col[k]] = rec[m]
        groups: list[str] = []
        for lr_row in self.lrs:
            groups += [g for g in lr_row if g != "step" and g not in groups]
        out["lr"] = {
            g: torch.tensor([float(row.get(g, math.nan)) for row in self.lrs], dtype=torch.float64) for g in groups
        }
        return out

    def _columns(self) -> list[str]:
        return ["step", "layer", "adapter", "layer_group", *self.metrics, "lr_A", "lr_B"]

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write one row per sampled step and adapter (columns: step, layer, adapter, layer_group, metrics, lrs)."""
        with open(path, "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=self._columns())
            writer.writeheader()
            for rec in self.records:
                writer.writerow({k: rec[k] for k in self._columns()})

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write the records as JSON lines (one object per sampled step and adapter; NaN as null)."""
        with open(path, "w") as fh:
            for rec in self.records:
                clean = {k: (None if isinstance(v, float) and v != v else v) for k, v in rec.items()}
                fh.write(json.dumps(clean) + "\n")

    def _ratios(self, rec: Mapping[str, Any], activation: bool) -> tuple[float, float]:
        if activation:
            return rec["act_B_dA"], rec["act_dB_A"]
        return rec["B_dA"], rec["dB_A"]

    def summary(self, band: float = 10.0) -> str:
        """Per layer group: are the A-side (B·ΔA) and B-side (ΔB·A) feature updates balanced?

        Uses the activation terms when recorded, else the weight-space terms; takes, per layer
        group, the median over sampled steps and adapters of each term and of their ratio
        (steps where either term is 0 — e.g. the first step with B = 0 — are left out), and calls
        the group balanced when the median ratio lies within ``[1/band, band]``.

        Returns:
            Plain text, one line per layer group, plus a line on unpaired factors.

        Raises:
            LoraPlusError: if ``band`` is not a number > 1.
        """
        if isinstance(band, bool) or not isinstance(band, (int, float)) or not band > 1:
            raise LoraPlusError(f"band must be a number > 1 (e.g. 10 for one order of magnitude), got {band!r}")
        use_act = self.activations
        which = "activation RMS ‖B·ΔA·x‖ vs ‖ΔB·A·x‖" if use_act else "weight-space ‖B·ΔA‖ vs ‖ΔB·A‖"
        if not self.records:
            return f"loraplus.Monitor: no sampled steps recorded yet ({len(self.pairs)} adapters attached)."
        per: dict[str, list[tuple[float, float]]] = {}
        for rec in self.records:
            a, b = self._ratios(rec, use_act)
            per.setdefault(rec["layer_group"], [])
            if a == a and b == b and a > 0 and b > 0:
                per[rec["layer_group"]].append((a, b))
        steps = sorted({rec["step"] for rec in self.records})
        lines = [
            f"loraplus.Monitor: {len(self.pairs)} adapters, {len(steps)} sampled steps "
            f"({steps[0]}..{steps[-1]}, every {self.every}); {which}; balanced = median ratio within "
            f"[{1 / band:.3g}, {band:g}]"
        ]
        width = max(len("layer group"), *(len(g) for g in per))
        lines.append(f"{'layer group'.ljust(width)}  {'A-side':>9}  {'B-side':>9}  {'A/B':>9}  verdict")
        for group, vals in per.items():
            if not vals:
                lines.append(f"{group.ljust(width)}  {'-':>9}  {'-':>9}  {'-':>9}  no step with both terms > 0")
                continue
            t = torch.tensor(vals, dtype=torch.float64)
            med_a, med_b = t[:, 0].median().item(), t[:, 1].median().item()
            ratio = (t[:, 0] / t[:, 1]).median().item()
            if ratio > band:
                verdict = "A-side dominates: B's updates move the features too little"
            elif ratio < 1 / band:
                verdict = "B-side dominates: A's updates move the features too little"
            else:
                verdict = "balanced"
            lines.append(f"{group.ljust(width)}  {_fmt(med_a):>9}  {_fmt(med_b):>9}  {_fmt(ratio):>9}  {verdict}")
        if self.unpaired:
            shown = "; ".join(f"{n} ({r})" for n, r in list(self.unpaired.items())[:3])
            more = f" and {len(self.unpaired) - 3} more" if len(self.unpaired) > 3 else ""
            lines.append(f"not monitored: {shown}{more}")
        if self._notes:
            k, v = next(iter(self._notes.items()))
            lines.append(f"activation terms missing for {len(self._notes)} adapters, e.g. {k}: {v}")
        return "\n".join(lines)

    def plot(self, path: str | os.PathLike[str] | None = None, *, activations: bool | None = None) -> Any:
        """Draw the history (log scale): per-adapter and median curves of the δ terms and update norms.

        Panels: A-side term per adapter, B-side term per adapter, medians over adapters of both
        terms and of ‖ΔA‖, ‖ΔB‖, ‖Δ(BA)‖, and the A/B ratio per adapter.

        Args:
            path: where to save a PNG (optional).
            activations: plot the activation terms (default: when recorded).

        Returns:
            The ``matplotlib.figure.Figure`` (made without pyplot, so no global state changes).

        Raises:
            LoraPlusError: if matplotlib is missing, nothing was recorded, or activation terms
                were asked for but not recorded.
        """
        try:
            import matplotlib
            from matplotlib.backends.backend_agg import FigureCanvasAgg
            from matplotlib.figure import Figure
        except ImportError as err:
            raise LoraPlusError(
                f"plot() needs matplotlib ({err}); pip install matplotlib (or loraplus[plot])"
            ) from None
        if not self.records:
            raise LoraPlusError("nothing to plot yet: no sampled optimizer step has been recorded")
        use_act = self.activations if activations is None else bool(activations)
        if use_act and not self.activations:
            raise LoraPlusError("activation terms were not recorded; build the Monitor with activations=True")
        h = self.to_dict()
        steps = h["step"].numpy()
        a_key, b_key = ("act_B_dA", "act_dB_A") if use_act else ("B_dA", "dB_A")
        a_lab, b_lab = ("RMS ‖B·ΔA·x‖", "RMS ‖ΔB·A·x‖") if use_act else ("‖B·ΔA‖", "‖ΔB·A‖")
        fig = Figure(figsize=(12, 8), layout="constrained")
        FigureCanvasAgg(fig)
        axes = fig.subplots(2, 2)
        cmap = getattr(matplotlib, "colormaps", {}).get("viridis")
        n = len(h["layer"])

        def color(j: int) -> Any:
            if cmap is None:
                return None
            return cmap(j / max(1, n - 1))

        def positive(t: torch.Tensor) -> Any:
            t = t.clone()
            t[~(t > 0)] = math.nan
            return t.numpy()

        for ax, key, lab in ((axes[0, 0], a_key, a_lab), (axes[0, 1], b_key, b_lab)):
            for j in range(n):
                ax.plot(steps, positive(h[key][:, j]), color=color(j), lw=0.8, alpha=0.8)
            ax.set_yscale("log")
            ax.set_title(f"A-side {lab}" if key == a_key else f"B-side {lab}")
            ax.set_xlabel("step")
        ax = axes[1, 0]
        curves = ((a_key, a_lab), (b_key, b_lab), ("delta_A", "‖ΔA‖"), ("delta_B", "‖ΔB‖"), ("delta_BA", "‖Δ(BA)‖"))
        for key, lab in curves:
            ax.plot(steps, positive(torch.nanmedian(h[key], dim=1).values), lw=1.8, label=lab)
        ax.set_yscale("log")
        ax.set_title(f"median over {n} adapters")
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
        ax = axes[1, 1]
        ratio = h[a_key] / h[b_key]
        for j in range(n):
            ax.plot(steps, positive(ratio[:, j]), color=color(j), lw=0.8, alpha=0.8)
        ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_yscale("log")
        ax.set_title(f"A/B balance {a_lab} / {b_lab} per adapter")
        ax.set_xlabel("step")
        fig.suptitle(f"loraplus.Monitor: {n} adapters, every {self.every} steps (colour = adapter depth)")
        if path is not None:
            fig.savefig(os.fspath(path), dpi=110)
        return fig

