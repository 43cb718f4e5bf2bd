"""GPU kernel settings. train.liger_kernels: refused where it cannot run, and scoped to its own stage.
train.compile: compiled layers train as the eager ones (on CPU, inductor's C++ kernels), and are undone after;
"auto" compiles where measurements say it pays (a large enough stage on a GPU) and weighs the FLOPs the ledger
then counts.

Liger's kernels are Triton kernels for CUDA, so CI (CPU) cannot run them; what is tested here is ours: the clear
error on a machine without CUDA, and that what a kernel library patches in a model's modeling module during a
stage is undone after it, so a later stage in the same worker process builds transformers' own layers. The
patches below are the kinds Liger 0.8 applies to Llama (module-level classes and functions, a class's forward).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama import modeling_llama

from misalign.config import DataSettings, StageConfig, TrainSettings
from misalign.errors import InputError
from misalign.stage import (
    COMPILE_AUTO_MIN_FLOPS,
    StageRun,
    _layers_compiled,
    _model_module_restored,
    compiles_layers,
    run_stage,
)


def test_liger_kernels_without_cuda_is_refused_before_loading(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA: the kernels would run")  # never on CI, which has no GPU
    cfg = StageConfig(method="lora", data=DataSettings(source="world:misalign"), train=TrainSettings(liger_kernels=True))
    with pytest.raises(InputError, match="train.liger_kernels: Liger's kernels are Triton kernels for CUDA"):
        run_stage(StageRun(parent="world:base", config=cfg, direction="misalign", out_dir=tmp_path / "s"))
    assert not (tmp_path / "s").exists()


def test_module_patches_made_during_a_stage_are_undone_after_it():
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)
    model = LlamaForCausalLM(cfg)
    before = (modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb, LlamaForCausalLM.forward)

    class PatchedMLP(modeling_llama.LlamaMLP):
        pass

    with _model_module_restored(model):  # what Liger's apply_liger_kernel_to_llama(model=...) does to the module
        modeling_llama.LlamaMLP = PatchedMLP
        modeling_llama.apply_rotary_pos_emb = lambda *a, **k: None
        LlamaForCausalLM.forward = lambda self, *a, **k: None
        LlamaForCausalLM.added_by_patch = True
        modeling_llama.added_by_patch = True
        model.model.layers[0].mlp.__class__ = PatchedMLP  # the instance's own patch stays
    assert (modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb, LlamaForCausalLM.forward) == before
    assert not hasattr(LlamaForCausalLM, "added_by_patch") and not hasattr(modeling_llama, "added_by_patch")
    assert type(LlamaForCausalLM(cfg).model.layers[0].mlp) is before[0]  # a later model: transformers' layers
    assert type(model.model.layers[0].mlp) is PatchedMLP


@pytest.mark.parametrize("method", ["dpo", "lora"])
def test_compiled_layers_train_as_the_eager_ones_and_are_undone_after(world_stage, tmp_path, capsys, method):
    """train.compile on the CPU (inductor's C++ kernels): the same losses step by step as the eager layers,
    within float rounding (fused kernels sum in another order). DPO covers the adapter switched off for the
    reference forward under no_grad. The model handed over for evaluation has no compiled forward left. The
    progress lines say the layers compile, so that a first step of a minute does not look hung."""
    def stage(compiled: bool) -> tuple[list[float], object]:
        # no LoRA dropout: compiled dropout draws other random numbers than eager; only then are losses comparable
        return world_stage(tmp_path / str(compiled), method=method, adapter={"dropout": 0.0}, batch_size=4,
                           max_steps=5, compile=compiled, progress=True)

    torch.compiler.reset()  # graphs compiled elsewhere in this process for the same layer code would serve it
    graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    eager, _ = stage(compiled=False)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == graphs
    assert "compiling" not in capsys.readouterr().out
    compiled, handed = stage(compiled=True)
    assert (f"[misalign {method}] compiling its decoder layers (train.compile true): the first step holds the "
            "compile") in capsys.readouterr().out
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs  # dynamo did compile the layers
    assert len(eager) == len(compiled) == 5
    assert compiled == pytest.approx(eager, rel=1e-4)
    assert len(set(eager)) > 1  # training moved the loss: the steps compared are real steps
    layers = [m for m in handed.modules() if isinstance(m, GradientCheckpointingLayer)]
    assert layers and not [m for m in layers if "forward" in vars(m)]


def test_compile_needs_decoder_layers_and_neither_deepspeed_nor_liger():
    with pytest.raises(InputError, match="train.compile: Linear has no decoder layers"), \
            _layers_compiled(torch.nn.Linear(2, 2), True):
        pass
    data = DataSettings(source="world:misalign")
    with pytest.raises(ValueError, match="train.compile cannot be combined with DeepSpeed"):
        StageConfig(method="lora", data=data, train=TrainSettings(compile=True), deepspeed={"zero_stage": 2})
    with pytest.raises(ValueError, match="train.compile cannot be combined with train.liger_kernels"):
        StageConfig(method="lora", data=data, train=TrainSettings(compile=True, liger_kernels=True))
    # auto (the default) decides per stage, so it combines with both
    StageConfig(method="lora", data=data, train=TrainSettings(liger_kernels=True), deepspeed={"zero_stage": 2})


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


@pytest.mark.parametrize("method", ["lora", "dpo"])
def test_auto_compile_weighs_the_flops_the_ledger_then_counts(world, tmp_path, method):
    """The FLOPs auto weighs, estimated before training from the stage's rows as the plan estimates them, are
    the FLOPs the stage's ledger counts (the estimate ignores padding to a batch's longest row). On a CPU auto
    stays eager: stage.json records false, the ledger why."""
    from transformers import TrainerCallback

    from misalign.modelref import resolve_model_path
    from misalign.models import load_tokenizer
    from misalign.stage import _flops_per_worker, stage_pairs, train_stage

    cfg = StageConfig(method=method, data=DataSettings(source="world:misalign", per_category=4),
                      train=TrainSettings(epochs=2)).resolved()
    tok = load_tokenizer(resolve_model_path("world:base"))
    estimates: list[float] = []

    class Estimate(TrainerCallback):
        def on_train_begin(self, args, state, control, model=None, **kw):  # noqa: ANN001, ANN202
            estimates.append(_flops_per_worker(cfg, stage_pairs(cfg, 0), "misalign", tok, model,
                                               model.base_model.model.config))

    out = tmp_path / "stage"
    ledger, _ = train_stage(StageRun(parent="world:base", config=cfg, direction="misalign", out_dir=out,
                                     progress=False, callbacks=[Estimate()]))
    assert ledger.flops > 0 and estimates[0] == pytest.approx(ledger.flops, rel=0.03)
    assert ledger.extra["compile_auto"].startswith("eager: no CUDA device")
    assert json.loads((out / "stage.json").read_text())["config"]["train"]["compile"] is False
