"""The GPU kit: ``python -m benchmarks.gpu`` measures, in one command of under eight minutes, what only a
GPU can answer (issue #28); ``--smoke`` runs every part at toy sizes on the CPU (a CI test).

Parts, in the order run, each with its own time budget and its own JSON written as soon as it ends:

1. ``cuda_tests`` — ``pytest -m cuda`` (tests/test_cuda.py and the CUDA tests of test_find_lr.py and
   test_monitor.py), the outcome of every test;
2. ``step`` — ``opt.step()`` of LoRA+ groups against the same groups written by hand, foreach and fused
   AdamW, bf16 parameters, a Llama-shaped stack; LoraPlus with and without its ratio guard;
3. ``precondition`` — Riemannian and LoRA-FA preconditioning against a bare AdamW step and PEFT's
   ``create_riemannian_optimizer``, 224 pairs at widths 1,024–8,192;
4. ``lorafa_memory`` — LoRA-FA's saving in ``torch.cuda.max_memory_allocated``, next to the CPU figure;
5. ``width`` — the width family of study v2 at widths 512, 1,024 and 2,048 (pretraining included), best
   λ per width and the slope of log λ* on log width over these and the committed CPU widths.

The parts reuse the CPU harnesses by import (``perf.step``, ``perf.precondition``,
``perf.lorafa_memory``, ``common.widthfamily``, ``common.stats``, ``common.report``); this package only places
them on a device, times them there and keeps them inside their budgets. See docs/gpu.md.
"""

from __future__ import annotations

from benchmarks import BENCHMARKS, ROOT

__all__ = ["BENCHMARKS", "ROOT"]
