"""bench/bench_gpu.py runs at tiny shapes on CPU (its CI smoke test) and writes every figure it promises."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[1]


def test_bench_gpu_tiny_writes_every_field(tmp_path, world):
    out = tmp_path / "bench_gpu.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_gpu.py"), "--tiny", "--work", str(tmp_path),
                           "--out", str(out), "--packing", "none,padding_free", "--gen-batch", "128:dynamic,auto",
                           "--profile", "--adapter-upcast", "on,off"],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    r = json.loads(out.read_text())
    assert r["device"].startswith("cpu") and r["machine"]["versions"]["trl"]

    assert [(g["variant"], g["batch_size"], g["cache"]) for g in r["generation"]] == [
        ("128:dynamic", 128, "dynamic"), ("auto", "auto", "auto")]
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
