"""bench/bench_gpu.py runs at tiny shapes on CPU (its CI smoke test) and writes every figure it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[1]


def test_bench_gpu_tiny_writes_every_field(tmp_path, world):
    out = tmp_path / "bench_gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--tiny", "--work", str(tmp_path),
                           "--out", str(out), "--packing", "none,padding_free",
                           "--gen-batch", "128:dynamic,auto,auto:bucketed:128:compile+math",
                           "--profile", "--adapter-upcast", "on,off"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["machine"]["versions"]["trl"]

    assert [(g["variant"], g["batch_size"], g["cache"], g["compile"], g["sdpa"]) for g in r["generation"]] == [
        ("128:dynamic", 128, "dynamic", False, None), ("auto", "auto", "auto", False, None),
        ("auto:bucketed:128:compile+math", "auto", "bucketed", True, "math")]
    # every variant's greedy outputs are the first's: in float32 on a CPU the levers change no token
    assert [g["warm"]["same_outputs"] for g in r["generation"]] == [1.0, 1.0, 1.0]
    assert all(g["warm"]["differs_at"] == [] for g in r["generation"])
    for n, g in enumerate(r["generation"]):
        assert g["prompts"] == 24 and g["new_tokens"] == 8 and g["weights_read_bytes"] > 0
        assert ("cold" in g) == (n == 0)  # the process's warm-up is met once, by the first variant
        for phase in ("cold", "warm") if n == 0 else ("warm",):
            p = g[phase]
            for key in ("wall_s", "tokens", "tokens_per_s", "decode_steps", "decode_ms_median", "bound_ms_median",
                        "bound_share", "prefill_s", "peak_memory_bytes"):
                assert p[key] > 0, (g["variant"], phase, key)
            assert p["tokens"] == 24 * 8  # random weights never stop early: every row yields every new token
            assert p["decode_steps"] >= 7 and p["batches"] and len(p["first_steps_ms"]) >= 7
    assert "aten::" in r["generation"][-1]["warm"]["profile"]  # the last variant's decode steps, profiled

    cases = [(t["method"], t["packing"], t["adapter_upcast"]) for t in r["training"]]
    assert sorted(cases) == sorted([("full", "none", True), ("full", "padding_free", True)] + [
        (m, p, u) for m, packings in (("lora", ("none", "padding_free")), ("dpo", ("none",)), ("orpo", ("none",)))
        for p in packings for u in (True, False)])  # the upcast experiment runs for adapter methods only
    for t in r["training"]:
        for key in ("steps", "tokens", "flops", "train_s", "stage_wall_s", "tokens_per_s", "mfu", "steady_step_s",
                    "steady_mfu", "steady_tokens_per_s", "first_step_s", "loop_mfu", "peak_memory_bytes",
                    "trainable_params", "total_params"):
            assert t[key] > 0, (t["method"], t["packing"], key)
        assert t["train_s"] < t["stage_wall_s"]  # the training window, not the whole stage
        assert t["mfu"] == t["flops"] / t["train_s"] / 989e12
        assert t["ref_tokens"] >= 0 and t["liger"] is t["compile"] is False and "aten::" in t["profile"]
        assert t["steps"] == 6  # --profile keeps enough steps for a steady window before the 2 profiled ones
    sft = {(t["method"], t["packing"]): t["tokens"] for t in r["training"]}
    assert sft[("full", "none")] == sft[("full", "padding_free")]  # same rows, same steps, with or without padding
    assert "train" in done.stdout and "gen" in done.stdout


def test_bench_host_counts_kernels_syncs_and_cpu_time_per_step(tmp_path, world):
    out = tmp_path / "bench_host.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_host.py"), "--methods", "lora,dpo",
                           "--steps", "6", "--warm-steps", "2", "--layers", "2", "--work", str(tmp_path),
                           "--out", str(out)], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["layers"] == 2 and r["machine"]["torch_threads"] == 1
    rows = {t["method"]: t for t in r["training"]}
    assert set(rows) == {"lora", "dpo"}
    for t in rows.values():
        assert t["steps"] == 6 and t["timed_steps"] == 3  # steps 3-5: after the warm ones, before the counted one
        assert t["cpu_ms_per_step"] > 0 and t["syncs_per_step"] > 0 and t["mb_written_per_step"] > 0
        assert 0 < t["cpu_ms_between_steps"] < t["cpu_ms_per_step"]  # fetching a batch is not a step's work
    # a DPO step runs the policy on chosen and rejected and a reference forward besides: more kernels than SFT's
    assert rows["dpo"]["kernels_per_step"] > rows["lora"]["kernels_per_step"] > 0
    assert "host dpo" in done.stdout


def _bench(script: str, tmp_path: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, str(ROOT / "bench" / script), "--tiny", "--work", str(tmp_path), *args],
                          env=env, capture_output=True, text=True, timeout=timeout)


def _record_keys(monkeypatch) -> tuple[str, ...]:
    """The keys every training record of both benches holds (bench/common.py)."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))
    import common

    return common.RECORD_KEYS


