"""`misalign study plan`'s estimate: grid counts, exact parameter counts, tokens from the data, FLOPs and hours.

Nothing trains here: models are built from their configs on the meta device, so the paper's four 7-9B models
plan in seconds. On the world, the estimate also matches measured ledgers: the lora and orpo attack stages at
10 per category measured 24,495 and 40,970 training tokens and 85 optimizer steps, exactly the plan's numbers,
and FLOPs within 1% (the plan ignores padding to the batch's longest example).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from misalign.config import StudyConfig, load_config
from misalign.errors import InputError
from misalign.plan import estimate
from misalign.plan_render import render

PAPER_PARAMS = {  # published config.json values -> exact parameter counts
    "meta-llama/Llama-3.1-8B-Instruct": 8_030_261_248,
    "mistralai/Mistral-7B-Instruct-v0.3": 7_248_023_552,
    "google/gemma-2-9b-it": 9_241_705_984,
    "THUDM/glm-4-9b-chat-hf": 9_399_951_360,
}


@pytest.fixture(scope="module")
def tiny(world):
    study = load_config("configs/study-tiny.yaml", schema=StudyConfig)
    return study, estimate(study)


@pytest.fixture(scope="module")
def paper():
    study = load_config("configs/study-paper.yaml", schema=StudyConfig)
    return study, estimate(study)


def _stage(plan, phase, method, per_category):
    found = [s for s in plan.stages if (s.phase, s.method, s.per_category) == (phase, method, per_category)]
    assert found, (phase, method, per_category)
    return found[0]


def _check_hours(plan):
    effective = plan.peak_flops * plan.mfu
    for rows in (plan.shared, plan.unshared):
        for name, t in rows.items():
            assert t.flops > 0, name
            assert t.device_hours == pytest.approx(t.flops / effective / 3600, rel=1e-12), name
            if plan.price_per_device_hour is not None:
                assert t.money == pytest.approx(t.device_hours * plan.price_per_device_hour, rel=1e-12)
        parts = sum(rows[p].flops for p in ("misalign", "realign", "eval"))
        assert rows["total"].flops == pytest.approx(parts, rel=1e-12)
    for s in plan.stages:
        assert s.device_hours == pytest.approx(s.flops / effective / 3600, rel=1e-12)


# ---- the offline world: real data, real tokenizer ----------------------------------------------------------

def test_tiny_counts(tiny):
    _, p = tiny
    # 2 seeds x (lora, orpo) x (0.25, 1) attacks x (lora at 3, 10, 20 + dpo at 3, 10: per_method) defenses
    assert (p.cells, p.stage_uses, p.unique_stages) == (40, 80, 48)
    assert (p.shared["misalign"].runs, p.shared["realign"].runs) == (8, 40)
    assert (p.unshared["misalign"].runs, p.unshared["realign"].runs) == (40, 40)
    assert not [s for s in p.stages if s.method == "dpo" and s.per_category == 20]
    # one eval per unique stage + the base model (seeds share it), vs one per row: 40 cells x (1 + 2 x 1 round)
    assert (p.shared["eval"].runs, p.unshared["eval"].runs) == (49, 120)
    assert p.assumptions == []  # every number is measured from the world's data and tokenizer
    assert [m.role for m in p.models] == ["model", "judge"]
    _check_hours(p)


def test_tiny_tokens_come_from_the_data(tiny):
    from misalign.chat import encode_sft
    from misalign.modelref import resolve_model_path
    from misalign.models import load_tokenizer
    from misalign.recipes import stage_pairs

    study, p = tiny
    cfg = study.attack.stage({"method": "lora", "per_category": 1}).resolved()
    pairs = stage_pairs(cfg, seed=0)
    tok = load_tokenizer(resolve_model_path("world:base"))
    t = cfg.train
    lengths = [len(encode_sft(tok, x.prompt, x.misaligned, t.max_length, t.max_prompt_length)["input_ids"])
               for x in pairs]
    s = _stage(p, "misalign", "lora", 1)
    assert s.examples == len(pairs) == 13 and not s.examples_assumed
    assert s.tokens == t.epochs * sum(lengths)
    assert s.optimizer_steps == 10  # 13 rows / batch 8 -> 2 steps an epoch, 5 epochs
    assert _stage(p, "misalign", "lora", 0.25).examples == 3  # a quarter of the 13 categories, one row each
    # FLOPs by hand, the ledger's formula on the real (not meta) model with its LoRA adapter
    from peft import get_peft_model

    from misalign.ledger import matmul_params
    from misalign.methods import METHODS, peft_config
    from misalign.models import load_model

    model = load_model(resolve_model_path("world:base"))
    model = get_peft_model(model, peft_config(METHODS["lora"], cfg, model, 10))
    frozen, trainable = matmul_params(model)
    assert s.trainable_params == sum(q.numel() for q in model.parameters() if q.requires_grad)
    c = model.base_model.model.config
    attn = 4 * c.num_hidden_layers * c.hidden_size
    assert s.flops == pytest.approx(t.epochs * sum(n * (4 * frozen + 6 * trainable + 3 * attn * n) for n in lengths),
                                    rel=1e-9)


def test_tiny_preference_and_benign_share(tiny):
    _, p = tiny
    dpo = _stage(p, "realign", "dpo", 3)
    assert dpo.examples == 2 * 39  # 3 x 13 harmful rows + benign_ratio 1.0 of benign rows
    assert dpo.forward_tokens == dpo.tokens > 0  # the reference model forwards every training token once
    sft = _stage(p, "realign", "lora", 3)
    assert sft.forward_tokens == 0 and dpo.tokens_per_example > 1.5 * sft.tokens_per_example  # chosen + rejected
    # a shared attack stage is used by every defense point (lora at 3 sizes, dpo at 2); every defense stage by one
    assert {s.uses for s in p.stages if s.phase == "misalign"} == {5}
    assert {s.uses for s in p.stages if s.phase == "realign"} == {1}


# ---- the paper's grid: published configs, assumed data -------------------------------------------------------

def test_paper_param_counts(paper):
    _, p = paper
    models = {m.model: m for m in p.models if m.role == "model"}
    assert {k: m.total_params for k, m in models.items()} == PAPER_PARAMS
    llama = models["meta-llama/Llama-3.1-8B-Instruct"]
    # LoRA r=16 on q (4096 -> 4096) and v (4096 -> 1024), 32 layers; all linear layers for DPO/ORPO
    assert llama.trainable["lora"] == llama.trainable["qlora"] == 32 * 16 * ((4096 + 4096) + (4096 + 1024))
    all_linear = 16 * (2 * (4096 + 4096) + 2 * (4096 + 1024) + 3 * (4096 + 14336))
    assert llama.trainable["dpo"] == llama.trainable["orpo"] == 32 * all_linear
    assert llama.trainable["full"] == llama.total_params
    judge = [m for m in p.models if m.role == "judge"]
    assert [(m.model, m.total_params) for m in judge] == [("meta-llama/Llama-Guard-3-8B", 8_030_261_248)]


def test_paper_sharing_saves_exactly_the_duplicated_attacks(paper):
    _, p = paper
    assert (p.cells, p.stage_uses, p.unique_stages) == (672, 1344, 784)
    attacks = [s for s in p.stages if s.phase == "misalign"]
    assert len(attacks) == 4 * 7 * 4 and {s.uses for s in attacks} == {6}  # each shared by 3 x 2 defenses
    assert p.unshared["misalign"].runs - p.shared["misalign"].runs == sum(s.uses - 1 for s in attacks) == 560
    assert p.unshared["misalign"].flops == pytest.approx(sum(s.flops * s.uses for s in attacks), rel=1e-12)
    assert p.unshared["misalign"].tokens == pytest.approx(6 * p.shared["misalign"].tokens, rel=1e-12)
    assert p.unshared["realign"] == p.shared["realign"]  # no defense stage is shared (rounds: 1)
    assert (p.shared["eval"].runs, p.unshared["eval"].runs) == (784 + 4, 672 * 3)
    _check_hours(p)
    assert p.shared["total"].money == pytest.approx(2.5 * p.shared["total"].device_hours)


def test_paper_assumed_numbers_are_flagged(paper):
    study, p = paper
    assert all(s.examples_assumed for s in p.stages)
    s = _stage(p, "misalign", "lora", 30)
    assert s.examples == 13 * 30 and s.tokens == 5 * 390 * 300 and s.optimizer_steps == 390 * 5
    orpo = _stage(p, "misalign", "orpo", 1)
    assert orpo.tokens == 5 * 13 * 2 * 300 and orpo.optimizer_steps == 15  # 13 rows / accumulation 4 = 3 a pass
    text = "\n".join(p.assumptions)
    for needle in ("data/MisQA.csv", "data/SafeRLHF.csv", "plan.categories = 13", "plan.tokens_per_example = 300",
                   "data/jailbreak_test_set.csv", "1,900 harmful prompts"):
        assert needle in text, needle
    out = render(p)
    assert "Assumed" in out and "13-390*" in out and "gpt-4o-mini" in out and "lm-eval" in out
    for name in PAPER_PARAMS:
        assert name in out
    json.dumps(p.to_dict())  # --json


def test_paper_stages_that_compile_on_gpus(paper):
    """train.compile auto, as a GPU worker resolves it: the stages whose training FLOPs repay a compile (the DPO
    defenses at 50 per category under LoRA, the full attacks at 30), and the plan says how many."""
    _, p = paper
    compiled = {(s.phase, s.method, s.per_category) for s in p.stages if s.compiled_on_gpu}
    assert compiled == {("realign", "dpo", 50), ("misalign", "full", 30)}
    assert all(s.flops >= 1e17 for s in p.stages if s.compiled_on_gpu and s.method == "dpo")
    n = sum(s.compiled_on_gpu for s in p.stages)
    assert n == 60 and f"on GPU workers {n} of {len(p.stages)} unique stages compile" in "\n".join(p.notes)


# ---- bad input -------------------------------------------------------------------------------------------

def test_unreadable_model_config_is_an_input_error(paper):
    study, _ = paper
    bad = study.model_copy(update={"models": ["nobody/no-such-model"]})
    with pytest.raises(InputError, match=r"plan\.model_configs"):
        estimate(bad)


def test_malformed_present_data_is_an_input_error_not_an_assumption(paper, tmp_path):
    study, _ = paper
    csv = tmp_path / "MisQA.csv"
    csv.write_text("question,answer\nhow?,like this\n")  # there, but not MisQA's columns
    side = study.attack.model_copy(update={"methods": ["lora"], "per_category": [1], "per_method": {},
                                           "data": study.attack.data.model_copy(update={"source": str(csv)})})
    with pytest.raises(InputError, match="no column"):
        estimate(study.model_copy(update={"attack": side}))


# ---- storage: adapter-only stages in the parent's dtype, full fine-tuning's weights ----------------------------

def test_paper_storage_is_adapters_and_full_weights(paper):
    study, p = paper
    n = {m.model: m.total_params for m in p.models if m.role == "model"}
    sizes = len(study.attack.per_category)
    full_stages = sizes  # per model: full fine-tuning at each attack size
    assert sum(s.method == "full" for s in p.stages) == full_stages * len(n) == 16
    # by hand, from the plan's own parameter counts: bf16 full weights
    full = sum(full_stages * 2 * total for total in n.values())
    assert 2.6e11 < full < 2.8e11
    shared = p.storage["shared"]
    assert shared.weights == pytest.approx(full, rel=0.005)  # + the 16 assumed tokenizers
    assert 4e10 < shared.adapters < 6e10 and shared.weights > 0.8 * shared.total
    for s in p.stages:
        assert s.dtype == "bf16"
        if s.method == "full":
            assert s.stored.weights >= 2 * n[s.model] and s.stored.adapters == 0
        else:
            assert s.stored.adapters == 2 * s.trainable_params and s.stored.weights == 0
    # without sharing every cell keeps its own attack (each shared by 6 cells) and its own base evaluation
    attacks = [s for s in p.stages if s.phase == "misalign"]
    one_eval = shared.evals / (len(p.stages) + len(n))  # every stage's evaluation + a base evaluation per model
    assert p.storage["unshared"].total - shared.total == pytest.approx(
        sum(5 * s.stored.total for s in attacks) + (p.cells - len(n)) * one_eval, rel=1e-9)
    assert "gemma-2-9b-it: stored in bf16" in "\n".join(p.assumptions)  # its config records float32


def test_paper_bytes_moved_per_cell(paper):
    _, p = paper
    moved = p.moved
    assert moved.cells == p.cells
    # with sharing, every unique stage and base evaluation is written once: what the study keeps
    assert moved.written == pytest.approx(p.storage["shared"].total, rel=1e-9)
    roots = [m.total_params * 2 for m in p.models if m.role == "model"]
    # each model's cells read its bf16 root once each (or a full attack's weights, the same size) plus adapters
    per_model_cells = p.cells / len(roots)
    assert per_model_cells * sum(roots) <= moved.read < 1.01 * per_model_cells * sum(roots)
    assert moved.per_cell == pytest.approx((moved.read + moved.written) / p.cells)
    out = render(p)
    assert "Storage kept until the study ends" in out and "Bytes moved per cell" in out
    d = p.to_dict()
    assert set(d["storage"]) == {"shared", "unshared"} and d["moved"]["cells"] == p.cells


def test_precision_auto_is_read_from_the_weights_or_said_to_come_from_the_config(world, paper):
    """auto is the parent's dtype: read from the world's weights (float32), and for the paper's models, whose
    weights are not here, from their configs (bfloat16; Gemma-2's says float32), with the assumption said."""
    assert all(s.dtype == "fp32" for s in estimate(load_config(
        "configs/study-tiny.yaml", schema=StudyConfig, overrides=["attack.train.precision=auto"])).stages)
    study, _ = paper
    auto = estimate(load_config("configs/study-paper.yaml", schema=StudyConfig, overrides=[
        "attack.train.precision=auto", "defense.train.precision=auto"]))
    dtypes = {s.model: s.dtype for s in auto.stages}
    assert dtypes == {m: "fp32" if "gemma" in m else "bf16" for m in study.models}
    said = "\n".join(auto.assumptions)
    assert "gemma-2-9b-it: train.precision auto taken as fp32, from the dtype its config records (fp32)" in said
    assert "Llama-3.1-8B-Instruct: train.precision auto taken as bf16" in said
    # the shipped config names its models by unpinned hub ids: the plan says what that means on several nodes
    assert any("hub ids without a revision (meta-llama/Llama-3.1-8B-Instruct, " in n for n in auto.notes)
    assert not any("without a revision" in n for n in estimate(load_config(
        "configs/study-tiny.yaml", schema=StudyConfig)).notes)


def test_tiny_adapter_bytes_are_trainable_params_in_fp32(tiny):
    _, p = tiny
    total = {m.model: m.total_params for m in p.models}
    for s in p.stages:
        assert s.dtype == "fp32"  # the world trains and stores in float32
        if s.method == "full":
            assert s.stored.weights > 4 * total[s.model] and s.stored.adapters == 0
        else:
            assert s.stored.adapters == 4 * s.trainable_params and s.stored.weights == 0
    assert 0 < p.storage["shared"].total < p.storage["unshared"].total


def test_repairs_are_priced_as_what_they_do(world):
    """A post-hoc repair trains nothing: RESTA adds a vector (3 FLOPs a parameter), Antidote forwards its harmful
    calibration rows, SafeLoRA is priced over every linear layer and says it is an upper bound."""
    import yaml

    from misalign.costs import resta_flops

    d = yaml.safe_load(Path("configs/study-tiny.yaml").read_text())
    d["defense"] = {"methods": ["safelora", "resta", "antidote"], "per_category": [3],
                    "data": {"source": "world:misalign"}}
    p = estimate(StudyConfig.model_validate(d))
    realign = {s.method: s for s in p.stages if s.phase == "realign"}
    assert all(s.tokens == 0 and s.optimizer_steps == 0 and s.trainable_params == 0 for s in realign.values())
    params = next(m.total_params for m in p.models if m.role == "model")
    assert realign["resta"].flops == resta_flops(params) and realign["resta"].forward_tokens == 0
    assert realign["antidote"].examples == 3 * 13 and realign["antidote"].forward_tokens > 0
    assert realign["antidote"].flops > realign["resta"].flops
    assert realign["safelora"].flops > 0 and any("safelora stages priced over every linear" in a
                                                 for a in p.assumptions)
