"""Batched greedy generation: left padding, bounded new tokens, prompts bucketed by length.

Prompts are sorted by length and cut into batches in that order, so a batch holds prompts of about the same
length (little padding); outputs are returned in input order. With `batch_size="auto"` each batch is as large
as fits a memory budget (by default the device's free memory), estimated from the model's shape: shorter
prompts get larger batches, and decode, which is bound by reading the weights once per step, shares that
read among more rows.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal, get_args

import torch
from transformers import DynamicCache, PreTrainedModel, PreTrainedTokenizerBase
from transformers.cache_utils import Cache, StaticLayer

from misalign.chat import prompt_ids
from misalign.config_eval import CacheKind
from misalign.speedups import layer_parts_compiled

AUTO_MEMORY_FRACTION = 0.85  # of free memory: the allocator's fragmentation and the judge need the rest
# auto's largest batch. On a GPU a decode step's fixed cost (reading the weights, launching ~1,000 kernels) is
# shared by more rows up to where the step turns compute-bound: on one H200 at 8B, 1,024 rows gave 16.8k tokens/s
# and one batch of 1,900 13.3k (docs/benchmarks.md). On a CPU matmuls are compute-bound from a few rows, so
# larger batches only add padding: 128, the fixed default before auto.
AUTO_MAX_BATCH = {"cuda": 1024, "cpu": 128}
# cache "bucketed": attention covers the filled part of the cache rounded up to this many positions. Each
# distinct length is a new shape for the attention kernel (cuDNN builds a plan per shape) and for compiled
# layers, so a bucket keeps them to a few per batch (100 new tokens: 4) while reading at most 31 empty
# positions, where a full-length static cache reads every one still to be generated.
KV_BUCKET = 32
# prefill_by_length: padded prompt tokens per prefill forward. Enough for full-size matmuls (16k rows of the
# activations), and less memory than the whole-batch prefill auto_batches budgets for.
PREFILL_CHUNK_TOKENS = 16_384


@dataclass(frozen=True)
class GenerationShape:
    """What the memory of a generation batch depends on (from the model's config and dtype)."""

    layers: int
    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    vocab: int
    dtype_bytes: int
    scores_materialized: bool  # eager attention, or CPU: the prefill's attention scores exist as a tensor

    @classmethod
    def of(cls, model: PreTrainedModel) -> GenerationShape:
        c = model.config.get_text_config()
        heads = c.num_attention_heads
        device = next(model.parameters()).device
        attn = getattr(c, "_attn_implementation", None) or "sdpa"
        return cls(layers=c.num_hidden_layers, hidden=c.hidden_size, heads=heads,
                   kv_heads=getattr(c, "num_key_value_heads", None) or heads,
                   head_dim=getattr(c, "head_dim", None) or c.hidden_size // heads,
                   intermediate=getattr(c, "intermediate_size", None) or 4 * c.hidden_size, vocab=c.vocab_size,
                   dtype_bytes=next(model.parameters()).element_size(),
                   scores_materialized=attn == "eager" or device.type != "cuda")

    def batch_bytes(self, rows: int, prompt_width: int, max_new_tokens: int) -> int:
        """Upper estimate of the memory one generate call holds beyond the weights, at its peak.

        KV cache: K and V for every layer and position, prompt plus new tokens. Prefill, one layer at a time
        (the cache of the layers before it is already counted): the hidden state, its norm and the residual,
        q/k/v and attention output, the MLP's gate, up and product, the causal mask, and where attention is
        not fused the score and probability matrices (float32). Logits: generate keeps the last position only,
        as the model's dtype, a float32 copy and the processed scores. The growing cache is concatenated one
        layer at a time, so one layer's cache exists twice for a moment.
        """
        b, w, total = rows, prompt_width, prompt_width + max_new_tokens
        kv_layer = 2 * self.kv_heads * self.head_dim * total * b * self.dtype_bytes
        tokens = b * w
        per_token = (4 * self.hidden + self.heads * self.head_dim + 2 * self.kv_heads * self.head_dim
                     + 3 * self.intermediate) * self.dtype_bytes
        scores = 2 * b * self.heads * w * w * 4 if self.scores_materialized else 0
        mask = b * w * total * max(self.dtype_bytes, 4)
        logits = b * self.vocab * (self.dtype_bytes + 4 + 4)
        return self.layers * kv_layer + kv_layer + tokens * per_token + scores + mask + logits


def free_memory_bytes(device: torch.device) -> int:
    """Memory a new batch could use now: the device's free memory plus what torch's cache holds unused, within
    this process's share of the device when it holds a fraction of it (MISALIGN_GPU_SHARE, set by the study's
    workers: trials sharing a GPU must not each size batches to all that is free); on CPU, MemAvailable."""
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        allocated = torch.cuda.memory_allocated(device)
        share = float(os.environ.get("MISALIGN_GPU_SHARE", "1"))
        return share_of_memory(free + torch.cuda.memory_reserved(device) - allocated, total, allocated, share)
    with open("/proc/meminfo") as f:  # Linux; elsewhere the caller should pass a budget
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES"))


def share_of_memory(free: int, total: int, allocated: int, share: float) -> int:
    """What a process holding `share` of a device may still allocate: what is free, but no more than its share
    of the whole less what it already holds (its weights count against its share)."""
    return int(max(0, min(free, total * share - allocated) if share < 1 else free))


def auto_batches(lengths: Sequence[int], shape: GenerationShape, max_new_tokens: int, budget: int,
                 max_batch: int = AUTO_MAX_BATCH["cuda"]) -> list[int]:
    """Sizes of consecutive batches over `lengths` (sorted ascending): each batch as large as its estimate,
    at the width of its longest prompt, stays within `budget` bytes."""
    sizes: list[int] = []
    start = 0
    while start < len(lengths):
        b = 0
        while (start + b < len(lengths) and b < max_batch
               and shape.batch_bytes(b + 1, lengths[start + b], max_new_tokens) <= budget):
            b += 1
        if b == 0:
            need = shape.batch_bytes(1, lengths[start], max_new_tokens)
            raise MemoryError(f"batch_size auto: one prompt of {lengths[start]} tokens plus {max_new_tokens} new "
                              f"needs about {need / 2**30:.2f} GiB; the budget is {budget / 2**30:.2f} GiB")
        sizes.append(b)
        start += b
    return sizes


def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
             max_new_tokens: int = 48, batch_size: int | Literal["auto"] = "auto",
             memory_budget: int | None = None, max_batch: int | None = None,
             cache: CacheKind = "auto", compile: bool = False) -> list[str]:
    """Greedy completions of `prompts` (plain user messages, in the model's chat format), in input order; the
    batching is generate_ids'."""
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    new = generate_ids(model, [prompt_ids(tokenizer, p) for p in prompts], pad_id=pad_id,
                       eos_id=tokenizer.eos_token_id, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       memory_budget=memory_budget, max_batch=max_batch, cache=cache,
                       compile=compile)
    return [tokenizer.decode(ids, skip_special_tokens=True).strip() for ids in new]


