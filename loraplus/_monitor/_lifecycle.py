"""Diagnostics: record how each adapter's A and B factors change during training.

The :class:`Monitor` pairs every A factor with its B factor (:func:`loraplus.pairs`), and on
sampled steps measures the paper's update terms (Hayou et al. 2024) of the applied updates,
including each layer's LoRA scaling s:

    Δ(s·B·A) = s·B·ΔA + s·ΔB·A + s·ΔB·ΔA        (δ¹ = s·B·ΔA·x, δ² = s·ΔB·A·x, δ³ = s·ΔB·ΔA·x)

LoRA+ works when the A-side term δ¹ and the B-side term δ² are of the same order.

The pieces: ``_measure.py`` (pure tensor maths), ``_recorder.py`` (hooks and capture),
``_history.py`` (named records, bounded history), ``_sinks.py`` (CSV, JSON lines, TensorBoard),
``_report.py`` (summary and plot). This module wires them together and holds the policy: what is
monitored, and that a failing side tool warns once and steps aside.
"""

from __future__ import annotations

import numbers
import os
import warnings
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from .._errors import LoraPlusError
from .._labels import RuleSpec
from .._numbers import check_number
from .._pairs._pairs import Pair
from ._history import History, StepRecord
from ._measure import ACTIVATION_METRICS, WEIGHT_METRICS
from ._recorder import Recorder
from ._report import plot_history, summary_text
from ._sinks import CsvSink, JsonlSink, open_tensorboard, write_csv, write_jsonl
from ._targets import find_targets, unwrap_optimizer

__all__ = ["Monitor"]

_STATE_VERSION = 1


