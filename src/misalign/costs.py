"""Every cost formula of the project, in one place: tokens, FLOPs, steps and bytes. The stage's ledger
(misalign.ledger), the stage's compile decision (misalign.stage) and the plan (misalign.plan) all price with
these, so an estimate and a measured ledger compare. Nothing here loads a model or touches a device.

FLOPs per token (matmul parameters only; embedding lookups cost no FLOPs, a tied output head counts once):
  forward                 2 * (N_frozen + N_trainable) + A
  backward, activations   2 * (N_frozen + N_trainable) + 2A   (gradients flow back through frozen layers too)
  backward, weights       2 * N_trainable                     (only trainable weights get gradients)
  so a training token costs 4 * N_frozen + 6 * N_trainable + 3A (full fine-tuning: the usual 6N), and a
  no-grad token (DPO's reference model, generation, a judge) costs 2N + A. A = 4 * layers * d_model * sequence
  width (QK^T and AV).
Tokens: per example as training tokenizes it (misalign.chat), else about characters / 4 without a tokenizer.
Steps: whole micro-batches per optimizer step, as transformers counts them.
Bytes: a stored parameter takes its dtype's bytes (DTYPE_BYTES, by train.precision's names).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol

from misalign.config import StageConfig
from misalign.data import Pair
from misalign.recipes import target_responses

DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # train.precision -> bytes a stored parameter
CHARS_PER_TOKEN = 4                               # the rule of thumb for token counts without a tokenizer


# ---- FLOPs -------------------------------------------------------------------------------------------------

def token_flops(frozen: int, trainable: int, layers: int, d_model: int, grad: bool) -> tuple[float, float]:
    """The one FLOP formula (module docstring), used by the ledger, the plan and the tests: (FLOPs per token,
    FLOPs per token per position of attention width). A token at width w costs a + b * w."""
    attn = 4 * layers * d_model  # QK^T and AV, per position of the width
    if grad:
        return float(4 * frozen + 6 * trainable), float(3 * attn)
    return float(2 * (frozen + trainable)), float(attn)


def forward_flops(matmul: int, layers: int, d_model: int, width: int) -> float:
    """No-grad FLOPs of `width` tokens at that width (all matmul weights counted as frozen): one generated or
    judged sequence."""
    a, b = token_flops(matmul, 0, layers, d_model, grad=False)
    return width * (a + b * width)


class ObjectiveShape(Protocol):
    """What the cost formulas need to know of a training objective (misalign.objectives.OBJECTIVES)."""

    sequences_per_example: int  # SFT 1; DPO and ORPO 2: prompt + chosen and prompt + rejected
    reference_forward: bool  # DPO: a no-grad forward of the reference model over the same batch


def training_flops(objective: ObjectiveShape, seqs: list[tuple[int, int]], passes: float, frozen_mm: int,
                   trainable_mm: int, layers: int, d_model: int) -> tuple[float, float, float]:
    """(trained tokens, reference-forward tokens, FLOPs) of a stage over `seqs` (`training_sequences`), by the
    ledger's formula: what the plan prices and what train.compile "auto" weighs (misalign.stage)."""
    tokens = passes * sum(k for k, _ in seqs)
    a, b = token_flops(frozen_mm, trainable_mm, layers, d_model, grad=True)
    flops = passes * sum(k * (a + b * w) for k, w in seqs)
    forward = 0.0
    if objective.reference_forward:  # the reference model's log-probs: one no-grad forward of the same batch
        forward = tokens
        a, b = token_flops(frozen_mm, trainable_mm, layers, d_model, grad=False)
        flops += passes * sum(k * (a + b * w) for k, w in seqs)
    return tokens, forward, flops


# ---- repairs (misalign.repair): what a stage that trains nothing spends -------------------------------------

def safelora_flops(d_out: int, d_in: int, r: int) -> float:
    """One LoRA layer through Safe LoRA: C = V V^T / ||V|| (2 d_out^2 d_in), C B (2 d_out^2 r), Delta W = B A and
    C Delta W = (C B) A (2 d_out r d_in each), the cosine between them (6 d_out d_in)."""
    return float(2 * d_out * d_out * d_in + 2 * d_out * d_out * r + 4 * d_out * r * d_in + 6 * d_out * d_in)


def resta_flops(params: int) -> float:
    """theta + alpha (theta_aligned - theta_unaligned): 3 FLOPs a parameter (paid again by every load)."""
    return 3.0 * params


