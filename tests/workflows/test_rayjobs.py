"""The study submitted as a Ray job (rayjobs/submit.sh -> `ray job submit`) to a real Ray head started with
`ray start --head`, with token authentication on, as on a cluster."""

from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

pytestmark = pytest.mark.slow  # trains end to end: `pytest -m "not slow"` leaves it out

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def ray_head(tmp_path):
    """A Ray head on loopback with token auth, the venv on PATH (as a node set up by cluster.yaml has)."""
    token = secrets.token_hex(32)
    dashboard = _free_port()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}", "HF_HOME": str(tmp_path / "hf")}
    start = subprocess.run(
        [str(BIN / "ray"), "start", "--head", "--num-cpus", "2", "--port", str(_free_port()),
         "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard), "--disable-usage-stats"],
        env=env, capture_output=True, text=True, timeout=120)
    assert start.returncode == 0, start.stderr[-3000:]
    address = f"http://127.0.0.1:{dashboard}"
    try:
        _wait_for_job_agent(env, address)
        yield env, address
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)


def _wait_for_job_agent(env: dict[str, str], address: str) -> None:
    """The head's job agent comes up a few seconds after `ray start` returns; a trivial job tells when."""
    deadline = time.time() + 240  # minutes on a loaded machine
    while True:
        probe = subprocess.run([str(BIN / "ray"), "job", "submit", "--address", address, "--", "true"],
                               env=env, capture_output=True, text=True, timeout=60)
        if probe.returncode == 0 or time.time() > deadline:
            assert probe.returncode == 0, probe.stderr[-2000:]
            return
        time.sleep(2)


def test_study_through_ray_job_submit(world, ray_head, tmp_path):
    env, address = ray_head
    config = REPO / "configs" / f".job-test-{secrets.token_hex(4)}.yaml"  # inside the uploaded repository
    config.write_text(yaml.safe_dump({
        "name": "job-study", "models": ["world:base"], "rounds": 1,
        "attack": {"methods": ["lora"], "per_category": [3], "data": {"source": "world:misalign"},
                   "train": {"max_steps": 4}},
        "defense": {"methods": ["lora", "dpo"], "per_category": [2], "train": {"max_steps": 4},
                    "data": {"source": "world:realign", "benign_source": "world:benign", "benign_ratio": 1.0}},
        "eval": {"limit": 20, "max_new_tokens": 16}}))
    storage = tmp_path / "shared"
    try:
        # without the token the cluster refuses the client
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        no_token["RAY_AUTH_TOKEN_PATH"] = str(tmp_path / "absent")
        refused = subprocess.run(["bash", str(REPO / "rayjobs/submit.sh"), str(config), str(storage), address],
                                 env=no_token, cwd=REPO, capture_output=True, text=True, timeout=60)
        assert refused.returncode == 2 and "token" in refused.stderr
        job = subprocess.run(["bash", str(REPO / "rayjobs/submit.sh"), str(config), str(storage), address],
                             env=env, cwd=REPO, capture_output=True, text=True, timeout=600)
    finally:
        config.unlink()
    assert job.returncode == 0, job.stdout[-4000:] + job.stderr[-2000:]
    assert "succeeded" in job.stdout.lower()
    results = pd.read_parquet(storage / "job-study" / "results.parquet")
    assert results.cell_id.nunique() == 2 and len(results) == 6
    assert results[results.phase == "misalign"].reused.sum() == 1  # shared across the two defenses
