"""The rank launcher every multi-rank test uses (tests/_ranks.py): it must report an aborted rank
and a hang as failures, and a rank that leaves must have no process group left behind."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from _ranks import Rendezvous, join, leave, run_ranks


def _round_trip(rank: int, rendezvous: Rendezvous, outdir: str) -> None:
    join(rank, rendezvous)
    ok = False
    try:
        t = torch.tensor([rank + 1.0])
        dist.all_reduce(t)
        ok = True
    finally:
        leave(rank, rendezvous, ok=ok)
    torch.save({"sum": t.item(), "initialized_after_leave": dist.is_initialized()}, Path(outdir) / f"{rank}.pt")


def _abort_on_rank_1(rank: int) -> None:
    if rank == 1:
        import resource

        resource.setrlimit(resource.RLIMIT_CORE, (0, 0))  # no core file left in the working folder
        os.abort()  # what a gloo "terminate called without an active exception" looks like from outside


def _hang(rank: int) -> None:
    time.sleep(600)


def test_two_ranks_meet_reduce_and_leave_nothing_behind(tmp_path):
    rendezvous = Rendezvous.fresh(tmp_path, timeout_s=60)
    run_ranks(_round_trip, (rendezvous, str(tmp_path)), world_size=2, deadline_s=240)
    for rank in range(2):
        out = torch.load(tmp_path / f"{rank}.pt")
        assert out == {"sum": 3.0, "initialized_after_leave": False}, rank  # 1 + 2, from both ranks
    with pytest.raises(FileExistsError):  # a store is never shared between two launches
        Rendezvous.fresh(tmp_path)


def test_an_aborted_rank_fails_the_test_with_its_signal():
    with pytest.raises(pytest.fail.Exception, match=r"exit codes \[0, -6\]"):
        run_ranks(_abort_on_rank_1, (), world_size=2, deadline_s=240)


def test_a_hanging_rank_fails_the_test_at_the_deadline():
    with pytest.raises(pytest.fail.Exception, match="did not finish within 5 s"):
        run_ranks(_hang, (), world_size=2, deadline_s=5)
