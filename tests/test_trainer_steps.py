"""What the stage changes in trl's trainers to cut host time per step (issue 13; bench/bench_host.py measures
it) changes no number: DPO's reference log-probs and loss are those of trl's own reference path, and the
Trainer's per-step walks of the model, made on lists taken once, do what its own walks do (misalign.objectives,
misalign.speedups). A whole stage trained with and without them, and a diverged step in the log without the NaN
filter's syncs: tests/test_stage.py."""

from __future__ import annotations

import contextlib

import torch
from peft import get_peft_model
from trl import DPOTrainer

from misalign.config import DataSettings, StageConfig
from misalign.data import stage_pairs
from misalign.methods import METHODS, peft_config
from misalign.modelref import resolve_model_path
from misalign.models import load_model, load_tokenizer
from misalign.objectives import OBJECTIVES
from misalign.speedups import module_walks_once
from misalign.stage import stage_dataset, training_args


def _dpo_parts(tmp_path):
    cfg = StageConfig(method="dpo", data=DataSettings(source="world:realign", per_category=2)).resolved()
    pairs = stage_pairs(cfg, seed=0)
    path = resolve_model_path("world:base")
    tok = load_tokenizer(path)
    torch.manual_seed(0)  # both adapters start from the same draw of LoRA's A
    model = get_peft_model(load_model(path, precision="fp32"), peft_config(METHODS["dpo"], cfg, load_model(path), 4))
    args = training_args(OBJECTIVES["dpo"], cfg, tmp_path, 0, len(pairs), None)
    return model, args, stage_dataset(OBJECTIVES["dpo"], pairs, "realign", tok, cfg), tok


def _loss(trainer, model, batch) -> torch.Tensor:
    model.train()
    with torch.no_grad():
        return trainer.compute_loss(model, batch)


def test_dpo_reference_is_the_disabled_adapter_and_gives_trls_loss(world, tmp_path):
    ours_model, args, dataset, tok = _dpo_parts(tmp_path / "ours")
    ours = OBJECTIVES["dpo"].trainer(ours_model, args, dataset, tok, [])
    assert "ref" not in ours_model.peft_config  # no copy of the new adapter as the reference
    assert "disable_adapter" in vars(ours_model)  # the stage's switch, not peft's walk over every module

    trl_model, args, dataset, tok = _dpo_parts(tmp_path / "trl")
    plain = DPOTrainer(model=trl_model, ref_model=None, args=args, train_dataset=dataset, processing_class=tok)
    assert "ref" in trl_model.peft_config  # what trl does with an already wrapped model, left to itself

    batch = next(iter(plain.get_train_dataloader()))
    torch.manual_seed(1)
    reference = _loss(plain, trl_model, batch)
    torch.manual_seed(1)
    assert reference.item() > 0 and torch.equal(_loss(ours, ours_model, batch), reference)

    # a trained adapter (B no longer 0), so the reference forward differs from the policy's: the stage's switch
    # gives peft's numbers, and a switch that left the adapter on would not
    with torch.no_grad():
        for n, p in ours_model.named_parameters():
            if "lora_B" in n:
                p.copy_(torch.randn_like(p) * 0.05)
    losses = {}
    for switch in ("ours", "peft", "none"):
        if switch == "peft":
            del ours_model.disable_adapter  # peft's own switch again, on the same model
        if switch == "none":
            ours_model.disable_adapter = contextlib.nullcontext
        torch.manual_seed(1)
        losses[switch] = _loss(ours, ours_model, batch)
    assert torch.equal(losses["ours"], losses["peft"]) and not torch.equal(losses["ours"], losses["none"])
    # the switch leaves the adapter on and trainable after each reference forward
    layers = [m for m in ours_model.modules() if hasattr(m, "_disable_adapters")]
    assert layers and not any(m._disable_adapters for m in layers)
    assert all(p.requires_grad for n, p in ours_model.named_parameters() if "lora_" in n)


def test_module_walks_made_once_do_what_the_trainers_walks_do(world, tmp_path):
    """The Trainer's per-step walks of the whole model (train mode, zero_grad, its FLOP log's parameter count)
    on lists made once: every module switched, every gradient cleared, the same FLOP count; undone after."""
    model, args, dataset, tok = _dpo_parts(tmp_path)
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
