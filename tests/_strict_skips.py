"""Under ``CI=true`` a skipped test is a failure, unless it needs hardware CI cannot have.

Every dependency the tests use is installed by ``.ci/run`` (the ``test`` extra), so a skip there
means something is missing or broken (``pytest.importorskip`` of a package that failed to install,
a ``skip`` left in by mistake), and it must not pass silently. Skips whose reason matches
:data:`ALLOWED` (a CUDA device) stay skips. Locally, without ``CI``, skips are skips.
Both a test's own skip and a whole module's (``importorskip`` at import time) are caught.
"""

from __future__ import annotations

import os
import re
from collections.abc import Generator
from typing import Any

import pytest

__all__ = ["ALLOWED", "pytest_make_collect_report", "pytest_runtest_makereport"]

#: Skip reasons that stay skips under CI: hardware this machine does not have.
ALLOWED = (re.compile(r"\b(CUDA|GPU)\b"),)


def _reason(longrepr: Any) -> str:
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (path, line, "Skipped: why")
        return str(longrepr[2])
    return str(longrepr)


def _fail_if_strict(report: Any) -> None:
    if not os.environ.get("CI") or not report.skipped or hasattr(report, "wasxfail"):
        return
    why = _reason(report.longrepr)
    if any(p.search(why) for p in ALLOWED):
        return
    report.outcome = "failed"
    report.longrepr = (f"skipped under CI=true ({why}): every test dependency is installed by .ci/run, so this "
                       "skip hides a missing or broken one; install it, or allow the reason in tests/_strict_skips.py")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Generator[None, Any, None]:
    outcome = yield
    _fail_if_strict(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> Generator[None, Any, None]:
    outcome = yield
    _fail_if_strict(outcome.get_result())
