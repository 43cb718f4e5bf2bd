"""A study on Ray's own autoscaler: the fake multi-node provider launches and terminates node processes on this
machine as a cloud provider launches instances. The head holds no trial (CPU 0, as in cluster.yaml), so every
trial waits for a worker node the autoscaler adds; the study (on S3, moto on loopback) must widen to the
cluster's largest size, finish every cell, give the nodes back, and agree with a static cluster's run.

Ray's AutoscalingCluster cannot be used: it reads a fake_multi_node/example.yaml the wheel lacks, and its start
and shutdown run `ray stop --force`, which kills every Ray on the machine (other tests', other users'). The head
here runs in a session of its own, on its own ports and temp dir, and is stopped by that session alone."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import yaml

from helpers import BUCKET, cli, free_port, objects
from misalign.storage import Store

REPO = Path(__file__).resolve().parents[2]
MAX_WORKERS = 2
IDLE_MINUTES = 0.1


# ---- the fake autoscaling cluster --------------------------------------------------------------------------

def _session_pids(sid: int) -> list[int]:
    """The processes of session `sid`: the head, its autoscaler and every node the autoscaler launched."""
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except OSError:  # gone meanwhile
            pass
    return pids


@pytest.fixture
def autoscaling_cluster(s3, tmp_path) -> Iterator[tuple[str, dict[str, str], NodeLog]]:
    """A head with no CPUs and one worker type of 1 CPU, min 0, max MAX_WORKERS, idle timeout IDLE_MINUTES, under
    Ray's autoscaler (v1: the v2 monitor needs the missing example.yaml), with a token of its own. Yields its GCS
    address, the environment of its clients, and the log of its worker nodes."""
    port = free_port()
    config = {
        "cluster_name": "misalign-fake", "max_workers": MAX_WORKERS, "upscaling_speed": 1.0,
        "idle_timeout_minutes": IDLE_MINUTES,
        # the provider, as example.yaml would give it, told where this head's GCS listens
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": f"127.0.0.1:{port}"},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "cpu-worker": {"resources": {"CPU": 1, "object_store_memory": 2**27}, "node_config": {},
                           "min_workers": 0, "max_workers": MAX_WORKERS}},
        "head_node_type": "ray.head.default",
        "auth": {"ssh_user": "nobody"}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "initialization_commands": [], "setup_commands": [],
        "head_setup_commands": [], "worker_setup_commands": [], "head_start_ray_commands": [],
        "worker_start_ray_commands": []}
    config_file = tmp_path / "autoscaling.yaml"
    config_file.write_text(yaml.safe_dump(config))
    # short: Ray's Unix sockets live under it, and its ray_current_cluster stays out of /tmp/ray
    temp_dir = tempfile.mkdtemp(prefix="rfa-", dir="/tmp")
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    # a lost node is declared dead in about 2 s (health checks every 0.5 s, 4 misses), and the autoscaler gives
    # up on a node that stopped reporting after 5 s and launches a replacement (Ray's defaults: 15 s and 30 s)
    head_env = {**env, "RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "1", "RAY_health_check_period_ms":
                "500", "RAY_health_check_failure_threshold": "4", "AUTOSCALER_HEARTBEAT_TIMEOUT_S": "5"}
    head = subprocess.Popen(
        [str(Path(sys.executable).parent / "ray"), "start", "--head", "--block", f"--port={port}",
         "--node-ip-address=127.0.0.1", "--num-cpus=0", f"--autoscaling-config={config_file}",
         "--include-dashboard=false", f"--ray-client-server-port={free_port()}", f"--temp-dir={temp_dir}"],
        env=head_env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    address = f"127.0.0.1:{port}"
    nodes = NodeLog(address, env)
    try:
        deadline = time.time() + 120
        while nodes.now() is None:
            assert head.poll() is None and time.time() < deadline, (tmp_path / "head.log").read_text()[-3000:]
            time.sleep(0.5)
        yield address, env, nodes
    finally:
        nodes.stop()
        # the head, its autoscaler and the nodes it launched: this session's processes, and no other's (a graceful
        # `ray start --block` stop took over 30 s here; nothing of this throwaway cluster needs saving)
        for pid in _session_pids(head.pid):
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)


# polls the GCS from a process of its own: the cluster's token stays out of this one (and out of the GCS client it
# would cache for other tests' clusters)
_POLL = """
import sys, time
from ray._raylet import GcsClient
address, t0 = sys.argv[1], float(sys.argv[2])
while True:
    try:
        nodes = GcsClient(address=address).get_all_node_info(timeout=2).values()
        print(time.time() - t0, sum(n.state == 0 and not n.is_head_node for n in nodes), flush=True)  # 0: ALIVE
    except Exception:  # not listening yet
        pass
    time.sleep(0.25)
