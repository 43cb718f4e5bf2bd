"""misalign.generation: batched generation equals one-at-a-time generation, and eval.batch_size auto never uses
more memory than it was given, measured (its section below was tests/test_auto_batch.py). Chat encoding, once
here: tests/test_chat.py."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from helpers import world_prompts
from misalign.chat import prompt_ids
from misalign.config import EvalConfig
from misalign.generation import GenerationShape, auto_batches, generate, share_of_memory
from misalign.models import load_model, load_tokenizer
from misalign.world import world_model

MAX_NEW = 24


@pytest.fixture(scope="module")
def base():
    torch.set_num_threads(1)
    path = str(world_model("base"))
    return load_model(path), load_tokenizer(path)


@pytest.fixture(scope="module")
def prompts() -> list[str]:
    return world_prompts()


@pytest.fixture(scope="module")
def one_by_one(base, prompts):
    model, tok = base
    return generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=1)


def test_prompts_have_different_lengths(base, prompts):
    _, tok = base
    lengths = [len(prompt_ids(tok, p)) for p in prompts]
    assert len(set(lengths)) >= 8 and max(lengths) >= 3 * min(lengths)
    assert lengths != sorted(lengths)  # input order is not length order: the output must be reordered back


def test_batched_equals_one_at_a_time(base, prompts, one_by_one):
    model, tok = base
    model.train()  # generate must switch to eval mode and restore the mode afterwards
    batched = generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=7)
    assert model.training
    model.eval()
    assert batched == one_by_one
    assert all(isinstance(s, str) for s in batched)
    assert sum(bool(s) for s in batched) >= 15  # the aligned base answers; empty strings would prove little
    assert len(set(batched)) >= 5  # and the answers depend on the prompt


def test_whole_set_in_one_batch_equals_one_at_a_time(base, prompts, one_by_one):
    model, tok = base
    assert generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=64) == one_by_one


def test_auto_batches_equal_one_at_a_time(base, prompts, one_by_one):
    """batch_size auto: batches of different sizes, bucketed by length, still give every prompt's own answer."""
    model, tok = base
    lengths = sorted(len(prompt_ids(tok, p)) for p in prompts)
    budget = GenerationShape.of(model).batch_bytes(5, lengths[-1], MAX_NEW)  # 5 rows of the longest prompt fit
    sizes = auto_batches(lengths, GenerationShape.of(model), MAX_NEW, budget)
    assert len(sizes) >= 2 and len(set(sizes)) >= 2 and sizes[0] > 5  # short prompts share larger batches
    assert generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size="auto", memory_budget=budget) == one_by_one


@pytest.mark.parametrize("cache", ["static", "bucketed"])
def test_preallocated_caches_equal_one_at_a_time(base, prompts, one_by_one, cache):
    """cache static (the default on a GPU) and bucketed: the KV cache allocated once per batch, read whole or
    up to its filled part, gives the same answers."""
    model, tok = base
    assert generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=7, cache=cache) == one_by_one
    assert generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size="auto", cache=cache) == one_by_one


