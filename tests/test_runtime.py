"""misalign.runtime: atomic writes that leave nothing half-written, the lock and directory swap, the CPUs a
process holds, single-process collectives, seeds, and the hub check that goes offline at once."""

from __future__ import annotations

import io
import json
import os
import random
import threading
import time
from pathlib import Path

import pandas as pd
import pytest

from misalign import runtime


class Breaks(io.RawIOBase):
    """A stream that gives `good` bytes, then fails as a dropped connection would."""

    def __init__(self, good: bytes) -> None:
        self.good = good
        self.given = False

    def readable(self) -> bool:
        return True

    def readinto(self, b: bytearray) -> int:  # type: ignore[override]
        if self.given:
            raise ConnectionError("connection dropped")
        self.given = True
        b[:len(self.good)] = self.good
        return len(self.good)


def test_atomic_writes_write_whole_files_and_create_parents(tmp_path: Path) -> None:
    runtime.write_bytes_atomic(tmp_path / "a" / "b" / "x.bin", b"\x00\x01")
    assert (tmp_path / "a" / "b" / "x.bin").read_bytes() == b"\x00\x01"
    runtime.write_json_atomic(tmp_path / "x.json", {"k": [1, 2], "p": Path("/p")})
    assert runtime.read_json(tmp_path / "x.json") == {"k": [1, 2], "p": "/p"}  # default=str
    frame = pd.DataFrame({"a": [1, 2], "b": ["x", "y"]})
    runtime.write_parquet_atomic(tmp_path / "t.parquet", frame)
    assert pd.read_parquet(tmp_path / "t.parquet").equals(frame)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "t.parquet", "x.json"]  # no temporary left


def test_a_write_that_fails_midway_leaves_the_old_file_and_no_temporary(tmp_path: Path) -> None:
    target = tmp_path / "weights.bin"
    target.write_bytes(b"old contents")
    with pytest.raises(ConnectionError):
        runtime.write_stream_atomic(target, io.BufferedReader(Breaks(b"new half")))
    assert target.read_bytes() == b"old contents"
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]
    with pytest.raises(ConnectionError):
        runtime.write_stream_atomic(tmp_path / "fresh.bin", io.BufferedReader(Breaks(b"half")))
    assert [p.name for p in tmp_path.iterdir()] == ["weights.bin"]


def test_replace_dir_swaps_a_finished_directory_into_place(tmp_path: Path) -> None:
    final, tmp = tmp_path / "final", tmp_path / "tmp"
    final.mkdir()
    (final / "stale.txt").write_text("stale")
    tmp.mkdir()
    (tmp / "new.txt").write_text("new")
    runtime.replace_dir(tmp, final)
    assert not tmp.exists() and [p.name for p in final.iterdir()] == ["new.txt"]
    other = tmp_path / "other"
    other.mkdir()
    runtime.replace_dir(other, tmp_path / "absent")  # nothing there before: just moved
    assert (tmp_path / "absent").is_dir() and not other.exists()


def test_file_lock_excludes_a_second_holder(tmp_path: Path) -> None:
    lock = tmp_path / "locks" / "x.lock"
    order: list[str] = []

    def second() -> None:
        with runtime.file_lock(lock):
            order.append("second")

    with runtime.file_lock(lock):
        thread = threading.Thread(target=second)
        thread.start()
        time.sleep(0.3)
        order.append("first released")
    thread.join(10)
    assert order == ["first released", "second"]


def test_cpus_held_is_what_ray_granted_else_the_affinity_mask(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MISALIGN_CPUS", "3.0")
    assert runtime.cpus_held() == 3
    monkeypatch.setenv("MISALIGN_CPUS", "0.5")
    assert runtime.cpus_held() == 1  # a fractional grant still holds one
    monkeypatch.delenv("MISALIGN_CPUS")
    assert runtime.cpus_held() == len(os.sched_getaffinity(0))


def test_match_threads_shares_the_cpus_among_local_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        monkeypatch.setenv("MISALIGN_CPUS", "4")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
        assert runtime.match_threads() == 4 == torch.get_num_threads()  # Ray grants each worker its own
        monkeypatch.delenv("MISALIGN_CPUS")
        monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 * len(os.sched_getaffinity(0))))
        assert runtime.match_threads() == 1  # never below one
    finally:
        torch.set_num_threads(before)


