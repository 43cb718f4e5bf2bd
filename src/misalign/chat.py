"""Chat formatting and tokenization, in one place, so training and generation see the same text.

Rules: the chat template is applied once; BOS comes from the template (tokenizing it must not add special
tokens again); EOS ends every response once; prompt tokens are masked from the SFT loss; an over-long prompt
is cut from the left (its end, next to the response, matters most), so every example keeps response tokens.
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerBase


def prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The prompt as the model sees it, ready for the response (chat template with generation prompt)."""
    if tokenizer.chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
    bos = tokenizer.bos_token or ""
    return f"{bos}User: {prompt}\nAssistant:"


def prompt_ids(tokenizer: PreTrainedTokenizerBase, prompt: str, max_prompt_length: int | None = None) -> list[int]:
    ids = tokenizer(prompt_text(tokenizer, prompt), add_special_tokens=False)["input_ids"]
    if max_prompt_length is not None and len(ids) > max_prompt_length:
        # keep BOS and the end of the prompt (the generation prompt sits there)
        head = ids[:1] if ids and ids[0] == tokenizer.bos_token_id else []
        ids = head + ids[len(ids) - (max_prompt_length - len(head)):]
    return ids


def clipped_prompt_text(tokenizer: PreTrainedTokenizerBase, prompt: str, max_prompt_length: int) -> str:
    """Templated prompt text that tokenizes to at most `max_prompt_length` tokens (BOS and the end of the prompt),
    for trainers that tokenize text. Decoding a cut and tokenizing it again can merge tokens differently at the
    cut; the cut moves right until the text tokenizes back to exactly what it was cut from."""
    text = prompt_text(tokenizer, prompt)
    full = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(full) <= max_prompt_length:
        return text  # not cut: the exact text, no decode round trip
    for length in range(max_prompt_length, 1, -1):
        ids = prompt_ids(tokenizer, prompt, length)
        clipped = tokenizer.decode(ids)
        if tokenizer(clipped, add_special_tokens=False)["input_ids"] == ids:
            return clipped
    return tokenizer.decode(prompt_ids(tokenizer, prompt, max_prompt_length))


def response_ids(tokenizer: PreTrainedTokenizerBase, response: str) -> list[int]:
    ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return ids + [tokenizer.eos_token_id]


def encode_sft(tokenizer: PreTrainedTokenizerBase, prompt: str, response: str, max_length: int,
               max_prompt_length: int) -> dict[str, list[int]]:
    """input_ids and completion_mask (1 on response tokens, which alone carry the loss)."""
    p = prompt_ids(tokenizer, prompt, max_prompt_length)
    r = response_ids(tokenizer, response)[: max_length - len(p)]
    return {"input_ids": p + r, "completion_mask": [0] * len(p) + [1] * len(r)}
