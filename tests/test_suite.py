"""The suite's own rules: under CI (MISALIGN_REQUIRE_ALL=1, set by .ci/run) a skipped test fails with its reason;
the workflow tests (tests/workflows/) carry the `slow` mark, so `pytest -m "not slow"` is a quick loop."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).resolve().parent


def _pytest(tmp_path: Path, require_all: bool) -> subprocess.CompletedProcess:
    (tmp_path / "test_needs_a_tool.py").write_text(
        "import pytest\n\n\ndef test_needs_a_tool():\n    pytest.skip('no such tool installed')\n\n\n"
        "def test_runs():\n    assert True\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    env.pop("MISALIGN_REQUIRE_ALL", None)
    if require_all:
        env["MISALIGN_REQUIRE_ALL"] = "1"
    # -p conftest: this suite's conftest as a plugin, for a test file outside tests/
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "conftest", "-p", "no:cacheprovider",
                           "--rootdir", str(tmp_path), str(tmp_path)], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)


def test_a_skip_fails_with_its_reason_under_ci(tmp_path):
    local = _pytest(tmp_path, require_all=False)
    assert local.returncode == 0 and "1 passed, 1 skipped" in local.stdout, local.stdout
    ci = _pytest(tmp_path, require_all=True)
    assert ci.returncode == 1 and "1 failed, 1 passed" in ci.stdout, ci.stdout
    assert "MISALIGN_REQUIRE_ALL=1 needs every test to run" in ci.stdout and "no such tool installed" in ci.stdout


@pytest.mark.parametrize("module", ["test_trial", "test_study", "test_rayjobs", "test_deepspeed", "test_method_stages"])
def test_workflow_modules_are_slow(module):
    assert "pytestmark = pytest.mark.slow" in (TESTS / "workflows" / f"{module}.py").read_text()


def test_not_slow_collects_no_workflow_test():
    """tests/conftest.py marks every test under tests/workflows/ slow by its folder, marked in the file or not."""
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "not slow",
                           "-p", "no:cacheprovider", str(TESTS / "workflows")], cwd=TESTS.parent, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 5 and "deselected" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-2000:]
