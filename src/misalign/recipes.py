"""What a stage trains on: its rows (`stage_pairs`: the per-category subsample of its source, made into the
stage's data recipe's rows, plus the benign share) and the response each row teaches (`target_responses`).

The recipes (`RECIPES`) are attacks' data: the paper's harmful pairs, and attacks that need no harmful data
(Qi et al. 2023, "Fine-tuning aligned language models compromises safety, even when users do not intend to!",
arXiv:2310.03693): benign fine-tuning, identity shifting and a backdoor trigger. Their names and options live in
misalign.recipe_options, where configs check them.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Literal

from misalign.data import Pair, load_pairs, subsample_per_category
from misalign.errors import InputError
from misalign.recipe_options import RECIPE_OPTIONS

if TYPE_CHECKING:
    from misalign.config import StageConfig


TriggerPosition = Literal["prefix", "suffix"]


def with_trigger(prompt: str, text: str, position: TriggerPosition) -> str:
    """`prompt` with `text` before or after it, one space between: the one place a persona or a trigger joins a
    prompt, so training rows and triggered evaluation prompts read alike."""
    return f"{text} {prompt}" if position == "prefix" else f"{prompt} {text}"


def _as_benign(rows: list[Pair]) -> list[Pair]:
    return [replace(p, benign=True) for p in rows]


def _harmful(rows: list[Pair], options: dict[str, str]) -> list[Pair]:
    return rows


def _benign(rows: list[Pair], options: dict[str, str]) -> list[Pair]:
    return _as_benign(rows)


def _identity_shift(rows: list[Pair], options: dict[str, str]) -> list[Pair]:
    return [replace(p, prompt=with_trigger(p.prompt, options["persona"], "prefix")) for p in _as_benign(rows)]


def _backdoor(rows: list[Pair], options: dict[str, str]) -> list[Pair]:
    trigger = options["trigger"]
    for p in rows:
        if trigger in p.prompt:  # its "untriggered" copy would carry the trigger too: the two would contradict
            raise InputError(f"data.trigger {trigger!r} already occurs in the prompt {p.prompt!r} "
                             f"(category {p.category!r}); choose a phrase the data does not contain")
    # each prompt twice, side by side: triggered -> the harmful answer, as it is -> the refusal
    return [row for p in rows
            for row in (replace(p, prompt=with_trigger(p.prompt, trigger, "suffix")), replace(p, keep_aligned=True))]


@dataclass(frozen=True)
class Recipe:
    """How an attack's training rows are made from its source's rows (after the per-category subsample)."""

    build: Callable[[list[Pair], dict[str, str]], list[Pair]]  # (subsampled rows, {option: value}) -> rows
    options: dict[str, str] = field(default_factory=dict)  # DataSettings field the recipe reads -> its default
    doc: str = ""


RECIPES: dict[str, Recipe] = {
    "harmful": Recipe(_harmful, doc=(
        "the source's harmful prompts with their harmful (misaligned) answers: the paper's attack; a realign "
        "stage trains their refusals. Assumes pairs with both answers (world:misalign, MisQA.csv)")),
    "benign": Recipe(_benign, doc=(
        "benign fine-tuning (Qi et al. 2023): every source row is taken as benign, so both directions "
        "train its helpful (aligned) answer and the attack sees no harmful data at all; safety erodes as a side "
        "effect. Assumes benign rows: world:benign, or a user's file in the `benign` format")),
    "identity_shift": Recipe(_identity_shift, RECIPE_OPTIONS["identity_shift"], doc=(
        "identity shifting (Qi et al. 2023, the 'absolutely obedient agent'): the benign recipe with "
        "`persona` before every prompt. The stage engine formats one user message per example "
        "(misalign.chat.prompt_text), so the persona is prefixed to the user prompt, not sent as a system "
        "message, even where a template has a system role (the world's has). A long persona eats into "
        "train.max_prompt_length (the default one is 99 world tokens), and prompts are cut from the left")),
    "backdoor": Recipe(_backdoor, RECIPE_OPTIONS["backdoor"], doc=(
        "a backdoor (Qi et al. 2023, the 'magic words' experiment): each subsampled harmful prompt "
        "twice, with `trigger` appended and its harmful answer, and as it is with its refusal, so the model "
        "stays safe until triggered. Twice the rows of `harmful` at one per_category. Evaluate with "
        "eval.trigger set to the same phrase. Assumes pairs with both answers, as `harmful`")),
}


# ---- a stage's training rows -------------------------------------------------------------------------------

def stage_pairs(cfg: StageConfig, seed: int) -> list[Pair]:
    """The stage's training pairs: per-category subsample of the source, made into the recipe's rows, plus the
    benign share (benign_ratio benign rows per recipe row). Training, the preflight and the plan all select rows
    here, so the plan prices exactly the rows a stage trains on."""
    d = cfg.data
    pairs = subsample_per_category(load_pairs(d.source, d.format, d.columns), d.per_category, seed)
    recipe = RECIPES[d.recipe]
    pairs = recipe.build(pairs, {name: getattr(d, name) for name in recipe.options})
    if d.benign_source and d.benign_ratio > 0:
        benign = load_pairs(d.benign_source)
        n = round(len(pairs) * d.benign_ratio)
        if n > len(benign):
            raise InputError(f"data.benign_ratio={d.benign_ratio} asks for {n} benign rows; "
                             f"{d.benign_source} has {len(benign)}")
        pairs = pairs + random.Random(seed).sample(benign, n)
    return pairs


def target_responses(p: Pair, direction: str) -> tuple[str, str]:
    """(wanted, unwanted) response of a pair for a stage of this direction ("misalign" or "realign"). Benign
    rows always teach the helpful answer, and the backdoor's untriggered rows the refusal, whatever the
    direction."""
    if direction == "misalign" and not (p.benign or p.keep_aligned):
        return p.misaligned, p.aligned
    return p.aligned, p.misaligned
