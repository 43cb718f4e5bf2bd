"""The study on a real local Ray: the grid, shared stages, the results store, status, resume after the driver
is killed, and a training worker killed mid-stage on a two-node cluster."""

from __future__ import annotations

import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from misalign.cli import main
from misalign.config import StudyConfig
from misalign.grid import cells
from misalign.rundir import RunDir
from misalign.storage import Store
from misalign.study import run_study

pytestmark = pytest.mark.slow  # trains end to end: `pytest -m "not slow"` leaves it out

# small, fast cells: 4 optimizer steps per stage, 30 items per eval set
FAST = {"train": {"max_steps": 4}}


def study_config(name: str, **changes: Any) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": name, "models": ["world:base"], "seeds": [0], "rounds": 1,
        "attack": {"methods": ["lora"], "per_category": [3], "data": {"source": "world:misalign"}, **FAST},
        "defense": {"methods": ["lora"], "per_category": [2],
                    "data": {"source": "world:realign", "benign_source": "world:benign", "benign_ratio": 1.0},
                    **FAST},
        "eval": {"limit": 30, "max_new_tokens": 24},
        "resources": {"workers": 1, "cpus_per_worker": 1},
    }
    d.update(changes)
    return d


class Dirs:
    """A study directory's places on local disk, for the assertions (the study itself sees a Store)."""

    def __init__(self, root: Path) -> None:
        self.root, self.stages, self.cells = root, root / "stages", root / "cells"
        self.results = root / "results.parquet"
        self.study = RunDir(Store(root))


def write(tmp: Path, d: dict[str, Any]) -> Path:
    path = tmp / f"{d['name']}.yaml"
    path.write_text(yaml.safe_dump(d))
    return path


@pytest.fixture(scope="module")
def shared_study(world, tmp_path_factory):
    """Six defenses (3 methods x 2 learning rates) realigning one misalignment, on a local Ray."""
    import ray

    d = study_config("six-defenses")
    d["attack"]["deepspeed"] = {"zero_stage": 2}  # ZeRO in a one-worker trial's own process
    d["defense"].update(methods=["lora", "ia3", "dpo"], grid={"train.lr": [1e-3, 3e-3]})
    cfg = StudyConfig.model_validate(d)
    paths = Dirs(tmp_path_factory.mktemp("study") / cfg.name)
    try:
        results = run_study(cfg, paths.study).results
    finally:
        ray.shutdown()
    return cfg, paths, results


def test_grid_covers_exactly_the_configured_cells(shared_study):
    cfg, paths, results = shared_study
    want = set(itertools.product(["lora", "ia3", "dpo"], [1e-3, 3e-3]))
    got = set(zip(results.defense_method, results["defense_train.lr"], strict=True))
    assert got == want
    assert results.cell_id.nunique() == len(cells(cfg)) == 6
    # one row per cell x round x phase, nothing doubled
    assert len(results) == 6 * 3
    assert not results.duplicated(["cell_id", "round", "phase"]).any()
    assert set(results.phase) == {"base", "misalign", "realign"}


def test_the_misalignment_trains_once_for_six_defenses(shared_study):
    _, paths, results = shared_study
    stage_dirs = [json.loads(p.read_text()) for p in paths.stages.glob("*/stage.json")]
    assert sum(s["direction"] == "misalign" for s in stage_dirs) == 1
    assert sum(s["direction"] == "realign" for s in stage_dirs) == 6
    mis = results[results.phase == "misalign"]
    assert mis.reused.sum() == 5 and (~mis.reused).sum() == 1
    assert mis.unsafety.nunique() == 1, "every cell sees the same shared misaligned model"
    # every defense really trained from the shared misaligned model
    mis_key = next(p.parent.name for p in paths.stages.glob("*/stage.json")
                   if json.loads(p.read_text())["direction"] == "misalign")
    parents = {Path(s["parent_dir"]).name for s in stage_dirs if s["direction"] == "realign"}
    assert parents == {mis_key}
    mis_ledger = json.loads((paths.stages / mis_key / "ledger.json").read_text())
    assert mis_ledger["extra"]["zero_stage"] == 2 and mis_ledger["workers"] == 1
    # evaluations are shared too: one base evaluation for six cells
    assert len(list(paths.stages.glob("base-*/eval-*/eval.json"))) == 1


