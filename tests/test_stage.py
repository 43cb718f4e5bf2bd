"""The stage engine (misalign.stage): one stage trained end to end on the world's tiny model, and the decisions
the stage makes on its own (Liger refused without CUDA, train.compile "auto", the hand-over in memory, the record
it writes). What it patches to train faster: tests/test_objectives.py and tests/test_speedups.py; each
method's outputs: tests/workflows/test_method_stages.py.
"""

from __future__ import annotations

import contextlib
import json
import math

import pytest
import torch
from peft import PeftModel
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from misalign import stage
from misalign.config import DataSettings, StageConfig, TrainSettings
from misalign.data import load_eval_items
from misalign.errors import InputError
from misalign.generation import generate
from misalign.modelref import resolve_model_path
from misalign.models import load_model, load_tokenizer, materialize, tokenizer_for
from misalign.records import StageRecord
from misalign.stage import (
    COMPILE_AUTO_MIN_FLOPS,
    StageRun,
    compiles_layers,
    run_stage,
    stage_pairs,
    train_stage,
    training_flops_per_worker,
)

STEPS = {"max_steps": 3, "batch_size": 4}


def _stage(method: str, direction: str = "misalign", **train: object) -> StageConfig:
    source = "world:misalign" if direction == "misalign" else "world:realign"
    return StageConfig(method=method, data={"source": source, "per_category": 1}, train={**STEPS, **train})


def _prompts(n: int = 12) -> list[str]:
    return [i.prompt for i in load_eval_items("world:eval_harmful", "eval", kind="harmful")[:n]]


