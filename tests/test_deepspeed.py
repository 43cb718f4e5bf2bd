"""DeepSpeed ZeRO-2 and ZeRO-3, and plain DDP, train a stage on 2 CPU processes (gloo) under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow  # trains end to end: `pytest -m "not slow"` leaves it out


@pytest.mark.parametrize(("zero", "offload"), [(2, False), (3, False), (2, True)])
def test_zero_stage_with_two_workers(world, tmp_path, zero, offload):
    cfg = tmp_path / "stage.yaml"
    cfg.write_text('method: lora\ndata: {source: "world:misalign", per_category: 2}\n'
                   f"train: {{max_steps: 4, batch_size: 4}}\n"
                   f"deepspeed: {{zero_stage: {zero}, offload: {str(offload).lower()}}}\n")
    out = tmp_path / "out"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(29500 + zero + 10 * offload),
         "-m", "misalign.cli", "stage", str(cfg), "--model", "world:base", "--direction", "misalign",
         "--out", str(out)], capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["workers"] == 2 and ledger["extra"]["zero_stage"] == zero
    # offloaded optimizer state steps on the CPU through DeepSpeed's own Adam, not torch's
    assert (ledger["extra"]["optimizer"] == "DeepSpeedCPUAdam") == offload, ledger["extra"]
    assert ledger["optimizer_steps"] == 4 and ledger["tokens"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "model").exists(), "an adapter stage stores no merged copy"
    # the gathered adapter (ZeRO-3 partitions it while training) is whole: it changes the model it rebuilds
    import torch

    from misalign.models import materialize

    base, trained = materialize("world:base").state_dict(), materialize(out).state_dict()
    assert any(not torch.equal(base[k], trained[k]) for k in base if k.endswith("proj.weight"))
    # both workers trained, each on its own shard of every batch
    per_worker = ledger["extra"]["tokens_per_worker"]
    assert len(per_worker) == 2 and all(t > 0 for t in per_worker) and sum(per_worker) == ledger["tokens"]
    assert ledger["device_s"] > 1.9 * ledger["wall_s"]


def test_ddp_with_two_workers_and_compiled_layers(world, tmp_path):
    """Without DeepSpeed, several workers train under DDP; train.compile "auto" may compile their layers on GPUs.
    Here compiled layers (true: auto stays eager on a CPU) train on 2 workers, each on its own shard, quietly:
    no DDP warning about unused parameters (every trainable parameter takes part in every forward)."""
    cfg = tmp_path / "stage.yaml"
    cfg.write_text('method: lora\ndata: {source: "world:misalign", per_category: 2}\n'
                   "train: {max_steps: 3, batch_size: 4, compile: true}\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29551",
         "-m", "misalign.cli", "stage", str(cfg), "--model", "world:base", "--direction", "misalign",
         "--out", str(out)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Warning" not in proc.stderr and "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("compiling its decoder layers (train.compile true)") == 1  # rank 0 says it
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["workers"] == 2 and "zero_stage" not in ledger["extra"] and ledger["optimizer_steps"] == 3
    per_worker = ledger["extra"]["tokens_per_worker"]
    assert len(per_worker) == 2 and all(t > 0 for t in per_worker) and sum(per_worker) == ledger["tokens"]
    import torch

    from misalign.models import materialize

    base, trained = materialize("world:base").state_dict(), materialize(out).state_dict()
    assert any(not torch.equal(base[k], trained[k]) for k in base if k.endswith("proj.weight"))


def test_qlora_with_zero3_is_refused(tmp_path):
    from misalign.cli import main

    cfg = tmp_path / "stage.yaml"
    cfg.write_text('method: qlora\ndata: {source: "world:misalign"}\ndeepspeed: {zero_stage: 3}\n')
    rc = main(["stage", str(cfg), "--model", "world:base", "--direction", "misalign", "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()


def test_dpo_with_zero3_on_two_workers(world, tmp_path):
    """DPO's reference forward (the adapter switched off by the stage, not peft's walk) under ZeRO-3's
    partitioned weights, on 2 workers: every worker counts its reference tokens."""
    cfg = tmp_path / "stage.yaml"
    cfg.write_text('method: dpo\ndata: {source: "world:realign", per_category: 2}\n'
                   "train: {max_steps: 3, batch_size: 2}\ndeepspeed: {zero_stage: 3}\n")
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29541",
         "-m", "misalign.cli", "stage", str(cfg), "--model", "world:base", "--direction", "realign",
         "--out", str(out)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["workers"] == 2 and ledger["extra"]["zero_stage"] == 3 and ledger["optimizer_steps"] == 3
    # one reference forward of every training row (chosen and rejected), on both workers
    assert ledger["ref_tokens"] == ledger["tokens"] > 0 and all(t > 0 for t in ledger["extra"]["tokens_per_worker"])
    assert (out / "adapter" / "adapter_model.safetensors").exists()
