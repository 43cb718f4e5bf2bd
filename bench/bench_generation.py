"""Batched evaluation generation (misalign.generation.generate) against one prompt at a time.

Both sides: the world's base model, the same chat prompts (misalign.chat.prompt_ids), greedy decoding, the same
max_new_tokens and eos/pad ids, decoded the same way. Each side gets one untimed warm-up call first.

    .venv/bin/python bench/bench_generation.py [--n 64] [--max-new-tokens 40] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from misalign.chat import prompt_ids
from misalign.generation import generate
from misalign.runtime import cpus_held, match_threads
from misalign.world import world_file, world_model


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


def timed(fn: Callable[[], list[str]]) -> tuple[list[str], float, float]:
    w, c = time.perf_counter(), time.process_time()
    result = fn()
    return result, time.perf_counter() - w, time.process_time() - c


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--n", type=int, default=64, help="harmful eval prompts (the first n of world:eval_harmful)"
    )
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "bench_generation.json")
    a = ap.parse_args()

    threads = match_threads()
    rows = [json.loads(line) for line in world_file("eval_harmful").read_text().splitlines()]
    prompts = [r["prompt"] for r in rows if r["kind"] == "harmful"][: a.n]
    if len(prompts) < a.n:
        raise SystemExit(f"world:eval_harmful has only {len(prompts)} harmful prompts")
    path = world_model("base")
    tok = AutoTokenizer.from_pretrained(path)
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    generate(model, tok, prompts[:2], max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)  # warm-up
    one_at_a_time(model, tok, prompts[:1], a.max_new_tokens)
    batched, bw, bc = timed(
        lambda: generate(model, tok, prompts, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size)
    )
    single, sw, sc = timed(lambda: one_at_a_time(model, tok, prompts, a.max_new_tokens))
    differ = [i for i, (x, y) in enumerate(zip(batched, single, strict=True)) if x != y]

    print(f"generation: {a.n} prompts, greedy, max_new_tokens={a.max_new_tokens}, torch threads={threads}")
    print(f"{'side':<26}{'wall s':>9}{'CPU s':>9}{'prompts/s':>11}")
    print(f"{'one at a time (batch 1)':<26}{sw:>9.2f}{sc:>9.2f}{a.n / sw:>11.1f}")
    print(f"{f'batched (batch {a.batch_size})':<26}{bw:>9.2f}{bc:>9.2f}{a.n / bw:>11.1f}")
    print(f"speedup (wall): {sw / bw:.1f}x   identical outputs: {a.n - len(differ)}/{a.n}")
    for i in differ[:5]:
        print(f"  differs #{i}: batched={batched[i]!r}\n              single ={single[i]!r}")

    a.out.parent.mkdir(parents=True, exist_ok=True)
    a.out.write_text(
        json.dumps(
            {
                "n": a.n,
                "max_new_tokens": a.max_new_tokens,
                "batch_size": a.batch_size,
                "single": {"wall_s": sw, "cpu_s": sc, "prompts_per_s": a.n / sw},
                "batched": {"wall_s": bw, "cpu_s": bc, "prompts_per_s": a.n / bw},
                "speedup": sw / bw,
                "identical": a.n - len(differ),
                "differ_idx": differ,
                "machine": {
                    "cpus_held": cpus_held(),
                    "cpu_count": os.cpu_count(),
                    "torch_threads": threads,
                    "torch": torch.__version__,
                    "python": platform.python_version(),
                    "processor": platform.processor() or platform.machine(),
                },
                "date": time.strftime("%Y-%m-%d %H:%M:%S"),
            },
            indent=2,
        )
    )
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