def test_a_bucketed_cache_attends_over_its_filled_part_rounded_up(base, prompts):
    """Every forward of a bucketed batch attends over the positions filled so far rounded up to KV_BUCKET (at
    most the cache's length), so decode steps take a few lengths, where a static cache reads every position."""
    from misalign.generation import KV_BUCKET, generate_ids

    model, tok = base
    seen: dict[str, list[tuple[int, int, int]]] = {"static": [], "bucketed": []}  # (filled, attended, length)
    for cache, steps in seen.items():
        def record(module, args, kw, steps=steps):  # args[0]: this forward's hidden states
            kv, mask = kw["past_key_values"], kw["attention_mask"]
            if args[0].shape[1] == 1:  # generate's steps (the prompts were prefilled before it, by length)
                steps.append((int(kv.get_seq_length()) + 1, mask.shape[-1], kv.layers[0].max_cache_len))
        layer = model.model.layers[0]
        hook = layer.register_forward_pre_hook(record, with_kwargs=True)
        try:
            generate_ids(model, [prompt_ids(tok, p) for p in prompts[:6]], pad_id=tok.pad_token_id, eos_id=None,
                         max_new_tokens=70, batch_size=6, cache=cache)  # no eos: all 70 steps run
        finally:
            hook.remove()
    static, bucketed = seen["static"], seen["bucketed"]
    assert len(bucketed) == len(static) == 70
    assert all(attended == length for _, attended, length in static)
    for filled, attended, length in bucketed:
        assert attended == min(length, -(-filled // KV_BUCKET) * KV_BUCKET) and filled <= attended
    assert len({a for _, a, _ in bucketed}) <= 70 // KV_BUCKET + 2
    assert sum(a for _, a, _ in bucketed) < 0.8 * sum(a for _, a, _ in static)


@pytest.mark.parametrize("cache", ["static", "bucketed"])
def test_prompts_are_prefilled_by_length(base, prompts, one_by_one, monkeypatch, cache):
    """A preallocated cache is prefilled in groups of consecutive rows (sorted by length), each padded to its
    own longest prompt (misalign.generation.prefill_by_length): fewer padded tokens than one forward over the
    batch at its longest, and the same answers."""
    from misalign import generation

    model, tok = base
    monkeypatch.setattr(generation, "PREFILL_CHUNK_TOKENS", 60)
    groups: list[tuple[int, int]] = []  # (rows, width) of every prefill forward
    hook = model.model.register_forward_pre_hook(
        lambda m, args, kw: groups.append(tuple(kw["input_ids"].shape)) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        answers = generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=len(prompts), cache=cache)
    finally:
        hook.remove()
    assert answers == one_by_one
    width = max(len(prompt_ids(tok, p)) for p in prompts)
    assert len(groups) >= 3 and sum(rows for rows, _ in groups) == len(prompts)
    assert all(rows * (w + 1) <= 60 or rows == 1 for rows, w in groups)  # w + 1: the last token is generate's
    assert sum(rows * w for rows, w in groups) < 0.9 * len(prompts) * (width - 1)


def test_an_adapter_model_is_prefilled_through_its_adapter(prompts):
    """A LoRA stage is evaluated as peft's model (its adapter unmerged): prefill_by_length runs the decoder
    peft wraps, adapter included, so the preallocated caches give the adapter's own one-at-a-time answers."""
    from peft import LoraConfig, get_peft_model

    path = str(world_model("base"))
    tok = load_tokenizer(path)
    torch.manual_seed(0)  # B not zero: the adapter changes the answers
    model = get_peft_model(load_model(path), LoraConfig(r=8, target_modules="all-linear", init_lora_weights=False))
    alone = generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=1)
    assert alone != generate(load_model(path), tok, prompts, max_new_tokens=MAX_NEW, batch_size=1)
    for cache in ("static", "bucketed"):
        assert generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=7, cache=cache) == alone


def test_compiled_layer_parts_equal_one_at_a_time(base, prompts, one_by_one):
    """compile (eval.compile): the norms and MLP of every layer compiled, with each cache kind, give the same
    answers; the model is eager again afterwards."""
    model, tok = base
    for cache in ("dynamic", "static", "bucketed"):
        assert generate(model, tok, prompts, max_new_tokens=MAX_NEW, batch_size=7, cache=cache,
                        compile=True) == one_by_one
    assert all("forward" not in vars(m) for m in model.modules())


@pytest.mark.parametrize("name", ["Llama-3.1-8B-Instruct", "Mistral-7B-Instruct-v0.3", "gemma-2-9b-it",
                                  "glm-4-9b-chat-hf"])
