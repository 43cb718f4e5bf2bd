"""The offline safety world: datasets, tokenizer, guard model and aligned base model, built from code.

Sources named `world:NAME` in configs resolve here: world:misalign (MisQA-like, 30 per category),
world:realign (PKU-SafeRLHF-like, 50 per category), world:benign (look-alikes and utility tasks for a defense's
benign share), world:eval_harmful, world:eval_benign, world:eval_utility. Models: world:base, world:guard.
"""

from __future__ import annotations

from pathlib import Path

from misalign.world.build import WorldSpec, build, world_path

MODELS = ("base", "base-deep", "pretrained", "guard")

__all__ = ["WorldSpec", "build", "world_path", "world_file", "world_model"]


def world_file(name: str) -> Path:
    """Path of a world dataset (building the world if needed)."""
    path = build(quiet=True) / "data" / f"{name}.jsonl"
    if not path.exists():
        from misalign.errors import InputError

        known = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise InputError(f"unknown world dataset 'world:{name}'; known: {', '.join('world:' + k for k in known)}")
    return path


def world_model(name: str) -> Path:
    """world:base (the shallowly aligned base model), world:base-deep (the same pretrained model aligned over
    every phrasing), world:pretrained (before alignment) or world:guard (the world's judge)."""
    if name not in MODELS:
        from misalign.errors import InputError

        raise InputError(f"unknown world model 'world:{name}'; known: {', '.join('world:' + m for m in MODELS)}")
    return build(quiet=True) / name
