"""What every result JSON records about how it was made: the command, the code, the libraries, the machine.

Every harness in ``benchmarks/`` puts ``provenance()`` into the JSON it writes, so a result
names the command that reproduces it (script path relative to the repository, its arguments
as given), the commit of the code that produced it (and whether the working tree had
uncommitted changes to tracked files), and the environment it ran in::

    >>> p = provenance(["--rounds", "20"], script="benchmarks/bench_monitor.py")
    >>> p["command"]
    'python benchmarks/bench_monitor.py --rounds 20'
    >>> sorted(p) == ["command", "commit", "dirty", "machine", "versions"] and "torch" in p["versions"]
    True
    >>> sorted(MACHINE_KEYS) == sorted(p["machine"])
    True

A library that is not installed is recorded as ``None``, not left out; so are the commit and
``dirty`` outside a git checkout (a run from an unpacked archive names no commit, and says so).
``tests/test_readme_numbers.py`` refuses a committed result without these fields, except the
files listed in ``benchmarks/results/RETROFITTED.toml`` (written before results recorded them).
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
#: What :func:`machine` records.
MACHINE_KEYS = ("platform", "architecture", "processor", "cpu_model", "cpus", "torch_threads", "device", "loadavg")


def command(argv: Sequence[str] | None = None, script: str | None = None) -> str:
    """The command line that reproduces this run, from the repository root."""
    if script is None:
        main = Path(sys.argv[0]).resolve()
        script = main.relative_to(ROOT).as_posix() if main.is_relative_to(ROOT) else main.name
    args = list(sys.argv[1:] if argv is None else argv)
    return "python " + shlex.join([script, *args])


def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def commit() -> tuple[str | None, bool | None]:
    """The checked-out commit, and whether tracked files differ from it (``None, None``: not a checkout)."""
    head = _git("rev-parse", "HEAD")
    if head is None:
        return None, None
    status = _git("status", "--porcelain", "--untracked-files=no")
    return head.strip(), None if status is None else bool(status.strip())


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


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def _device() -> str:
    """The accelerator torch would use (its name), or ``"cpu"``."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        return f"cuda: {torch.cuda.get_device_name(0)} (x{torch.cuda.device_count()})"
    return "cpu"


def machine() -> dict[str, Any]:
    """The machine: OS and kernel, architecture, CPU model, logical CPUs, torch's intra-op threads,
    the device, and the load when recorded (the 1-, 5- and 15-minute load averages)."""
    torch = sys.modules.get("torch")
    load = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    return {"platform": platform.platform(), "architecture": platform.machine(), "processor": platform.processor(),
            "cpu_model": _cpu_model(), "cpus": os.cpu_count(),
            "torch_threads": None if torch is None else torch.get_num_threads(), "device": _device(),
            "loadavg": load}


def git_state() -> dict[str, Any]:
    """:func:`commit` as ``{"commit": sha or None, "dirty": bool or None}`` (the GPU kit's record)."""
    sha, dirty = commit()
    return {"commit": sha, "dirty": dirty}


def provenance(argv: Sequence[str] | None = None, script: str | None = None) -> dict[str, Any]:
    """``{"command", "commit", "dirty", "versions", "machine"}`` for the JSON a harness writes.

    Call it when the run's settings are in place (after ``torch.set_num_threads``), so the
    machine record holds the threads the run used."""
    sha, dirty = commit()
    return {"command": command(argv, script), "commit": sha, "dirty": dirty, "versions": versions(),
            "machine": machine()}
