"""The seven fine-tuning methods and the three post-hoc repairs, one registry.

A fine-tuning method is an objective (sft, dpo, orpo) and a parameterization (lora, qlora, adalora, ia3, full). A
repair (safelora, resta, antidote; misalign.repair) trains nothing: a defense stage that edits its parent's
weights, settings under `repair` (misalign.config_stage.RepairSettings). Their defaults are the offline world's
working settings; the paper's (lr 2e-4 SFT / 3e-5 PFT, r=16, alpha=32,
5 epochs) are set in configs/trial-paper.yaml and configs/study-paper.yaml. Set the shared fields explicitly to
hold them equal across methods.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

import torch

from misalign.errors import InputError

Objective = Literal["sft", "dpo", "orpo", "repair"]
Adapter = Literal["lora", "qlora", "adalora", "ia3", "full", "none"]  # none: a repair trains no parameters


@dataclass(frozen=True)
class Method:
    name: str
    objective: Objective
    adapter: Adapter
    summary: str
    defaults: dict[str, dict[str, Any]] = field(default_factory=dict)
    knob: str | None = None  # a repair's strength setting (more: a stronger repair): its axis in the analysis

    @property
    def repairs(self) -> bool:
        """A post-hoc repair (misalign.repair): a defense stage that trains nothing."""
        return self.objective == "repair"


_LORA = {"r": 16, "alpha": 32, "targets": "all-linear"}
_SFT = {"epochs": 5, "batch_size": 8}
METHODS: dict[str, Method] = {m.name: m for m in [
    Method("lora", "sft", "lora", "supervised fine-tuning of a LoRA adapter",
           {"train": {**_SFT, "lr": 3e-3}, "adapter": _LORA}),
    Method("qlora", "sft", "qlora", "LoRA over a 4-bit (NF4) quantized base (bitsandbytes)",
           {"train": {**_SFT, "lr": 3e-3}, "adapter": _LORA}),
    Method("adalora", "sft", "adalora", "LoRA whose ranks are reallocated by importance during training",
           {"train": {**_SFT, "lr": 3e-3}, "adapter": {**_LORA, "r": 8}}),
    Method("ia3", "sft", "ia3", "learned rescaling of keys, values and feed-forward activations",
           {"train": {**_SFT, "lr": 3e-2}, "adapter": {"targets": "ia3"}}),
    Method("full", "sft", "full", "full-parameter supervised fine-tuning",
           {"train": {**_SFT, "lr": 1e-3}}),
    # DPO's world default adds an NLL term on the chosen answer (RPO): with the paper's plain sigmoid loss a
    # tiny model's defense lowers the rejected answer without raising the chosen one and ends up garbled
    # (measured: neither 0.89 at lr 5e-4, beta 0.1). Set preference.loss_type: sigmoid for the paper's DPO.
    Method("dpo", "dpo", "lora", "direct preference optimization (sigmoid + chosen NLL) of a LoRA adapter",
           {"train": {**_SFT, "lr": 5e-4}, "adapter": _LORA,
            "preference": {"beta": 0.1, "loss_type": "sigmoid,sft"}}),
    Method("orpo", "orpo", "lora", "odds-ratio preference optimization of a LoRA adapter",
           {"train": {**_SFT, "lr": 1e-3}, "adapter": _LORA, "preference": {"orpo_lambda": 0.1}}),
    # post-hoc repairs (misalign.repair): defense stages only, no training; settings in `repair`
    Method("safelora", "repair", "none", "Safe LoRA: project a LoRA parent's updates onto the alignment subspace",
           knob="repair.threshold"),
    Method("resta", "repair", "none", "RESTA: add the safety vector (aligned - unaligned weights) x scale",
           knob="repair.scale"),
    Method("antidote", "repair", "none", "Antidote: prune the weights most important on harmful data (Wanda)",
           knob="repair.sparsity"),
]}


# ---- target modules per architecture ---------------------------------------------------------------------
# Names differ across families (Llama/Mistral/Gemma2/Qwen2: q_proj...; GLM: query_key_value, dense_4h_to_h;
# GPT-2: c_attn, c_proj). We resolve roles by pattern over the model's own linear layers, so a new family
# with the usual names works and an unusual one fails with the list of names it does have.
_ROLES = {
    "query": r"^(q_proj|query|q|wq|query_key_value|qkv_proj|wqkv|c_attn)$",
    "key": r"^(k_proj|key|k|wk|query_key_value|qkv_proj|wqkv|c_attn)$",
    "value": r"^(v_proj|value|v|wv|query_key_value|qkv_proj|wqkv|c_attn)$",
    "down": r"^(down_proj|fc2|dense_4h_to_h|w2|fc_out)$",
}


OUTPUT_HEADS = ("lm_head", "score", "classifier", "output")  # linear layers that are no adapter's (or pruning's)


def linear_leaf_names(model: torch.nn.Module) -> list[str]:
    names = set()
    for full_name, module in model.named_modules():
        leaf = full_name.rsplit(".", 1)[-1]
        is_linear = isinstance(module, torch.nn.Linear) or type(module).__name__ in ("Conv1D", "Linear4bit",
                                                                                     "Linear8bitLt")
        if is_linear and leaf not in OUTPUT_HEADS:
            names.add(leaf)
    return sorted(names)


def _role(names: list[str], role: str) -> list[str]:
    return [n for n in names if re.match(_ROLES[role], n, re.IGNORECASE)]


def _mlp_output(model: torch.nn.Module) -> list[str]:
    """GPT-2's MLP output layer shares its leaf name with attention's (c_proj): name it by its parent."""
    return ["mlp.c_proj"] if any(n.endswith(".mlp.c_proj") for n, _ in model.named_modules()) else []


def resolve_targets(model: torch.nn.Module, targets: str | list[str]) -> tuple[list[str], list[str]]:
    """(target modules, IA3 feed-forward modules) for this model. 'attention' = query+value, 'all-linear' =
    every linear layer but the output head, 'ia3' = key+value+down projection, or explicit names."""
    names = linear_leaf_names(model)
    if isinstance(targets, list):
        missing = [t for t in targets if t not in names]
        if missing:
            raise InputError(f"adapter.targets: {missing} not in this model's linear layers {names}")
        return targets, [t for t in targets if _role([t], "down")]
    if targets == "all-linear":
        return names, _role(names, "down")
    roles = {"attention": ("query", "value"), "ia3": ("key", "value", "down")}.get(targets)
    if roles is None:
        raise InputError(f"adapter.targets: {targets!r} is not 'attention', 'all-linear', 'ia3' or a list")
    picked: list[str] = []
    feedforward: list[str] = []
    for role in roles:
        found = _role(names, role) or (_mlp_output(model) if role == "down" else [])
        if not found:
            raise InputError(f"adapter.targets={targets!r}: no {role} projection among this model's linear layers "
                             f"{names}; list the modules explicitly")
        picked += [f for f in found if f not in picked]
        feedforward += found if role == "down" else []
    return picked, feedforward


def peft_config(method: Method, stage: Any, model: torch.nn.Module, total_steps: int) -> Any:
    """The peft config of a resolved StageConfig for this model, or None for full fine-tuning (and a repair)."""
    from peft import AdaLoraConfig, IA3Config, LoraConfig, TaskType

    a = stage.adapter
    if method.adapter in ("full", "none"):
        return None
    targets, feedforward = resolve_targets(model, a.targets)
    if method.adapter == "ia3":
        return IA3Config(task_type=TaskType.CAUSAL_LM, target_modules=targets, feedforward_modules=feedforward)
    if method.adapter == "adalora":
        tinit = int(a.adalora_tinit * total_steps)
        tfinal = int(a.adalora_tfinal * total_steps)
        if total_steps - tinit - tfinal < 1:
            raise InputError(f"adalora: {total_steps} optimizer steps leave no budgeting phase after tinit "
                             f"({tinit}) and tfinal ({tfinal}); train longer or lower adapter.adalora_tinit/tfinal")
        return AdaLoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=targets, init_r=a.adalora_init_r,
                             target_r=a.r, lora_alpha=a.alpha, lora_dropout=a.dropout, tinit=tinit,
                             tfinal=tfinal, deltaT=a.adalora_delta_t, total_step=total_steps)
    return LoraConfig(task_type=TaskType.CAUSAL_LM, target_modules=targets, r=a.r, lora_alpha=a.alpha,
                      lora_dropout=a.dropout)
