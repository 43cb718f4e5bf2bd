"""misalign.repair: the post-hoc repair defenses (SafeLoRA, RESTA, Antidote) as defense stages on the world, after
a short LoRA attack, stored on top of their parent and rebuilt by its lineage."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from misalign.config import DataSettings, EvalConfig, StageConfig, TrainSettings, TrialConfig
from misalign.config_stage import RepairSettings
from misalign.errors import InputError
from misalign.lineage import model_identity, trial_stages
from misalign.models import materialize
from misalign.preflight import check_repair_sides
from misalign.records import StageRecord
from misalign.repair import (
    MASK_FILE,
    check_lora_parent,
    prunable_linears,
    safelora_adapter,
    safelora_b,
    safelora_projection,
)
from misalign.stage import StageRun, train_stage
from misalign.storage import Store
from misalign.trial import run_cached_trial

SHORT = TrainSettings(max_steps=2, batch_size=4)
ATTACK = StageConfig(method="lora", data=DataSettings(source="world:misalign", per_category=1), train=SHORT)
REPAIR_DATA = DataSettings(source="world:realign", per_category=1)


def repair_config(method: str, **settings: float) -> StageConfig:
    return StageConfig(method=method, data=REPAIR_DATA, repair=RepairSettings(**settings))


def logits(model: torch.nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=torch.tensor([[1, 5, 9, 17, 33]])).logits


# ---- the math, by hand ------------------------------------------------------------------------------------------

def test_safelora_projects_a_small_adapter_as_computed_by_hand() -> None:
    # V = W_aligned - W_unaligned = [[2, 0], [0, 0]]: ||V||_F = 2, C = V V^T / 2 = [[2, 0], [0, 0]]
    aligned, unaligned = torch.tensor([[3.0, 1.0], [1.0, 1.0]]), torch.tensor([[1.0, 1.0], [1.0, 1.0]])
    c = safelora_projection(aligned, unaligned)
    assert torch.equal(c, torch.tensor([[2.0, 0.0], [0.0, 0.0]]))
    # B A = [[1, 0], [1, 0]], C B A = [[2, 0], [0, 0]]: cosine 2 / (sqrt(2) * 2) = 1 / sqrt(2)
    b, a = torch.tensor([[1.0], [1.0]]), torch.tensor([[1.0, 0.0]])
    projected, cos = safelora_b(b, a, c, threshold=0.8)
    assert cos == pytest.approx(1 / math.sqrt(2))
    assert torch.equal(projected, torch.tensor([[1.0], [-1.0]]))  # (C - I) B
    assert torch.equal(b @ a + projected @ a, c @ b @ a)  # merged into the parent: Delta W becomes C Delta W
    kept, _ = safelora_b(b, a, c, threshold=0.5)  # similar enough: the layer is left as it is
    assert torch.equal(kept, torch.zeros(2, 1))
    # the adapter's tensors by peft's key names, A unchanged
    lora = {"base_model.model.layer.lora_A.weight": a, "base_model.model.layer.lora_B.weight": b}
    tensors, summary, flops = safelora_adapter(lora, {"layer.weight": aligned}, {"layer.weight": unaligned}, 0.8)
    assert torch.equal(tensors["base_model.model.layer.lora_B.weight"], projected)
    assert torch.equal(tensors["base_model.model.layer.lora_A.weight"], a)
    assert summary["projected"] == summary["layers"] == 1 and flops > 0


def test_a_layer_the_alignment_left_alone_projects_to_nothing() -> None:
    w = torch.ones(3, 2)
    assert torch.equal(safelora_projection(w, w), torch.zeros(3, 3))


# ---- stages on the world ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def attacked(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short LoRA attack on world:base (2 optimizer steps)."""
    out = tmp_path_factory.mktemp("repair") / "attack"
    train_stage(StageRun("world:base", ATTACK, "misalign", out, progress=False))
    return out


