"""One snapshot of everything a probe can change, restored in place (the same tensor objects).

What is saved: a copy of every *trainable* parameter's values and of every buffer (the probe's
optimizer only steps trainable parameters, so frozen weights — most of a LoRA model — are not
copied), each parameter's ``requires_grad`` and ``.grad`` object, every module's ``training``
flag, and the torch CPU, CUDA (when initialised), Python ``random`` and NumPy RNG states.
"""

from __future__ import annotations

import random
from typing import Any

import torch
from torch import nn

__all__ = ["Snapshot"]


class Snapshot:
    """Saved once by :func:`loraplus.find_lr`; :meth:`restore` may be called any number of times.

    Args:
        model: the model.
        offload: keep the copy on the CPU instead of on each tensor's own device.
    """

    def __init__(self, model: nn.Module, *, offload: bool = False) -> None:
        where = (lambda t: t.detach().to("cpu", copy=True)) if offload else (lambda t: t.detach().clone())
        self._params: list[tuple[nn.Module, str, nn.Parameter, torch.Tensor | None]] = []
        self._buffers: list[tuple[nn.Module, str, torch.Tensor, torch.Tensor]] = []
        self._flags: list[tuple[nn.Module, bool]] = []
        self._grad: list[tuple[nn.Parameter, bool, torch.Tensor | None]] = []
        seen: set[int] = set()
        for module in model.modules():
            self._flags.append((module, module.training))
            for name, p in module._parameters.items():
                if p is None:
                    continue
                self._params.append((module, name, p, where(p) if p.requires_grad and id(p) not in seen else None))
                if id(p) not in seen:
                    self._grad.append((p, p.requires_grad, p.grad))
                seen.add(id(p))
            for name, b in module._buffers.items():
                if b is not None:
                    self._buffers.append((module, name, b, where(b)))
        self._rng = _rng_state()

    def clear_grads(self) -> None:
        """Detach every parameter's ``.grad`` (kept here) so backward never accumulates into it."""
        for p, _, _ in self._grad:
            p.grad = None

    def restore(self) -> None:
        """Put every saved value back into the original tensor objects, then the flags, grads and RNGs."""
        with torch.no_grad():
            for module, name, p, saved in self._params:
                if module._parameters.get(name) is not p:
                    module._parameters[name] = p
                if saved is not None:
                    p.copy_(saved)
            for module, name, b, saved_b in self._buffers:
                if module._buffers.get(name) is not b:
                    module._buffers[name] = b
                b.copy_(saved_b)
        for p, requires_grad, grad in self._grad:
            p.requires_grad_(requires_grad)
            p.grad = grad
        for module, training in self._flags:
            module.training = training
        _set_rng_state(self._rng)


def _rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"torch": torch.get_rng_state(), "random": random.getstate()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    try:
        import numpy
    except ImportError:  # pragma: no cover - numpy is optional
        pass
    else:
        state["numpy"] = numpy.random.get_state()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["random"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])
    if "numpy" in state:
        import numpy

        numpy.random.set_state(state["numpy"])
