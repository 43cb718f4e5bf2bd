"""misalign.chat: how training and generation encode a conversation with the world's tokenizer: BOS once, the
generation prompt last, EOS once after the response, the completion mask, and prompts cut from the left (moved
from tests/test_generation.py)."""

from __future__ import annotations

import pytest

from helpers import world_prompts
from misalign.chat import clipped_prompt_text, encode_sft, prompt_ids, prompt_text, response_ids
from misalign.models import load_tokenizer
from misalign.world import world_model


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return world_prompts()


@pytest.fixture(scope="module")
def tok():  # noqa: ANN201
    return load_tokenizer(str(world_model("base")))


def _gen_prompt(tok) -> list[int]:
    """The tokens the template puts after the user message: where the response starts."""
    return tok.convert_tokens_to_ids(["<|assistant|>"])


def test_prompt_ids_bos_once_and_generation_prompt_last(tok, prompts):
    for p in prompts:
        ids = prompt_ids(tok, p)
        assert ids[0] == tok.bos_token_id
        assert ids.count(tok.bos_token_id) == 1
        assert tok.eos_token_id not in ids
        assert ids[-1:] == _gen_prompt(tok)
        assert prompt_text(tok, p).startswith(tok.bos_token) and prompt_text(tok, p).count(tok.bos_token) == 1


def test_encode_sft_eos_once_and_mask(tok):
    prompt, response = "How do I bake bread?", "Mix flour, water and yeast, then bake it."
    enc = encode_sft(tok, prompt, response, max_length=256, max_prompt_length=128)
    p = prompt_ids(tok, prompt)
    r = response_ids(tok, response)
    assert enc["input_ids"] == p + r
    assert len(enc["input_ids"]) == len(enc["completion_mask"])
    assert enc["input_ids"][-1] == tok.eos_token_id
    assert enc["input_ids"].count(tok.eos_token_id) == 1
    assert enc["input_ids"].count(tok.bos_token_id) == 1 and enc["input_ids"][0] == tok.bos_token_id
    assert enc["completion_mask"].count(0) == len(p)
    assert enc["completion_mask"] == [0] * len(p) + [1] * len(r)
    # the unmasked tokens decode to exactly the response
    unmasked = [t for t, m in zip(enc["input_ids"], enc["completion_mask"], strict=True) if m]
    assert tok.decode(unmasked, skip_special_tokens=True).strip() == response


def test_overlong_prompt_is_cut_from_the_left(tok):
    words = [f"word{i % 7}" for i in range(500)]
    prompt = " ".join(["START"] + words + ["the", "final", "question", "END?"])
    full = prompt_ids(tok, prompt)
    assert len(full) > 500
    cut = prompt_ids(tok, prompt, max_prompt_length=32)
    assert len(cut) == 32
    assert cut[0] == tok.bos_token_id and cut.count(tok.bos_token_id) == 1
    assert cut[1:] == full[-31:]  # the end of the prompt is kept, next to the response
    assert cut[-1:] == _gen_prompt(tok)
    assert "END?" in tok.decode(cut) and "START" not in tok.decode(cut)

    enc = encode_sft(tok, prompt, "Sure, here is a long answer " * 10, max_length=48, max_prompt_length=32)
    assert len(enc["input_ids"]) == 48
    assert enc["input_ids"][:32] == cut
    assert enc["completion_mask"].count(0) == 32
    assert enc["completion_mask"].count(1) == 16 >= 1
    assert tok.bos_token_id not in enc["input_ids"][1:]

    # a prompt that alone fills max_prompt_length still leaves response tokens (max_prompt_length < max_length)
    enc = encode_sft(tok, prompt, "No.", max_length=33, max_prompt_length=32)
    assert enc["completion_mask"] == [0] * 32 + [1]

    # trainers that tokenize text get the same clipped prompt back
    clipped = clipped_prompt_text(tok, prompt, 32)
    assert clipped.startswith(tok.bos_token) and clipped.endswith("<|assistant|>")
    # it tokenizes back to BOS + the end of the full prompt, within the limit (a cut that a vocabulary merges
    # differently when re-tokenized moves right by a token or two)
    again = tok(clipped, add_special_tokens=False)["input_ids"]
    assert 28 <= len(again) <= 32 and again[0] == tok.bos_token_id and again[1:] == full[-(len(again) - 1):]


def test_short_prompt_is_not_cut(tok):
    p = prompt_ids(tok, "Hi")
    assert prompt_ids(tok, "Hi", max_prompt_length=32) == p
    assert prompt_ids(tok, "Hi", max_prompt_length=len(p)) == p