"""


class NodeLog:
    """Worker nodes alive over time (the head left out), sampled every 0.25 s from the GCS at `address`."""

    def __init__(self, address: str, env: dict[str, str]) -> None:
        self.samples: list[tuple[float, int]] = []
        self.t0 = time.time()
        self._poll = subprocess.Popen([sys.executable, "-c", _POLL, address, str(self.t0)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        for line in self._poll.stdout:
            t, n = line.split()
            self.samples.append((float(t), int(n)))

    def now(self) -> int | None:
        return self.samples[-1][1] if self.samples else None

    def first(self, count: int) -> float | None:
        return next((t for t, n in self.samples if n >= count), None)

    def stop(self) -> None:
        self._poll.terminate()
        self._poll.wait()
        self._thread.join()


# three cells (three misalignments, one defense each), one seed, quick: 4 optimizer steps a stage, 20 items a set
CELLS = 3
QUICK = ["--set", "seeds=[0]", "--set", "attack.methods=[lora]", "--set", "attack.per_category=[1, 2, 3]",
         "--set", "defense.methods=[lora]", "--set", "defense.per_category=[3]", "--set", "attack.train.max_steps=4",
         "--set", "defense.train.max_steps=4", "--set", "eval.limit=20", "--set", "eval.max_new_tokens=16"]
# what a run computes, as opposed to when and where it ran (wall time, memory, which cell trained a shared stage)
DETERMINISTIC = ["cell_id", "round", "phase", "unsafety", "unsafety_se", "refusal", "neither", "over_refusal",
                 "utility", "n_examples", "epochs", "tokens", "flops", "optimizer_steps", "workers"]


@pytest.mark.slow
def test_a_study_widens_an_autoscaling_cluster_and_gives_it_back(world, s3, autoscaling_cluster, tmp_path):
    """`study run --address auto` on a cluster that starts with no workers: the autoscaler goes 0 -> MAX_WORKERS
    as the study's trials queue (not one node for one trial at a time), every cell finishes, the nodes go back
    after the idle timeout, and the results equal a static local cluster's run of the same study row for row."""
    runs = f"s3://{BUCKET}/autoscaled"
    address, cluster_env, nodes = autoscaling_cluster
    env = {**cluster_env, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": address}
    assert nodes.now() == 0, "the cluster starts with no workers"
    driver = subprocess.Popen(cli("study", "run", "configs/study-tiny.yaml", *QUICK, "--storage", runs,
                                   "--address", "auto"), env=env, stdout=subprocess.PIPE,
                              stderr=(tmp_path / "driver.err").open("w"), text=True, cwd=REPO)
    out, asked = [], None  # asked: when the driver hands the grid to Tune (validation and Ray's start-up done)
    for line in driver.stdout:
        out.append(line)
        if asked is None and "at once ->" in line:
            asked = time.time() - nodes.t0
    driver.wait(timeout=600)
    finished = time.time() - nodes.t0
    assert driver.returncode == 0, "".join(out)[-3000:] + (tmp_path / "driver.err").read_text()[-3000:]
    assert f"up to {MAX_WORKERS} at once" in "".join(out), "concurrency from what the cluster can grow to"
    deadline = time.time() + 120
    while nodes.now() and time.time() < deadline:
        time.sleep(0.5)
    first, full = nodes.first(1), nodes.first(MAX_WORKERS)
    assert full is not None, f"never reached full width: {nodes.samples}"
    assert max(n for _, n in nodes.samples) == MAX_WORKERS  # and never wider than the autoscaler's limit
    released = next((t for t, n in nodes.samples if t > finished and n == 0), None)
    assert released is not None, f"the nodes were not given back: {nodes.samples[-5:]}"
    print(f"\n[autoscaling] {CELLS} cells; after the grid went to Tune: first worker node {first - asked:.1f}s, "
          f"full width ({MAX_WORKERS}) {full - asked:.1f}s; study done {finished - asked:.1f}s; all nodes released "
          f"{released - finished:.1f}s after the driver exited (idle timeout {IDLE_MINUTES * 60:.0f}s)")

    scaled = Store(f"{runs}/study-tiny").read_parquet("results.parquet")
    assert scaled.cell_id.nunique() == CELLS and len(scaled) == CELLS * 3
    assert not scaled.duplicated(["cell_id", "round", "phase"]).any()

    static_env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray of its own
    static = subprocess.run(cli("study", "run", "configs/study-tiny.yaml", *QUICK, "--storage",
                                 str(tmp_path / "static")), env=static_env, capture_output=True, text=True,
                            timeout=600, cwd=REPO)
    assert static.returncode == 0, static.stdout[-3000:] + static.stderr[-3000:]
    here = pd.read_parquet(tmp_path / "static" / "study-tiny" / "results.parquet")
    key = ["cell_id", "round", "phase"]
    pd.testing.assert_frame_equal(scaled[DETERMINISTIC].sort_values(key).reset_index(drop=True),
                                  here[DETERMINISTIC].sort_values(key).reset_index(drop=True))


# ---- spot preemption ----------------------------------------------------------------------------------------

def _node_processes(node_id: str) -> list[tuple[int, str]]:
    """(pid, command line) of every process of one fake node: the fake provider starts each node's processes
    with RAY_OVERRIDE_NODE_ID_FOR_TESTING set to the node's id, and its workers inherit it."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            environ = Path(f"/proc/{entry}/environ").read_bytes().split(b"\0")
            cmd = Path(f"/proc/{entry}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if f"RAY_OVERRIDE_NODE_ID_FOR_TESTING={node_id}".encode() in environ:
            found.append((int(entry), cmd))
    return found


def _reclaim(node_id: str) -> int:
    """What a cloud does to a reclaimed spot instance once its notice ran out: every process of it, SIGKILL."""
    procs = _node_processes(node_id)
    for pid, _ in procs:
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)
    return len(procs)


def _attempts(store: Store, cell_id: str) -> list[dict]:
    return store.read_json(f"attempts/{cell_id}.json") if store.exists(f"attempts/{cell_id}.json") else []


def _checkpoint_stages(s3, prefix: str) -> list[str]:
    """The keys of the stages with a whole in-stage checkpoint on the store."""
    return sorted({k.split("/")[-4] for k in objects(s3, prefix) if k.endswith("/trainer_state.json")})


# one cell: a LoRA attack then a LoRA defense, 30 optimizer steps each with a checkpoint every 5, and no failure
# retries at all: the two preemptions must not use any
SPOT = ["--set", "seeds=[0]", "--set", "attack.methods=[lora]", "--set", "attack.per_category=[2]",
        "--set", "defense.methods=[lora]", "--set", "defense.per_category=[3]", "--set", "attack.train.max_steps=30",
        "--set", "defense.train.max_steps=30", "--set", "checkpoint_every=5", "--set", "max_failures=0",
        "--set", "eval.limit=20", "--set", "eval.max_new_tokens=16"]


@pytest.mark.slow
def test_a_study_survives_two_spot_reclaims_one_noticed(world, s3, autoscaling_cluster, tmp_path):
    """Mid-attack, the trial's node is reclaimed without notice (SIGKILL of all its processes); mid-defense, its
    new node gets a preemption notice (SIGTERM to its Ray workers) and is reclaimed once the trial saved and
    stopped. Each time the autoscaler brings up a replacement, the stage resumes on it from the store's
    checkpoint, and the study ends with one row per round and phase, with max_failures=0: preemptions are
    counted apart, in the attempt log and in `study status`."""
    runs = f"s3://{BUCKET}/spot"
    address, cluster_env, nodes = autoscaling_cluster
    env = {**cluster_env, "PYTHONUNBUFFERED": "1", "RAY_ADDRESS": address}
    driver = subprocess.Popen(cli("study", "run", "configs/study-tiny.yaml", *SPOT, "--storage", runs,
                                   "--address", "auto"), env=env, stdout=subprocess.PIPE,
                              stderr=(tmp_path / "driver.err").open("w"), text=True, cwd=REPO)
    out: list[str] = []
    reader = threading.Thread(target=lambda: out.extend(driver.stdout), daemon=True)  # type: ignore[arg-type]
    reader.start()
    store = Store(f"{runs}/study-tiny")
    prefix = "spot/study-tiny/stages/"
    try:
        deadline = time.time() + 300

        def wait_for(what: str, ready: Any) -> Any:
            while not (value := ready()):
                assert driver.poll() is None and time.time() < deadline, (
                    f"waiting for {what}: " + "".join(out)[-3000:] + (tmp_path / "driver.err").read_text()[-3000:])
                time.sleep(0.2)
            return value

        # 1. mid-attack, a reclaim without notice
        (attack,) = wait_for("an attack checkpoint", lambda: _checkpoint_stages(s3, prefix))
        cell_id = store.list("attempts", suffix=".json")[0][:-5]
        first = _attempts(store, cell_id)[-1]
        killed = _reclaim(first["node"])
        assert killed, f"no process of node {first['node']}"
        t_kill = time.time() - nodes.t0

        # 2. mid-defense, on the replacement node: the notice, then the reclaim once the trial has stopped
        defense = wait_for("a defense checkpoint", lambda: [k for k in _checkpoint_stages(s3, prefix) if k != attack])
        second = _attempts(store, cell_id)[-1]
        assert second["node"] != first["node"] and second["outcome"] == "running"
        procs = _node_processes(second["node"])
        # the trial's process (Tune's function trainable); the node's agents and raylet are left to the reclaim
        workers = [pid for pid, cmd in procs if cmd.startswith("ray::ImplicitFunc")]
        assert workers, [cmd for _, cmd in procs]
        print(f"\n[spot] notice (SIGTERM) to {[cmd[:60] for pid, cmd in procs if pid in workers]}")
        for pid in workers:
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)
        noticed = wait_for("the noticed attempt to end",
                           lambda: [a for a in _attempts(store, cell_id) if a["outcome"] == "preempted"])
        _reclaim(second["node"])
        driver.wait(timeout=300)
    finally:
        driver.kill()
        reader.join(timeout=10)
    log = "".join(out)
    assert driver.returncode == 0, log[-3000:] + (tmp_path / "driver.err").read_text()[-3000:]

    results = store.read_parquet("results.parquet")
    assert len(results) == 3 and not results.duplicated(["cell_id", "round", "phase"]).any()
    history = _attempts(store, cell_id)
    assert [a["outcome"] for a in history] == ["node lost", "preempted", "done"], history
    assert len({a["node"] for a in history}) == 3, "each retry ran on a replacement node"
    assert max(n for _, n in nodes.samples) <= MAX_WORKERS

    # the stages resumed from their checkpoints on the store, on other nodes
    attack_ledger = Store(f"{runs}/study-tiny/stages/{attack}").read_json("ledger.json")
    defense_ledger = Store(f"{runs}/study-tiny/stages/{defense[0]}").read_json("ledger.json")
    assert attack_ledger["extra"]["resumed_from_step"] >= 5 and attack_ledger["optimizer_steps"] == 30
    saved_at = int(noticed[0]["error"].split("checkpoint at step ")[1].split()[0])
    assert defense_ledger["extra"]["resumed_from_step"] == saved_at and defense_ledger["optimizer_steps"] == 30

    # counted apart from failures, and shown
    status = subprocess.run(cli("study", "status", f"{runs}/study-tiny", "--json"), env=env, capture_output=True,
                            text=True, timeout=120, cwd=REPO)
    summary = yaml.safe_load(status.stdout)["preemptions"]
    assert summary["preemptions"] == 2 and summary["noticed"] == 1 and summary["nodes_lost"] == 1
    assert summary["failures"] == 0 and summary["lost_device_s"] > 0
    assert "preemptions survived: 2" in log
    step_s = {k: led["wall_s"] / led["optimizer_steps"] for k, led in (("attack", attack_ledger),
                                                                       ("defense", defense_ledger))}
    # lost_s runs to when Ray declared the node dead: an upper bound (it includes the ~2 s the health checks
    # take here to notice a killed node)
    lost_steps = (history[0]["lost_s"] / step_s["attack"], history[1]["lost_s"] / step_s["defense"])
    replaced = [t for t, n in nodes.samples if t > t_kill]
    print(f"\n[spot] 1 cell, 3 rows; preemptions survived 2 (attempt nodes ...{', ...'.join(a['node'][-5:] for a in history)}); "
          f"without notice: lost {history[0]['lost_s']:.1f}s ~ {lost_steps[0]:.1f} steps (resumed from step "
          f"{attack_ledger['extra']['resumed_from_step']}); with notice: lost {history[1]['lost_s']:.2f}s ~ "
          f"{lost_steps[1]:.2f} steps (saved at step {saved_at}); {len(replaced)} node samples after the kill")
    assert lost_steps[1] < 1, "a noticed preemption loses under one step"
