"""Studies and searches on object storage: an S3-compatible server (moto's standalone server, a real HTTP server
speaking the S3 protocol) on loopback, a two-node local Ray cluster, a driver SIGKILLed mid-study and resumed,
a search reusing the study's stages, status, results and the report, all through s3:// URLs. And the lease that
replaces file locks on object stores: a killed trainer's claim is taken over."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from helpers import BUCKET, cli, objects
from misalign.storage import Store

pytestmark = pytest.mark.slow

# the default study, narrowed to one seed and 2 attacks x 2 defenses (a full fine-tuning stage, DPO, shared
# misalignments)
# and made quick: 4 optimizer steps a stage, 20 items a set
FAST = ["--set", "seeds=[0]", "--set", "attack.methods=[lora, full]", "--set", "attack.per_category=[3]",
        "--set", "defense.methods=[lora, dpo]", "--set", "defense.per_category=[3]", "--set", "defense.per_method={}",
        "--set", "attack.train.max_steps=4",
        "--set", "defense.train.max_steps=4", "--set", "eval.limit=20", "--set", "eval.max_new_tokens=16"]


def test_store_round_trips_files_and_directories(s3, tmp_path):
    store = Store(f"s3://{BUCKET}/unit")
    store.write_json("a/b.json", {"x": 1})
    assert store.exists("a/b.json") and store.read_json("a/b.json") == {"x": 1} and store.list("a") == ["b.json"]
    assert store.subdirs() == ["a"] and not store.exists("nope")
    src = tmp_path / "src"
    (src / "adapter").mkdir(parents=True)
    (src / "adapter" / "w.safetensors").write_bytes(b"w" * 10)
    (src / "eval-1").mkdir()
    (src / "eval-1" / "eval.json").write_text("{}")
    (src / "ledger.json").write_text("{}")
    store.upload(src, "stage", last="ledger.json", skip=("eval-",))
    assert sorted(objects(s3, "unit/stage/")) == ["unit/stage/adapter/w.safetensors", "unit/stage/ledger.json"]
    store.download("stage", tmp_path / "back")
    assert (tmp_path / "back" / "adapter" / "w.safetensors").read_bytes() == b"w" * 10


# One LoRA stage through the study's lineage cache on the store, with a checkpoint every 2 of 8 steps; each step
# is slowed so the parent can kill it mid-stage. It prints the ledger when done.
_STAGE = """
import json, sys, time
from transformers import TrainerCallback
from misalign.config import DataSettings, StageConfig, TrainSettings
from misalign.lineage import LineageCache
from misalign.stage import StageRun, train_stage
from misalign.storage import Store
url, key, checkpoints, pause = sys.argv[1], sys.argv[2], sys.argv[3] == "1", float(sys.argv[4])
class Slow(TrainerCallback):
    def on_step_end(self, *a, **k):
        time.sleep(pause)
cache = LineageCache(Store(url))
d = cache.stage_dir(key)
cfg = StageConfig(method="lora", data=DataSettings(source="world:misalign", per_category=2),
                  train=TrainSettings(max_steps=8, batch_size=2))
ledger, _ = train_stage(StageRun(parent="world:base", config=cfg, direction="misalign", out_dir=d, progress=False,
                                 checkpoint_every=2 if checkpoints else None,
                                 checkpoint_sync=cache.checkpoints(d) if checkpoints else None, callbacks=[Slow()]))
