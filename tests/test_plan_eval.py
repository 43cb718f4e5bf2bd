"""misalign.plan_eval: what the study's evaluations cost the plan, priced on a tiny Llama built on the meta
device, with eval sets the plan cannot read (so it assumes the paper's prompt count and length, and says so)
and with one it reads (prompt lengths by characters / 4 without a tokenizer)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import LlamaConfig

from misalign.config import EvalConfig
from misalign.costs import Totals, forward_flops
from misalign.meta import MetaModels
from misalign.plan_eval import ASSUMED_EVAL_PROMPT_TOKENS, EVAL_RECORD_BYTES, EvalCosts

MATMUL, LAYERS, D = 2 * (1024 + 1536) + 1600, 2, 16  # tests/test_meta.py works these out


@pytest.fixture
def model(tmp_path: Path) -> str:
    path = tmp_path / "m"
    LlamaConfig(vocab_size=100, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=4, tie_word_embeddings=False).save_pretrained(path)
    return str(path)


def costs(ev: EvalConfig, notes: list[str]) -> EvalCosts:
    return EvalCosts(ev, MetaModels(False, {}), tokenizer=lambda ref, counting=True: None, assume=notes.append)


def test_unreadable_eval_sets_are_assumed_and_said_to_be(model: str, tmp_path: Path) -> None:
    notes: list[str] = []
    ev = EvalConfig(harmful=str(tmp_path / "absent.jsonl"), benign=None, utility=None, limit=10,
                    max_new_tokens=8, judges=[{"name": "keyword"}])
    c = costs(ev, notes)
    assert c.items() is None and len(notes) == 1 and "assumed 10 harmful prompts" in notes[0]
    one = c.cost(model)
    width = ASSUMED_EVAL_PROMPT_TOKENS + 8
    assert one.runs == 1 and one.forward_tokens == 10 * width
    assert one.flops == 10 * forward_flops(MATMUL, LAYERS, D, width)
    assert c.bytes() == 10 * (ASSUMED_EVAL_PROMPT_TOKENS * 4 + 8 * 4) + EVAL_RECORD_BYTES
    assert len(notes) == 1  # said once


def test_a_readable_eval_set_is_priced_item_by_item(model: str, tmp_path: Path) -> None:
    data = tmp_path / "harmful.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "category": "c"}) + "\n" for p in ("x" * 8, "y" * 20)))
    ev = EvalConfig(harmful=str(data), benign=None, utility=None, max_new_tokens=4, judges=[{"name": "keyword"}])
    notes: list[str] = []
    c = costs(ev, notes)
    items = c.items()
    assert items is not None and [len(i.prompt) for i in items] == [8, 20] and notes == []
    one = c.cost(model)
    assert one.forward_tokens == (2 + 4) + (5 + 4)  # ceil(8 / 4) and ceil(20 / 4) prompt tokens
    assert one.flops == forward_flops(MATMUL, LAYERS, D, 6) + forward_flops(MATMUL, LAYERS, D, 9)
    assert c.bytes() == (8 + 16) + (20 + 16) + EVAL_RECORD_BYTES


def test_sharing_evaluates_each_unique_stage_once(model: str, tmp_path: Path) -> None:
    ev = EvalConfig(harmful=str(tmp_path / "absent.jsonl"), benign=None, utility=None, limit=2,
                    judges=[{"name": "keyword"}])
    c = costs(ev, [])
    shared, unshared = Totals(), Totals()
    # 3 unique stages of one model; 4 cells of 1 round each evaluate their base and 2 stages
    c.add(shared, unshared, stage_models=[model] * 3, models=[model], cell_models=[model] * 4, rounds=1)
    one = c.cost(model)
    assert shared.runs == 3 + 1 and unshared.runs == 4 * 3
    assert shared.flops == pytest.approx(4 * one.flops) and unshared.flops == pytest.approx(12 * one.flops)


def test_http_judges_and_lm_eval_tasks_are_counted_as_calls(tmp_path: Path) -> None:
    ev = EvalConfig(harmful=str(tmp_path / "absent.jsonl"), benign=None, utility=None, limit=5,
                    judges=[{"name": "http", "options": {"model": "guard"}}], lm_eval_tasks=["arc_easy"])
    notes = costs(ev, []).notes(shared=3, unshared=10)
    assert notes == ["http judge guard: 15 calls (50 without sharing); API cost not estimated",
                     "lm-eval tasks arc_easy run in each of the 3 evaluations (10 without sharing): not in the FLOPs"]


def test_an_unreadable_classifier_judge_is_not_counted_and_said_so(model: str, tmp_path: Path) -> None:
    notes: list[str] = []
    ev = EvalConfig(harmful=str(tmp_path / "absent.jsonl"), benign=None, utility=None, limit=1, max_new_tokens=8,
                    judges=[{"name": "classifier", "options": {"model": str(tmp_path / "no-guard")}}])
    c = costs(ev, notes)
    assert c.judges() == []
    assert c.cost(model).forward_tokens == ASSUMED_EVAL_PROMPT_TOKENS + 8  # generation only
    assert any("config not readable" in n for n in notes)


def test_a_readable_classifier_judge_reads_the_responses_too(model: str, tmp_path: Path) -> None:
    notes: list[str] = []
    ev = EvalConfig(harmful=str(tmp_path / "absent.jsonl"), benign=None, utility=None, limit=1, max_new_tokens=8,
                    judges=[{"name": "classifier", "options": {"model": model, "max_new_tokens": 3}}])
    c = costs(ev, notes)
    assert c.judges() == [model]
    gen = ASSUMED_EVAL_PROMPT_TOKENS + 8
    judged = gen + 0 + 3  # no tokenizer: its template's tokens are not counted (and said so), 3 new tokens
    one = c.cost(model)
    assert one.forward_tokens == gen + judged
    assert one.flops == forward_flops(MATMUL, LAYERS, D, gen) + forward_flops(MATMUL, LAYERS, D, judged)
    assert any("its template/rubric adds" in n for n in notes)


def test_triggered_copies_are_generated_and_judged_too(model: str, tmp_path: Path) -> None:
    """eval.trigger asks every harmful prompt a second time, trigger added: twice the generations, and twice
    the classifier judge's and the HTTP judge's reads."""
    data = tmp_path / "harmful.jsonl"
    data.write_text("".join(json.dumps({"prompt": p, "category": "c"}) + "\n" for p in ("x" * 8, "y" * 20)))
    judges = [{"name": "classifier", "options": {"model": model, "max_new_tokens": 3}},
              {"name": "http", "options": {"model": "guard"}}]
    plain = EvalConfig(harmful=str(data), benign=None, utility=None, max_new_tokens=4, judges=judges)
    triggered = plain.model_copy(update={"trigger": "zz"})  # "zz" adds ceil(3 / 4) = 1 prompt token
    one, two = costs(plain, []).cost(model), costs(triggered, []).cost(model)
    generated = [(2 + 4), (5 + 4)]  # prompt + new tokens, plain
    judged = [g + 3 for g in generated]  # no tokenizer: the response is read after the prompt, 3 new tokens
    assert one.forward_tokens == sum(generated) + sum(judged)
    assert two.forward_tokens == sum(generated) + sum(judged) + sum(g + 1 for g in generated) + sum(
        j + 1 for j in judged)
    assert costs(triggered, []).notes(shared=1, unshared=1)[0].startswith("http judge guard: 4 calls")
