"""Stages keep adapters (or a full stage's weights) in the parent's dtype, never a merged copy; a stage's model is
materialized in memory from its lineage, handed from training to evaluation and the next stage, and exported on
request. The in-memory path must give exactly what merging on disk gave."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from misalign.cli import main
from misalign.config import StageConfig
from misalign.models import load_model, load_tokenizer, materialize, model_dtype
from misalign.records import StageRecord
from misalign.stage import StageRun, train_stage

STEPS = {"max_steps": 3, "batch_size": 4}


def _stage(method: str, direction: str = "misalign", **train: object) -> StageConfig:
    source = "world:misalign" if direction == "misalign" else "world:realign"
    return StageConfig(method=method, data={"source": source, "per_category": 1}, train={**STEPS, **train})


@pytest.fixture(scope="module")
def bf16_parent(world, tmp_path_factory):
    """The world's base stored in bfloat16: a parent whose dtype a stage must keep. Its config says float32, as
    Gemma-2-9b-it's does for its bfloat16 weights: the weights decide."""
    out = tmp_path_factory.mktemp("bf16") / "base"
    load_model(str(world / "base")).to(torch.bfloat16).save_pretrained(out)
    load_tokenizer(str(world / "base")).save_pretrained(out)
    config = json.loads((out / "config.json").read_text())
    (out / "config.json").write_text(json.dumps({**config, "dtype": "float32"}))
    return out


def _dtypes(directory) -> set[torch.dtype]:
    return {t.dtype for f in directory.glob("*.safetensors") for t in load_file(str(f)).values()}


def test_a_bf16_parent_gives_bf16_stages_models_and_exports(bf16_parent, tmp_path):
    lora = tmp_path / "lora"
    ledger, handed = train_stage(StageRun(str(bf16_parent), _stage("lora"), "misalign", lora, progress=False))
    assert _dtypes(lora / "adapter") == {torch.bfloat16}, "the adapter is stored in the parent's dtype"
    record = StageRecord.read(lora)
    assert record.dtype == "bfloat16"
    # train.precision auto: a bf16 parent trains under bf16 autocast (its config's float32 does not decide)
    assert _stage("lora").train.precision == "auto" and record.config["train"]["precision"] == "bf16"
    assert not (lora / "model").exists() and ledger.bytes_written < 2 * ledger.trainable_params + 20_000
    rebuilt = materialize(lora)
    assert model_dtype(materialize(str(bf16_parent))) == torch.bfloat16, "loaded as stored, not upcast"
    assert model_dtype(handed) == model_dtype(rebuilt) == torch.bfloat16
    for (name, a), b in zip(handed.state_dict().items(), rebuilt.state_dict().values(), strict=True):
        assert torch.equal(a, b), f"{name}: the handed-over model differs from its rebuild"

    assert main(["export", str(lora), "--out", str(tmp_path / "exported")]) == 0
    exported = tmp_path / "exported"
    assert _dtypes(exported) == {torch.bfloat16}
    assert json.loads((exported / "config.json").read_text())["dtype"] == "bfloat16"
    assert (exported / "tokenizer.json").exists()
    assert main(["export", str(lora), "--out", str(tmp_path / "exported")]) == 2, "never overwrites"

    full = tmp_path / "full"
    train_stage(StageRun(str(bf16_parent), _stage("full"), "misalign", full, progress=False))
    assert _dtypes(full / "model") == {torch.bfloat16}, "full fine-tuning keeps the parent's dtype"
    assert not (full / "adapter").exists()


def test_a_hub_model_pinned_to_a_revision_loads_that_snapshot(world, tmp_path, monkeypatch, capsys):
    """ORG/NAME@REVISION (a commit, or a branch or tag the HF cache records) loads that snapshot on every node
    and is keyed by its commit; a revision that is not there is an input error before anything runs."""
    import shutil

    from misalign.lineage import model_identity
    from misalign.modelref import config_path, resolve_model_path

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(world / "base", repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    snapshot = str(repo / "snapshots" / sha)
    assert resolve_model_path("org/tiny@main") == resolve_model_path(f"org/tiny@{sha}") == snapshot
    assert config_path("org/tiny@main") == snapshot
    assert model_identity("org/tiny@main") == model_identity(f"org/tiny@{sha}") == f"hf:org/tiny@{sha}"

    cfg = tmp_path / "stage.yaml"
    cfg.write_text("method: lora\ndata: {source: 'world:misalign', per_category: 1}\n"
                   "train: {max_steps: 1, batch_size: 2}\n")
    assert main(["stage", str(cfg), "--model", "org/tiny@main", "--direction", "misalign",
                 "--out", str(tmp_path / "stage")]) == 0
    record = StageRecord.read(tmp_path / "stage")
    assert record.root == "org/tiny@main" and record.root_identity == f"hf:org/tiny@{sha}"
    assert model_dtype(materialize(tmp_path / "stage")) == torch.float32  # rebuilt from the same snapshot
    capsys.readouterr()

    out = tmp_path / "eval"
    assert main(["eval", "--model", "org/tiny@v2", "--judge", "keyword", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "org/tiny@v2: this revision is not in the local HF cache" in err and "Traceback" not in err, err
    assert not out.exists()


def test_an_unreachable_hub_means_the_local_cache_at_once(world, tmp_path):
    """Without HF_HUB_OFFLINE on a machine that cannot reach the hub, huggingface_hub retried every request with
    backoff (and printed each retry) before it fell back to the cache: minutes per command. The CLI tries one
    connection first and goes offline when it fails: a cached hub id trains at once, and says why."""
    import os
    import shutil
    import subprocess
    import sys

    sha = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--org--tiny"
    shutil.copytree(world / "base", repo / "snapshots" / sha)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(sha)
    cfg = tmp_path / "stage.yaml"
    cfg.write_text("method: lora\ndata: {source: 'world:misalign', per_category: 1}\n"
                   "train: {max_steps: 1, batch_size: 2}\n")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    env.update(HF_HUB_CACHE=str(tmp_path / "hub"), HF_ENDPOINT="http://127.0.0.1:9")  # nothing listens there
    done = subprocess.run([sys.executable, "-m", "misalign.cli", "stage", str(cfg), "--model", "org/tiny",
                           "--direction", "misalign", "--out", str(tmp_path / "stage")],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "127.0.0.1:9 is unreachable" in done.stderr and "HF_HUB_OFFLINE=1" in done.stderr
    assert "Retrying" not in done.stderr + done.stdout, done.stderr[-3000:]
    assert StageRecord.read(tmp_path / "stage").root_identity == f"hf:org/tiny@{sha}"