cache.publish(d, "ledger.json")
print("LEDGER " + json.dumps(ledger.to_dict()))
"""


def _stage(url: str, key: str, cache: Path, checkpoints: bool, pause: float) -> subprocess.Popen:
    env = {**os.environ, "MISALIGN_CACHE": str(cache), "OMP_NUM_THREADS": "1"}  # the cache: this "node"'s disk
    return subprocess.Popen([sys.executable, "-c", _STAGE, url, key, "1" if checkpoints else "0", str(pause)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _ledger(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    return json.loads(out.split("LEDGER ", 1)[1])


def test_a_stage_killed_on_one_node_resumes_on_another_from_the_store(world, s3, tmp_path):
    """Object storage: in-stage checkpoints go to the store, so a stage whose node is lost resumes on another
    node (another local cache) from its last whole checkpoint, and its ledger still counts every step."""
    url = f"s3://{BUCKET}/ckpt"
    from misalign.runtime import cache_root

    node_a, node_b = tmp_path / "node-a", tmp_path / "node-b"
    for node in (node_a, node_b):  # each "node" its own cache; both read the one world already built
        node.mkdir()
        (node / "world").symlink_to(cache_root() / "world")
    first = _stage(url, "stage", node_a, checkpoints=True, pause=1.0)
    deadline = time.time() + 300
    while not any(k.endswith("trainer_state.json") for k in objects(s3, "ckpt/stage/trainer/")):
        assert first.poll() is None and time.time() < deadline, "no checkpoint reached the store"
        time.sleep(0.2)
    first.kill()
    first.wait()
    saved = sorted({k.split("/")[3] for k in objects(s3, "ckpt/stage/trainer/")})
    assert len(saved) == 1 and saved[0].startswith("checkpoint-")  # older checkpoints are dropped
    step = int(saved[0].split("-")[1])
    assert step < 8 and not objects(s3, "ckpt/stage/ledger.json")  # killed mid-stage

    resumed = _ledger(_stage(url, "stage", node_b, checkpoints=True, pause=0.0))
    assert resumed["extra"]["resumed_from_step"] >= step and resumed["optimizer_steps"] == 8
    whole = _ledger(_stage(url, "reference", node_a, checkpoints=False, pause=0.0))  # the same stage, unbroken
    for key in ("tokens", "flops"):
        assert resumed[key] == whole[key], key  # the steps before the checkpoint are counted too
    before = resumed["extra"]["seconds_before_resume"]  # and the device time they took (1 s a step, slowed)
    assert before >= step and resumed["device_s"] == pytest.approx(resumed["wall_s"] + before, abs=0.01)
    assert not objects(s3, "ckpt/stage/trainer/")  # a finished stage's checkpoints are dropped from the store
    assert objects(s3, "ckpt/stage/ledger.json") and objects(s3, "ckpt/stage/adapter/")


def test_a_killed_trainers_claim_is_taken_over(s3):
    """A trainer holding a stage's lease is killed: its lease stops being renewed and, after its time to live,
    another trial takes the stage over. While the holder lives, nobody else gets it."""
    import ray

    from misalign.claims import actor_name, leased, start_leases

    url = f"s3://{BUCKET}/claims/stages"
    ray.init(address="local", num_cpus=2, include_dashboard=False,
             runtime_env={"env_vars": {"MISALIGN_CLAIM_TTL_S": "2"}})
    try:
        os.environ["MISALIGN_CLAIM_TTL_S"] = "2"
        leases = start_leases(url)

        @ray.remote(num_cpus=1)
        class Trainer:
            def hold(self, url: str, key: str) -> None:
                with leased(url, key):
                    time.sleep(3600)

        holder = Trainer.remote()
        holder.hold.remote(url, "stage-key")
        deadline = time.time() + 60
        while ray.get(leases.holder.remote("stage-key")) is None and time.time() < deadline:
            time.sleep(0.2)
        assert ray.get(leases.holder.remote("stage-key")) is not None, "the trainer took the lease"
        time.sleep(3)  # past one time to live: the living holder renewed it
        assert not ray.get(leases.acquire.remote("stage-key", "someone-else", 2.0))
        ray.kill(holder)
        t0 = time.time()
        with leased(url, "stage-key", poll_s=0.1):
            waited = time.time() - t0
        assert waited < 10, f"the dead trainer's claim was not taken over ({waited:.1f}s)"
        assert ray.get(leases.holder.remote("stage-key")) is None, "released after use"
        assert actor_name(url) != actor_name(f"s3://{BUCKET}/other/stages")
    finally:
        os.environ["MISALIGN_CLAIM_TTL_S"] = "10"
        ray.shutdown()


_DRIVER = """
import sys, time
import ray
from misalign.claims import start_leases
ray.init(address=sys.argv[1])
leases = start_leases(sys.argv[2])
# a lease as a trainer of this job holds it while it trains; held here, by the driver itself, nothing releases it
# when the driver dies (a trainer actor that Ray tears down gracefully after its driver died releases its own,
# which is right, but would race the check below)
assert ray.get(leases.acquire.remote("stage-key", "trainer-of-the-dead-driver", 600))
print("HELD", flush=True)
time.sleep(3600)
"""


def test_the_lease_table_outlives_a_killed_driver(s3):
    """A driver SIGKILLed mid-study leaves its trainers' leases in place (the lease actor is detached), so a
    restarted driver's trials wait for them instead of training a stage beside a trainer still running. Were the
    actor not detached, it would die with the driver and the restarted driver would start an empty one."""
    import ray

    from misalign.claims import start_leases

    url = f"s3://{BUCKET}/claims-restart/stages"
    ray.init(address="local", num_cpus=2, include_dashboard=False)
    try:
        driver = subprocess.Popen([sys.executable, "-c", _DRIVER, ray.get_runtime_context().gcs_address, url],
                                  stdout=subprocess.PIPE, text=True, start_new_session=True)
        assert driver.stdout.readline().strip() == "HELD"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        leases = start_leases(url)  # the restarted driver
        assert ray.get(leases.holder.remote("stage-key")) == "trainer-of-the-dead-driver", (
            "the dead driver's trainer's lease survived")
    finally:
        ray.shutdown()


def test_study_search_status_results_and_report_on_s3(world, s3, tmp_path):
    from ray.cluster_utils import Cluster

    runs = f"s3://{BUCKET}/runs"
    study = f"{runs}/study-tiny"
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    run = cli("study", "run", "configs/study-tiny.yaml", *FAST, "--storage", runs, "--address", cluster.address)
    try:
        driver = subprocess.Popen(run, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        deadline = time.time() + 400
        while time.time() < deadline and not objects(s3, "runs/study-tiny/cells/") and driver.poll() is None:
            time.sleep(0.5)
        assert driver.poll() is None and objects(s3, "runs/study-tiny/cells/"), "mid-study, a cell finished"
        os.killpg(driver.pid, signal.SIGKILL)
        driver.wait()
        finished = objects(s3, "runs/study-tiny/cells/")
        assert len(finished) < 4

        rerun = subprocess.run(run, env=env, capture_output=True, text=True, timeout=900)
        assert rerun.returncode == 0, rerun.stdout[-3000:] + rerun.stderr[-3000:]
        assert f"({len(finished)} done before this run)" in rerun.stdout
        after = objects(s3, "runs/study-tiny/cells/")
        assert len(after) == 4 and all(after[k] == v for k, v in finished.items()), "a finished cell was redone"

        results = Store(study).read_parquet("results.parquet")
        assert len(results) == 4 * 3 and not results.duplicated(["cell_id", "round", "phase"]).any()
        stages = objects(s3, "runs/study-tiny/stages/")
        ledgers = [k for k in stages if k.endswith("/ledger.json")]
        assert len(ledgers) == 2 + 4, "each unique stage stored once (2 attacks, 4 defenses)"
        for ledger in ledgers:
            stage = ledger.removesuffix("ledger.json")
            files = {k.removeprefix(stage) for k in stages if k.startswith(stage) and "/eval-" not in k}
            if f"{stage}adapter/adapter_model.safetensors" in stages:  # an adapter stage: no model copy
                assert not any(f.startswith("model/") for f in files), files
            else:
                assert "model/model.safetensors" in files, files  # the full stage's own weights
        assert any(k.endswith("/eval.json") for k in stages) and any(k.endswith("generations.parquet") for k in stages)
        for name in ("study.yaml", "inputs.json", "environment.json", "status.json"):
            assert Store(study).exists(name), name
        assert objects(s3, "runs/study-tiny/tune/"), "Tune's experiment lives in the bucket too"

        status = subprocess.run(cli("study", "status", study, "--json"), env=env, capture_output=True, text=True)
        assert status.returncode == 0 and '"done": 4' in status.stdout, status.stderr
        table = tmp_path / "results.csv"
        assert subprocess.run(cli("study", "results", study, "--csv", str(table)), env=env).returncode == 0
        assert len(pd.read_csv(table)) == 12

        search = subprocess.run(cli(
            "search", "attack", "configs/search-attack-tiny.yaml", "--storage", runs, "--stages", f"{study}/stages",
            "--address", cluster.address, "--set", "trials=2", "--set", "attack.methods=[lora]",
            "--set", "attack.per_category=[3, 5]", "--set", "attack.train.max_steps=4", "--set", "eval.limit=20",
            "--set", "eval.max_new_tokens=16", "--set", "startup_trials=1", "--set", "max_concurrent=1",
            "--set", "start_points=[{per_category: 3}]"), env=env, capture_output=True, text=True, timeout=600)
        assert search.returncode == 0, search.stdout[-3000:] + search.stderr[-3000:]
        search_dir = Store(f"{runs}/search-attack-tiny")
        answer = search_dir.read_json("answer.json")
        assert answer["trials"] == 2 and search_dir.exists("optuna.db")
        points = [search_dir.read_parquet(f"points/{name}") for name in search_dir.list("points")]
        (three,) = [p for p in points if (p.per_category == 3).all()]
        assert three.loc[three.phase == "misalign", "reused"].all(), "the search reused the study's misalignment"

        report = subprocess.run(cli("report", study, "--search", search_dir.url, "--out", str(tmp_path / "report")),
                                env=env, capture_output=True, text=True, timeout=600)
        assert report.returncode == 0, report.stderr[-3000:]
        assert "study-tiny" in (tmp_path / "report" / "report.html").read_text()
    finally:
        cluster.shutdown()


# ---- models on object storage -------------------------------------------------------------------------------

@pytest.fixture
def node(world, tmp_path, monkeypatch) -> Path:
    """This test's node cache (model mirrors, digests), reading the one world already built."""
    from misalign.runtime import cache_root

    cache = tmp_path / "node"
    cache.mkdir()
    (cache / "world").symlink_to(cache_root() / "world")
    monkeypatch.setenv("MISALIGN_CACHE", str(cache))
    return cache


