"""train.liger_kernels: refused where it cannot run, and scoped to its own stage.

Liger's kernels are Triton kernels for CUDA, so CI (CPU) cannot run them; what is tested here is ours: the clear
error on a machine without CUDA, and that what a kernel library patches in a model's modeling module during a
stage is undone after it, so a later stage in the same worker process builds transformers' own layers. The
patches below are the kinds Liger 0.8 applies to Llama (module-level classes and functions, a class's forward).
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from misalign.config import DataSettings, StageConfig, TrainSettings
from misalign.errors import InputError
from misalign.stage import StageRun, _model_module_restored, run_stage


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