def test_status_and_results_commands(shared_study, capsys, tmp_path):
    _, paths, results = shared_study
    assert main(["study", "status", str(paths.root), "--json"]) == 0
    status = json.loads(capsys.readouterr().out)
    assert status["done"] == status["cells"] == 6 and status["pending"] == 0
    assert status["cost"]["stages_trained"] == 7 and status["cost"]["stages_reused"] == 5
    assert status["cost"]["flops_saved"] > 0
    assert main(["study", "results", str(paths.root), "--csv", str(tmp_path / "r.csv")]) == 0
    assert len(pd.read_csv(tmp_path / "r.csv")) == len(results)
    # Tune's own experiment directory holds its logs, for Ray's tools
    tune_dir = paths.root / "tune"
    assert list(tune_dir.glob("experiment_state-*.json"))
    assert list(tune_dir.glob("cell-*/progress.csv")) and list(tune_dir.glob("cell-*/result.json"))
    assert list(tune_dir.glob("cell-*/events.out.tfevents.*"))


def test_rerun_of_a_finished_study_trains_nothing(shared_study, monkeypatch):
    import ray

    cfg, paths, _ = shared_study
    before = {p: p.stat().st_mtime_ns for p in paths.stages.glob("*/ledger.json")}
    cells_before = {p: p.stat().st_mtime_ns for p in paths.cells.glob("*.parquet")}
    results_before = paths.results.stat().st_mtime_ns
    monkeypatch.chdir(paths.root.parent)  # as `make study` runs it: a config and a storage relative to here
    write(paths.root.parent, cfg.model_dump(mode="json"))
    try:
        assert main(["study", "run", f"{cfg.name}.yaml", "--storage", "."]) == 0
    finally:
        ray.shutdown()
    assert {p: p.stat().st_mtime_ns for p in paths.stages.glob("*/ledger.json")} == before
    assert {p: p.stat().st_mtime_ns for p in paths.cells.glob("*.parquet")} == cells_before
    assert paths.results.stat().st_mtime_ns >= results_before
    assert len(pd.read_parquet(paths.results)) == 18


def test_a_changed_config_is_not_mixed_into_an_existing_study(shared_study, capsys):
    cfg, paths, _ = shared_study
    path = write(paths.root.parent, {**cfg.model_dump(mode="json"), "seeds": [1]})
    code = main(["study", "run", str(path), "--storage", str(paths.root.parent)])
    assert code == 2 and "seeds" in capsys.readouterr().err


def _env() -> dict[str, str]:
    return {**os.environ, "PYTHONUNBUFFERED": "1"}


def test_driver_killed_mid_study_resumes_without_redoing_finished_cells(world, tmp_path):
    d = study_config("killed", attack={**study_config("x")["attack"], "per_category": [2, 3]})
    d["defense"]["grid"] = {"train.lr": [1e-3, 3e-3]}
    config = write(tmp_path, d)
    paths = Dirs(tmp_path / "runs" / "killed")
    cmd = [sys.executable, "-m", "misalign.cli", "study", "run", str(config), "--storage", str(tmp_path / "runs")]
    driver = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                              start_new_session=True)
    deadline = time.time() + 300
    while time.time() < deadline and not list(paths.cells.glob("*.parquet")) and driver.poll() is None:
        time.sleep(0.5)
    finished = {p: p.stat().st_mtime_ns for p in paths.cells.glob("*.parquet")}
    assert finished and driver.poll() is None, "the driver should be mid-study with a cell finished"
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    finished = {p: p.stat().st_mtime_ns for p in paths.cells.glob("*.parquet")}  # any that landed meanwhile
    assert len(finished) < 4
    _wait_for_ray_to_go(tmp_path)

    rerun = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
    assert f"({len(finished)} done before this run)" in rerun.stdout
    for p, mtime in finished.items():
        assert p.stat().st_mtime_ns == mtime, f"finished cell {p.name} was redone"
    results = pd.read_parquet(paths.results)
    assert results.cell_id.nunique() == 4
    assert not results.duplicated(["cell_id", "round", "phase"]).any() and len(results) == 4 * 3
    # the stages of finished cells were trained once: one ledger per unique stage (2 attacks, 4 defenses)
    assert len(list(paths.stages.glob("*/ledger.json"))) == 6


