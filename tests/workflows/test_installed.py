"""The package works when installed (`pip install .`, not editable) and run from outside the repository: no
part of it may depend on the checkout (the analysis the report needs ships in the wheel; no sys.path edits)."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # builds and installs the package, then trains a small trial and study

REPO = Path(__file__).resolve().parents[2]


def test_installed_package_runs_world_trial_study_and_report(world, tmp_path):
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    site = next((venv / "lib").glob("python3*/site-packages"))
    # the dependencies come from the test's environment (a path entry, so its editable misalign hook is not
    # loaded); misalign itself from the wheel installed below
    (site / "deps.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    # the wheel `pip install .` builds (with this environment's setuptools), then installed like any wheel
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                            str(tmp_path / "dist"), str(REPO)], capture_output=True, text=True, cwd=tmp_path)
    assert build.returncode == 0, build.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("misalign-*.whl")
    install = subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-deps", str(wheel)],
                             capture_output=True, text=True, cwd=tmp_path)
    assert install.returncode == 0, install.stderr[-3000:]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONUNBUFFERED": "1"}

    def run(*args: str) -> str:
        proc = subprocess.run([str(venv / "bin" / "misalign"), *args], capture_output=True, text=True, cwd=tmp_path,
                              env=env, timeout=900)
        assert proc.returncode == 0, f"misalign {' '.join(args)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        return proc.stdout

    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import misalign; print(misalign.__file__)"],
                           capture_output=True, text=True, cwd=tmp_path, env=env, check=True).stdout
    assert where.startswith(str(site)), f"misalign imported from {where}, not the installed wheel"
    assert "aligned base" in run("world", "build")
    run("trial", str(REPO / "configs" / "trial-tiny.yaml"), "--out", "trial", "--quiet",
        "--set", "attack.train.max_steps=2", "--set", "defense.train.max_steps=2", "--set", "eval.limit=8")
    assert (tmp_path / "trial" / "stages.parquet").exists()
    run("study", "run", str(REPO / "configs" / "study-tiny.yaml"), "--storage", "runs",
        "--set", "seeds=[0]", "--set", "attack.methods=[lora]", "--set", "attack.per_category=[3]",
        "--set", "defense.methods=[lora]", "--set", "defense.per_category=[3]",
        "--set", "attack.train.max_steps=2", "--set", "defense.train.max_steps=2", "--set", "eval.limit=8",
        "--set", "eval.max_new_tokens=8")
    # the shipped calibration table comes with the wheel (package data), found by its name
    plan = run("study", "plan", str(REPO / "configs" / "study-tiny.yaml"), "--set", "plan.calibration=h200")
    assert "plan.calibration h200: 0 of 48 unique stages priced at a measured MFU" in plan
    run("report", "runs/study-tiny", "--out", "report")
    assert "study-tiny" in (tmp_path / "report" / "report.html").read_text()
