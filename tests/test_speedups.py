"""GPU kernel settings as misalign.speedups applies them. train.liger_kernels: scoped to its own stage.
train.compile: compiled layers train as the eager ones (on CPU, inductor's C++ kernels), and are undone after.
(The stage's own decisions, Liger refused without CUDA and "auto" compiling where it pays: tests/test_stage.py.)
module_walks_once: the Trainer's per-step walks of the model, made on lists taken once, do what its own walks do
(issue 13; moved from tests/test_trainer_steps.py).

Liger's kernels are Triton kernels for CUDA, so CI (CPU) cannot run them; what is tested here is ours: what a
kernel library patches in a model's modeling module during a stage is undone after it, so a later stage in the
same worker process builds transformers' own layers. The patches below are the kinds Liger 0.8 applies to Llama
(module-level classes and functions, a class's forward).
"""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.modeling_layers import GradientCheckpointingLayer
from transformers.models.llama import modeling_llama

from helpers import dpo_parts
from misalign.config import DataSettings, StageConfig, TrainSettings
from misalign.errors import InputError
from misalign.objectives import OBJECTIVES
from misalign.speedups import layers_compiled, model_module_restored, module_walks_once
from misalign.stage import compiles_layers


def test_module_patches_made_during_a_stage_are_undone_after_it():
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)
    model = LlamaForCausalLM(cfg)
    before = (modeling_llama.LlamaMLP, modeling_llama.apply_rotary_pos_emb, LlamaForCausalLM.forward)

    class PatchedMLP(modeling_llama.LlamaMLP):
        pass

    with model_module_restored(model):  # what Liger's apply_liger_kernel_to_llama(model=...) does to the module
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


@pytest.mark.slow  # trains each method twice, once compiled (20-35 s each)
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
            layers_compiled(torch.nn.Linear(2, 2), True):
        pass
    data = DataSettings(source="world:misalign")
    with pytest.raises(ValueError, match="train.compile cannot be combined with DeepSpeed"):
        StageConfig(method="lora", data=data, train=TrainSettings(compile=True), deepspeed={"zero_stage": 2})
    with pytest.raises(ValueError, match="train.compile cannot be combined with train.liger_kernels"):
        StageConfig(method="lora", data=data, train=TrainSettings(compile=True, liger_kernels=True))
    # auto (the default) decides per stage, so it combines with both
    StageConfig(method="lora", data=data, train=TrainSettings(liger_kernels=True), deepspeed={"zero_stage": 2})


def test_cuda_graphs_need_padded_rows_and_a_cuda_device(world_stage, tmp_path):
    """train.compile graphs: refused without train.pad_to_multiple_of and, like compiled layers, under DeepSpeed
    (when the config is read); a CUDA-less worker refuses it before training (CI's, here)."""
    data = DataSettings(source="world:misalign")
    with pytest.raises(ValueError, match="train.compile graphs needs train.pad_to_multiple_of"):
        StageConfig(method="lora", data=data, train=TrainSettings(compile="graphs"))
    with pytest.raises(ValueError, match="train.compile cannot be combined with DeepSpeed"):
        StageConfig(method="lora", data=data, train=TrainSettings(compile="graphs", pad_to_multiple_of=64),
                    deepspeed={"zero_stage": 2})
    graphs = StageConfig(method="lora", data=data, train=TrainSettings(compile="graphs", pad_to_multiple_of=64))
    assert compiles_layers(graphs, None, lambda: 0.0) == ("graphs", "train.compile graphs")
    if not torch.cuda.is_available():  # on a GPU, bench/gpu_check.sh graphs trains them
        with pytest.raises(InputError, match="train.compile graphs: CUDA graphs replay on CUDA devices"):
            world_stage(tmp_path, compile="graphs", pad_to_multiple_of=64)
        assert not (tmp_path / "adapter").exists()


def test_graphs_hand_autograd_copies_of_the_layers_gradients_and_take_the_hooks_back():
    """Under "graphs" every trainable parameter of a compiled layer gets a hook that copies its gradient out of
    the graph's memory (torch < 2.12 let a later replay overwrite an accumulated .grad: see layers_compiled). On
    the CPU inductor records no graph, so this checks the hooks' bookkeeping and that two accumulated
    micro-batches give eager's gradients; bench/gpu_check.sh graphs checks the losses where graphs replay."""
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                      num_key_value_heads=1, vocab_size=32)
    model = LlamaForCausalLM(cfg)
    batches = [torch.randint(0, 32, (1, n)) for n in (8, 8)]

    def accumulated() -> list[torch.Tensor]:
        model.zero_grad()
        for ids in batches:
            model(input_ids=ids, labels=ids).loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    eager = accumulated()
    layer_params = [p for layer in model.model.layers for p in layer.parameters()]
    torch.compiler.reset()
    with layers_compiled(model, "graphs"):
        assert all(len(p._backward_hooks or {}) == 1 for p in layer_params)
        assert not model.lm_head.weight._backward_hooks  # outside the layers: eager, no copy
        graphs = accumulated()
    assert all(not p._backward_hooks for p in layer_params)
    assert all(torch.allclose(g, e, rtol=1e-4, atol=1e-6) for g, e in zip(graphs, eager, strict=True))


# moved from tests/test_trainer_steps.py
def test_module_walks_made_once_do_what_the_trainers_walks_do(world, tmp_path):
    """The Trainer's per-step walks of the whole model (train mode, zero_grad, its FLOP log's parameter count)
    on lists made once: every module switched, every gradient cleared, the same FLOP count; undone after."""
    model, args, dataset, tok = dpo_parts(tmp_path)
    trainer = OBJECTIVES["dpo"].trainer(model, args, dataset, tok, [])
    batch = trainer.data_collator([trainer.train_dataset[0], trainer.train_dataset[1]])
    expected_flops = type(trainer).floating_point_ops(trainer, batch)
    with module_walks_once(trainer):
        assert trainer.floating_point_ops(batch) == expected_flops > 0
        model.eval()  # Module.eval calls self.train(False): the instance's
        assert not any(m.training for m in model.modules())
        model.train()
        assert all(m.training for m in model.modules())
        for p in model.parameters():
            p.grad = torch.ones_like(p)
        model.zero_grad()
        assert all(p.grad is None for p in model.parameters())
    assert not {"train", "zero_grad"} & set(vars(model)) and "floating_point_ops" not in vars(trainer)
