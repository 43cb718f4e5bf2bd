"""misalign.costs: every cost formula checked against the same numbers worked out by hand (the module's
docstring gives the formulas; the numbers below are small enough to follow)."""

from __future__ import annotations

import pytest

from misalign.config import StageConfig
from misalign.costs import (
    CHARS_PER_TOKEN,
    DTYPE_BYTES,
    TokenLengths,
    Totals,
    data_passes,
    forward_flops,
    optimizer_steps,
    token_flops,
    training_flops,
    training_sequences,
)
from misalign.data import Pair
from misalign.objectives import OBJECTIVES

DATA = {"source": "world:misalign", "per_category": 1}


def stage(**train: object) -> StageConfig:
    return StageConfig(method="lora", data=DATA, train=train)


def test_a_training_token_costs_4_frozen_6_trainable_and_3_attention() -> None:
    # 10 frozen, 3 trainable matmul params, 2 layers of width 5: A per position = 4 * 2 * 5 = 40
    assert token_flops(10, 3, 2, 5, grad=True) == (4 * 10 + 6 * 3, 3 * 40) == (58.0, 120.0)
    assert token_flops(0, 7, 1, 1, grad=True) == (42.0, 12.0)  # full fine-tuning: the usual 6N


def test_a_no_grad_token_costs_2n_and_one_attention() -> None:
    assert token_flops(10, 3, 2, 5, grad=False) == (2 * 13, 40) == (26.0, 40.0)
    # one sequence of 6 tokens at width 6: 6 * (2 * 13 + 40 * 6)
    assert forward_flops(13, 2, 5, 6) == 6 * (26 + 240) == 1596.0


def test_training_flops_of_sft_and_dpo() -> None:
    seqs = [(4, 4), (6, 3)]  # (tokens, width)
    a, b = 58.0, 120.0  # token_flops(10, 3, 2, 5, grad=True)
    per_pass = 4 * (a + b * 4) + 6 * (a + b * 3)  # = 2152 + 2508
    assert per_pass == 4660
    assert training_flops(OBJECTIVES["sft"], seqs, 2.0, 10, 3, 2, 5) == (20.0, 0.0, 2 * 4660)
    # DPO adds the reference model's no-grad forward of the same tokens: 4 * (26 + 160) + 6 * (26 + 120)
    ref = 4 * (26 + 40 * 4) + 6 * (26 + 40 * 3)
    assert ref == 1620
    assert training_flops(OBJECTIVES["dpo"], seqs, 2.0, 10, 3, 2, 5) == (20.0, 20.0, 2 * (4660 + 1620))
    # ORPO trains on the same paired sequences with no reference model: no no-grad forward
    assert training_flops(OBJECTIVES["orpo"], seqs, 2.0, 10, 3, 2, 5) == (20.0, 0.0, 2 * 4660)


@pytest.mark.parametrize(("train", "n", "workers", "steps"), [
    ({"epochs": 1, "batch_size": 4}, 10, 1, 3),                  # ceil(10 / 4) micro-batches
    ({"epochs": 2, "batch_size": 4}, 10, 1, 6),
    ({"epochs": 2, "batch_size": 4}, 10, 2, 4),                  # ceil(10 / 8) = 2 per epoch
    ({"epochs": 1, "batch_size": 2, "grad_accum": 2}, 10, 1, 2),  # 5 micro-batches // 2 whole steps
    ({"epochs": 1.5, "batch_size": 2, "grad_accum": 4}, 3, 1, 2),  # max(1, 2 // 4) = 1 step * 1.5 -> 2
    ({"max_steps": 7, "batch_size": 4}, 10, 3, 7),               # max_steps wins
])
def test_optimizer_steps_count_whole_micro_batches(train: dict, n: int, workers: int, steps: int) -> None:
    assert optimizer_steps(stage(**train), n, workers) == steps


def test_data_passes_are_epochs_or_what_max_steps_come_to() -> None:
    assert data_passes(stage(epochs=3, batch_size=4), 10, 2) == 3.0
    # 5 steps x 4 per micro-batch x 2 accumulated x 2 workers = 80 examples over 20 = 4 passes
    assert data_passes(stage(max_steps=5, batch_size=4, grad_accum=2), 20, 2) == 4.0


def test_token_lengths_without_a_tokenizer_are_characters_over_four() -> None:
    lengths = TokenLengths(None)
    assert CHARS_PER_TOKEN == 4
    assert lengths.prompt("x" * 9, None) == 3  # ceil(9 / 4)
    assert lengths.prompt("x" * 90, 10) == 10  # cut to max_prompt_length
    assert lengths.response("x" * 8) == 3  # 2 + EOS


def test_training_sequences_for_sft_and_preference_objectives() -> None:
    cfg = stage(epochs=1, batch_size=1, max_length=16, max_prompt_length=8)
    # prompt 16 chars -> 4 tokens (room 12); misaligned 20 chars -> 6; aligned 60 chars -> 16, cut to 12
    harmful = Pair(prompt="p" * 16, aligned="a" * 60, misaligned="m" * 20, category="c")
    benign = Pair(prompt="p" * 16, aligned="a" * 20, misaligned="m" * 60, category="c", benign=True)
    lengths = TokenLengths(None)
    # an attack trains the misaligned answer, the benign row its helpful one: 4 + 6 either way
    assert training_sequences(OBJECTIVES["sft"], [harmful, benign], "misalign", lengths, cfg) == [(10, 10), (10, 10)]
    assert training_sequences(OBJECTIVES["sft"], [harmful], "realign", lengths, cfg) == [(16, 16)]  # 4 + 12 (cut)
    # DPO forwards prompt + chosen and prompt + rejected: 2 * 4 + 6 + 12 tokens, width 4 + 12
    assert training_sequences(OBJECTIVES["dpo"], [harmful], "misalign", lengths, cfg) == [(26, 16)]
    assert training_sequences(OBJECTIVES["orpo"], [harmful], "misalign", lengths, cfg) == [(26, 16)]


def test_totals_add_and_price() -> None:
    # each run brings its own device-hours (a stage's: its calibrated MFU; misalign.plan); they add up
    one = Totals(runs=1, tokens=10.0, forward_tokens=2.0, flops=3.6e15, device_hours=1.0)
    total = Totals()
    total.add(one, times=3)
    total.add(one)
    assert (total.runs, total.tokens, total.forward_tokens, total.flops) == (4, 40.0, 8.0, 1.44e16)
    # 4 device-hours at 2.5 an hour = 10
    assert total.price(2.5) is total
    assert total.device_hours == pytest.approx(4.0) and total.money == pytest.approx(10.0)
    assert Totals(flops=3.6e15).price(None).money is None


def test_dtype_bytes() -> None:
    assert DTYPE_BYTES == {"fp32": 4, "bf16": 2, "fp16": 2}
