"""The CI strict-skip hook (tests/_strict_skips.py), run on small generated test files.

Under ``CI=true`` only a test marked ``@pytest.mark.cuda`` may skip; what the skip's reason says
does not matter (a reason mentioning CUDA is no pass, a marked test's reason need not mention it).
"""

from __future__ import annotations

import pytest

CONFTEST = "from _strict_skips import pytest_make_collect_report, pytest_runtest_makereport\n"
INI = "[pytest]\nmarkers =\n    cuda: needs a CUDA device\n"
# a package whose import fails with an error that mentions CUDA (as bitsandbytes' can)
FAKE_GPU_LIB = 'raise ImportError("CUDA Setup failed: libcudart.so not found, is a CUDA GPU installed?")\n'
TESTS = """
import pytest

def test_missing_dependency():
    pytest.importorskip("no_such_package_for_loraplus")

def test_import_error_mentioning_cuda():
    pytest.importorskip("fake_gpu_lib_for_loraplus", exc_type=ImportError)

@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_says_cuda_without_the_marker():
    pass

@pytest.mark.cuda
@pytest.mark.skipif(True, reason="needs a CUDA device")
def test_marked_cuda():
    pass

@pytest.mark.cuda
def test_marked_cuda_any_reason():
    pytest.skip("no device here")

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
    pytester.makeini(INI)
    pytester.makeconftest(CONFTEST)
    pytester.makepyfile(test_sample=TESTS, test_module_skip=MODULE_SKIP, fake_gpu_lib_for_loraplus=FAKE_GPU_LIB)
    pytester.syspathinsert()
    return pytester


def _outcomes(result: pytest.RunResult) -> dict[str, str]:
    """{test function name: outcome} from the -rA summary lines (skips are listed there by file and line)."""
    out = {}
    for line in result.outlines:
        parts = line.split()
        if len(parts) >= 2 and parts[0] in {"PASSED", "FAILED", "ERROR", "XFAIL"} and "::" in parts[1]:
            out[parts[1].split("::")[-1]] = parts[0]
    return out


def test_under_ci_only_tests_marked_cuda_may_skip(project, monkeypatch):
    monkeypatch.setenv("CI", "true")
    result = project.runpytest("-p", "no:cacheprovider", "--continue-on-collection-errors", "-rA")
    # a skip in setup (skipif) turned into a failure is reported as an error at setup, as is the module's
    result.assert_outcomes(passed=1, failed=3, skipped=2, xfailed=1, errors=2)
    outcomes = _outcomes(result)
    for name in (
        "test_missing_dependency",
        "test_import_error_mentioning_cuda",  # the reason says CUDA, but the test is not marked
        "test_says_cuda_without_the_marker",
        "test_left_in_by_mistake",
    ):
        assert outcomes.get(name) in {"FAILED", "ERROR"}, (name, outcomes)
    assert "test_marked_cuda" not in outcomes and "test_marked_cuda_any_reason" not in outcomes  # the 2 skips
    result.stdout.fnmatch_lines(["*skipped under CI=true*fake_gpu_lib_for_loraplus*CUDA Setup failed*"])
    result.stdout.fnmatch_lines(["*skipped under CI=true*no_such_package_for_loraplus*@pytest.mark.cuda*"])
    assert result.ret != 0


def test_without_ci_skips_are_skips(project, monkeypatch):
    monkeypatch.delenv("CI", raising=False)
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, skipped=7, xfailed=1)
    assert result.ret == 0


def test_the_cuda_marker_is_registered_and_unknown_markers_are_refused(pytestconfig):
    assert any(line.split(":")[0].strip() == "cuda" for line in pytestconfig.getini("markers"))
    assert pytestconfig.getoption("strict_markers")  # a misspelt @pytest.mark.cdua is an error, not a silent no-op