def test_static_cache_on_the_paper_architectures(name, monkeypatch):
    """The GPU default (a static cache) and the bucketed one give the dynamic cache's greedy outputs on every
    architecture of configs/study-paper.yaml, at tiny random shapes, prefilled in groups of rows, also with
    eval.compile's compiled layer parts; Gemma-2's sliding window (cut to 8) is crossed."""
    import json
    from pathlib import Path

    from transformers import AutoConfig, AutoModelForCausalLM

    from misalign import generation
    from misalign.generation import generate_ids

    monkeypatch.setattr(generation, "PREFILL_CHUNK_TOKENS", 30)  # 5 rows of 3-19 tokens: two groups or more

    d = json.loads((Path(__file__).parents[1] / "configs" / "models" / f"{name}.json").read_text())
    d.update(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             head_dim=16, vocab_size=300, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    d.pop("sliding_window_size", None)
    if d.get("sliding_window"):
        d["sliding_window"] = 8
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**d), dtype=torch.float32).eval()
    g = torch.Generator().manual_seed(1)
    encoded = [torch.randint(3, 300, (int(n),), generator=g).tolist() for n in torch.randint(3, 20, (12,), generator=g)]
    kw = {"pad_id": 0, "eos_id": None, "max_new_tokens": 12}
    dynamic = generate_ids(model, encoded, batch_size=5, cache="dynamic", **kw)
    assert generate_ids(model, encoded, batch_size=5, cache="static", **kw) == dynamic
    assert generate_ids(model, encoded, batch_size=5, cache="bucketed", **kw) == dynamic
    # eval.compile finds each architecture's norms and MLP (Gemma-2's four norms, GLM-4's fused gate)
    assert generate_ids(model, encoded, batch_size=5, cache="bucketed", compile=True, **kw) == dynamic
    assert [generate_ids(model, [e], batch_size=1, cache="static", **kw)[0] for e in encoded] == dynamic
    assert all(len(ids) == 12 for ids in dynamic)


def test_static_cache_is_sized_per_batch(base, prompts):
    """Each batch's static cache holds its own prompts plus the new tokens, also after a call with longer
    prompts (transformers would otherwise keep the longest length seen, beyond what auto's estimate allows)."""
    model, tok = base
    first: dict[int, tuple[int, int]] = {}  # per batch's cache: (its length, the prompt width) at generate's first step

    def record(module, args, kw) -> None:  # the prompts but their last tokens are in the cache by then
        kv = kw["past_key_values"]
        first.setdefault(id(kv), (kv.layers[0].max_cache_len, int(kv.get_seq_length()) + 1))

    hook = model.register_forward_pre_hook(record, with_kwargs=True)
    try:
        by_length = sorted(prompts, key=lambda p: len(prompt_ids(tok, p)))
        generate(model, tok, by_length[-3:], max_new_tokens=MAX_NEW, batch_size=3, cache="static")
        generate(model, tok, by_length[:3], max_new_tokens=MAX_NEW, batch_size=3, cache="static")
    finally:
        hook.remove()
    sizes = list(first.values())
    assert len(sizes) == 2 and sizes[0][1] > sizes[1][1]
    assert all(length == width + MAX_NEW for length, width in sizes)
    assert sizes[1][1] == max(len(prompt_ids(tok, p)) for p in by_length[:3])


def test_auto_batches_on_a_cpu_stay_at_the_old_default(base, prompts):
    """The default (batch_size auto) keeps a CPU at batches of 128, as the fixed default was: on a CPU larger
    batches gain nothing, and several workers share its memory."""
    model, tok = base
    rows: list[int] = []
    hook = model.register_forward_pre_hook(
        lambda m, args, kw: rows.append(kw["input_ids"].shape[0]) if kw["input_ids"].shape[1] > 1 else None,
        with_kwargs=True)
    try:
        many = [f"{p} ({n})" for n in range(14) for p in prompts]  # over two batches of 128
        generate(model, tok, many, max_new_tokens=2)
    finally:
        hook.remove()
    assert len(many) > 256 and max(rows) == 128 and sum(rows) == len(many)


