"""DeepSpeed ZeRO-2 and ZeRO-3, and plain DDP, train a stage on 2 CPU processes (gloo) under torchrun."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from helpers import both_workers_trained

pytestmark = pytest.mark.slow  # trains end to end: `pytest -m "not slow"` leaves it out


def _torchrun_stage(tmp_path: Path, config: str, port: int, direction: str = "misalign") -> tuple[Any, Path]:
    """`misalign stage` with this YAML config on 2 CPU processes under torchrun: the process and its out dir."""
    cfg = tmp_path / "stage.yaml"
    cfg.write_text(config)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
         "-m", "misalign.cli", "stage", str(cfg), "--model", "world:base", "--direction", direction,
         "--out", str(out)], capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc, out


def _adapter_trained(out: Path) -> bool:
    """Whether the stage's adapter changes the model it rebuilds (its gathered weights are whole)."""
    import torch

    from misalign.models import materialize

    base, trained = materialize("world:base").state_dict(), materialize(out).state_dict()
    return any(not torch.equal(base[k], trained[k]) for k in base if k.endswith("proj.weight"))


@pytest.mark.parametrize(("zero", "offload"), [(2, False), (3, False), (2, True)])
def test_zero_stage_with_two_workers(world, tmp_path, zero, offload):
    _, out = _torchrun_stage(tmp_path, 'method: lora\ndata: {source: "world:misalign", per_category: 2}\n'
                                       "train: {max_steps: 4, batch_size: 4}\n"
                                       f"deepspeed: {{zero_stage: {zero}, offload: {str(offload).lower()}}}\n",
                             port=29500 + zero + 10 * offload)
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["workers"] == 2 and ledger["extra"]["zero_stage"] == zero
    # offloaded optimizer state steps on the CPU through DeepSpeed's own Adam, not torch's
    assert (ledger["extra"]["optimizer"] == "DeepSpeedCPUAdam") == offload, ledger["extra"]
    assert ledger["optimizer_steps"] == 4 and ledger["tokens"] > 0
    assert (out / "adapter" / "adapter_model.safetensors").exists()
    assert not (out / "model").exists(), "an adapter stage stores no merged copy"
    assert _adapter_trained(out)  # the gathered adapter (ZeRO-3 partitions it while training) is whole
    assert both_workers_trained(ledger)
    assert ledger["device_s"] > 1.9 * ledger["wall_s"]


def test_ddp_with_two_workers_and_compiled_layers(world, tmp_path):
    """Without DeepSpeed, several workers train under DDP; train.compile "auto" may compile their layers on GPUs.
    Here compiled layers (true: auto stays eager on a CPU) train on 2 workers, each on its own shard, quietly:
    no DDP warning about unused parameters (every trainable parameter takes part in every forward)."""
    proc, out = _torchrun_stage(tmp_path, 'method: lora\ndata: {source: "world:misalign", per_category: 2}\n'
                                          "train: {max_steps: 3, batch_size: 4, compile: true}\n", port=29551)
    assert "Warning" not in proc.stderr and "find_unused_parameters" not in proc.stderr, proc.stderr[-3000:]
    assert proc.stdout.count("compiling its decoder layers (train.compile true)") == 1  # rank 0 says it
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["workers"] == 2 and "zero_stage" not in ledger["extra"] and ledger["optimizer_steps"] == 3
    assert both_workers_trained(ledger) and _adapter_trained(out)


def test_qlora_with_zero3_is_refused(tmp_path):
    from misalign.cli import main

    cfg = tmp_path / "stage.yaml"
    cfg.write_text('method: qlora\ndata: {source: "world:misalign"}\ndeepspeed: {zero_stage: 3}\n')
    rc = main(["stage", str(cfg), "--model", "world:base", "--direction", "misalign", "--out", str(tmp_path / "o")])
    assert rc == 2 and not (tmp_path / "o").exists()


def test_dpo_with_zero3_on_two_workers(world, tmp_path):
    """DPO's reference forward (the adapter switched off by the stage, not peft's walk) under ZeRO-3's
    partitioned weights, on 2 workers: every worker counts its reference tokens."""
    _, out = _torchrun_stage(tmp_path, 'method: dpo\ndata: {source: "world:realign", per_category: 2}\n'
                                       "train: {max_steps: 3, batch_size: 2}\ndeepspeed: {zero_stage: 3}\n",
                             port=29541, direction="realign")
    ledger = json.loads((out / "ledger.json").read_text())
    assert ledger["workers"] == 2 and ledger["extra"]["zero_stage"] == 3 and ledger["optimizer_steps"] == 3
    # one reference forward of every training row (chosen and rejected), on both workers
    assert ledger["ref_tokens"] == ledger["tokens"] > 0 and all(t > 0 for t in ledger["extra"]["tokens_per_worker"])
    assert (out / "adapter" / "adapter_model.safetensors").exists()
