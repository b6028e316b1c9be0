"""What every result JSON records about how it was made: the command, the code, the libraries, the machine.

Every harness in ``benchmarks/`` puts ``provenance()`` into the JSON it writes, so a result
names the command that reproduces it (script path relative to the repository, its arguments
as given), the commit of the code that produced it (and whether the working tree had
uncommitted changes to tracked files), and the environment it ran in::

    >>> p = provenance(["--rounds", "20"], module="benchmarks.perf.monitor")
    >>> p["command"]
    'python -m benchmarks.perf.monitor --rounds 20'
    >>> sorted(p) == ["command", "commit", "dirty", "machine", "versions"] and "torch" in p["versions"]
    True
    >>> sorted(MACHINE_KEYS) == sorted(p["machine"])
    True

A library that is not installed is recorded as ``None``, not left out; so are the commit and
``dirty`` outside a git checkout (a run from an unpacked archive names no commit, and says so).
``tests/test_readme_numbers.py`` refuses a committed result without these fields, except the
files listed in ``benchmarks/RETROFITTED.toml`` (written before results recorded them).
The record itself lives in the package (``loraplus/_demo/_provenance.py``, which the demo's JSON
uses too): one implementation, wrapped here with the harness's command line.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from benchmarks import ROOT

# One record, kept in the package (the demo writes it too); this module names the harness's command.
from loraplus._demo._provenance import LIBRARIES, MACHINE_KEYS, machine, versions
from loraplus._demo._provenance import commit as _commit_at
from loraplus._demo._provenance import record as _record

__all__ = ["LIBRARIES", "MACHINE_KEYS", "ROOT", "command", "commit", "git_state", "machine", "provenance", "versions"]


def command(argv: Sequence[str] | None = None, script: str | None = None, module: str | None = None) -> str:
    """The command line that reproduces this run, from the repository root: ``python -m <module> ...``
    for a module (``module=``, or the ``-m`` module this process runs), else ``python <script> ...``."""
    args = list(sys.argv[1:] if argv is None else argv)
    if module is None and script is None:
        spec = getattr(sys.modules.get("__main__"), "__spec__", None)
        module = spec.name if spec is not None and spec.name != "__main__" else None
    if module is not None:
        return "python -m " + shlex.join([module, *args])
    if script is None:
        main = Path(sys.argv[0]).resolve()
        script = main.relative_to(ROOT).as_posix() if main.is_relative_to(ROOT) else main.name
    return "python " + shlex.join([script, *args])


def commit() -> tuple[str | None, bool | None]:
    """The checked-out commit of this repository, and whether tracked files differ from it
    (``None, None``: not a checkout)."""
    return _commit_at(ROOT)


def git_state() -> dict[str, Any]:
    """:func:`commit` as ``{"commit": sha or None, "dirty": bool or None}`` (the GPU kit's record)."""
    sha, dirty = commit()
    return {"commit": sha, "dirty": dirty}


def provenance(argv: Sequence[str] | None = None, script: str | None = None, module: str | None = None) -> dict[str, Any]:
    """``{"command", "commit", "dirty", "versions", "machine"}`` for the JSON a harness writes.

    Call it when the run's settings are in place (after ``torch.set_num_threads``), so the
    machine record holds the threads the run used."""
    return _record(command(argv, script, module), ROOT)