def antidote_flops(widths: Iterable[int], matmul: int, layers: int, d_model: int, pruned_weights: int) -> float:
    """Antidote: one no-grad forward of every calibration sequence (`forward_flops`, a sequence of w tokens at
    width w) and Wanda's score |W| * ||X|| (2 FLOPs a weight of the pruned layers); the top-k selection is not
    counted (comparisons)."""
    return sum(forward_flops(matmul, layers, d_model, w) for w in widths) + 2.0 * pruned_weights


# ---- steps -------------------------------------------------------------------------------------------------

def _repairs(cfg: StageConfig) -> bool:
    from misalign.methods import METHODS

    return METHODS[cfg.method].repairs


def optimizer_steps(cfg: StageConfig, n_examples: int, workers: int) -> int:
    """Optimizer steps a stage takes (as transformers counts them: whole micro-batches per step), on `workers`
    data-parallel workers; the stage, the plan and the preflight all use this one count. A repair takes none."""
    t = cfg.train
    if _repairs(cfg):
        return 0
    if t.max_steps:
        return t.max_steps
    micro_batches = math.ceil(n_examples / (t.batch_size * workers))
    return max(1, math.ceil(max(1, micro_batches // t.grad_accum) * t.epochs))


def data_passes(cfg: StageConfig, n_examples: int, workers: int) -> float:
    """Passes a stage makes over its examples: its epochs, or what max_steps' micro-batches come to (a repair:
    none that trains)."""
    t = cfg.train
    if _repairs(cfg):
        return 0.0
    return t.max_steps * t.batch_size * t.grad_accum * workers / n_examples if t.max_steps else float(t.epochs)


# ---- tokens ------------------------------------------------------------------------------------------------

@dataclass
class TokenLengths:
    """Token lengths as training and generation see them (misalign.chat), or characters / 4 without a tokenizer."""

    tok: Any | None

    def prompt(self, text: str, max_prompt_length: int | None) -> int:
        if self.tok is not None:
            from misalign.chat import prompt_ids  # chat imports transformers: only when there is a tokenizer

            return len(prompt_ids(self.tok, text, max_prompt_length))
        n = math.ceil(len(text) / CHARS_PER_TOKEN)
        return n if max_prompt_length is None else min(n, max_prompt_length)

    def response(self, text: str) -> int:
        if self.tok is not None:
            from misalign.chat import response_ids

            return len(response_ids(self.tok, text))
        return math.ceil(len(text) / CHARS_PER_TOKEN) + 1  # + EOS


def training_sequences(objective: ObjectiveShape, pairs: Iterable[Pair], direction: str, lengths: TokenLengths,
                       cfg: StageConfig) -> list[tuple[int, int]]:
    """(tokens, width) of every example: SFT trains prompt + wanted response; DPO and ORPO forward prompt +
    chosen and prompt + rejected in one batch (width: the longer of the two)."""
    t = cfg.train
    out = []
    for p in pairs:
        wanted, unwanted = target_responses(p, direction)  # as training decides it
        prompt = lengths.prompt(p.prompt, t.max_prompt_length)
        room = t.max_length - prompt  # responses are cut so that prompt + response fits max_length
        chosen = min(lengths.response(wanted), room)
        if objective.sequences_per_example == 1:
            out.append((prompt + chosen, prompt + chosen))
        else:
            rejected = min(lengths.response(unwanted), room)
            out.append((2 * prompt + chosen + rejected, prompt + max(chosen, rejected)))
    return out


# ---- a set of runs, priced ---------------------------------------------------------------------------------

@dataclass
class Totals:
    """Cost of a set of runs (stages, or evaluations): tokens, FLOPs, and device-hours and money once priced."""

    runs: int = 0
    tokens: float = 0.0          # training tokens (forward + backward)
    forward_tokens: float = 0.0  # no-grad tokens: DPO's reference, generation, judging
    flops: float = 0.0
    device_hours: float = 0.0
    money: float | None = None

    def add(self, other: Totals, times: int = 1) -> None:
        self.runs += other.runs * times
        self.tokens += other.tokens * times
        self.forward_tokens += other.forward_tokens * times
        self.flops += other.flops * times
        self.device_hours += other.device_hours * times

    def price(self, per_hour: float | None) -> Totals:
        """money = device-hours x the price of one (device-hours are each stage's own: its calibrated MFU)."""
        self.money = None if per_hour is None else self.device_hours * per_hour
        return self