@pytest.fixture(scope="module")
def fully_attacked(world: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A short full fine-tuning attack on world:base (2 optimizer steps)."""
    out = tmp_path_factory.mktemp("repair") / "full"
    train_stage(StageRun("world:base", ATTACK.model_copy(update={"method": "full"}), "misalign", out,
                         progress=False))
    return out


def repaired(parent: Path, cfg: StageConfig, out: Path) -> torch.nn.Module:
    _, handed = train_stage(StageRun(str(parent), cfg, "realign", out, progress=False))
    return handed


def test_resta_at_scale_zero_is_the_parent(attacked: Path, tmp_path: Path) -> None:
    handed = repaired(attacked, repair_config("resta", scale=0), tmp_path / "resta")
    parent = logits(materialize(attacked))
    assert torch.equal(logits(materialize(tmp_path / "resta")), parent)
    assert torch.equal(logits(handed), parent)
    assert not (tmp_path / "resta" / "adapter").exists()  # a recipe, not weights
    assert StageRecord.read(tmp_path / "resta").repair == {"kind": "resta", "plus": "world:base",
                                                           "minus": "world:pretrained", "scale": 0.0}


def test_resta_adds_the_scaled_safety_vector(attacked: Path, tmp_path: Path) -> None:
    handed = repaired(attacked, repair_config("resta", scale=0.5), tmp_path / "resta")
    parent, plus, minus = (dict(materialize(ref).named_parameters())
                           for ref in (attacked, "world:base", "world:pretrained"))
    rebuilt = dict(materialize(tmp_path / "resta").named_parameters())
    name = "model.layers.0.self_attn.q_proj.weight"
    expected = parent[name] + 0.5 * (plus[name] - minus[name])
    assert torch.allclose(rebuilt[name], expected, atol=1e-6)
    assert torch.equal(dict(handed.named_parameters())[name], rebuilt[name])


def test_antidote_prunes_exactly_the_fraction_asked(attacked: Path, tmp_path: Path) -> None:
    repaired(attacked, repair_config("antidote", sparsity=0.3), tmp_path / "antidote")
    mask = load_file(str(tmp_path / "antidote" / MASK_FILE))
    parent, child = materialize(attacked), materialize(tmp_path / "antidote")
    layers = prunable_linears(parent)
    assert set(mask) == set(layers) and "lm_head.weight" not in mask  # every linear layer but the output head
    after = dict(child.named_parameters())
    for weight, module in layers.items():
        positions = mask[weight].long()
        assert mask[weight].dtype == torch.int32 and len(positions) == round(0.3 * module.weight.numel())
        assert len(set(positions.tolist())) == len(positions)
        assert torch.all(after[weight].view(-1)[positions] == 0)
        kept = torch.ones(module.weight.numel(), dtype=torch.bool)
        kept[positions] = False
        assert torch.equal(after[weight].view(-1)[kept], module.weight.view(-1)[kept])
    ledger = json.loads((tmp_path / "antidote" / "ledger.json").read_text())
    assert ledger["examples"] > 0 and ledger["ref_tokens"] > 0 and ledger["flops"] > 0  # its budget


def test_safelora_stores_an_adapter_the_size_of_its_parents(attacked: Path, tmp_path: Path) -> None:
    handed = repaired(attacked, repair_config("safelora", threshold=1.0), tmp_path / "safelora")  # every layer
    parent = load_file(str(attacked / "adapter" / "adapter_model.safetensors"))
    stored = load_file(str(tmp_path / "safelora" / "adapter" / "adapter_model.safetensors"))
    assert stored.keys() == parent.keys() and all(stored[k].shape == parent[k].shape for k in parent)
    assert torch.equal(logits(handed), logits(materialize(tmp_path / "safelora")))
    assert not torch.equal(logits(handed), logits(materialize(attacked)))


def test_resta_and_antidote_repair_a_full_stage(fully_attacked: Path, tmp_path: Path) -> None:
    parent = materialize(fully_attacked)
    for cfg in (repair_config("resta", scale=0.5), repair_config("antidote", sparsity=0.1)):
        handed = repaired(fully_attacked, cfg, tmp_path / cfg.method)
        rebuilt = materialize(tmp_path / cfg.method)  # model/ of the full stage, then the recipe
        assert torch.equal(logits(handed), logits(rebuilt)) and not torch.equal(logits(rebuilt), logits(parent))


def test_safelora_refuses_a_parent_that_is_not_lora(fully_attacked: Path, tmp_path: Path) -> None:
    with pytest.raises(InputError, match="safelora needs a LoRA parent.*full"):
        check_repair_sides("full", "safelora")  # the trial's and the study's preflight: before the attack trains
    with pytest.raises(InputError, match="is a repair"):
        check_repair_sides("resta", "lora")
    for adapter in ({"peft_type": "IA3"}, {"peft_type": "ADALORA"}, {"peft_type": "LORA", "use_dora": True}):
        with pytest.raises(InputError, match="safelora needs a parent stage with a LoRA adapter"):
            check_lora_parent(adapter, "stages/x")
    check_lora_parent({"peft_type": "LORA"}, "stages/x")
    with pytest.raises(InputError, match="safelora needs a parent stage with a LoRA adapter.*full fine-tuning"):
        repaired(fully_attacked, repair_config("safelora"), tmp_path / "safelora")
    assert not (tmp_path / "safelora").exists()  # refused before anything was computed or written
    with pytest.raises(InputError, match="is a model, not a stage"):
        repaired(Path("world:base"), repair_config("safelora"), tmp_path / "root")


@pytest.mark.parametrize("method", ["safelora", "resta", "antidote"])
def test_each_repair_is_a_defense_stage_of_a_trial(world: Path, tmp_path_factory: pytest.TempPathFactory,
                                                   method: str) -> None:
    """attack (LoRA, 2 steps), then the repair as the defense, evaluated; the cache shares the attack."""
    cache = tmp_path_factory.getbasetemp() / "repair-cache"
    trial = TrialConfig(model="world:base", attack=ATTACK, defense=repair_config(method),
                        eval=EvalConfig(judges=[{"name": "keyword"}], limit=3, max_new_tokens=8))
    rows = run_cached_trial(trial, {"method": method}, Store(cache), (Store(cache), f"rows-{method}.parquet"))
    defense = next(r for r in rows if r["phase"] == "realign")
    assert 0 <= defense["unsafety"] <= 1 and defense["utility"] is not None
    assert defense["n_examples"] == (13 if method == "antidote" else 0)  # rows read: one per category, or none
    key = trial_stages(model_identity("world:base"), 1, ATTACK.resolved(), trial.defense.resolved(), 0)[-1][3]
    stage = cache / key
    record = StageRecord.read(stage)
    assert record.config["method"] == method and record.parent_dir is not None
    assert torch.isfinite(logits(materialize(stage))).all()  # loads from its lineage
