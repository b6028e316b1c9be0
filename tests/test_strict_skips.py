"""The CI strict-skip hook (tests/_strict_skips.py), run on small generated test files."""

from __future__ import annotations

import pytest

CONFTEST = "from _strict_skips import pytest_make_collect_report, pytest_runtest_makereport\n"
TESTS = """
import pytest

def test_missing_dependency():
    pytest.importorskip("no_such_package_for_loraplus")

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_needs_cuda():
    pass

def test_left_in_by_mistake():
    pytest.skip("arrives with some later patch")

@pytest.mark.xfail(reason="a known failure", strict=True)
def test_expected_failure():
    assert False

def test_passes():
    pass
"""
MODULE_SKIP = 'import pytest\npytest.importorskip("no_such_package_for_loraplus")\n\ndef test_x():\n    pass\n'


@pytest.fixture
def project(pytester: pytest.Pytester) -> pytest.Pytester:
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sample=TESTS, test_module_skip=MODULE_SKIP)
    return pytester


def test_under_ci_a_skip_for_a_missing_dependency_fails_and_a_cuda_skip_stays_a_skip(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = project.runpytest("-p", "no:cacheprovider", "--continue-on-collection-errors")
    result.assert_outcomes(passed=1, failed=2, skipped=1, xfailed=1, errors=1)
    result.stdout.fnmatch_lines(["*test_missing_dependency*", "*test_left_in_by_mistake*"])
    result.stdout.fnmatch_lines(["*skipped under CI=true*no_such_package_for_loraplus*"])
    assert result.ret != 0


def test_without_ci_skips_are_skips(project, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=4, xfailed=1)
    assert result.ret == 0
