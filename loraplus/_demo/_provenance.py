"""What a result JSON records about how it was made: the command, the code, the libraries, the machine.

The one implementation of the record: the demo writes it into its JSON, and
``benchmarks/common/provenance.py`` (not installed with the package) wraps it for the harnesses::

    >>> r = record("python -m loraplus demo --quick")
    >>> sorted(r) == ["command", "commit", "dirty", "machine", "versions"] and "torch" in r["versions"]
    True
    >>> sorted(MACHINE_KEYS) == sorted(r["machine"])
    True

The commit (and ``dirty``: whether tracked files other than results differ from it) is read with git from the
checkout the code runs from; outside one (a pip-installed package, an unpacked archive) both are
``None``, as is a library that is not installed.
"""

from __future__ import annotations

import os
import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

__all__ = ["LIBRARIES", "MACHINE_KEYS", "PACKAGE_ROOT", "RESULTS", "commit", "machine", "record", "versions"]

#: The directory holding the ``loraplus`` package: a checkout's root when run from one.
PACKAGE_ROOT = Path(__file__).resolve().parent.parent.parent
#: Distributions whose versions can change a result (as pip names them).
LIBRARIES = ("torch", "peft", "transformers", "pytorch-optimizer", "lora-pro-adamw", "loraplus")
#: Tracked files under a folder of this name are results, not code: they never make ``dirty`` true.
RESULTS = "results"
#: What :func:`machine` records.
MACHINE_KEYS = ("platform", "architecture", "processor", "cpu_model", "cpus", "torch_threads", "device", "loadavg")


def _git(root: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30, check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def commit(root: Path | None = None) -> tuple[str | None, bool | None]:
    """The commit checked out at ``root`` (default: the checkout holding this package), and whether
    tracked files other than results differ from it; ``(None, None)`` when ``root`` is not the top of
    a git checkout (an installed package inside some other repository names no commit, not that
    repository's).

    Files under a ``results`` folder do not make a checkout dirty: they are what runs write, and a
    resumable study that writes one task's file before the next task starts would otherwise call
    its own later tasks dirty. Code, docs and settings do."""
    root = PACKAGE_ROOT if root is None else Path(root)
    top = _git(root, "rev-parse", "--show-toplevel")
    if top is None or Path(top.strip()).resolve() != root.resolve():
        return None, None
    head = _git(root, "rev-parse", "HEAD")
    if head is None:
        return None, None
    changed = _git(root, "diff", "--name-only", "--no-renames", "HEAD")
    if changed is None:
        return head.strip(), None
    return head.strip(), any(RESULTS not in Path(path).parts for path in changed.splitlines() if path)


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


def record(command: str | None, root: Path | None = None) -> dict[str, Any]:
    """``{"command", "commit", "dirty", "versions", "machine"}``: call it while the run's settings
    are in place (inside its ``torch.set_num_threads``), so the machine record holds its threads."""
    sha, dirty = commit(root)
    return {"command": command, "commit": sha, "dirty": dirty, "versions": versions(), "machine": machine()}
