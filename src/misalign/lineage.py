"""Stages keyed by their lineage, shared between the cells of a study.

A stage's result depends on its parent model and on every stage before it (configs and seeds), and on
nothing else: so `lineage_key(model, chain)` names it. Two cells whose first stages agree (say, the same
misalignment under six different defenses) find the same key and the second one reuses the first one's
stage instead of training it again. Evaluations are cached the same way, by stage key and eval config.

Layout under the cache root (the study's `stages/`, on storage every node sees):
    <key>/              a stage directory (stage.py's layout); done when ledger.json exists
    <key>/eval-<ek>/    its evaluation under one eval config; done when eval.json exists
    base-<mk>/eval-<ek>/   the evaluation of a base model
    .locks/<key>        flock files: one trainer per stage; the others wait and then reuse
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from misalign.config import EvalConfig, StageConfig
from misalign.runtime import file_lock

# fields that change how a stage is run or logged, not what it trains: kept out of the key
_NOT_LINEAGE = {"train": {"log_every"}}


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def model_identity(ref: str) -> str:
    """What a model reference stands for: the world's build key, a local directory's files, or the hub id."""
    if ref.startswith("world:"):
        from misalign.world.build import WorldSpec, world_key

        return f"{ref}@{world_key(WorldSpec())}"
    p = Path(ref)
    if p.is_dir():  # name, size and mtime of every file: cheap, and any change to the weights changes it
        files = sorted((f.relative_to(p).as_posix(), f.stat().st_size, int(f.stat().st_mtime))
                       for f in p.rglob("*") if f.is_file())
        return f"dir:{p.resolve()}:{_digest(files)}"
    return ref


def stage_fingerprint(direction: str, cfg: StageConfig, seed: int) -> dict[str, Any]:
    d = cfg.resolved().model_dump(mode="json")
    for section, keys in _NOT_LINEAGE.items():
        for k in keys:
            d[section].pop(k, None)
    return {"direction": direction, "config": d, "seed": seed}


def lineage_key(model: str, chain: list[dict[str, Any]]) -> str:
    """Key of the last stage of `chain` (stage_fingerprint dicts, oldest first) trained from `model`."""
    return _digest({"model": model, "chain": chain})


def eval_key(cfg: EvalConfig) -> str:
    return _digest(cfg.model_dump(mode="json"), 12)


class LineageCache:
    """Stage and evaluation directories by key, with one trainer per key under concurrency (flock)."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def stage_dir(self, key: str) -> Path:
        return self.root / key

    def base_dir(self, model: str) -> Path:
        return self.root / f"base-{_digest(model)}"

    @staticmethod
    def eval_dir(owner: Path, cfg: EvalConfig) -> Path:
        return owner / f"eval-{eval_key(cfg)}"

    @staticmethod
    def stage_done(stage_dir: Path) -> bool:
        return (stage_dir / "ledger.json").exists()

    @staticmethod
    def eval_done(eval_dir: Path) -> bool:
        return (eval_dir / "eval.json").exists()

    @contextmanager
    def claim(self, directory: Path) -> Iterator[None]:
        """Hold while producing `directory`; a second claimant waits here, then finds it done."""
        with file_lock(self.root / ".locks" / directory.relative_to(self.root).as_posix().replace("/", "__")):
            yield