def _model_on_s3(world: Path, name: str, drop: tuple[str, ...] = (), add: dict[str, bytes] | None = None) -> str:
    """The world's base model uploaded under models/NAME (less the files in `drop`, plus `add`): its URL."""
    models = Store(f"s3://{BUCKET}/models")
    models.upload(world / "base", name, exclude=drop)
    for rel, data in (add or {}).items():
        models.write_bytes(f"{name}/{rel}", data)
    return f"{models.url}/{name}"


def _files(directory: Path) -> dict[str, bytes]:
    return {f.relative_to(directory).as_posix(): f.read_bytes() for f in directory.rglob("*") if f.is_file()}


def test_a_model_on_s3_is_keyed_by_contents_like_its_local_copy(s3, world, node, capsys):
    """The same files in a bucket and in a local directory are the same model (a stage trained from one is
    reused for the other); the driver keys the bucket's copy by streaming it once, without mirroring it."""
    from misalign.lineage import model_identity
    from misalign.modelref import resolve_model_path

    url = _model_on_s3(world, "same", add={".gitattributes": b"*.safetensors lfs", ".cache/part": b"x"})
    local = model_identity(str(world / "base"))
    assert model_identity(url) == local, "dot-files are left out, as in a local directory"
    assert "once to key the model" in capsys.readouterr().err
    assert not (node / "models").exists(), "keying the model downloaded nothing to keep"
    assert model_identity(url) == local and not capsys.readouterr().err, "remembered: not streamed again"
    resolve_model_path(url)
    assert model_identity(url) == local, "from the node's mirror"


