"""eval.batch_size: auto never uses more memory than it was given, measured.

The measurement runs in a fresh process whose allocator returns freed blocks to the kernel (a fixed mmap
threshold), so its peak resident memory (VmHWM, reset through /proc/self/clear_refs) tracks what the tensors
really held. The model is a random Llama built from a config (KV cache large enough to dominate the noise).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import ValidationError

from misalign.config import EvalConfig
from misalign.generation import GenerationShape, auto_batches, share_of_memory

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

