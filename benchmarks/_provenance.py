"""What every result JSON records about how it was made: the command, the library versions, the machine.

Every harness in ``benchmarks/`` puts ``provenance()`` into the JSON it writes, so a result
names the command that reproduces it (script path relative to the repository, its arguments
as given) and the environment it ran in::

    >>> p = provenance(["--rounds", "20"], script="benchmarks/bench_monitor.py")
    >>> p["command"]
    'python benchmarks/bench_monitor.py --rounds 20'
    >>> sorted(p) == ["command", "machine", "versions"] and "torch" in p["versions"]
    True

A library that is not installed is recorded as ``None``, not left out. ``git_state()`` gives the
commit and whether the working tree differs from it (``None`` for both where there is no git
checkout, e.g. a copy of the tree sent to another machine).
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
#: Distributions whose versions can change a result (as pip names them).
LIBRARIES = ("torch", "peft", "transformers", "pytorch-optimizer", "lora-pro-adamw", "loraplus")


def command(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """The command line that reproduces this run, from the repository root."""
    if script is None:
        main = Path(sys.argv[0]).resolve()
        script = main.relative_to(ROOT).as_posix() if main.is_relative_to(ROOT) else main.name
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + shlex.join([script, *args])


def versions() -> dict[str, str | None]:
    """Installed versions of :data:`LIBRARIES` and of Python."""
    out: dict[str, str | None] = {}
    for name in LIBRARIES:
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    if "torch" in sys.modules:  # the build tag (+cpu, +cu124) is in torch's own version string
        out["torch"] = sys.modules["torch"].__version__
    out["python"] = platform.python_version()
    return out


def machine() -> dict[str, Any]:
    """The machine: OS and kernel, architecture, processor string, logical CPUs, load when recorded."""
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "architecture": platform.machine(), "processor": platform.processor(),
            "cpus": os.cpu_count(), "loadavg": load}


def git_state() -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository holding this file."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30)
        status = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):  # no git on this machine
        return {"commit": None, "dirty": None}
    if sha.returncode != 0 or status.returncode != 0:  # not a checkout
        return {"commit": None, "dirty": None}
    return {"commit": sha.stdout.strip(), "dirty": bool(status.stdout.strip())}


def provenance(argv: Sequence[str] | None = None, script: str | None = None) -> dict[str, Any]:
    """``{"command": ..., "versions": {...}, "machine": {...}}`` for the JSON a harness writes."""
    return {"command": command(argv, script), "versions": versions(), "machine": machine()}
