"""Riemannian preconditioning under ``torch.compile(opt.step)``: why the preconditioner runs eagerly.

``n`` pairs of d×d LoRA factors (rank ``--rank``, one shape bucket) get fixed random gradients;
AdamW (foreach) steps them. Variants, stepped in interleaved repetitions (the order rotates; the
gradients are restored before each step, untimed):

* ``eager`` — ``loraplus.precondition(opt, model)`` and ``opt.step()``;
* ``compiled`` — the same, with ``torch.compile(opt.step)`` (inductor): what loraplus does, the
  preconditioner runs eagerly (``torch.compiler.disable``) and the AdamW update is compiled;
* ``traced_branch_free`` — the alternative: a step pre-hook written here with the same maths as
  loraplus (batched Cholesky, ``pinv`` where it fails), made traceable by computing ``pinv`` for
  every matrix and choosing with ``torch.where`` (no data-dependent branch), compiled with the step;
* ``traced_no_fallback`` — that hook without ``pinv`` at all (a singular system then gives NaN);
* ``compiled_bare`` — the compiled step without preconditioning.

Reported: the median step time of each (ms) and the time of the first three steps (which include
compiling). Usage::

    python -m benchmarks.perf.precondition_compile          # about 2 minutes on 2 shared CPU cores
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

import loraplus
from benchmarks.common.provenance import provenance

RESULTS = Path(__file__).resolve().parent / "results"
LR, REG = 1e-3, 1e-2
VARIANTS = ("eager", "compiled", "traced_branch_free", "traced_no_fallback", "compiled_bare")


def build(n: int, d: int, r: int, seed: int) -> nn.Module:
    """PEFT-named adapters only (the frozen base weight plays no part in a step), fixed gradients."""
    torch.manual_seed(seed)
    model = nn.ModuleList()
    for _ in range(n):
        layer = nn.Module()
        layer.lora_A = nn.ModuleDict({"default": nn.Linear(d, r, bias=False)})
        layer.lora_B = nn.ModuleDict({"default": nn.Linear(r, d, bias=False)})
        nn.init.normal_(layer.lora_B["default"].weight, std=0.1)
        model.append(layer)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    return model


def traced_hook(model: nn.Module, fallback: bool) -> Callable[..., None]:
    """The alternative to loraplus's eager hook: branch-free, so dynamo traces it into the step."""
    a = [layer.lora_A["default"].weight for layer in model]
    b = [layer.lora_B["default"].weight for layer in model]

    def inverse(gram: torch.Tensor) -> torch.Tensor:
        eye = torch.eye(gram.shape[-1])
        system = gram + REG * eye
        chol, info = torch.linalg.cholesky_ex(system)
        linv = torch.linalg.solve_triangular(chol, eye.expand_as(system), upper=False)
        if not fallback:
            return linv.mT @ linv
        return torch.where((info == 0).view(-1, 1, 1), linv.mT @ linv, torch.linalg.pinv(system))

    @torch.no_grad()
    def hook(optimizer: Any, args: Any, kwargs: Any) -> None:
        fa, fb = torch.stack(a), torch.stack(b)
        ga, gb = torch.stack([p.grad for p in a]), torch.stack([p.grad for p in b])
        torch._foreach_copy_([p.grad for p in a], list((inverse(fb.mT @ fb) @ ga).unbind(0)))
        torch._foreach_copy_([p.grad for p in b], list((gb @ inverse(fa @ fa.mT)).unbind(0)))

    return hook


def variant(kind: str, n: int, d: int, r: int) -> tuple[Callable[[], float], float]:
    """A timed step of ``kind`` (restoring the gradients first, untimed) and the first three steps' time."""
    model = build(n, d, r, seed=0)
    params = list(model.parameters())
    saved = [p.grad.clone() for p in params]
    opt = torch.optim.AdamW(params, lr=LR, foreach=True)
    if kind in ("eager", "compiled"):
        loraplus.precondition(opt, model, method="riemannian", reg=REG)
    elif kind.startswith("traced"):
        opt.register_step_pre_hook(traced_hook(model, fallback=kind == "traced_branch_free"))
    step = opt.step if kind == "eager" else torch.compile(opt.step)

    def one() -> float:
        torch._foreach_copy_([p.grad for p in params], saved)
        t0 = time.perf_counter()
        step()
        return time.perf_counter() - t0

    t0 = time.perf_counter()
    for _ in range(3):
        one()
    first = time.perf_counter() - t0
    return one, first


def parser() -> argparse.ArgumentParser:
    """This module's command line (tests/test_benchmarks_layout.py checks recorded commands against it)."""
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pairs", type=int, default=64)
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=7, help="repetitions of --steps steps per variant")
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (1: steadier on a shared machine)")
    ap.add_argument("--out", type=Path, default=RESULTS / "precondition_compile.json")
    return ap


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    torch.set_num_threads(args.threads)
    steps, first = {}, {}
    for kind in VARIANTS:
        steps[kind], first[kind] = variant(kind, args.pairs, args.d, args.rank)
    times: dict[str, list[float]] = {k: [] for k in VARIANTS}
    for i in range(args.repeat):
        for kind in VARIANTS[i % len(VARIANTS):] + VARIANTS[: i % len(VARIANTS)]:
            times[kind] += [steps[kind]() for _ in range(args.steps)]
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    for kind in VARIANTS:
        print(f"{kind:>20}: {med[kind]:6.2f} ms/step (median)   first 3 steps {first[kind]:6.1f} s")
    meta = {**provenance(argv, module="benchmarks.perf.precondition_compile"), "pairs": args.pairs,
            "d": args.d, "rank": args.rank, "reg": REG, "threads": args.threads,
            "optimizer": "torch.optim.AdamW(foreach=True)", "backend": "inductor"}
    result = {"meta": meta, "median_step_ms": med, "first_three_steps_s": first,
              "step_ms": {k: [t * 1e3 for t in v] for k, v in times.items()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