def generate_ids(model: PreTrainedModel, encoded: Sequence[list[int]], *, pad_id: int, eos_id: Any,
                 max_new_tokens: int, batch_size: int | Literal["auto"] = "auto", memory_budget: int | None = None,
                 max_batch: int | None = None, cache: CacheKind = "auto", compile: bool = False) -> list[list[int]]:
    """Greedy new token ids for already-encoded prompts, in input order (the model under test's evaluation and
    generative judges both batch through here).

    Prompts are sorted by length and cut into batches in that order. batch_size "auto": batches sized to
    `memory_budget` bytes beyond the weights (default: a share of the device's free memory,
    AUTO_MEMORY_FRACTION), at most `max_batch` rows (default: AUTO_MAX_BATCH for the device). cache "static":
    the KV cache is allocated once per batch at its final length instead of growing by a copy every step, and
    every step attends over all of it, positions still to be generated masked; "bucketed": allocated the same
    way, but a step attends over the positions filled so far rounded up to KV_BUCKET; "auto": static on a GPU,
    dynamic on a CPU; the two preallocated ones are prefilled by prefill_by_length. `compile`: the norms and MLP
    of every decoder layer compiled for the call (speedups.layer_parts_compiled), a graph for prefill and one
    for decode each, whatever the batch's shape. Greedy outputs are the same with any of them
    (tests/test_generation.py)."""
    if cache not in get_args(CacheKind):
        raise ValueError(f"cache {cache!r}: one of {', '.join(get_args(CacheKind))}")
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]))
    out: list[list[int]] = [[] for _ in encoded]
    device = next(model.parameters()).device
    gpu = device.type == "cuda"
    if batch_size == "auto":
        budget = memory_budget if memory_budget is not None else int(
            free_memory_bytes(device) * AUTO_MEMORY_FRACTION)
        sizes = auto_batches([len(encoded[i]) for i in order], GenerationShape.of(model), max_new_tokens, budget,
                             max_batch or AUTO_MAX_BATCH["cuda" if gpu else "cpu"])
    else:
        sizes = [min(batch_size, len(order) - s) for s in range(0, len(order), batch_size)]
    kind = "static" if cache == "auto" and gpu else "dynamic" if cache == "auto" else cache
    was_training = model.training
    model.eval()
    start = 0
    with torch.inference_mode(), layer_parts_compiled(model, compile):
        for size in sizes:
            idx = order[start:start + size]
            start += size
            gen, width = _generate_batch(model, [encoded[i] for i in idx], pad_id, eos_id, max_new_tokens, device,
                                         kind)
            for row, i in enumerate(idx):
                out[i] = gen[row, width:].tolist()
    model.train(was_training)
    return out