def test_liger_kernels_without_cuda_is_refused_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the kernels would run")  # never on CI, which has no GPU
    cfg = StageConfig(method="lora", data=DataSettings(source="world:misalign"), train=TrainSettings(liger_kernels=True))
    with pytest.raises(InputError, match="train.liger_kernels: Liger's kernels are Triton kernels for CUDA"):
        run_stage(StageRun(parent="world:base", config=cfg, direction="misalign", out_dir=tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_auto_compiles_a_large_enough_stage_on_a_gpu_only():
    """train.compile auto: compiled layers on a CUDA device for a stage whose training repays the compile
    (COMPILE_AUTO_MIN_FLOPS per worker, by the weights its method trains), with full or LoRA weights, without
    DeepSpeed or Liger; eager otherwise. The FLOPs are asked for only when everything else allows compiling."""
    model = LlamaForCausalLM(LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, vocab_size=32))
    asked: list[bool] = []

    def decide(flops: float = 2e17, cuda: bool = True, method: str = "lora", m: object = model,
               **stage: object) -> tuple[bool, str]:
        cfg = StageConfig(method=method, data=DataSettings(source="world:misalign"), **stage)
        return compiles_layers(cfg, m, lambda: asked.append(True) or flops, cuda=cuda)

    assert COMPILE_AUTO_MIN_FLOPS == {"full": 2.5e16, "lora": 1e17}  # the measured figures (docs/benchmarks.md)
    assert decide() == (True, "compiled: 2e+17 training FLOPs per worker, at least 1e+17")
    assert decide(flops=0.9e17) == (False, "eager: 9e+16 training FLOPs per worker, below the 1e+17 that repay a "
                                           "compile")
    assert decide(flops=0.3e17, method="full")[0] is True
    assert decide(flops=0.2e17, method="full")[0] is False
    assert len(asked) == 4
    for off, why in [
        (decide(cuda=False), "eager: no CUDA device"),
        (decide(deepspeed={"zero_stage": 2}), "eager: DeepSpeed ZeRO-2"),
        (decide(train={"liger_kernels": True}), "eager: Liger's kernels"),
        (decide(method="qlora"), "eager: qlora was not measured compiled on a GPU"),
        (decide(m=torch.nn.Linear(2, 2)), "eager: Linear has no marked decoder layers"),
    ]:
        assert off[0] is False and off[1].startswith(why)
    assert len(asked) == 4  # none of those estimated FLOPs
    assert decide(cuda=False, train={"compile": True}) == (True, "train.compile true")
    assert decide(train={"compile": False}) == (False, "train.compile false")


@pytest.mark.slow  # trains and compiles a stage per method (25-35 s each)
@pytest.mark.parametrize("method", ["lora", "dpo"])
def test_auto_compile_weighs_the_flops_the_ledger_then_counts(world, tmp_path, method):
    """The FLOPs auto weighs, estimated before training from the stage's rows as the plan estimates them, are
    the FLOPs the stage's ledger counts (the estimate ignores padding to a batch's longest row). On a CPU auto
    stays eager: stage.json records false, the ledger why."""
    cfg = StageConfig(method=method, data=DataSettings(source="world:misalign", per_category=4),
                      train=TrainSettings(epochs=2)).resolved()
    tok = load_tokenizer(resolve_model_path("world:base"))
    estimates: list[float] = []

    class Estimate(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN202
            estimates.append(training_flops_per_worker(cfg, stage_pairs(cfg, 0), "misalign", tok, model,
                                                       model.base_model.model.config))

    out = tmp_path / "stage"
    ledger, _ = train_stage(StageRun(parent="world:base", config=cfg, direction="misalign", out_dir=out,
                                     progress=False, callbacks=[Estimate()]))
    assert ledger.flops > 0 and estimates[0] == pytest.approx(ledger.flops, rel=0.03)
    assert ledger.extra["compile_auto"].startswith("eager: no CUDA device")
    assert StageRecord.read(out).config["train"]["compile"] is False


def test_a_stage_trains_the_same_with_the_walks_made_once(world_stage, tmp_path, monkeypatch):
    once, _ = world_stage(tmp_path / "once", batch_size=2, grad_accum=2, max_steps=4)
    monkeypatch.setattr(stage, "module_walks_once", lambda trainer: contextlib.nullcontext())
    walked, _ = world_stage(tmp_path / "walked", batch_size=2, grad_accum=2, max_steps=4)  # Trainer's walks
    assert len(once) == 4 and once == walked  # dropout included: the same random draws, the same numbers


def test_a_diverged_step_shows_in_the_logged_loss(world_stage, tmp_path):
    """transformers would log a NaN step as the window's mean so far, reading every loss back to check (two
    device syncs per micro-batch); the stage logs what happened."""
    losses, _ = world_stage(tmp_path / "s", method="full", batch_size=2, max_steps=4, lr=1e8, max_grad_norm=1e30)
    assert len(losses) == 4 and math.isfinite(losses[0]) and math.isnan(losses[-1])


def test_two_adapter_stages_in_memory_equal_merging_on_disk(world, tmp_path):
    """A chain of two adapter stages: the model handed over in memory, the model materialized from the stage
    files, and the old way (merge, save the merged copy, load it back, merge the next) give the same weights and
    the same greedy generations."""
    first, second = tmp_path / "misalign", tmp_path / "realign"
    _, m1 = train_stage(StageRun("world:base", _stage("lora"), "misalign", first, progress=False))
    _, m2 = train_stage(StageRun(str(first), _stage("ia3", "realign"), "realign", second, progress=False,
                                 parent_model=m1))
    record = StageRecord.read(second)
    assert record.parent_dir == "../misalign" and record.parent(second) == first
    assert record.config["train"]["precision"] == "fp32"  # auto on the world's float32 weights

    old = PeftModel.from_pretrained(load_model(str(world / "base")), str(first / "adapter")).merge_and_unload()
    old.save_pretrained(tmp_path / "old-1")
    old = PeftModel.from_pretrained(load_model(str(tmp_path / "old-1")), str(second / "adapter")).merge_and_unload()
    old.save_pretrained(tmp_path / "old-2")
    old = load_model(str(tmp_path / "old-2")).eval()

    rebuilt = materialize(second)
    for (name, a), b, c in zip(m2.state_dict().items(), rebuilt.state_dict().values(), old.state_dict().values(),
                               strict=True):
        assert torch.equal(a, b) and torch.equal(a, c), name
    tok, prompts = tokenizer_for(second), _prompts()
    in_memory = generate(m2, tok, prompts, max_new_tokens=24, batch_size=12)
    assert in_memory == generate(rebuilt, tok, prompts, max_new_tokens=24, batch_size=12)
    assert in_memory == generate(old, tok, prompts, max_new_tokens=24, batch_size=12)
    base = generate(materialize("world:base"), tok, prompts, max_new_tokens=24, batch_size=12)
    assert in_memory != base, "the stages changed the model (else the comparison shows nothing)"


def test_the_stage_record_reads_and_writes_stage_json_as_before(tmp_path):
    """stage.json keeps its keys, their order and its values (caches written before StageRecord still read), and
    a record reads back equal; keys it does not know are ignored."""
    fields = {"root": "world:base", "root_identity": "world:abc", "parent_dir": "../misalign", "direction": "realign",
              "seed": 3, "config": {"method": "lora"}, "has_adapter": True, "dtype": "bfloat16",
              "versions": {"torch": "2.0"}}
    path = StageRecord(**fields).write(tmp_path)
    assert path == tmp_path / "stage.json"
    assert list(json.loads(path.read_text()).items()) == list(fields.items())
    path.write_text(json.dumps({**fields, "added_later": 1}))
    assert StageRecord.read(tmp_path) == StageRecord(**fields)
    assert StageRecord.read(tmp_path).parent(tmp_path / "realign") == tmp_path / "misalign"
    assert StageRecord(root="world:base", has_adapter=False).parent(tmp_path) is None
