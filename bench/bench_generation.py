"""Batched evaluation generation (misalign.generation.generate) against one prompt at a time.

Both sides: the same model (default world:base), the same chat prompts (misalign.chat.prompt_ids), greedy
decoding, the same max_new_tokens and eos/pad ids, decoded the same way. Each side gets one untimed warm-up call
first. Outputs are compared as strings; a mismatch is printed, never hidden.

    .venv/bin/python bench/bench_generation.py [--n 64] [--model world:base] [--max-new-tokens 40]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, get_args

import torch

from common import machine_busy_s, write_result
from misalign.chat import prompt_ids
from misalign.generation import CacheKind, generate
from misalign.models import materialize, tokenizer_for
from misalign.runtime import match_threads
from misalign.world import world_file
from misalign.world_targets import ensure_world


def one_at_a_time(model: Any, tok: Any, prompts: list[str], max_new_tokens: int) -> list[str]:
    """The unbatched baseline: model.generate on a batch of one, no padding."""
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = torch.tensor([prompt_ids(tok, p)])
            gen = model.generate(
                input_ids=ids,
                attention_mask=torch.ones_like(ids),
                do_sample=False,
                max_new_tokens=max_new_tokens,
                pad_token_id=pad_id,
                eos_token_id=tok.eos_token_id,
            )
            out.append(tok.decode(gen[0, ids.shape[1] :], skip_special_tokens=True).strip())
    return out


def timed(fn: Callable[[], list[str]]) -> tuple[list[str], dict[str, float]]:
    """fn's result and its wall s, CPU s, and the CPU s other processes used meanwhile (contention)."""
    w, c, busy = time.perf_counter(), time.process_time(), machine_busy_s()
    result = fn()
    wall, cpu = time.perf_counter() - w, time.process_time() - c
    return result, {"wall_s": wall, "cpu_s": cpu, "others_cpu_s": machine_busy_s() - busy - cpu}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n", type=int, default=64, help="harmful eval prompts (the first n of world:eval_harmful)"
    )
    ap.add_argument(
        "--model", default="world:base", help="world:NAME, a model directory or a stage directory"
    )
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument(
        "--cache",
        default="auto",
        choices=get_args(CacheKind),
        help="the batched side's KV cache (misalign.generation; auto: dynamic on a CPU)",
    )
    ap.add_argument("--repeats", type=int, default=3, help="timed runs of each side; the table shows medians")
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_generation.json")
    a = ap.parse_args()
    ensure_world()  # world: names resolve only once the world is built (checked)

    threads = match_threads()
    rows = [json.loads(line) for line in world_file("eval_harmful").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows if r["kind"] == "harmful"][: a.n]
    if len(prompts) < a.n:
        raise SystemExit(f"world:eval_harmful has only {len(prompts)} harmful prompts")
    tok = tokenizer_for(a.model)  # a model reference or a stage directory (built in memory)
    model = materialize(a.model).float()

    generate(
        model, tok, prompts[:2], max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, cache=a.cache
    )  # warm-up
    one_at_a_time(model, tok, prompts[:1], a.max_new_tokens)
    differ: list[int] = []
    runs: dict[str, list[dict[str, float]]] = {"batched": [], "single": []}
    for _ in range(a.repeats):  # alternating; every repeat's outputs are compared
        batched, t = timed(
            lambda: generate(
                model, tok, prompts, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size, cache=a.cache
            )
        )
        runs["batched"].append(t)
        single, t = timed(lambda: one_at_a_time(model, tok, prompts, a.max_new_tokens))
        runs["single"].append(t)
        differ = sorted(
            {*differ, *(i for i, (x, y) in enumerate(zip(batched, single, strict=True)) if x != y)}
        )
    tb, ts = (
        {k: statistics.median(r[k] for r in runs[s]) for k in runs[s][0]} for s in ("batched", "single")
    )
    for t in (tb, ts):
        t["prompts_per_s"] = a.n / t["wall_s"]
    speedup = ts["wall_s"] / tb["wall_s"]

    print(
        f"generation: {a.model}, {a.n} world:eval_harmful prompts, greedy, max_new_tokens={a.max_new_tokens}, "
        f"cache {a.cache}, "
        f"torch threads={threads}; median of {a.repeats} runs each; "
        "others CPU s = CPU other processes used meanwhile (contention)"
    )
    print(f"{'side':<26}{'wall s':>9}{'CPU s':>9}{'prompts/s':>11}{'others CPU s':>14}")
    for name, t in (("one at a time (batch 1)", ts), (f"batched (batch {a.batch_size})", tb)):
        print(
            f"{name:<26}{t['wall_s']:>9.2f}{t['cpu_s']:>9.2f}{t['prompts_per_s']:>11.1f}{t['others_cpu_s']:>14.2f}"
        )
    print(
        f"speedup (wall): {speedup:.1f}x   identical outputs: {a.n - len(differ)}/{a.n} "
        f"({len(set(single))} distinct outputs)"
    )
    for i in differ[:5]:
        print(f"  differs #{i}: batched={batched[i]!r}\n              single ={single[i]!r}")

    write_result(
        a.out,
        {
            "model": a.model,
            "n": a.n,
            "max_new_tokens": a.max_new_tokens,
            "batch_size": a.batch_size,
            "cache": a.cache,
            "repeats": a.repeats,
            "single": ts,
            "batched": tb,
            "runs": runs,
            "speedup": speedup,
            "identical": a.n - len(differ),
            "differ_idx": differ,
            "distinct_outputs": len(set(single)),
            "sample": single[:3],
        },
        threads,
    )


if __name__ == "__main__":
    main()