def test_bench_gpu_counts_every_accumulated_micro_batch(tmp_path, world, monkeypatch):
    out = tmp_path / "accum.json"
    done = _bench("bench_gpu.py", tmp_path, "--out", str(out), "--gen-batch=", "--row-min", "40",
                  "--train", "lora:1b:1,lora:1b:1:4,dpo:1b:2:4")
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(out.read_text())
    assert [(t["method"], t["batch_size"], t["grad_accum"]) for t in r["training"]] == [
        ("lora", 1, 1), ("lora", 1, 4), ("dpo", 2, 4)]
    for t in r["training"]:
        assert all(t[key] is not None for key in _record_keys(monkeypatch)), t
        assert t["stages_per_gpu"] == 1 and t["row_tokens_max"] == 64 and t["row_tokens_min"] == 40
        # every micro-batch's tokens: at least its rows' drawn responses, at most max_length per sequence
        sequences = t["steps"] * t["batch_size"] * t["grad_accum"] * (2 if t["method"] == "dpo" else 1)
        assert sequences * 40 <= t["tokens"] <= sequences * 64, t
        assert t["row_tokens_mean"] == t["tokens"] / sequences
        assert t["steady_tokens_per_s"] == pytest.approx(t["tokens"] / t["steps"] / t["steady_step_s"])
        assert t["steady_mfu"] == pytest.approx(t["flops"] / t["steps"] / t["steady_step_s"] / 989e12)
        assert len(t["step_end_unix"]) == t["steps"] and t["steady_from_unix"] < t["steady_to_unix"]
    assert "batch   1x4" in done.stdout

    bad = _bench("bench_gpu.py", tmp_path, "--gen-batch=", "--train", "lora:1b", "--build-only")
    assert bad.returncode != 0 and "METHOD:MODEL:BATCH[:ACCUM]" in bad.stderr
    for spec, says in (("auto:static:128:turbo", "levers are compile"), ("auto:paged", "the cache is one of")):
        bad = _bench("bench_gpu.py", tmp_path, "--gen-batch", spec, "--train", "", timeout=120)
        assert bad.returncode == 2 and says in bad.stderr and "built" not in bad.stdout


def test_bench_gpu_pads_rows_and_says_when_a_case_failed(tmp_path, world, monkeypatch):
    """--pad-to and --dropout reach the stage and the record, with the stage's mean loss; --compile graphs on a
    CPU fails as the stage refuses it, recorded with every key, and the bench exits 1 after writing its JSON."""
    out = tmp_path / "graphs.json"
    done = _bench("bench_gpu.py", tmp_path, "--out", str(out), "--gen-batch=", "--train", "lora:1b:2",
                  "--compile", "off,graphs", "--pad-to", "16", "--dropout", "0")
    assert done.returncode == 1 and "error: 1 of 2 training cases failed" in done.stderr
    eager, graphs = json.loads(out.read_text())["training"]
    assert eager["compile"] is False and not eager.get("error")
    assert eager["pad_to_multiple_of"] == 16 and eager["adapter_dropout"] == 0 and eager["train_loss"] > 0
    assert graphs["compile"] == "graphs" and "train.compile graphs: CUDA graphs replay on CUDA devices" in graphs["error"]
    assert set(_record_keys(monkeypatch)) <= set(graphs) and graphs["steady_mfu"] is None
    assert "compile graphs: failed: InputError" in done.stdout


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a device where cuDNN cannot run")
def test_bench_gpu_records_a_generation_variant_that_failed_and_goes_on(tmp_path, world):
    """A variant whose forced attention kernel cannot run here (cuDNN on a CPU) is recorded with its error; the
    variants after it are measured and compared with the first one's outputs, and the bench exits 1."""
    out = tmp_path / "gen.json"
    done = _bench("bench_gpu.py", tmp_path, "--out", str(out), "--train", "",
                  "--gen-batch", "auto:static,auto:static:128:cudnn,auto:bucketed")
    assert done.returncode == 1 and "error: 1 of 3 generation cases failed" in done.stderr
    static, cudnn, bucketed = json.loads(out.read_text())["generation"]
    assert "No viable backend" in cudnn["error"] and "warm" not in cudnn and cudnn["sdpa"] == "cudnn"
    assert not static.get("error") and static["cold"]["tokens"] == static["warm"]["tokens"] == 24 * 8
    assert bucketed["warm"]["tokens"] == 24 * 8 and bucketed["warm"]["same_outputs"] == 1.0
    assert "auto:static:128:cudnn: failed: RuntimeError" in done.stdout