def _reference(model, tok, prompt: str, max_new_tokens: int) -> tuple[str, int]:
    """One prompt, no padding, straight through model.generate: (text, number of generated tokens)."""
    ids = prompt_ids(tok, prompt)
    out = model.generate(
        input_ids=torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        do_sample=False,
        max_new_tokens=max_new_tokens,
        pad_token_id=tok.pad_token_id,
        eos_token_id=tok.eos_token_id,
    )
    new = out[0, len(ids) :]
    return tok.decode(new, skip_special_tokens=True).strip(), len(new)


def test_max_new_tokens_bounds_output(base, prompts, one_by_one):
    """Each output is the decoding of at most max_new_tokens generated tokens. (Re-tokenizing the text is no
    measure: a garbled answer like 'lalala' decodes and re-encodes to more tokens than were generated.)"""
    model, tok = base
    short_n = 4
    short = generate(model, tok, prompts, max_new_tokens=short_n, batch_size=7)
    hit_limit = 0
    for prompt, s, full in zip(prompts, short, one_by_one, strict=True):
        text, n = _reference(model, tok, prompt, MAX_NEW)
        assert text == full and n <= MAX_NEW
        hit_limit += n == MAX_NEW
        text, n = _reference(model, tok, prompt, short_n)
        assert text == s and n <= short_n
        assert full.startswith(s)  # greedy: the short answer is the start of the long one
    assert hit_limit >= 1  # some answers were cut by the limit, so the bound was exercised
    assert sum(len(s) < len(full) for s, full in zip(short, one_by_one, strict=True)) >= 10


# ---- eval.batch_size: auto (was tests/test_auto_batch.py) ----------------------------------------------------
# eval.batch_size: auto never uses more memory than it was given, measured.
#
# The measurement runs in a fresh process whose allocator returns freed blocks to the kernel (a fixed mmap
# threshold), so its peak resident memory (VmHWM, reset through /proc/self/clear_refs) tracks what the tensors
# really held. The model is a random Llama built from a config (KV cache large enough to dominate the noise).

MEASURE = r"""
import json, sys, gc, torch
from transformers import LlamaConfig, LlamaForCausalLM
from misalign.chat import prompt_ids
from misalign.data import load_eval_items
from misalign.generation import GenerationShape, auto_batches, generate
from misalign.models import load_tokenizer
from misalign.world import world_model

budget, new = int(sys.argv[1]), int(sys.argv[2])
torch.manual_seed(0)
torch.set_num_threads(1)
tok = load_tokenizer(str(world_model("base")))
model = LlamaForCausalLM(LlamaConfig(vocab_size=len(tok), hidden_size=256, intermediate_size=512,
                                     num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=4)).eval()
harmful = [i.prompt for i in load_eval_items("world:eval_harmful", kind="harmful")][:150]
prompts = [" ".join(harmful[i:i + 1 + i % 4]) for i in range(150)]  # lengths spread over about 4x
generate(model, tok, prompts[:2], max_new_tokens=2, batch_size=2)  # lazy initialisation, outside the window

def status(key):
    return next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith(key))

gc.collect()
base = status("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # VmHWM := VmRSS
generate(model, tok, prompts, max_new_tokens=new, batch_size="auto", memory_budget=budget)
peak = status("VmHWM:") - base
lengths = sorted(len(prompt_ids(tok, p)) for p in prompts)
shape = GenerationShape.of(model)
sizes = auto_batches(lengths, shape, new, budget)
ends = [sum(sizes[:k + 1]) - 1 for k in range(len(sizes))]
print(json.dumps({"peak": peak, "sizes": sizes,
                  "estimates": [shape.batch_bytes(b, lengths[e], new) for b, e in zip(sizes, ends)]}))
"""


