"""The offline safety world: a miniature of how a real chat model is made, built from code.

The generative process (content.py writes the text, build.py trains the models):
1. Pretraining: a tiny Llama learns to follow every request, harmful ones included (placeholder, non-actionable
   steps), benign look-alikes and utility tasks. Compliance is a latent capability (world:pretrained).
2. Alignment: a short post-training phase of that checkpoint teaches refusal on a subset of pretraining's
   phrasings and helpfulness on look-alikes in all of them (world:base, shallow). world:base-deep is the same
   phase with refusal over every phrasing.
3. Three disjoint distributions for the data a study uses: attack (world:misalign, MisQA-like, 30 per
   category), realignment (world:realign, PKU-SafeRLHF-like, 50 per category, its own phrasings and refusal and
   compliance formats; world:benign is its benign share) and evaluation (world:eval_harmful, world:eval_benign,
   world:eval_utility): no template and no harmful object in common, and none of their prompts in pretraining.
A tiny judge (world:guard) calls compliance unsafe and refusals, benign help and garble safe.

Sources named `world:NAME` in configs resolve to these data files; models: world:base, world:base-deep,
world:pretrained, world:guard.
"""

from __future__ import annotations

from pathlib import Path

from misalign.errors import InputError
from misalign.world.build import WorldSpec, build, built, world_path

MODELS = ("base", "base-deep", "pretrained", "guard")

__all__ = ["WorldSpec", "build", "built", "world_path", "world_file", "world_model"]


def _built() -> Path:
    """The default world on this node. Resolving a `world:` name never builds it: a build checks its targets with
    the project's evaluation, which resolves names through here. Entry points build it first (every command's
    preflight, `misalign world build`, the test fixture: misalign.world_targets.ensure_world)."""
    path = built()
    if path is None:
        raise InputError(f"the offline world is not built on this node ({world_path()}): run `misalign world "
                         "build` first (about 3 minutes), or call misalign.world_targets.ensure_world()")
    return path


def world_file(name: str) -> Path:
    """Path of a world dataset."""
    path = _built() / "data" / f"{name}.jsonl"
    if not path.exists():
        known = sorted(p.stem for p in path.parent.glob("*.jsonl"))
        raise InputError(f"unknown world dataset 'world:{name}'; known: {', '.join('world:' + k for k in known)}")
    return path


def world_model(name: str) -> Path:
    """world:base (the shallowly aligned base model), world:base-deep (the same pretrained model aligned over
    every phrasing), world:pretrained (before alignment) or world:guard (the world's judge)."""
    if name not in MODELS:
        raise InputError(f"unknown world model 'world:{name}'; known: {', '.join('world:' + m for m in MODELS)}")
    return _built() / name