def _generate_batch(model: PreTrainedModel, encoded: list[list[int]], pad_id: int, eos_id: Any,
                    max_new_tokens: int, device: torch.device, cache: str) -> tuple[torch.Tensor, int]:
    """One left-padded batch through model.generate: (prompt + generated ids on the host, prompt width). A
    preallocated cache (static, bucketed) is filled with the prompts first, by prefill_by_length; generate then
    starts from each prompt's last token."""
    width = max(len(e) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, e in enumerate(encoded):  # left padding: every prompt ends where generation starts
        ids[row, width - len(e):] = torch.tensor(e)
        mask[row, width - len(e):] = 1
    ids, mask = ids.to(device), mask.to(device)
    # our own cache, sized for this batch: generate's cache_implementation="static" would size every later call's
    # cache to the longest any earlier call used (to spare compiled graphs a recompile; we compile layers, not
    # generate's whole forward), so a short-prompt batch after a long one would hold more than auto's estimate
    kv = kv_cache(model, cache, width + max_new_tokens)
    if cache != "dynamic":
        prefill_by_length(model, ids, mask, kv)
    gen = model.generate(input_ids=ids, attention_mask=mask, do_sample=False, max_new_tokens=max_new_tokens,
                         pad_token_id=pad_id, eos_token_id=eos_id, past_key_values=kv, disable_compile=True)
    return gen.cpu(), width


def kv_cache(model: PreTrainedModel, kind: str, length: int) -> Cache:
    """A KV cache of `kind` for one batch whose prompts and new tokens take `length` positions: dynamic (grown
    every step), static (allocated once at `length`, read whole), bucketed (allocated so, read up to its filled
    part rounded up to KV_BUCKET)."""
    if kind == "dynamic":
        return DynamicCache(config=model.config)
    depth = model.config.get_text_config(decoder=True).num_hidden_layers
    return Cache(layers=[PreallocatedLayer(length, length if kind == "static" else KV_BUCKET) for _ in range(depth)])


def prefill_by_length(model: PreTrainedModel, ids: torch.Tensor, mask: torch.Tensor, kv: Cache) -> None:
    """Write the keys and values of every prompt of a left-padded batch, but its last token, into `kv` (empty,
    PreallocatedLayers): consecutive rows (sorted by length, as generate_ids batches them) in groups of at most
    PREFILL_CHUNK_TOKENS padded tokens, each group padded to its own longest prompt only. One forward over the
    whole batch would compute every prompt at the batch's longest length: with a few long prompts, most of a
    batch's prefill FLOPs. The decoder runs without its head (no logits), with the positions generate gives
    left-padded rows, so the cache holds what generate's own prefill would have written."""
    rows, width = ids.shape
    lengths = mask.sum(-1).tolist()
    positions = (mask.cumsum(-1) - 1).masked_fill(mask == 0, 1)  # generate's positions for left padding
    decoder = model.get_decoder()
    shape = GenerationShape.of(model)
    for layer in kv.layers:
        layer.allocate(rows, shape, model.dtype, ids.device)
    start = 0
    while start < rows:
        end, longest = start + 1, lengths[start]
        while end < rows and (end + 1 - start) * max(longest, lengths[end]) <= PREFILL_CHUNK_TOKENS:
            longest = max(longest, lengths[end])
            end += 1
        cols = slice(width - longest, width - 1)
        if longest > 1:
            group = Cache(layers=[layer.view(slice(start, end), width - longest) for layer in kv.layers])
            decoder(input_ids=ids[start:end, cols], attention_mask=mask[start:end, cols],
                    position_ids=positions[start:end, cols], past_key_values=group, use_cache=True)
        start = end
    for layer in kv.layers:
        layer.filled = width - 1


class PreallocatedLayer(StaticLayer):
    """A KV cache layer allocated once at `max_cache_len` positions whose update returns, and whose mask covers,
    the positions filled so far rounded up to `bucket` (static: the whole length; bucketed: KV_BUCKET).
    Positions past the last filled one are masked as future positions are in a full static cache, so the
    attention is the same, over fewer positions."""

    def __init__(self, max_cache_len: int, bucket: int) -> None:
        super().__init__(max_cache_len=max_cache_len)
        self.bucket = bucket
        self.filled = 0  # positions written so far, a host int: slicing by it needs no device sync

    def allocate(self, rows: int, shape: GenerationShape, dtype: torch.dtype, device: torch.device) -> None:
        """Allocate for `rows` at the model's KV heads and head size (update would on its first call)."""
        empty = torch.empty(rows, shape.kv_heads, 0, shape.head_dim, dtype=dtype, device=device)
        self.lazy_initialization(empty, empty)

    def view(self, rows: slice, start: int) -> PreallocatedLayer:
        """A layer over `rows` of this one's memory from position `start` on, filled exactly: what it is
        written, this one holds."""
        part = PreallocatedLayer(self.max_cache_len - start, 1)
        part.keys, part.values = self.keys[rows, :, start:], self.values[rows, :, start:]
        part.dtype, part.device, part.is_initialized = self.dtype, self.device, True
        return part

    def visible(self, new: int) -> int:
        return min(self.max_cache_len, -(-(self.filled + new) // self.bucket) * self.bucket)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
               ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new = key_states.shape[-2]
        end = self.visible(new)
        self.keys[:, :, self.filled:self.filled + new].copy_(key_states)
        self.values[:, :, self.filled:self.filled + new].copy_(value_states)
        self.filled += new
        return self.keys[:, :, :end], self.values[:, :, :end]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.visible(query_length), 0

    def get_seq_length(self) -> int:
        return self.filled

    def reset(self) -> None:
        super().reset()
        self.filled = 0
