"""The offline world, built with its targets checked: how entry points get it.

A world build scores its two aligned models with the project's own evaluation (the default one, with the
world's guard) and caches nothing when a target is missed (misalign.world.build.ALIGNED_TARGETS). The evaluation
resolves `world:` names through misalign.world, so the world package cannot import it: the scorer lives here,
above both, and is handed to the build. Resolving a `world:` name never builds; every command's preflight,
`misalign world build`, the benches and the test fixture call `ensure_world()` first.

    from misalign.world_targets import ensure_world
    path = ensure_world()      # built once per node (about 3 minutes), then a directory check
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from misalign.config import EvalConfig, JudgeSpec
from misalign.evaluation import evaluate_path
from misalign.runtime import deepspeed_cpu_unless_cuda
from misalign.world.build import WorldSpec, build, built, world_path

SCORED = ("unsafety", "utility", "over_refusal", "neither")


def score_aligned(world_dir: Path) -> dict[str, dict[str, float]]:
    """Both aligned models of a world in `world_dir` on its held-out evaluation sets, judged by its guard."""
    data = world_dir / "data"
    cfg = EvalConfig(harmful=str(data / "eval_harmful.jsonl"), benign=str(data / "eval_benign.jsonl"),
                     utility=str(data / "eval_utility.jsonl"),
                     judges=[JudgeSpec(name="classifier", options={"model": str(world_dir / "guard")})])
    scores = {}
    for name in ("base", "base-deep"):
        m = evaluate_path(str(world_dir / name), cfg).metrics
        scores[f"world:{name}"] = {k: float(m[k]) for k in SCORED}
    return scores


def ensure_world(spec: WorldSpec | None = None, force: bool = False, quiet: bool = True) -> Path:
    """The world's directory, built here first (targets checked) unless this node has it; raises
    misalign.world.build.WorldTargetMiss, caching nothing, when a build misses a target."""
    deepspeed_cpu_unless_cuda()  # saving the guard and the models imports DeepSpeed (through transformers)
    return build(spec or WorldSpec(), force=force, quiet=quiet, score=score_aligned)


def ensure_world_if_named(*configs: object) -> None:
    """Build the world first when any of `configs` (pydantic models, strings) names a `world:` model or data
    file: the preflight's step before it resolves those names."""
    texts = (c.model_dump_json() if hasattr(c, "model_dump_json") else str(c) for c in configs if c is not None)
    if any("world:" in t for t in texts) and built() is None:
        print(f"world: building the offline world in {world_path()} (about 3 minutes, once per node)",
              file=sys.stderr, flush=True)
        t0 = time.time()
        ensure_world()
        print(f"world: built in {time.time() - t0:.0f}s, its targets met", file=sys.stderr, flush=True)