def _wait_for_ray_to_go(tmp: Path) -> None:
    """A SIGKILLed driver's local Ray shuts itself down (its processes share the driver's fate)."""
    deadline = time.time() + 60
    while time.time() < deadline:
        alive = subprocess.run(["pgrep", "-f", "ray/core/src/ray/gcs/gcs_server"], capture_output=True)
        if alive.returncode != 0:
            return
        time.sleep(1)


def _kill_a_training_worker_after_a_checkpoint(paths: Dirs, killed: list[int]) -> None:
    import psutil

    deadline = time.time() + 300
    while time.time() < deadline:
        if list(paths.stages.glob("*/trainer/checkpoint-*/misalign-whole.json")):
            for proc in psutil.process_iter(["cmdline"]):
                if any("RayTrainWorker" in part for part in proc.info["cmdline"] or []):
                    proc.kill()
                    killed.append(proc.pid)
                    return
        time.sleep(0.2)


def test_two_node_trial_survives_a_killed_worker(world, tmp_path):
    """Two Ray nodes, one training worker on each (ZeRO-2); a worker killed mid-stage is replaced and the stage
    resumes from its last checkpoint; the study completes."""
    import threading

    import ray
    from ray.cluster_utils import Cluster

    from misalign.errors import InputError

    d = study_config("two-nodes", resources={"workers": 2, "cpus_per_worker": 1, "placement": "STRICT_SPREAD"},
                     checkpoint_every=2)
    d["attack"].update(train={"max_steps": 30}, deepspeed={"zero_stage": 2})
    cfg = StudyConfig.model_validate(d)
    paths = Dirs(tmp_path / "runs" / cfg.name)
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    killed: list[int] = []
    try:
        with pytest.raises(InputError, match="2 nodes: pass --storage"):
            run_study(cfg, paths.study, address=cluster.address, storage_given=False)
        watcher = threading.Thread(target=_kill_a_training_worker_after_a_checkpoint, args=(paths, killed))
        watcher.start()
        results = run_study(cfg, paths.study, address=cluster.address, storage_given=True).results
        watcher.join()
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert killed, "a training worker was killed mid-stage"
    assert len(results) == 3 and not results.unsafety.isna().any()
    ledgers = [json.loads(p.read_text()) for p in paths.stages.glob("*/ledger.json")]
    attack = next(x for x in ledgers if x["direction"] == "misalign")
    assert attack["extra"]["resumed_from_step"] >= 2, "the retried stage resumed from its checkpoint"
    assert attack["optimizer_steps"] == 30
    assert attack["extra"]["zero_stage"] == 2 and attack["workers"] == 2
    assert len(set(attack["extra"]["worker_nodes"])) == 2, "the two workers ran on two Ray nodes"
    assert all(t > 0 for t in attack["extra"]["tokens_per_worker"])


def test_a_trial_no_node_can_hold_stops_the_study_with_a_message(world, tmp_path):
    """Joined to a cluster (no local preflight of resources), a trial asking more than any node has would wait
    forever in Tune: after resources.start_timeout_s the study stops, saying what a trial asks and nodes have."""
    import ray
    from ray.cluster_utils import Cluster

    from misalign.study import StudyStalled

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    d = study_config("stalled", resources={"workers": 1, "cpus_per_worker": 2, "start_timeout_s": 5})
    t0 = time.time()
    try:
        with pytest.raises(StudyStalled, match=r"asks for 1 worker\(s\) x 2 CPU; the cluster's nodes have \[\{'CPU': 1.0\}\]"):
            run_study(StudyConfig.model_validate(d), Dirs(tmp_path / "stalled").study, address=cluster.address)
    finally:
        ray.shutdown()
        cluster.shutdown()
    assert time.time() - t0 < 120