def _positive_int(name: str, value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise LoraPlusError(f"{name} must be a positive int ({what}), got {value!r}")
    return int(value)  # NumPy integers too


def _release(recorder: Recorder, sinks: Sequence[Any], state: dict[str, bool]) -> None:
    """Detach the hooks and close the sinks: run by close(), a failure, or the Monitor's garbage collection."""
    recorder.detach()
    for sink in sinks:
        try:
            sink.close()
        except Exception as err:
            if not state["failed"]:  # after a failure, one warning has been given already
                msg = f"loraplus.Monitor could not close its {sink!r} sink: {type(err).__name__}: {err}"
                warnings.warn(msg, RuntimeWarning, stacklevel=3)


class _SinkFailed(Exception):
    pass


class Monitor:
    """Record how each LoRA adapter's A and B factors change at every ``every``-th optimizer step.

    Attaches to the optimizer with step pre/post hooks. On a sampled step it copies the adapter
    factors (and nothing else) before ``optimizer.step()`` and records, per adapter and from the
    applied updates ΔA, ΔB, the Frobenius norms ``norm_A``, ``norm_B`` (before the step),
    ``delta_A``, ``delta_B``, and the ΔW terms ``B_dA`` = ‖s·B·ΔA‖, ``dB_A`` = ‖s·ΔB·A‖, ``dB_dA`` =
    ‖s·ΔB·ΔA‖, ``delta_BA`` = ‖Δ(s·B·A)‖, where s is the layer's LoRA scaling as read by
    :func:`loraplus.pairs` (``scale`` in each record; ``None`` where the layout does not record it,
    and then s = 1), with B·A read as the (out, in) matrix the layer applies; and the learning rates
    ``lr_A``, ``lr_B`` of the factors' groups. For DoRA layers the terms are those of the
    direction's update s·B·A (see :attr:`notes`).

    With ``activations=True`` it also records ``act_B_dA`` = RMS(s·B·ΔA·x), ``act_dB_A`` =
    RMS(s·ΔB·A·x) and ``act_dB_dA`` = RMS(s·ΔB·ΔA·x) over the output entries, on the inputs x of
    every forward with gradients between the previous step and the sampled one (the forward, the
    gradient-accumulation forwards, or the closure whose gradients the step applies): at most
    ``max_rows`` rows per layer, an evenly strided copy, no RNG. x is the adapted layer's input,
    before any LoRA dropout; embeddings use their token ids.

    It is safe to leave attached: the hooks hold the Monitor weakly (a dropped Monitor detaches
    itself when garbage-collected); memory holds the last ``keep`` sampled steps while sinks
    (``csv=``, ``jsonl=``, ``tensorboard=``) receive every record as it is made; and any failure
    while measuring or writing is caught, reported once as a ``RuntimeWarning`` with its cause, and
    the Monitor detaches. A monitored run equals an unmonitored one bit for bit.

    Args:
        optimizer: a ``torch.optim.Optimizer``; wrappers exposing it as ``.optimizer`` (accelerate)
            are unwrapped.
        model: the model; optional when the optimizer was built by LoraPlus (its groups carry
            ``param_names`` and ``role``; the scaling is then unknown), required for ``activations=True``.
        every: record every n-th ``optimizer.step()`` call (0-based, starting with the first).
        activations: also record the activation-space terms (needs ``model``).
        max_rows: input rows kept per layer and step for the activation terms.
        rules: role rules, as for :func:`loraplus.LoraPlus` (only used with ``model``).
        keep: sampled steps kept in memory (the last ones); ``None`` keeps all.
        csv: a path; every record is appended there as a CSV row as it is made (the header only to a new file).
        jsonl: a path; every record is appended there as a JSON line as it is made.
        tensorboard: a ``SummaryWriter`` (anything with ``add_scalar``) or a log directory.

    Attributes:
        pairs: the monitored adapters (:class:`loraplus.pairing.Pair`), in model order.
        unpaired: ``{parameter name: reason}`` for adapter factors that could not be paired.

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
        keep: int | None = 1000,
        csv: str | os.PathLike[str] | None = None,
        jsonl: str | os.PathLike[str] | None = None,
        tensorboard: Any = None,
    ) -> None:
        optimizer = unwrap_optimizer(optimizer)
        if not hasattr(optimizer, "_optimizer_step_pre_hooks") or not hasattr(optimizer, "param_groups"):
            raise LoraPlusError(
                f"Monitor needs a torch.optim.Optimizer (it attaches with register_step_pre_hook), "
                f"got {type(optimizer).__name__}"
            )
        self.every = _positive_int("every", every, "record every n-th optimizer step")
        self.max_rows = _positive_int("max_rows", max_rows, "input rows kept per layer")
        self.keep = None if keep is None else _positive_int("keep", keep, "sampled steps kept in memory, or None")
        self.activations = bool(activations)
        if model is not None and not isinstance(model, nn.Module):
            raise LoraPlusError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if self.activations and model is None:
            raise LoraPlusError(
                "activations=True needs the model (to hook its adapted layers): Monitor(opt, model, ...)"
            )
        self.optimizer = optimizer
        self.model = model
        targets = find_targets(optimizer, model, rules, self.activations)
        self.pairs: list[Pair] = targets.pairs
        self.unpaired: dict[str, str] = targets.unpaired
        self._adapters = targets.adapters
        self._notes = targets.notes
        self._missing = targets.missing  # adapter key -> why it has no activation terms
        self._history = History(self._adapters, self.metrics, self.keep)
        sinks: list[Any] = []
        if csv is not None:
            sinks.append(CsvSink(csv, self._columns()))
        if jsonl is not None:
            sinks.append(JsonlSink(jsonl))
        tb = open_tensorboard(tensorboard, self.metrics)
        if tb is not None:
            sinks.append(tb)
        self._sinks = sinks
        self._recorder = Recorder(
            self,
            optimizer,
            self.pairs,
            [1.0 if p.scaling is None else p.scaling for p in self.pairs],
            targets.hosts,
            every=self.every,
            activations=self.activations,
            max_rows=self.max_rows,
        )
        self._state = {"failed": False}
        # the hooks hold the Monitor weakly; dropping it runs this finalizer, which detaches them
        self._finalizer = weakref.finalize(self, _release, self._recorder, self._sinks, self._state)

    # ------------------------------------------------------------------ lifecycle

    def close(self) -> None:
        """Detach every hook (step and forward) and close the sinks (a writer it did not make is flushed).

        Recorded data stays available. Calling it again does nothing.
        """
        self._finalizer()

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def __enter__(self) -> Monitor:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def __repr__(self) -> str:
        state = "closed" if self.closed else "attached"
        return (
            f"Monitor({len(self.pairs)} adapters, every={self.every}, activations={self.activations}, "
            f"{len(self._history.steps)} sampled steps kept, {state})"
        )

    @property
    def step(self) -> int:
        """``optimizer.step()`` calls seen so far (continued from a loaded :meth:`state_dict`)."""
        return self._recorder.step

    def _on_step(self, step: int, values: torch.Tensor) -> None:
        """Called by the recorder after a sampled step: keep the record and stream it to the sinks."""
        names = [str(g.get("name", f"group{i}")) for i, g in enumerate(self.optimizer.param_groups)]
        group_lrs = tuple(float(g["lr"]) for g in self.optimizer.param_groups)
        rec = StepRecord(step, dict(zip(names, group_lrs)), group_lrs, values)
        self._history.add(rec)
        if self._sinks:
            rows = list(rec.rows(self._adapters, self.metrics))
            for sink in self._sinks:
                try:
                    sink.write(step, rows, rec.lrs)
                except Exception as err:
                    raise _SinkFailed(f"writing step {step} to its {sink!r} sink") from err

    def _on_failure(self, err: BaseException, when: str) -> None:
        """Called once by the recorder (already detached) when a hook failed: warn with the cause, close."""
        if isinstance(err, _SinkFailed) and err.__cause__ is not None:
            when, err = str(err), err.__cause__
        self._state["failed"] = True
        kept = self._history.steps
        warnings.warn(
            f"loraplus.Monitor stopped while {when}: {type(err).__name__}: {err}. It has detached from the "
            f"optimizer; training is not affected. {len(kept)} sampled steps stay in memory"
            + (f" (last: step {kept[-1].step})." if kept else "."),
            RuntimeWarning,
            stacklevel=2,
        )
        self.close()

    # ------------------------------------------------------------------ resume

    def state_dict(self) -> dict[str, Any]:
        """What a resumed run needs to continue this Monitor's records: the step count and the kept history.

        Save it with the model and optimizer (``torch.save``); pass it to :meth:`load_state_dict` of
        the resumed run's Monitor so that its steps (records, TensorBoard, CSV) continue these.
        """
        return {
            "version": _STATE_VERSION,
            "step": self.step,
            "every": self.every,
            "adapters": [a.key for a in self._adapters],
            "metrics": list(self.metrics),
            "history": self._history.state(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a saved :meth:`state_dict`: the step count, and the history when the adapters match.

        Raises:
            LoraPlusError: if ``state`` is not a Monitor state, or its adapters or metrics differ from this
                Monitor's (the history could not continue).
        """
        if not isinstance(state, Mapping) or state.get("version") != _STATE_VERSION or "step" not in state:
            raise LoraPlusError("load_state_dict() takes what Monitor.state_dict() returned")
        keys = [a.key for a in self._adapters]
        if list(state["adapters"]) != keys:
            extra = sorted(set(state["adapters"]) - set(keys))[:3]
            lost = sorted(set(keys) - set(state["adapters"]))[:3]
            raise LoraPlusError(
                f"the saved Monitor monitored other adapters (only saved: {extra}, only here: {lost}, or another "
                "order); build the Monitor on the same model and optimizer layout"
            )
        if list(state["metrics"]) != list(self.metrics):
            raise LoraPlusError(
                f"the saved Monitor recorded {list(state['metrics'])}, this one records {list(self.metrics)}: "
                "use the same activations= setting"
            )
        self._history.load(state["history"])
        self._recorder.set_step(int(state["step"]))

    # ------------------------------------------------------------------ outputs

    @property
    def metrics(self) -> tuple[str, ...]:
        """The metric names every record carries."""
        return WEIGHT_METRICS + (ACTIVATION_METRICS if self.activations else ())

    @property
    def records(self) -> list[dict[str, Any]]:
        """One flat dict per kept sampled step and adapter: ``step``, ``layer``, ``adapter``,
        ``layer_group``, ``scale``, the metrics, ``lr_A``, ``lr_B``."""
        return self._history.records()

    @property
    def lrs(self) -> list[dict[str, Any]]:
        """One dict per kept sampled step: ``{"step": s, <group name>: lr, ...}``."""
        return self._history.lrs()

    @property
    def notes(self) -> dict[str, str]:
        """``{adapter key: note}``: what the ΔW terms mean where not plain s·B·A (DoRA), and why
        activation terms are missing."""
        return {**self._notes, **self._missing, **self._recorder.notes}

    def to_dict(self) -> dict[str, Any]:
        """The kept history as tensors: ``{"step": (S,), "layer": [L keys], <metric>: (S, L), "lr": {group: (S,)}}``.

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
        return self._history.to_dict()

    def _columns(self) -> list[str]:
        return ["step", "layer", "adapter", "layer_group", "scale", *self.metrics, "lr_A", "lr_B"]

    def to_csv(self, path: str | os.PathLike[str]) -> None:
        """Write the kept records, one row per sampled step and adapter (to stream every record, pass ``csv=``)."""
        with open(path, "w", newline="") as fh:
            write_csv(fh, self.records, self._columns(), header=True)

    def to_jsonl(self, path: str | os.PathLike[str]) -> None:
        """Write the kept records as JSON lines (NaN and an unknown scale as null; to stream, pass ``jsonl=``)."""
        with open(path, "w") as fh:
            write_jsonl(fh, self.records)

    def summary(self, band: float = 10.0) -> str:
        """Per layer group: are the A-side (s·B·ΔA) and B-side (s·ΔB·A) feature updates balanced?

        Uses the activation terms when recorded, else the weight-space terms; takes, per layer
        group, the median over kept steps and adapters of each term and of their ratio (steps where
        either term is 0 — e.g. the first step with B = 0 — are left out), and calls the group
        balanced when the median ratio lies within ``[1/band, band]``. Then lists the adapters whose
        scaling is unknown, DoRA layers, unpaired factors and missing activation terms.

        Raises:
            LoraPlusError: if ``band`` is not a number > 1.
        """
        if check_number("band", band) <= 1:
            raise LoraPlusError(f"band must be a number > 1 (e.g. 10 for one order of magnitude), got {band!r}")
        return summary_text(
            self.to_dict(),
            self._adapters,
            every=self.every,
            activations=self.activations,
            band=band,
            unpaired=self.unpaired,
            notes=self._notes,
            missing={**self._missing, **self._recorder.notes},
        )

    def plot(self, path: str | os.PathLike[str] | None = None, *, activations: bool | None = None) -> Any:
        """Draw the kept history (log scale): per-adapter and median curves of the δ terms and update norms.

        Panels: A-side term per adapter, B-side term per adapter, medians over adapters of both
        terms and of ‖ΔA‖, ‖ΔB‖, ‖Δ(s·BA)‖, and the A/B ratio per adapter.

        Args:
            path: where to save a PNG (optional).
            activations: plot the activation terms (default: when recorded).

        Returns:
            The ``matplotlib.figure.Figure`` (made without pyplot, so no global state changes).

        Raises:
            LoraPlusError: if matplotlib is missing, nothing was recorded, or activation terms
                were asked for but not recorded.
        """
        use_act = self.activations if activations is None else bool(activations)
        if not self._history.steps:
            raise LoraPlusError("nothing to plot yet: no sampled optimizer step has been recorded")
        if use_act and not self.activations:
            raise LoraPlusError("activation terms were not recorded; build the Monitor with activations=True")
        return plot_history(self.to_dict(), every=self.every, activations=use_act, path=path)
