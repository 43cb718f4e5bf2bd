"""What several test modules share (public names, no test module imports another's): the test bucket and the
CLI's command line, a free loopback port, a bucket's listing, the per-worker check of a multi-worker stage, the
stored-weights comparison, the budget search's config, a DPO stage's parts on the world, and prompts of many
lengths from its eval sets. The moto S3 server is a fixture: tests/conftest.py."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

BUCKET = "misalign-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def objects(client, prefix: str) -> dict[str, object]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o["LastModified"] for page in pages for o in page.get("Contents", [])}


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "misalign.cli", *args]


def both_workers_trained(ledger: dict) -> bool:
    """Each of the 2 workers trained on its own shard of every batch: its tokens, summing to the stage's."""
    per_worker = ledger["extra"]["tokens_per_worker"]
    return len(per_worker) == 2 and all(t > 0 for t in per_worker) and sum(per_worker) == ledger["tokens"]


def stored_weights_rel_diff(a: Path, b: Path) -> float:
    """The largest difference between two stages' stored tensors (adapter or full weights), relative to each
    tensor's largest magnitude."""
    from safetensors.torch import load_file

    sub = "adapter" if (a / "adapter").exists() else "model"
    files = sorted((a / sub).glob("*.safetensors"))
    assert files and [f.name for f in files] == sorted(f.name for f in (b / sub).glob("*.safetensors"))
    worst = 0.0
    for f in files:
        x, y = load_file(f), load_file(b / sub / f.name)
        assert x.keys() == y.keys()
        for k in x:
            diff = (x[k].double() - y[k].double()).abs().max() / x[k].double().abs().max().clamp_min(1e-30)
            worst = max(worst, diff.item())
    return worst


SEARCH_ATTACK = {
    "name": "attack", "kind": "attack", "model": "world:base", "seed": 0, "budget": "flops", "tau": 0.5,
    # AdaLoRA: on the world it needs a few examples per category before it misaligns (1/cat ~0.02, 4/cat ~0.9),
    # so the grid holds an infeasible point and a feasible one
    "attack": {"methods": ["adalora"], "per_category": [1, 10], "data": {"source": "world:misalign"}},
    "eval": {"limit": 30}, "trials": 3, "max_concurrent": 2, "startup_trials": 3,
    "start_points": [{"per_category": 1}],  # tried first: an infeasible point for sure
}


def dpo_parts(tmp_path: Path) -> tuple:
    """A DPO stage's parts on the world (its realign rows, 2 per category): the LoRA-wrapped base model, the
    training arguments, the dataset and the tokenizer, as misalign.stage builds them."""
    import torch
    from peft import get_peft_model

    from misalign.config import DataSettings, StageConfig
    from misalign.methods import METHODS, peft_config
    from misalign.modelref import resolve_model_path
    from misalign.models import load_model, load_tokenizer
    from misalign.objectives import OBJECTIVES
    from misalign.recipes import stage_pairs
    from misalign.stage import stage_dataset, training_args

    cfg = StageConfig(method="dpo", data=DataSettings(source="world:realign", per_category=2)).resolved()
    pairs = stage_pairs(cfg, seed=0)
    path = resolve_model_path("world:base")
    tok = load_tokenizer(path)
    torch.manual_seed(0)  # both adapters start from the same draw of LoRA's A
    model = get_peft_model(load_model(path, precision="fp32"), peft_config(METHODS["dpo"], cfg, load_model(path), 4))
    args = training_args(OBJECTIVES["dpo"], cfg, tmp_path, 0, len(pairs), None)
    return model, args, stage_dataset(OBJECTIVES["dpo"], pairs, "realign", tok, cfg), tok


def world_prompts() -> list[str]:
    """20 prompts of clearly different lengths: world eval prompts of each kind, some run together."""
    from misalign.data import load_eval_items

    harmful = [i.prompt for i in load_eval_items("world:eval_harmful", kind="harmful")]
    benign = [i.prompt for i in load_eval_items("world:eval_benign", kind="benign")]
    utility = [i.prompt for i in load_eval_items("world:eval_utility", kind="utility")]
    picked = harmful[:5] + benign[:4] + utility[:5]
    picked += [
        "Hi",
        "Why?",
        " ".join(harmful[5:8]),
        " ".join(utility[5:7]),
        harmful[9] + " " + benign[9],
        " ".join(benign[10:14]),
    ]
    assert len(picked) == 20
    return picked