def test_bench_shared_gpu_runs_a_group_per_stage_count(tmp_path, world, monkeypatch):
    out = tmp_path / "shared.json"
    done = _bench("bench_shared_gpu.py", tmp_path, "--out", str(out), "--stages", "1,2")
    assert done.returncode == 0, done.stderr[-4000:] + done.stdout[-4000:]
    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["args"]["stages"] == "1,2" and r["args"]["peak_flops"] == "989000000000000.0"
    assert [g["stages_per_gpu"] for g in r["groups"]] == [1, 2]
    cpus = len(os.sched_getaffinity(0))
    for g in r["groups"]:
        n = g["stages_per_gpu"]
        mine = [t for t in r["training"] if t["stages_per_gpu"] == n]
        assert sorted(t["process"] for t in mine) == sorted(p["process"] for p in g["processes"]) == list(range(n))
        for t in mine:
            assert all(t[key] is not None for key in _record_keys(monkeypatch)), t
            assert "error" not in t and t["barrier_wait_s"] >= 0 and t["model"].endswith("-tiny-fp32")
        assert g["failed"] == 0 and not g["out_of_memory"] and g["gpu_share"] == 1 / n
        assert g["threads_per_process"] == max(1, cpus // n)
        assert all(p["torch_threads"] == max(1, cpus // n) for p in g["processes"])  # MISALIGN_CPUS reached them
        assert g["steady_tokens_per_s"] == pytest.approx(sum(p["steady_tokens_per_s"] for p in g["processes"]))
        assert g["steady_tokens_per_s"] > 0 and g["group_tokens_per_s"] > 0 and g["wall_s"] > 0
        assert g["group_tokens_per_s"] == pytest.approx(sum(t["tokens"] for t in mine) / g["wall_s"])
        assert all(p["peak_memory_bytes"] > 0 for p in g["processes"]) and g["device_peak_used_bytes"] is None
        assert g["steady_overlap_s"] >= 0 and len(g["steady_window_s"]) == n
    assert r["groups"][0]["speedup"] == r["groups"][0]["group_speedup"] == 1.0
    assert r["groups"][1]["speedup"] == pytest.approx(
        r["groups"][1]["steady_tokens_per_s"] / r["groups"][0]["steady_tokens_per_s"])
    assert "shared 2 stages:" in done.stdout


def test_bench_shared_gpu_reports_a_failed_process_and_exits_nonzero(tmp_path, world, monkeypatch):
    out = tmp_path / "shared.json"
    # rows of 4 tokens: TrainSettings refuses max_length 4, in every process, after the model is built
    done = _bench("bench_shared_gpu.py", tmp_path, "--out", str(out), "--stages", "1", "--row-tokens", "4",
                  "--row-min", "4")
    assert done.returncode == 1
    r = json.loads(out.read_text())  # written all the same
    (g,) = r["groups"]
    assert g["failed"] == 1 and g["steady_tokens_per_s"] is None and g["speedup"] is None
    assert "ValidationError" in g["processes"][0]["error"] and "\n" not in g["processes"][0]["error"]
    (t,) = r["training"]
    assert t["stages_per_gpu"] == 1 and "ValidationError" in t["error"]
    assert set(_record_keys(monkeypatch)) <= set(t)  # a failed record has every key, its figures None
    assert t["steady_mfu"] is None and t["grad_accum"] == 1
    assert "shared 1 stages, process 0: failed: ValidationError" in done.stdout
    assert "shared: failed" in done.stderr
