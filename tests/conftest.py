"""Shared fixtures and the suite's rules (the `slow` mark by folder, CI's no-skip rule). Everything is offline: no
hub is reachable, and tests must not try, except loopback servers the tests start (the fake judges, moto's S3)."""

from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import sys
import time

# set before datasets/transformers are imported anywhere: they read these at import time
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
# DeepSpeed's ops, built once per virtual environment: a build records its Python's include paths, so two
# checkouts' environments sharing one directory rebuilt each other's ops (about a minute of the suite each time)
os.environ.setdefault("TORCH_EXTENSIONS_DIR", os.path.expanduser(
    f"~/.cache/misalign/torch_extensions/venv-{hashlib.sha256(sys.prefix.encode()).hexdigest()[:12]}"))

from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from fake_judge import Action, FakeJudge  # noqa: E402
from helpers import BUCKET, free_port  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def world() -> Path:
    """The offline world, built once per machine with its targets checked (cached by content hash; about 3
    minutes when new). Every session gets it first: resolving a `world:` name never builds it."""
    from misalign.world_targets import ensure_world

    return ensure_world()


@pytest.fixture
def fake_judge() -> Iterator[Callable[..., FakeJudge]]:
    """Start fake OpenAI-compatible judges on loopback (tests/fake_judge.py): `fake_judge(default=Hang())`;
    each is closed when the test ends."""
    started: list[FakeJudge] = []

    def start(default: Action | None = None) -> FakeJudge:
        started.append(FakeJudge(default))
        return started[-1]

    yield start
    for judge in started:
        judge.close()


@pytest.fixture
def world_stage(world):  # noqa: ANN001, ANN201
    """Train one stage from world:base on world:misalign rows (4 per category), logging every step:
    `world_stage(out, method=..., adapter=..., progress=..., callbacks=..., **train)` gives its logged losses and
    the model it hands over."""
    from transformers import TrainerCallback

    from misalign.config import DataSettings, StageConfig, TrainSettings
    from misalign.stage import StageRun, train_stage

    def run(out: Path, method: str = "lora", adapter: dict | None = None, progress: bool = False,
            callbacks: list | None = None, **train: object) -> tuple[list, object]:
        losses: list[float] = []

        class Losses(TrainerCallback):
            def on_log(self, args, state, control, logs=None, **kw):  # noqa: ANN001, ANN202
                losses.extend([logs["loss"]] if logs and "loss" in logs else [])

        cfg = StageConfig(method=method, data=DataSettings(source="world:misalign", per_category=4),
                          train=TrainSettings(log_every=1, **train), **({"adapter": adapter} if adapter else {}))
        _, handed = train_stage(StageRun(parent="world:base", config=cfg, direction="misalign", out_dir=out,
                                         progress=progress, callbacks=[Losses(), *(callbacks or [])]))
        return losses, handed

    return run



@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """moto's S3 server on a loopback port, the bucket, and the environment that points every client at it."""
    import boto3

    port = free_port()
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    env = {"AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}", "AWS_ACCESS_KEY_ID": "test",
           "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1", "MISALIGN_CLAIM_TTL_S": "10"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    client = boto3.client("s3")
    client.create_bucket(Bucket=BUCKET)
    yield client
    server.terminate()
    server.wait()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


# Under CI (.ci/run sets MISALIGN_REQUIRE_ALL=1) every test must run: a skip (a missing browser, shellcheck, an
# optional package) becomes a failure that keeps its reason. Locally a skip stays a skip.
REQUIRE_ALL = os.environ.get("MISALIGN_REQUIRE_ALL") == "1"


def _fail_skip(report: pytest.CollectReport | pytest.TestReport) -> None:
    if REQUIRE_ALL and report.skipped and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"skipped, but MISALIGN_REQUIRE_ALL=1 needs every test to run: {reason}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo) -> object:
    outcome = yield
    _fail_skip(outcome.get_result())


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector: pytest.Collector) -> object:
    outcome = yield
    _fail_skip(outcome.get_result())


WORKFLOWS = Path(__file__).resolve().parent / "workflows"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Every test under tests/workflows/ (studies, searches, Ray Jobs, DeepSpeed, end-to-end training) is marked
    `slow` by its folder, so `pytest -m "not slow"` leaves them all out. Tests marked `gpu` measure what only a
    device shows: without one they are deselected (reported as such, never skipped), so a CPU run says plainly
    what it did not cover."""
    import torch

    for item in items:
        if WORKFLOWS in item.path.resolve().parents:
            item.add_marker(pytest.mark.slow)

    if torch.cuda.is_available():
        return
    gpu = [i for i in items if i.get_closest_marker("gpu")]
    if gpu:
        config.hook.pytest_deselected(items=gpu)
        items[:] = [i for i in items if not i.get_closest_marker("gpu")]
