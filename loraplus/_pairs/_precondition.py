"""Pair preconditioners (Riemannian, LoRA-FA) attached to any optimizer as a step pre-hook.

Lifecycle only: :func:`precondition` finds the pairs (``_pairs.py``), checks that the optimizer
holds whole factors, buckets the pairs by shape and registers a hook; the maths of one bucket
lives in :func:`_solve_bucket`. Nothing is carried from one step to the next but reusable buffers:
the r×r systems are rebuilt from the current factors each step, so there is no state to checkpoint.

Ownership: the optimizer owns its preconditioner. The one strong link is an attribute of the
optimizer instance (read by :func:`preconditioner`); the hook holds the preconditioner weakly and
the preconditioner holds the optimizer weakly, so there is no module-level registry and no
reference cycle, and dropping the optimizer frees both.

LoRA-FA's freeze of the A factors is a :class:`_Freeze` record: each frozen factor carries it (so a
later call on the model can say why A is frozen), and it is released once, by ``remove()`` or by a
``weakref.finalize`` on the optimizer when the optimizer is collected.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from .._errors import LoraPlusError
from .._labels import RuleSpec
from .._numbers import check_number
from .._role import Role
from ._methods import METHODS, Method, method_named
from ._pairs import Pair, Unpaired, Why, pairs
from ._sharding import sharding_error

__all__ = ["DEFAULT_REG", "Preconditioner", "precondition", "preconditioner"]

#: Methods :func:`precondition` knows, and the damping δ each uses by default (PEFT's defaults:
#: ``create_riemannian_optimizer(reg=1e-2)``, ``LoraFAOptimizer``'s ``delta = 1e-8``). A read-only
#: view of the method records, which are what :func:`precondition` reads.
DEFAULT_REG: Mapping[str, float] = MappingProxyType({m.name: m.default_reg for m in METHODS})

#: The attribute of an optimizer instance that holds its preconditioner (the optimizer owns it).
_LINK = "_loraplus_preconditioner"
#: The attribute of an A factor that LoRA-FA froze: the :class:`_Freeze` that will make it trainable again.
_FROZEN_BY = "_loraplus_frozen_by"


def preconditioner(optimizer: torch.optim.Optimizer) -> Preconditioner | None:
    """The :class:`Preconditioner` attached to ``optimizer``, or ``None``.

    Reaches the preconditioner that ``LoraPlus(..., precondition=...)`` attached, so that it can be
    inspected or removed; a ``remove()``-d preconditioner is no longer returned.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, lr=1e-3, precondition="riemannian")
        >>> loraplus.pairing.preconditioner(opt)
        Preconditioner('riemannian', reg=0.01, 2 pairs, 1 buckets, 0 skipped, attached)
        >>> loraplus.pairing.preconditioner(opt).remove()
        >>> loraplus.pairing.preconditioner(opt) is None
        True
    """
    found = vars(optimizer).get(_LINK) if hasattr(optimizer, "__dict__") else None
    return found if isinstance(found, Preconditioner) else None


def _weak_hook(pre: Preconditioner) -> Any:
    """A step pre-hook that calls ``pre`` through a weak reference (a bound method would hold it)."""
    ref = weakref.ref(pre)

    def hook(optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        target = ref()
        return None if target is None else target._pre_step(optimizer, args, kwargs)

    return hook


def _not_frozen() -> None:
    """What a pickled :class:`_Freeze` loads as: a saved model carries no live freeze."""
    return None


class _Freeze:
    """The A factors one LoRA-FA preconditioner froze with ``requires_grad_(False)``.

    Each of them carries this record as an attribute until :meth:`release`, which a ``weakref.finalize``
    on the optimizer runs once: from ``remove()``, or when the optimizer is collected. It holds the
    factors weakly and not the optimizer, so it keeps neither alive.
    """

    def __init__(self, params: Sequence[nn.Parameter], optimizer: torch.optim.Optimizer):
        self._params = tuple(weakref.ref(p) for p in params)
        self.optimizer = f"{type(optimizer).__name__} at {id(optimizer):#x}"  # for messages only
        for p in params:
            p.requires_grad_(False)
            p.grad = None
            setattr(p, _FROZEN_BY, self)

    def release(self) -> None:
        """Make the factors that still carry this freeze trainable again (a collected factor is skipped)."""
        for ref in self._params:
            p = ref()
            if p is None or vars(p).get(_FROZEN_BY) is not self:
                continue
            delattr(p, _FROZEN_BY)
            if not p.requires_grad:
                p.requires_grad_(True)
        self._params = ()

    def __reduce__(self) -> tuple[Any, tuple]:  # torch.save(model) pickles the factors' attributes
        return (_not_frozen, ())


def frozen_by_lorafa(model: nn.Module) -> list[tuple[str, _Freeze]]:
    """``(name, freeze)`` for each parameter of ``model`` that a live LoRA-FA preconditioner froze."""
    found: list[tuple[str, _Freeze]] = []
    if not isinstance(model, nn.Module):
        return found  # not a model: the caller's own check says so
    for name, p in model.named_parameters():
        freeze = vars(p).get(_FROZEN_BY)
        if isinstance(freeze, _Freeze):
            found.append((name, freeze))
    return found


def check_not_frozen_by_lorafa(model: nn.Module) -> None:
    """Refuse a model whose A factors a LoRA-FA preconditioner of another, still alive optimizer froze.

    Raises:
        LoraPlusError: naming the factors, the optimizer that froze them and the two ways out.
    """
    found = frozen_by_lorafa(model)
    if found:
        owners = sorted({freeze.optimizer for _, freeze in found})
        names = [name for name, _ in found]
        raise LoraPlusError(
            f"{len(names)} A factors of this model ({', '.join(names[:3])}{', …' if len(names) > 3 else ''}) are "
            f"frozen by the LoRA-FA preconditioner of an optimizer that is still alive ({', '.join(owners)}); "
            "drop that optimizer first (`del opt`, and any scheduler or trainer holding it: its factors are "
            "trainable again once it is collected) or call loraplus.pairing.preconditioner(opt).remove()"
        )


@dataclass(frozen=True)
class _Bucket:
    """Pairs whose factors share shapes, dtype, device and orientation: one batched solve each step."""

    a: tuple[nn.Parameter, ...]
    b: tuple[nn.Parameter, ...]
    transposed: bool
    inv_s2: torch.Tensor | None  # (k, 1, 1) 1/s² per pair (LoRA-FA only)


def _matrices(stacked: torch.Tensor) -> torch.Tensor:
    """(k, rows, cols) view of stacked factors in their stored layout (conv kernels flattened)."""
    return stacked.flatten(2) if stacked.dim() > 3 else stacked


def _damped_inverse(gram: torch.Tensor, reg: float) -> torch.Tensor:
    """(gram + reg·I)⁻¹ for a batch of symmetric PSD r×r matrices: Cholesky, pinv where it fails."""
    r = gram.shape[-1]
    eye = torch.eye(r, dtype=gram.dtype, device=gram.device)
    system = gram + reg * eye
    chol, info = torch.linalg.cholesky_ex(system)
    linv = torch.linalg.solve_triangular(chol, eye.expand_as(system), upper=False)
    out = linv.mT @ linv
    bad = info.nonzero().flatten()  # one host sync per bucket and side on GPUs
    if bad.numel():  # singular (reg = 0 on a zero factor) or not finite: what PEFT's pinv gives
        out[bad] = torch.linalg.pinv(system[bad])
    return out


class _Workspace:
    """Buffers one side of one bucket reuses every step (stacked factors, stacked grads, the result).

    They are a cache, not state: in the compute dtype (float32 for half-precision factors), about
    three times the size of the bucket's factors, freed by ``Preconditioner.remove()``.
    """

    def __init__(self, own: Sequence[nn.Parameter], partner: Sequence[nn.Parameter], dtype: torch.dtype):
        k = len(own)
        self.partner = torch.empty((k, *partner[0].shape), dtype=dtype, device=own[0].device)
        self.grad = torch.empty((k, *own[0].shape), dtype=dtype, device=own[0].device)
        self.out = torch.empty_like(self.grad)
        self.views = list(self.out.unbind(0))


def _side(own: Sequence[nn.Parameter], partner: Sequence[nn.Parameter], grads: list[torch.Tensor], rank_left: bool,
          reg: float, scale: torch.Tensor | None, dtype: torch.dtype, ws: _Workspace | None) -> None:
    """Precondition the stored gradients of one side of a bucket in place.

    ``rank_left``: the own factor is stored with r as its first dimension (standard A,
    transposed B), so its partner has r last, the partner's Gram matrix is Xᵀ·X and the
    gradient is multiplied on the left; otherwise the mirror image. In standard orientation
    this is g_A ← (BᵀB + δI)⁻¹ g_A and g_B ← g_B (AAᵀ + δI)⁻¹.
    """
    if ws is not None:
        torch.stack(list(partner), out=ws.partner)
        torch.stack(grads, out=ws.grad)
        x, g = _matrices(ws.partner), _matrices(ws.grad)
    else:
        x = _matrices(torch.stack(list(partner)).to(dtype))
        g = _matrices(torch.stack(grads).to(dtype))
    inv = _damped_inverse(x.mT @ x if rank_left else x @ x.mT, reg)
    if scale is not None:
        inv = inv * scale
    if ws is not None:
        torch.bmm(inv, g, out=_matrices(ws.out)) if rank_left else torch.bmm(g, inv, out=_matrices(ws.out))
        new = ws.views
    else:
        new = list((inv @ g if rank_left else g @ inv).reshape(len(grads), *grads[0].shape).unbind(0))
    torch._foreach_copy_(grads, new)  # in place (DDP bucket views stay views), cast to the gradient's dtype


def _check_sparse(grads: Sequence[torch.Tensor], own: Sequence[nn.Parameter]) -> None:
    if any(g.is_sparse for g in grads):
        raise LoraPlusError(f"sparse gradients cannot be preconditioned (factors of shape {tuple(own[0].shape)}); "
                            "use dense embeddings")


@torch.no_grad()
def _solve_bucket(bucket: _Bucket, method: Method, reg: float, cache: dict[tuple[int, Role], _Workspace]) -> None:
    """Rewrite the gradients of one bucket in place (the maths; ``cache`` only holds buffers)."""
    dtype = torch.promote_types(torch.promote_types(bucket.a[0].dtype, bucket.b[0].dtype), torch.float32)
    if method.freezes_a:
        for p in bucket.a:  # A is frozen: the optimizer skips parameters without a gradient
            p.grad = None
    factors = {Role.A: (bucket.a, bucket.b), Role.B: (bucket.b, bucket.a)}
    for side in method.preconditions:
        own, partner = factors[side]
        grads = [p.grad for p in own]
        rank_left = (side is Role.A) != bucket.transposed
        scale = bucket.inv_s2 if side is Role.B else None
        present = [g for g in grads if g is not None]
        if len(present) < len(grads):  # a side without gradient is left alone
            idx = [i for i, g in enumerate(grads) if g is not None]
            if not idx:
                continue
            _check_sparse(present, own)
            _side([own[i] for i in idx], [partner[i] for i in idx], present, rank_left, reg,
                  None if scale is None else scale[idx], dtype, None)
            continue
        _check_sparse(present, own)
        key = (id(bucket), side)
        if key not in cache:
            cache[key] = _Workspace(own, partner, dtype)
        _side(own, partner, present, rank_left, reg, scale, dtype, cache[key])


class Preconditioner:
    """The handle :func:`precondition` returns: what is preconditioned, and ``remove()``.

    Attributes:
        method: ``"riemannian"`` or ``"lorafa"``.
        reg: the damping δ added to the r×r matrices' diagonal.
        pairs: the :class:`loraplus.pairing.Pair` records whose gradients are rewritten, in model order.
        skipped: one :class:`loraplus.pairing.Unpaired` record (``name``, ``role``, ``reason`` for people,
            ``why`` to test) per adapter factor left as the optimizer sees them: factors that
            :func:`loraplus.pairs` could not pair keep their record, and the factors of a pair the
            optimizer does not hold (both, or B for LoRA-FA) get ``Why.NOT_HELD``.
        frozen: the A factors LoRA-FA froze (``requires_grad_(False)``); ``remove()``, or the
            optimizer being garbage-collected, makes them trainable again. Empty for Riemannian.

    The optimizer owns it: dropping this handle does not detach it (``loraplus.pairing.preconditioner(opt)``
    returns it again); ``remove()`` does. It holds no state between steps (the r×r systems are
    rebuilt from the factors each step), so there is nothing to checkpoint: attach it again after
    loading a checkpoint.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> with loraplus.precondition(opt, model) as pre:
        ...     [p.key for p in pre.pairs]
        ['layers.0[default]', 'layers.1[default]']
        >>> pre.active
        False
    """

    def __init__(self, optimizer: torch.optim.Optimizer, method: Method, reg: float, found: Sequence[Pair],
                 skipped: Sequence[Unpaired], buckets: Sequence[_Bucket]):
        self._method = method
        self.method = method.name
        self.reg = reg
        self.pairs = tuple(found)
        self.skipped = tuple(skipped)
        self._buckets = tuple(buckets)
        self._cache: dict[tuple[int, Role], _Workspace] = {}
        self._optimizer = weakref.ref(optimizer)
        self.frozen: tuple[nn.Parameter, ...] = ()
        self._unfreeze: weakref.finalize | None = None
        if method.freezes_a:  # LoRA-FA proper: autograd never computes dA nor keeps what it needs
            self.frozen = tuple(pr.a for pr in self.pairs if pr.a is not None and pr.a.requires_grad)
            # undone by remove() or when the optimizer is collected; nothing to undo at interpreter exit
            self._unfreeze = weakref.finalize(optimizer, _Freeze(self.frozen, optimizer).release)
            self._unfreeze.atexit = False
        self._handle: RemovableHandle | None = optimizer.register_step_pre_hook(_weak_hook(self))
        setattr(optimizer, _LINK, self)

    @property
    def active(self) -> bool:
        """Whether the hook is still attached."""
        return self._handle is not None

    @torch.compiler.disable
    def apply(self) -> None:
        """Precondition the current gradients now (what the hook does before each step).

        Always eager, also inside ``torch.compile(opt.step)``: dynamo does not trace it (see
        docs/optimizers.md for why and what it costs); the rest of the step is still compiled.
        """
        for bucket in self._buckets:
            _solve_bucket(bucket, self._method, self.reg, self._cache)

    def _pre_step(self, optimizer: Any, args: tuple, kwargs: dict) -> tuple[tuple, dict] | None:
        # torch passes step()'s own arguments: args = (optimizer, closure?, …)
        closure = kwargs.get("closure", args[1] if len(args) > 1 else None)
        if closure is None:
            self.apply()
            return None

        def preconditioned_closure() -> Any:  # the closure computes the gradients: precondition after it
            loss = closure()
            self.apply()
            return loss

        if "closure" in kwargs:
            return args, {**kwargs, "closure": preconditioned_closure}
        return (args[0], preconditioned_closure, *args[2:]), kwargs

    def remove(self) -> None:
        """Detach the hook and make the A factors LoRA-FA froze trainable again; the optimizer steps
        on raw gradients again. Idempotent."""
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
            self._cache.clear()
            if self._unfreeze is not None:
                self._unfreeze()  # a finalize runs once: the collected optimizer will not run it again
            opt = self._optimizer()
            if opt is not None and vars(opt).get(_LINK) is self:
                delattr(opt, _LINK)

    def __enter__(self) -> Preconditioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "attached" if self.active else "removed"
        return (f"Preconditioner({self.method!r}, reg={self.reg:g}, {len(self.pairs)} pairs, "
                f"{len(self._buckets)} buckets, {len(self.skipped)} skipped, {state})")


def precondition(
    optimizer: torch.optim.Optimizer,
    model: nn.Module,
    *,
    method: str = "riemannian",
    reg: float | None = None,
    rules: RuleSpec | None = None,
) -> Preconditioner:
    """Precondition the LoRA factors' gradients of ``model`` before every ``optimizer.step()``.

    Registers a step pre-hook that rewrites each pair's ``.grad`` in place, so any optimizer
    class (and its LoRA+ group learning rates) then steps on the preconditioned gradients:

    * ``"riemannian"`` (Zhang & Pilanci 2024): g_A ← (BᵀB + δI)⁻¹ g_A and g_B ← g_B (AAᵀ + δI)⁻¹.
      Matches ``peft.optimizers.create_riemannian_optimizer`` (same δ, no LoRA scaling).
    * ``"lorafa"`` (LoRA-FA): A is frozen with ``requires_grad_(False)`` (so autograd never computes
      dA, and ``clip_grad_norm_`` sees B's gradients only) and g_B ← g_B (AAᵀ + δI)⁻¹ / s², s
      being the layer's LoRA scaling. Needs every pair's scaling. It is the one method that
      changes ``requires_grad``; ``remove()`` restores it, and so does the optimizer being
      garbage-collected (only on the factors it froze that are still frozen). While that optimizer
      is alive, another ``LoraPlus`` or ``precondition`` on the model is refused (its A factors are
      frozen): drop the optimizer first. Attach it before wrapping the model in DDP, which records
      the trainable parameters when it is built.

    The optimizer owns the returned preconditioner: dropping the handle does not detach it, and
    :func:`loraplus.pairing.preconditioner` returns it again; ``remove()`` detaches it.

    Pairs come from :func:`loraplus.pairs` (every layout: transposed factors, conv factors read as
    (r, in·k·k) matrices, embedding adapters). Pairs sharing one shape, dtype, device and
    orientation are solved together: one batched Cholesky solve per bucket, in float32 for
    half-precision factors. A side whose gradient is ``None`` is left alone (the other side is
    still preconditioned). Gradient accumulation needs nothing: the hook runs once per step on the
    accumulated gradient. With ``step(closure)`` the gradients the closure computes are
    preconditioned before the update.

    Args:
        optimizer: a ``torch.optim.Optimizer`` holding the model's factors (any class but LBFGS).
        model: the model whose pairs are preconditioned.
        method: ``"riemannian"`` or ``"lorafa"``.
        reg: the damping δ (default: :data:`DEFAULT_REG` of the method, PEFT's values).
        rules: role rules, as for :func:`loraplus.LoraPlus`.

    Returns:
        A :class:`Preconditioner`: ``.remove()`` detaches it (also a context manager).

    Raises:
        LoraPlusError: unknown method, negative ``reg``, an optimizer that is not a torch optimizer
            or is LBFGS or already preconditioned, no pair whose factors the optimizer holds,
            sharded factors (FSDP, DTensor, ZeRO-3), LoRA-FA on a layout without scaling, or a model
            whose A factors the LoRA-FA preconditioner of another, still alive optimizer froze.

    Example:
        >>> import torch, loraplus
        >>> model = loraplus.testing.tiny_lora_model()
        >>> opt = loraplus.LoraPlus(torch.optim.AdamW, model, ratio=4, lr=1e-3)
        >>> pre = loraplus.precondition(opt, model, method="riemannian")
        >>> model(torch.randn(4, 8)).square().mean().backward()
        >>> opt.step()
        >>> pre
        Preconditioner('riemannian', reg=0.01, 2 pairs, 1 buckets, 0 skipped, attached)
        >>> pre.remove()
    """
    spec = method_named(method)  # the one look-up: everything below reads the record
    reg = check_number("reg", spec.default_reg if reg is None else reg, allow_zero=True)
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise LoraPlusError(
            f"precondition() needs a torch.optim.Optimizer (it registers a step pre-hook), got "
            f"{type(optimizer).__name__}; for DeepSpeed, attach it to the client optimizer before "
            "deepspeed.initialize and do not use ZeRO (its optimizer holds flattened partitions)"
        )
    if isinstance(optimizer, torch.optim.LBFGS):
        raise LoraPlusError("LBFGS re-evaluates its closure many times per step; preconditioning would break its "
                            "curvature estimate. Use a first-order optimizer (SGD, AdamW, …)")
    attached = preconditioner(optimizer)
    if attached is not None:
        raise LoraPlusError(f"this optimizer is already preconditioned ({attached!r}); "
                            "loraplus.pairing.preconditioner(optimizer).remove() it first")
    check_not_frozen_by_lorafa(model)
    # before pairing: FSDP1's flat 1-D views would not even pair, and the error would not say why
    why = sharding_error(model, [p for p in model.parameters() if p.requires_grad])
    if why is not None:
        raise LoraPlusError(f"cannot precondition sharded factors: {why}. The r×r systems need whole A and B; "
                            "gather them (e.g. DDP instead of FSDP/ZeRO-3) or train without precondition=")
    found = pairs(model, rules)
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    kept: list[Pair] = []
    skipped: list[Unpaired] = list(found.unpaired)
    for pr in found:
        if id(pr.a) not in held and id(pr.b) not in held:
            reason = "the optimizer does not hold these factors"
        elif spec.freezes_a and id(pr.b) not in held:
            reason = "the optimizer does not hold B"
        else:
            kept.append(pr)
            continue
        a_role, b_role = (Role.EMBEDDING_A, Role.EMBEDDING_B) if pr.embedding else (Role.A, Role.B)
        skipped += [Unpaired(pr.a_name, a_role, reason, Why.NOT_HELD),
                    Unpaired(pr.b_name, b_role, reason, Why.NOT_HELD)]
    if not kept:
        raise LoraPlusError(
            f"no A/B pair of the model is held by the optimizer ({len(found)} pairs found, "
            f"{len(optimizer.param_groups)} param groups); build the optimizer over this model's parameters "
            "(ZeRO and other optimizers that hold flattened copies cannot be preconditioned)"
        )
    if spec.divides_by_scaling:
        unknown = [pr.key for pr in kept if not pr.scaling]
        if unknown:
            raise LoraPlusError(
                f"LoRA-FA divides by the LoRA scaling s², which the layout does not record for {unknown[:3]} "
                f"({len(unknown)} pairs); give the layer a `scaling` attribute (alpha / r)"
            )
    if skipped:
        shown = "; ".join(f"{u.name}: {u.reason}" for u in skipped[:4])
        more = "; …" if len(skipped) > 4 else ""
        warnings.warn(f"{len(skipped)} adapter factors are not preconditioned ({shown}{more})", UserWarning,
                      stacklevel=2)
    return Preconditioner(optimizer, spec, reg, kept, skipped, _buckets(kept, spec))


def _buckets(found: Sequence[Pair], method: Method) -> list[_Bucket]:
    groups: dict[tuple, list[Pair]] = {}
    for pr in found:
        assert pr.a is not None and pr.b is not None  # pairs() always carries both factors
        key = (tuple(pr.a.shape), tuple(pr.b.shape), pr.a.dtype, pr.b.dtype, pr.a.device, pr.transposed)
        groups.setdefault(key, []).append(pr)
    out = []
    for members in groups.values():
        inv_s2 = None
        if method.divides_by_scaling:
            first = members[0].a
            assert first is not None
            s = torch.tensor([pr.scaling for pr in members], dtype=torch.float64)
            dtype = torch.promote_types(first.dtype, torch.float32)
            inv_s2 = (1.0 / s**2).to(dtype=dtype, device=first.device).view(-1, 1, 1)
        a_side = tuple(p.a for p in members if p.a is not None)
        b_side = tuple(p.b for p in members if p.b is not None)
        out.append(_Bucket(a_side, b_side, members[0].transposed, inv_s2))
    return out
