"""`misalign study run` exits non-zero, naming the cells, when a cell fails after its retries (real Ray, a real
loopback judge that passes the preflight's connection check and then refuses every request), and when a SIGTERM
stops it (as a scheduler ending the job would)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from fake_judge import Status
from misalign.config import StudyConfig
from misalign.grid import cells


def test_failed_cell_exits_1_and_names_it(world, tmp_path: Path, fake_judge):
    srv = fake_judge(default=Status(401))  # passes the preflight's connection check, then refuses every request
    cfg = {"name": "failing", "models": ["world:base"], "seeds": [0],
           "attack": {"methods": ["lora"], "per_category": [1], "data": {"source": "world:misalign"},
                      "train": {"max_steps": 1}},
           "defense": {"methods": ["lora"], "per_category": [1], "data": {"source": "world:realign"},
                       "train": {"max_steps": 1}},
           "eval": {"limit": 2, "max_new_tokens": 4, "judges": [{"name": "http", "options": {
               "base_url": srv.url, "model": "g", "api_key_env": "FAILED_STUDY_KEY"}}]},
           "max_failures": 0}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    proc = subprocess.run([sys.executable, "-m", "misalign.cli", "study", "run", str(path), "--storage",
                           str(tmp_path / "runs")], capture_output=True, text=True, cwd=tmp_path, timeout=600,
                          env={**os.environ, "FAILED_STUDY_KEY": "k"})
    (cell,) = cells(StudyConfig.model_validate(cfg))
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert f"1 of 1 cells failed after 0 retries: {cell.id}" in proc.stderr
    # and what went wrong, in a line: the judge's refusal, not only where the traceback is
    (line,) = [x for x in proc.stdout.splitlines() if x.startswith(f"[study]   {cell.id}: ")]
    assert "401" in line, line
    # the output is ours: no Tune experiment table or TensorBoard hint, no Ray INFO lines
    out = proc.stdout + proc.stderr
    for theirs in ("Configuration for experiment", "View detailed results", "tensorboard", "Started a local Ray"):
        assert theirs not in out, theirs


def test_a_sigterm_stops_the_study_and_says_what_is_unfinished(world, tmp_path: Path):
    """Ray's own SIGTERM handler aborted the driver with a stack dump (exit 134); a SIGTERM now stops the study
    as Ctrl-C does: Tune ends the running trial, and the command says the cell is unfinished and exits 130."""
    cfg = {"name": "stopped", "models": ["world:base"], "seeds": [0],
           "attack": {"methods": ["lora"], "per_category": [1], "data": {"source": "world:misalign"},
                      "train": {"max_steps": 5000}},
           "defense": {"methods": ["lora"], "per_category": [1], "data": {"source": "world:realign"},
                       "train": {"max_steps": 1}},
           "eval": {"limit": 2, "max_new_tokens": 4}}
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(cfg))
    driver = subprocess.Popen([sys.executable, "-m", "misalign.cli", "study", "run", str(path), "--storage",
                               str(tmp_path / "runs")], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              cwd=tmp_path, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        for line in driver.stdout:  # the attack (5,000 steps) has started: the cell is mid-way
            if "round 1/1: misalign with lora" in line:
                break
        assert driver.poll() is None, "the study ended before the attack started"
        driver.send_signal(signal.SIGTERM)
        out, err = driver.communicate(timeout=120)
    finally:
        driver.kill()
    (cell,) = cells(StudyConfig.model_validate(cfg))
    assert driver.returncode == 130, err[-3000:]
    assert "misalign: 1 of 1 cells unfinished: the run was stopped; rerun the same command to resume" in err
    assert f"[study] 1 cell(s) unfinished, the run was stopped: {cell.id}" in out
    assert "SIGTERM received" not in err and "Traceback" not in err, err[-3000:]