def test_a_model_on_s3_is_mirrored_once_per_node(s3, world, node, capsys):
    from concurrent.futures import ThreadPoolExecutor

    from misalign.lineage import model_identity
    from misalign.modelref import resolve_model_path

    url = _model_on_s3(world, "mirrored")
    with ThreadPoolExecutor(4) as pool:  # concurrent resolvers: one downloads, the others wait for it
        paths = set(pool.map(lambda _: resolve_model_path(url), range(4)))
    assert len(paths) == 1
    path = Path(paths.pop())
    assert _files(path) == _files(world / "base")
    assert capsys.readouterr().err.count(f"[models] {url} -> node cache (6 files, ") == 1
    mtimes = {f: f.stat().st_mtime_ns for f in path.rglob("*")}
    assert resolve_model_path(url) == str(path) and not capsys.readouterr().err, "cached: nothing printed"
    assert {f: f.stat().st_mtime_ns for f in path.rglob("*")} == mtimes, "and nothing downloaded"

    before = model_identity(url)
    config = json.loads((world / "base" / "config.json").read_text())
    Store(url).write_json("config.json", {**config, "misalign_test": "changed"})
    changed = Path(resolve_model_path(url))
    assert changed != path and json.loads((changed / "config.json").read_text())["misalign_test"] == "changed"
    assert "-> node cache" in capsys.readouterr().err and _files(path) == _files(world / "base"), "a fresh mirror"
    assert model_identity(url) != before


