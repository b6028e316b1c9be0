"""The kit's runner: the parts as records, their budgets and the global deadline, the environment
every JSON carries, one JSON per part written as soon as the part ends, and the command line."""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import torch

from benchmarks.common.provenance import git_state, machine, versions

from . import BENCHMARKS, _cuda_tests, _memory, _precondition, _step, _width
from ._context import Context

DEFAULT_OUT = BENCHMARKS / "results" / "gpu"
#: the whole run, start-up and imports aside, stays under this on one GPU (issue #28: under 8 minutes)
DEFAULT_DEADLINE_S = 470.0


@dataclass(frozen=True)
class Part:
    """One part of the kit: its name (and JSON file), its budget on a GPU and on ``--smoke``, and the
    function that runs it and returns ``{"settings": ..., "results": ...}``."""

    name: str
    budget_s: float
    smoke_budget_s: float
    run: Callable[[Context], dict[str, Any]] = field(repr=False)


def _parts() -> tuple[Part, ...]:
    return (
        Part("cuda_tests", 100.0, 60.0, _cuda_tests.run),
        Part("step", 45.0, 15.0, _step.run),
        Part("precondition", 70.0, 15.0, _precondition.run),
        Part("lorafa_memory", 25.0, 15.0, _memory.run),
        Part("width", 300.0, 40.0, _width.run),  # last: it gets what the global deadline leaves, up to 300 s
    )


PART_NAMES = ("cuda_tests", "step", "precondition", "lorafa_memory", "width")


def _driver() -> str | None:
    try:
        res = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return res.stdout.strip().splitlines()[0] if res.returncode == 0 and res.stdout.strip() else None


def environment(device: torch.device, commit: str | None) -> dict[str, Any]:
    """Device name, driver, torch/CUDA versions, the commit (and dirty flag), library versions."""
    git = git_state()
    source = "git" if git["commit"] else ("--commit" if commit else None)
    env: dict[str, Any] = {
        "device": str(device), "device_name": platform.processor() or platform.machine(), "driver": None,
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "tf32_matmul": torch.backends.cuda.matmul.allow_tf32,
        "commit": git["commit"] or commit, "dirty": git["dirty"], "commit_source": source,
        "versions": versions(), "machine": machine(),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                   memory_gib=round(props.total_memory / 2**30, 1), multiprocessors=props.multi_processor_count,
                   driver=_driver())
    return env


def command(argv: Sequence[str]) -> str:
    """The command line, ``--out`` left out: run from the repository root it writes to
    benchmarks/results/gpu/, where the JSONs are committed (the folder it wrote to is kept as ``out``)."""
    args, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--out":
            skip = True
        elif not a.startswith("--out="):
            args.append(a)
    return shlex.join(["python", "-m", "benchmarks.gpu", *args])


def _write(out: Path, index: int, name: str, record: dict[str, Any]) -> Path:
    path = out / f"{index}_{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    tmp.replace(path)
    return path


def run_parts(parts: Sequence[Part], out: Path, smoke: bool, deadline_s: float, budgets: dict[str, float],
              commit: str | None, argv: Sequence[str], log_file: TextIO | None = None) -> list[Path]:
    """Run ``parts`` in order; each writes ``<out>/<i>_<name>.json`` when it ends (or fails, or finds the
    global deadline passed). Returns the paths written."""
    device = torch.device("cuda" if torch.cuda.is_available() and not smoke else "cpu")
    end_all = time.monotonic() + deadline_s
    env = environment(device, commit)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    for part in parts:
        index = PART_NAMES.index(part.name) + 1
        budget = budgets.get(part.name, part.smoke_budget_s if smoke else part.budget_s)
        ctx = Context(device, smoke, min(time.monotonic() + budget, end_all), log_file)
        record: dict[str, Any] = {"part": part.name, "command": command(argv), "out": str(out), "smoke": smoke,
                                  "budget_s": budget, "versions": env["versions"], "machine": env["machine"],
                                  "environment": env}
        t0 = time.monotonic()
        if ctx.left() <= 0:
            record.update(status="not_run", reason="the global deadline (--deadline-s) had passed")
        else:
            ctx.log(f"part {part.name}: budget {budget:.0f} s, {ctx.left():.0f} s before its deadline")
            try:
                record.update(status="ok", **part.run(ctx))
            except Exception as err:  # the kit goes on to the next part; the JSON says what broke
                record.update(status="error", error={"type": type(err).__name__, "message": str(err),
                                                      "traceback": traceback.format_exc()})
                ctx.log(f"part {part.name} failed: {type(err).__name__}: {err}")
        record["seconds"] = time.monotonic() - t0
        written.append(_write(out, index, part.name, record))
        ctx.log(f"part {part.name}: {record['status']} in {record['seconds']:.1f} s -> {written[-1]}")
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return written


def main(argv: Sequence[str] | None = None) -> list[Path]:
    args_in = list(sys.argv[1:] if argv is None else argv)
    ap = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="folder for one JSON per part and kit.log")
    ap.add_argument("--parts", nargs="+", choices=PART_NAMES, default=list(PART_NAMES))
    ap.add_argument("--budget-s", nargs=2, action="append", default=[], metavar=("PART", "SECONDS"),
                    help="a part's time budget (repeatable), e.g. --budget-s width 300")
    ap.add_argument("--deadline-s", type=float, default=None,
                    help=f"the whole run's deadline (default {DEFAULT_DEADLINE_S:.0f} s; 600 with --smoke)")
    ap.add_argument("--smoke", action="store_true", help="every part at toy sizes on the CPU (~1 minute)")
    ap.add_argument("--commit", default=os.environ.get("LORAPLUS_COMMIT"),
                    help="the commit to record where the tree has no .git (a copy sent to a GPU machine)")
    args = ap.parse_args(args_in)
    budgets = {}
    for name, seconds in args.budget_s:
        if name not in PART_NAMES:
            ap.error(f"--budget-s: unknown part {name!r}; parts: {', '.join(PART_NAMES)}")
        budgets[name] = float(seconds)
    deadline = args.deadline_s if args.deadline_s is not None else (600.0 if args.smoke else DEFAULT_DEADLINE_S)
    if args.smoke:
        torch.set_num_threads(1)  # CI and shared machines: one core
    parts = [p for p in _parts() if p.name in args.parts]
    args.out.mkdir(parents=True, exist_ok=True)
    with open(args.out / "kit.log", "a", encoding="utf-8") as log_file:
        return run_parts(parts, args.out, args.smoke, deadline, budgets, args.commit, args_in, log_file)