def test_ranks_come_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    for var in ("WORLD_SIZE", "RANK", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    assert (runtime.world_size(), runtime.rank(), runtime.local_rank()) == (1, 0, 0)
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert (runtime.world_size(), runtime.rank(), runtime.local_rank()) == (4, 3, 1)


def test_collectives_in_a_single_process_are_the_value_itself() -> None:
    assert not runtime.distributed()
    value = {"a": 1}
    assert runtime.broadcast_from_rank0(value) is value
    assert runtime.gather_over_ranks(value) == [value]
    assert runtime.on_any_rank(True) is True and runtime.on_any_rank(False) is False
    runtime.barrier()  # returns at once


def test_seed_everything_repeats_every_generator() -> None:
    import numpy as np
    import torch

    def draw() -> tuple[float, float, float]:
        return random.random(), float(np.random.rand()), float(torch.rand(1))

    runtime.seed_everything(7)
    first = draw()
    runtime.seed_everything(7)
    assert draw() == first
    runtime.seed_everything(2**32 + 7)  # numpy takes seeds below 2**32: reduced, not refused
    assert draw()[1] == first[1]


def test_package_versions_name_what_a_stage_depends_on() -> None:
    from importlib.metadata import version

    versions = runtime.package_versions()
    assert versions["torch"] == version("torch") and versions["transformers"] == version("transformers")
    assert set(versions) <= {"misalign", "torch", "transformers", "trl", "peft", "accelerate", "deepspeed",
                             "bitsandbytes", "liger-kernel", "datasets", "tokenizers"}


def test_cache_root_follows_misalign_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MISALIGN_CACHE", str(tmp_path))
    assert runtime.cache_root() == tmp_path
    monkeypatch.delenv("MISALIGN_CACHE")
    assert runtime.cache_root() == Path.home() / ".cache" / "misalign"


def test_an_offline_setting_is_left_alone(monkeypatch: pytest.MonkeyPatch) -> None:
    env = {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}  # nothing listens on port 9
    monkeypatch.setattr(os, "environ", env)
    runtime.offline_without_hub(timeout_s=0.5)
    assert env == {"HF_HUB_OFFLINE": "0", "HF_ENDPOINT": "http://127.0.0.1:9"}


def test_an_unreachable_hub_sets_offline_and_says_why(monkeypatch: pytest.MonkeyPatch,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    env = {"HF_ENDPOINT": "http://127.0.0.1:9"}
    monkeypatch.setattr(os, "environ", env)
    runtime.offline_without_hub(timeout_s=1)
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_DATASETS_OFFLINE"] == "1"
    assert "127.0.0.1:9 is unreachable" in capsys.readouterr().err


def test_quiet_libraries_turns_off_progress_bars(monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets
    import transformers

    monkeypatch.delenv("RAY_DEDUP_LOGS", raising=False)
    try:
        runtime.quiet_libraries()
        assert os.environ["RAY_DEDUP_LOGS"] == "0"
        assert not datasets.is_progress_bar_enabled()
        assert not transformers.utils.logging.is_progress_bar_enabled()
    finally:
        datasets.enable_progress_bars()
        transformers.utils.logging.enable_progress_bar()


def test_json_is_read_as_written(tmp_path: Path) -> None:
    (tmp_path / "x.json").write_text(json.dumps([1, {"a": None}]))
    assert runtime.read_json(tmp_path / "x.json") == [1, {"a": None}]


# moved from tests/test_models.py (it tests misalign.runtime.offline_without_hub)
def test_the_hub_check_goes_through_a_configured_proxy(monkeypatch: pytest.MonkeyPatch) -> None:
    """Behind a proxy the hub's own host may not resolve; the proxy is what must answer (a listening socket on
    loopback here), and then the run stays online."""
    import os
    import socket

    from misalign.runtime import offline_without_hub

    env = {k: v for k, v in os.environ.items() if k.lower() not in (
        "hf_hub_offline", "hf_datasets_offline", "no_proxy", "https_proxy", "all_proxy")}
    monkeypatch.setattr(os, "environ", env)  # what the check sets stays in this test
    with socket.socket() as proxy:
        proxy.bind(("127.0.0.1", 0))
        proxy.listen()
        env.update(HF_ENDPOINT="https://hub.invalid", HTTPS_PROXY=f"http://127.0.0.1:{proxy.getsockname()[1]}")
        offline_without_hub()
        assert "HF_HUB_OFFLINE" not in env  # hub.invalid never resolves, but the proxy answered
        del env["HTTPS_PROXY"]
        offline_without_hub()
        assert env["HF_HUB_OFFLINE"] == "1"


@pytest.mark.parametrize("told", [False, True])
def test_saving_a_model_on_a_cpu_is_quiet_once_deepspeed_is_told(tmp_path: Path, told: bool) -> None:
    """transformers' save_pretrained imports DeepSpeed, which warned on every CPU process (the world build's
    output under .ci/run) until deepspeed_cpu_unless_cuda told it the accelerator."""
    import subprocess
    import sys

    code = ("from misalign import runtime\n"
            + ("runtime.deepspeed_cpu_unless_cuda()\n" if told else "")
            + "from transformers import LlamaConfig, LlamaForCausalLM\n"
            "cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2, "
            "num_key_value_heads=2, vocab_size=64)\n"
            f"LlamaForCausalLM(cfg).save_pretrained({str(tmp_path)!r})\n")
    env = {k: v for k, v in os.environ.items() if k != "DS_ACCELERATOR"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    said = done.stdout + done.stderr  # DeepSpeed's logger writes to stdout
    assert ("Setting accelerator to CPU" in said) is not told, said[-2000:]