def test_the_stage_command_trains_from_a_model_on_s3(s3, world, node, tmp_path):
    """`misalign stage --model s3://...` end to end, in its own process: the stage trains from the node's
    mirror and records the root by its URL and by its contents (those of the local copy)."""
    from misalign.lineage import model_identity

    url = _model_on_s3(world, "cli")
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("method: lora\ndata: {source: 'world:misalign', per_category: 1}\n"
                   "train: {max_steps: 2, batch_size: 2}\n")
    out = tmp_path / "stage"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = subprocess.run(cli("stage", str(cfg), "--model", url, "--direction", "misalign", "--out", str(out)),
                         env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert run.stderr.count("-> node cache") == 1
    meta = json.loads((out / "stage.json").read_text())
    assert meta["root"] == url and meta["root_identity"] == model_identity(str(world / "base"))
    assert json.loads((out / "ledger.json").read_text())["optimizer_steps"] == 2


@pytest.mark.parametrize(("name", "drop", "add", "message"), [
    ("empty", None, None, "no objects under this prefix"),
    ("no-config", ("config.json",), None, "no config.json under this prefix"),
    ("pickle", ("model.safetensors",), {"pytorch_model.bin": b"pickle"}, "has no .safetensors weights"),
    ("bad-config", ("config.json",), {"config.json": b'{"model_type": "no-such-architecture"}'},
     "cannot load model"),
])
def test_bad_models_on_s3_fail_before_anything_is_written(s3, world, node, tmp_path, capsys, name, drop, add,
                                                          message):
    """Checked from the model's small files: exit 2 naming the field and the URL, no output, no weights."""
    from misalign.cli import main

    url = f"s3://{BUCKET}/models/{name}" if drop is None else _model_on_s3(world, name, drop, add)
    out = tmp_path / "out"
    code = main(["eval", "--model", url, "--judge", "keyword", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and err.startswith("misalign: error: --model: ") and url in err and message in err, err
    assert "Traceback" not in err and not out.exists()
    assert not list(node.glob("models/**/*.safetensors")) and not list(node.glob("models/**/*.bin")), "no weights"


@pytest.mark.parametrize("url", [f"s3://AKEXAMPLE:TOPSECRET@{BUCKET}/models/base",
                                 f"s3://{BUCKET}/models/base?secret_key=TOPSECRET&region=us-east-1"])
def test_credentials_in_a_url_are_refused_and_never_printed(s3, tmp_path, capsys, url):
    """A URL is kept where it is used (stage.json's root, results, logs): secrets go through the environment."""
    from misalign.cli import main

    code = main(["eval", "--model", url, "--judge", "keyword", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    assert code == 2 and "credentials in a URL" in err and "AWS_SECRET_ACCESS_KEY" in err, err
    assert "TOPSECRET" not in err and not (tmp_path / "out").exists()
    code = main(["study", "run", "configs/study-tiny.yaml", "--storage", url.replace("/models/base", "/runs")])
    err = capsys.readouterr().err
    assert code == 2 and "credentials in a URL" in err and "TOPSECRET" not in err, err


def test_an_object_rewritten_during_the_download_never_enters_the_mirror(s3, world, node, monkeypatch):
    """A node's mirror is keyed by the listing it was downloaded for: a file rewritten between the listing and
    the download fails the download (the trial's retry lists again) instead of filing new bytes under the old
    key."""
    import misalign.modelref as modelref

    url = _model_on_s3(world, "moving")
    listing = modelref.model_files(url)
    config = json.loads((world / "base" / "config.json").read_text())
    Store(url).write_json("config.json", {**config, "misalign_test": "rewritten after the listing"})
    monkeypatch.setattr(modelref, "model_files", lambda _: listing)  # the listing taken before the rewrite
    with pytest.raises(RuntimeError, match="config.json changed while this node downloaded the model"):
        modelref.resolve_model_path(url)
    assert not modelref.url_mirror(url, listing).exists()
    assert not list(modelref.url_mirror(url, listing).parent.glob(".*.*")), "no half-downloaded directory is left"


def test_the_cache_lists_mirrors_and_prunes_the_unused_ones(s3, world, node, capsys):
    """`misalign cache` says what the node keeps and for which URL; `prune --older-than DAYS` removes the model
    mirrors and store copies no run used for that long, and a run that needs one again downloads it again."""
    from misalign.cache import record
    from misalign.cli import main
    from misalign.lineage import LineageCache
    from misalign.modelref import resolve_model_path

    old_url, new_url = _model_on_s3(world, "old"), _model_on_s3(world, "new")
    old, new = Path(resolve_model_path(old_url)), Path(resolve_model_path(new_url))
    stages = LineageCache(Store(f"s3://{BUCKET}/cached-study"))  # a study's stages on the bucket
    stages.stage_dir("a-stage").mkdir(parents=True)  # this node's copy of one
    capsys.readouterr()
    assert main(["cache", "--json"]) == 0
    listed = {e["source"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    assert listed[old_url]["kind"] == "model mirror" and listed[old_url]["path"] == f"models/{old.name}"
    assert listed[old_url]["bytes"] == sum(f.stat().st_size for f in (world / "base").iterdir() if f.is_file())
    assert listed[f"s3://{BUCKET}/cached-study"]["kind"] == "object-store copy"

    week_ago = time.time() - 8 * 86400
    for unused in (old, stages.root):
        os.utime(record(unused), (week_ago, week_ago))
    assert main(["cache", "prune", "--older-than", "7", "--dry-run"]) == 0
    assert "would remove 2 entries" in capsys.readouterr().out and old.exists() and stages.root.exists()
    assert main(["cache", "prune", "--older-than", "7"]) == 0
    out = capsys.readouterr().out
    assert f"removed {old} (" in out and "removed 2 entries unused for 7 days" in out
    assert not old.exists() and not record(old).exists() and new.exists() and not stages.root.exists()
    assert not list(old.parent.glob(f".{old.name}*")), "nothing half-removed is left"
    assert resolve_model_path(old_url) == str(old) and _files(old) == _files(world / "base"), "downloaded again"
    assert main(["cache", "prune", "--older-than", "7"]) == 0 and new.exists() and old.exists(), "both in use"
    assert main(["cache", "prune"]) == 2 and "--older-than DAYS" in capsys.readouterr().err
