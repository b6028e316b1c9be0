"""Launching gloo ranks on this machine for the multi-rank tests, with a clean way in and out.

Every multi-rank test (ZeroRedundancyOptimizer, DDP/FSDP, DeepSpeed, refine/apply recipes) uses
this module, so the rules live in one place:

* **No port to steal.** Ranks meet through a ``file://`` store in the test's temporary folder
  (:class:`Rendezvous`), not a TCP port picked by binding to 0 and releasing it (another process can
  take a released port before rank 0 binds it, and a rank can then join someone else's store).
  Gloo's own connections stay on loopback (``GLOO_SOCKET_IFNAME=lo``).
* **No rank leaves while a peer is still in a collective.** :func:`leave` ends with a barrier
  (when the rank's own work succeeded), then the ranks destroy their process group one after the
  other, in rank order, each waiting for the previous one in a second file store; each one frees the
  process group's objects (``gc.collect()``) before it returns, so gloo's sockets and threads are torn
  down while the interpreter is fully alive, never during interpreter exit.
* **A deadline.** Collectives time out after ``Rendezvous.timeout_s``; :func:`run_ranks` kills
  the ranks after ``deadline_s`` and fails the test.

A worker is written as::

    def _worker(rank: int, rendezvous: Rendezvous, outdir: str) -> None:
        join(rank, rendezvous)
        ok = False
        try:
            ...  # the rank's work; results are saved under outdir
            ok = True
        finally:
            leave(rank, rendezvous, ok=ok)
"""

from __future__ import annotations

import datetime
import gc
import os
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["Rendezvous", "join", "leave", "run_ranks", "run_script"]


@dataclass(frozen=True)
class Rendezvous:
    """Where the ranks of one launch meet: two files in a fresh folder, and the collective timeout.

    Args:
        folder: a folder only this launch uses (the files must not exist yet).
        world_size: the number of ranks.
        timeout_s: how long a collective (or the rendezvous itself) may wait before it raises.
    """

    folder: str
    world_size: int
    timeout_s: float

    @property
    def init_method(self) -> str:
        """The ``init_method`` for ``init_process_group`` / ``deepspeed.init_distributed``."""
        return f"file://{Path(self.folder) / 'store'}"

    @property
    def timeout(self) -> datetime.timedelta:
        return datetime.timedelta(seconds=self.timeout_s)

    @classmethod
    def fresh(cls, parent: str | Path, world_size: int = 2, timeout_s: float = 60.0) -> Rendezvous:
        folder = Path(parent) / "rendezvous"
        folder.mkdir()  # fails if a previous launch left one: never share a store between launches
        return cls(str(folder), world_size, timeout_s)


def _stay_on_loopback() -> None:
    if sys.platform.startswith("linux"):
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")


def join(rank: int, rendezvous: Rendezvous) -> None:
    """Start this rank's gloo process group (use :attr:`Rendezvous.init_method` for DeepSpeed's init)."""
    import torch.distributed as dist

    _stay_on_loopback()
    dist.init_process_group(
        "gloo",
        init_method=rendezvous.init_method,
        rank=rank,
        world_size=rendezvous.world_size,
        timeout=rendezvous.timeout,
    )


def leave(rank: int, rendezvous: Rendezvous, *, ok: bool) -> None:
    """End this rank's part: a final barrier (if ``ok``), then the process groups are destroyed in rank order.

    ``ok=False`` (this rank's work raised) skips the barrier: the peer may be waiting in another
    collective, and the timeout (or this rank's sockets closing) ends that wait with an error there.
    Whatever happens, this rank's process group is destroyed and its objects freed before returning.
    """
    import torch.distributed as dist

    try:
        if dist.is_initialized() and ok:
            dist.barrier()
    finally:
        # the order of teardown: rank r destroys its group after rank r - 1 has destroyed and freed its
        # own, so no rank tears down gloo while a peer is tearing down the other end of its pairs
        order = dist.FileStore(str(Path(rendezvous.folder) / "teardown"), -1)
        order.set_timeout(rendezvous.timeout)
        try:
            if rank > 0 and ok:
                order.wait([f"left{rank - 1}"])
        finally:
            if dist.is_initialized():
                dist.destroy_process_group()
            gc.collect()  # the group's C++ objects (threads, sockets) go now, not at interpreter exit
            order.set(f"left{rank}", "1")


def run_ranks(
    worker: Callable[..., None], args: tuple[Any, ...], *, world_size: int, deadline_s: float
) -> None:
    """Start ``worker(rank, *args)`` in ``world_size`` spawned processes; fail the test if one fails or hangs.

    Raises:
        AssertionError (via ``pytest.fail``): a rank exited with a non-zero code or a signal (an abort
            shows as ``-6``), or the ranks were still running after ``deadline_s`` (then all are killed).
    """
    import pytest
    import torch.multiprocessing as mp

    ctx = mp.start_processes(worker, args=args, nprocs=world_size, join=False, start_method="spawn")
    deadline = time.monotonic() + deadline_s
    try:
        while not all(p.exitcode is not None for p in ctx.processes):
            if time.monotonic() > deadline:
                pytest.fail(f"ranks did not finish within {deadline_s} s (hang?)")
            time.sleep(0.2)
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
                p.join()
    codes = [p.exitcode for p in ctx.processes]
    if any(codes):
        pytest.fail(f"rank exit codes {codes} (negative: killed by that signal, -6 is an abort)")


def run_script(
    code: str, args: tuple[str, ...], *, world_size: int, deadline_s: float
) -> list[str]:
    """Run ``python -c code <rank> *args`` as ``world_size`` processes (this folder and the repository on
    ``PYTHONPATH``, so the script can ``from _ranks import join, leave``); return each rank's output.

    Raises:
        AssertionError (via ``pytest.fail``): a rank exited with a non-zero code or a signal, or the
            ranks were still running after ``deadline_s`` (then all are killed); the output is shown.
    """
    import subprocess

    import pytest

    here = Path(__file__).resolve().parent
    path = [str(here), str(here.parent), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(rank), *args],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in range(world_size)
    ]
    deadline = time.monotonic() + deadline_s
    outs: list[str] = []
    try:
        for proc in procs:
            try:
                outs.append(proc.communicate(timeout=max(1.0, deadline - time.monotonic()))[0])
            except subprocess.TimeoutExpired:
                pytest.fail(f"ranks did not finish within {deadline_s} s (hang?)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.communicate()
    codes = [proc.returncode for proc in procs]
    if any(codes):
        shown = "\n".join(f"--- rank {r} (exit {c}):\n{out[-3000:]}" for r, (c, out) in enumerate(zip(codes, outs)))
        pytest.fail(f"rank exit codes {codes} (negative: killed by that signal, -6 is an abort)\n{shown}")
    return outs