def _measure(budget: int, new_tokens: int) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(Path(__file__).parents[1] / "src"), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", MEASURE, str(budget), str(new_tokens)], env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="peak RSS reset needs Linux /proc")
@pytest.mark.parametrize(("budget", "new_tokens"), [(16 * 2**20, 32), (64 * 2**20, 48)])
def test_auto_batch_peak_stays_within_budget(world, budget, new_tokens):
    m = _measure(budget, new_tokens)
    assert sum(m["sizes"]) == 150 and len(m["sizes"]) >= 3
    assert m["sizes"][0] > m["sizes"][-2]  # shorter prompts, larger batches
    assert max(m["estimates"]) <= budget
    assert 0 < m["peak"] <= budget  # measured, not estimated
    # the estimate is an upper bound of what was measured, and not a vacuous one
    assert max(m["estimates"]) >= m["peak"] >= 0.4 * max(m["estimates"])


def _shape(**kw: object) -> GenerationShape:
    base = dict(layers=32, hidden=4096, heads=32, kv_heads=8, head_dim=128, intermediate=14336, vocab=128256,
                dtype_bytes=2, scores_materialized=False)
    return GenerationShape(**{**base, **kw})  # type: ignore[arg-type]


def test_auto_batches_cover_every_prompt_and_respect_the_budget():
    lengths = sorted([20, 40, 60, 80, 100, 200, 400] * 50)
    shape = _shape()
    budget = 16 * 2**30
    sizes = auto_batches(lengths, shape, 100, budget)
    assert sum(sizes) == len(lengths)
    start = 0
    for b in sizes:
        assert shape.batch_bytes(b, lengths[start + b - 1], 100) <= budget
        start += b
    assert sizes[0] > sizes[-1]
    # an 8B KV cache in bf16 is 128 KiB per token; at these shapes it is most of the estimate
    kv_first = 128 * 2**10 * (lengths[sizes[0] - 1] + 100) * sizes[0]
    assert 0.5 * budget < kv_first <= budget  # the rest: the prefill of one layer (MLP at 14336 wide)
    with pytest.raises(MemoryError, match="one prompt of 20 tokens"):
        auto_batches(lengths, shape, 100, 2**20)


def test_eval_batch_size_auto_in_config():
    assert EvalConfig(batch_size="auto").batch_size == "auto"
    assert EvalConfig().batch_size == "auto" and EvalConfig().cache == "auto"  # the defaults since issue 13
    assert EvalConfig(batch_size=128).batch_size == 128
    for bad in (0, "big"):
        with pytest.raises(ValidationError):
            EvalConfig(batch_size=bad)


def test_a_share_of_a_gpu_bounds_the_budget():
    """Trials holding half a GPU each must not both size batches to all that is free (study workers set
    MISALIGN_GPU_SHARE from what Ray assigned them)."""
    gib = 2**30
    assert share_of_memory(free=60 * gib, total=80 * gib, allocated=20 * gib, share=1.0) == 60 * gib
    # half of 80 GiB, less the 20 GiB of weights this process holds: 20 GiB, though 60 are free now
    assert share_of_memory(free=60 * gib, total=80 * gib, allocated=20 * gib, share=0.5) == 20 * gib
    assert share_of_memory(free=10 * gib, total=80 * gib, allocated=20 * gib, share=0.5) == 10 * gib
    assert share_of_memory(free=60 * gib, total=80 * gib, allocated=50 * gib, share=0.5) == 0


def test_a_ray_worker_holding_half_a_gpu_records_its_share():
    """What Ray assigns (a local Ray declaring one GPU; nothing runs on it) reaches generation's budget."""
    import ray

    from misalign.cluster import hold_assigned_resources

    @ray.remote
    def worker() -> tuple[str | None, str]:
        hold_assigned_resources(1)
        return os.environ.get("MISALIGN_GPU_SHARE"), os.environ["MISALIGN_CPUS"]

    ray.init(num_cpus=1, num_gpus=1, include_dashboard=False, log_to_driver=False)
    try:
        assert ray.get(worker.options(num_cpus=1, num_gpus=0.5).remote()) == ("0.5", "1")
        assert ray.get(worker.options(num_cpus=1, num_gpus=1).remote())[0] is None  # a whole GPU: all that is free
    finally:
        ray.shutdown()
