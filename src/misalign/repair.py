"""Post-hoc repairs: defenses that train nothing. Each reads its parent (the misaligned model) and stores a small
correction on top of it; its cost is the data it reads and the FLOPs it spends (misalign.costs).

- SafeLoRA (Hsu et al. 2024, "Safe LoRA: the silver lining of reducing safety risks when fine-tuning large
  language models", arXiv:2405.16833). Per LoRA layer, the alignment matrix V = W_aligned - W_unaligned and the
  projection C = V V^T / ||V||_F; an update Delta W = B A whose cosine similarity with C Delta W is below a
  threshold becomes C Delta W. Stored as a LoRA adapter on the parent, B' = (C - I) B and A' = A with the
  parent's scaling: merged into the parent it turns Delta W into C Delta W. It needs a LoRA parent.
- RESTA (Bhardwaj et al. 2024, "Language models are Homer Simpson: safety re-alignment of fine-tuned language
  models through task arithmetic", arXiv:2402.11746). theta + alpha * s, the safety vector
  s = theta_aligned - theta_unaligned. Stored as a recipe (the two models and alpha): loading rebuilds it.
- Antidote (Huang et al. 2024, "Antidote: post-fine-tuning safety alignment for large language models against
  harmful fine-tuning", arXiv:2408.09600). One-shot pruning: the share alpha of each linear layer's weights with
  the highest Wanda score (Sun et al. 2023) |W_ij| * ||X_j||_2 on harmful calibration data is set to zero. Stored
  as the pruned positions (flat indices, int32 where they fit).

SafeLoRA and RESTA assume the model before alignment (W_unaligned), which users of a released chat model often
lack. The math is here; the stage around it (reading the parent, writing the stage directory and the ledger) is
misalign.stage.repair_stage, and loading a recipe misalign.models.apply_stage (through `apply_recipe`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch

from misalign.costs import safelora_flops
from misalign.errors import InputError
from misalign.methods import OUTPUT_HEADS

MASK_FILE = "repair/mask.safetensors"  # Antidote's pruned positions, in the stage directory


# ---- SafeLoRA ------------------------------------------------------------------------------------------------

def safelora_projection(aligned: torch.Tensor, unaligned: torch.Tensor) -> torch.Tensor:
    """C = V V^T / ||V||_F with V = W_aligned - W_unaligned (a layer the alignment left alone: C = 0)."""
    v = (aligned - unaligned).float()
    norm = torch.linalg.matrix_norm(v)
    return v @ v.T / norm if norm > 0 else torch.zeros(v.shape[0], v.shape[0], device=v.device)


def safelora_b(b: torch.Tensor, a: torch.Tensor, c: torch.Tensor, threshold: float) -> tuple[torch.Tensor, float]:
    """(B' of the stored adapter, cos(Delta W, C Delta W)) for one layer: (C - I) B when the cosine is below the
    threshold, else zeros (the layer is left as it is). A zero update (cosine undefined) is left too. Computed
    in float32 on C's device; B' comes back in B's dtype and device."""
    b32, a32 = b.to(c.device, torch.float32), a.to(c.device, torch.float32)
    cb = c @ b32
    cos = float(torch.nn.functional.cosine_similarity((b32 @ a32).flatten(), (cb @ a32).flatten(), dim=0))
    return ((cb - b32) if cos < threshold else torch.zeros_like(b32)).to(b.device, b.dtype), cos


def lora_module(key: str) -> str:
    """The module a peft LoRA tensor belongs to: base_model.model.X.lora_B.weight -> X."""
    return key.removeprefix("base_model.model.").rsplit(".lora_", 1)[0]


def safelora_adapter(lora: Mapping[str, torch.Tensor], aligned: Mapping[str, torch.Tensor],
                     unaligned: Mapping[str, torch.Tensor], threshold: float
                     ) -> tuple[dict[str, torch.Tensor], dict[str, Any], float]:
    """(the SafeLoRA adapter's tensors, a summary, FLOPs) from a parent's LoRA tensors and the two models'
    weights (state dicts): lora_A as it was, lora_B projected or zero per layer."""
    out = dict(lora)
    cosines: dict[str, float] = {}
    flops = 0.0
    for key in sorted(k for k in lora if ".lora_B." in k):
        module = lora_module(key)
        b, a = lora[key], lora[key.replace(".lora_B.", ".lora_A.")]
        weight = f"{module}.weight"
        if weight not in aligned or weight not in unaligned:
            raise InputError(f"safelora: the aligned and unaligned models have no {weight!r} (the parent's adapter "
                             "is on another architecture)")
        out[key], cosines[module] = safelora_b(b, a, safelora_projection(aligned[weight], unaligned[weight]),
                                               threshold)
        flops += safelora_flops(b.shape[0], a.shape[1], b.shape[1])
    projected = sorted(m for m, cos in cosines.items() if cos < threshold)
    summary = {"layers": len(cosines), "projected": len(projected), "threshold": threshold,
               "cosines": {m: round(c, 6) for m, c in cosines.items()}}
    return out, summary, flops


def check_lora_parent(adapter_config: dict[str, Any], parent: str) -> None:
    """SafeLoRA projects a LoRA update B A: refuse any other adapter, before any weight is read."""
    kind = adapter_config.get("peft_type")
    if kind != "LORA" or adapter_config.get("use_dora") or adapter_config.get("fan_in_fan_out"):
        raise InputError(f"safelora needs a parent stage with a LoRA adapter (B A updates, as methods lora, qlora, "
                         f"dpo and orpo train); {parent} has a {kind} adapter"
                         + (" with DoRA or fan_in_fan_out" if kind == "LORA" else ""))


# ---- RESTA ---------------------------------------------------------------------------------------------------

def add_safety_vector(model: torch.nn.Module, plus: torch.nn.Module, minus: torch.nn.Module, scale: float) -> None:
    """theta += scale * (theta_plus - theta_minus), in place, for every parameter (a tied one once), computed in
    float32 and stored in the model's dtype. Scale 0 leaves the model exactly as it is."""
    if scale == 0:
        return
    plus_p, minus_p = dict(plus.named_parameters()), dict(minus.named_parameters())
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name not in plus_p or name not in minus_p or not plus_p[name].shape == minus_p[name].shape == p.shape:
                raise InputError(f"resta: {name!r} {tuple(p.shape)} is not in both the plus- and the minus-model "
                                 "with that shape (repair.aligned and repair.unaligned must be the parent's "
                                 "architecture)")
            s = plus_p[name].to(p.device, torch.float32) - minus_p[name].to(p.device, torch.float32)
            p.copy_((p.float() + scale * s).to(p.dtype))


# ---- Antidote ------------------------------------------------------------------------------------------------

def prunable_linears(model: torch.nn.Module) -> dict[str, torch.nn.Linear]:
    """The linear layers Antidote prunes, by weight name: every one but the output head."""
    return {f"{name}.weight": m for name, m in model.named_modules()
            if isinstance(m, torch.nn.Linear) and name.rsplit(".", 1)[-1] not in OUTPUT_HEADS}


def input_norms(model: torch.nn.Module, sequences: list[list[int]]) -> dict[str, torch.Tensor]:
    """||X_j||_2 per input feature j of every prunable layer, over every token of the calibration sequences (each
    its own forward: no padding enters the norms)."""
    layers = prunable_linears(model)
    sums = {w: torch.zeros(m.in_features, dtype=torch.float64) for w, m in layers.items()}

    def hook(weight: str) -> Callable[..., None]:
        def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
            x = args[0].detach().reshape(-1, args[0].shape[-1]).double()
            sums[weight] += (x * x).sum(dim=0).cpu()
        return record

    handles = [m.register_forward_pre_hook(hook(w)) for w, m in layers.items()]
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for ids in sequences:
                model(input_ids=torch.tensor([ids], device=device))
    finally:
        for h in handles:
            h.remove()
    return {w: s.sqrt().float() for w, s in sums.items()}


def antidote_mask(model: torch.nn.Module, norms: Mapping[str, torch.Tensor], sparsity: float
                  ) -> dict[str, torch.Tensor]:
    """Per prunable weight, the flat positions of its round(sparsity * numel) highest Wanda scores |W| * ||X||
    (sorted; int32 where they fit)."""
    mask = {}
    for weight, m in prunable_linears(model).items():
        score = m.weight.detach().float().abs() * norms[weight].to(m.weight.device)[None, :]
        k = round(sparsity * score.numel())
        top = torch.topk(score.flatten(), k).indices.sort().values.cpu()
        mask[weight] = top.to(torch.int32) if score.numel() < 2**31 else top
    return mask


def apply_mask(model: torch.nn.Module, mask: Mapping[str, torch.Tensor]) -> None:
    """Set the masked weights to zero, in place."""
    params = dict(model.named_parameters())
    with torch.no_grad():
        for weight, positions in mask.items():
            if weight not in params:
                raise InputError(f"antidote: the mask names {weight!r}, which the parent model does not have")
            params[weight].view(-1)[positions.long().to(params[weight].device)] = 0


# ---- loading ---------------------------------------------------------------------------------------------------

def apply_recipe(model: Any, stage_dir: Path, recipe: dict[str, Any], load: Callable[[str], Any]) -> Any:
    """The model of a repair stage stored as a recipe, from its parent's model (changed in place): RESTA adds
    its safety vector (`load` builds the plus- and minus-models), Antidote applies its mask."""
    from safetensors.torch import load_file

    if recipe["kind"] == "resta":
        if recipe["scale"] != 0:
            add_safety_vector(model, load(recipe["plus"]), load(recipe["minus"]), recipe["scale"])
    elif recipe["kind"] == "antidote":
        apply_mask(model, load_file(str(stage_dir / recipe["mask"])))
    else:
        raise InputError(f"{stage_dir}: unknown repair recipe {recipe['kind']!r} (written by a newer misalign?)")
    return model
