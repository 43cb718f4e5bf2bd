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

import contextlib
import hashlib
import json
import re
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any, BinaryIO

from misalign import claims
from misalign.cache import note_store_use
from misalign.config import EvalConfig, StageConfig
from misalign.modelref import hub_cache, model_files, pinned_revision, url_mirror, visible
from misalign.records import StageRecord
from misalign.runtime import cache_root, write_bytes_atomic
from misalign.storage import Store, is_url, redacted

# fields that change how a stage is run or logged, not what it trains: kept out of the key. Compiled layers
# compute the same functions as eager ones (losses equal to 1e-4, tests/test_speedups.py); like another
# device, they round and draw dropout's random numbers their own way, and "auto" decides by the device. Rows
# padded to a multiple are masked where they are padded: the same losses (tests/test_objectives.py)
_NOT_LINEAGE = {"train": {"log_every", "compile", "pad_to_multiple_of"}}


def _digest(obj: Any, n: int = 16) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]


def _memo(key: list[Any]) -> Path:
    return cache_root() / "digests" / _digest(key, 32)


def _memoized_digest(key: list[Any], read: Callable[[], BinaryIO]) -> str:
    """sha256 of what `read` opens, remembered under the cache by `key` (what names those bytes without reading
    them: a path or URL with its size and mtime), so the bytes are read again only when they change: keys stay
    cheap for 16 GB of weights."""
    memo = _memo(key)
    if memo.exists():
        return memo.read_text()
    h = hashlib.sha256()
    with read() as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            h.update(block)
    write_bytes_atomic(memo, h.hexdigest().encode())
    return h.hexdigest()


def file_digest(path: Path) -> str:
    """sha256 of a file's contents, remembered by (path, size, mtime, inode)."""
    st = path.stat()
    return _memoized_digest([str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino], lambda: open(path, "rb"))


def _contents(files: list[tuple[str, str]]) -> str:
    """A model's identity from its (relative name, sha256) pairs: the same files anywhere are the same model."""
    return f"sha256:{_digest(sorted(files), 32)}"


def _directory_identity(directory: Path) -> str:
    return _contents([(f.relative_to(directory).as_posix(), file_digest(f)) for f in directory.rglob("*")
                      if f.is_file() and visible(f.relative_to(directory).as_posix())])


def _url_identity(url: str) -> str:
    """A model on object storage by its files' contents, equal to a local copy's: from this node's mirror when
    it is complete, else by streaming each object through sha256 once (remembered by URL, name, size and mtime),
    so the driver keys a 16 GB model without keeping it on its disk."""
    files = model_files(url)
    mirror = url_mirror(url, files)
    if mirror.exists():
        return _directory_identity(mirror)
    store = Store(url)
    keys = {name: [store.url, name, size, mtime] for name, size, mtime in files}
    if not all(_memo(key).exists() for key in keys.values()):
        gib = sum(size for _, size, _ in files) / 2**30
        print(f"[models] {redacted(url)}: reading {len(files)} files ({gib:.2f} GiB) once to key the model by "
              "its contents", file=sys.stderr, flush=True)
    return _contents([(name, _memoized_digest(key, partial(store.open, name))) for name, key in keys.items()])


def _hub_identity(ref: str) -> str:
    """A hub id with the commit the local HF cache resolves it to (or the commit it is pinned to: ORG/NAME@SHA),
    so a new upstream revision is a new model and not a stale cache hit; offline (the id alone when it is not
    cached: the loader says why it cannot load it)."""
    from huggingface_hub import try_to_load_from_cache

    repo, revision = pinned_revision(ref) or (ref, None)
    if revision is not None and re.fullmatch(r"[0-9a-f]{40}", revision):
        return f"hf:{repo}@{revision}"
    try:
        cached = try_to_load_from_cache(repo, "config.json", cache_dir=hub_cache(), revision=revision)
    except ValueError:  # not a hub id (huggingface_hub's validation error)
        return ref
    return f"hf:{repo}@{Path(cached).parent.name}" if isinstance(cached, str) else ref


def model_identity(ref: str) -> str:
    """What a model reference stands for: the world's build key, a local directory's or object-store prefix's
    contents (not its location: the same weights anywhere are the same model), or the hub id at its cached
    revision."""
    if ref.startswith("world:"):
        # here, not at the top: the world's builder imports torch and transformers
        from misalign.world.build import WorldSpec, world_key

        return f"{ref}@{world_key(WorldSpec())}"
    if is_url(ref):
        return _url_identity(ref)
    if Path(ref).is_dir():
        return _directory_identity(Path(ref))
    return _hub_identity(ref)


def source_identity(source: str | None) -> str | None:
    """What a data source stands for: a local file's contents (edit a row and it changes; copy the file
    elsewhere and it does not), the world's build for world: sources, or the hub id."""
    if source is None:
        return None
    if source.startswith("world:"):
        return model_identity(source)
    p = Path(source)
    return f"sha256:{file_digest(p)}" if p.is_file() else source


def stage_fingerprint(direction: str, cfg: StageConfig, seed: int) -> dict[str, Any]:
    from misalign.methods import METHODS

    d = cfg.resolved().model_dump(mode="json")
    for section, keys in _NOT_LINEAGE.items():
        for k in keys:
            d[section].pop(k, None)
    d["data"]["source"] = source_identity(d["data"]["source"])
    d["data"]["benign_source"] = source_identity(d["data"]["benign_source"])
    repair = d.pop("repair")  # a trained stage's key stays what it was before repairs existed
    if METHODS[cfg.method].repairs:  # the models a repair reads, by what they are; an unset aligned model is
        # the lineage's root, which the parent's key already holds
        d["repair"] = {**repair, "aligned": repair["aligned"] and model_identity(repair["aligned"]),
                       "unaligned": model_identity(repair["unaligned"])}
    return {"direction": direction, "config": d, "seed": seed}


def eval_identity(cfg: EvalConfig) -> dict[str, Any]:
    """An eval config with its files and judge models by contents."""
    d = cfg.model_dump(mode="json")
    del d["compile"]  # how generation runs; keys made before the field existed stay valid
    for k in ("harmful", "benign", "utility"):
        d[k] = source_identity(d[k])
    for j in d["judges"]:
        if isinstance(j["options"].get("model"), str):
            j["options"]["model"] = model_identity(j["options"]["model"])
    return d


def lineage_key(model: str, chain: list[dict[str, Any]]) -> str:
    """Key of the last stage of `chain` (stage_fingerprint dicts, oldest first) trained from `model`."""
    return _digest({"model": model, "chain": chain})


def trial_stages(model_id: str, rounds: int, attack: StageConfig, defense: StageConfig, seed: int,
                 attack_only: bool = False) -> list[tuple[int, str, StageConfig, str]]:
    """(round, phase, config, lineage key) of every stage a trial runs, in order: the one place a trial's
    lineage keys are computed (the trial loop, the grid's sharing count and the plan use it)."""
    out: list[tuple[int, str, StageConfig, str]] = []
    chain: list[dict[str, Any]] = []
    for r in range(1, rounds + 1):
        for phase, stage in (("misalign", attack), ("realign", defense))[: 1 if attack_only else 2]:
            chain.append(stage_fingerprint(phase, stage, seed))
            out.append((r, phase, stage, lineage_key(model_id, chain)))
    return out


def eval_key(cfg: EvalConfig) -> str:
    return _digest(eval_identity(cfg), 12)


class LineageCache:
    """Stage and evaluation directories by key on a store (a directory, or an object store of which each node
    works in a local mirror), with one trainer per key under concurrency (misalign.claims)."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.root = store.mirror  # this node's copy: the directory itself for a directory store
        note_store_use(store)  # what `misalign cache` says this node's copy is, and when a run last used it

    def stage_dir(self, key: str) -> Path:
        return self.root / key

    def base_dir(self, model: str) -> Path:
        return self.root / f"base-{_digest(model)}"

    @staticmethod
    def eval_dir(owner: Path, cfg: EvalConfig) -> Path:
        return owner / f"eval-{eval_key(cfg)}"

    def _rel(self, directory: Path) -> str:
        return directory.relative_to(self.root).as_posix()

    def done(self, directory: Path, marker: str) -> bool:
        """Whether a stage (marker ledger.json) or an evaluation (eval.json) is finished, on any node: the store
        says so (a node's mirror may hold files of a store since wiped)."""
        if self.store.remote:
            return self.store.exists(f"{self._rel(directory)}/{marker}")
        return (directory / marker).exists()

    def read(self, directory: Path, name: str) -> Any:
        if self.store.remote:
            return self.store.read_json(f"{self._rel(directory)}/{name}")
        return json.loads((directory / name).read_text())

    def publish(self, directory: Path, marker: str) -> None:
        """Make what this node wrote visible to every node: its files, the marker last (an object store only;
        evaluations beneath a stage are published on their own). A finished stage's in-stage checkpoints on the
        store are then dropped: nothing resumes a finished stage."""
        if self.store.remote:
            self.store.upload(directory, self._rel(directory), last=marker, skip=("eval-", "trainer"))
            if marker == "ledger.json":
                self.store.delete_tree(f"{self._rel(directory)}/trainer")

    def checkpoints(self, stage_dir: Path) -> CheckpointSync | None:
        """In-stage checkpoints kept on the store, so a stage retried on another node resumes (object stores;
        a directory store is shared by every node already)."""
        return CheckpointSync(self.store, f"{self._rel(stage_dir)}/trainer") if self.store.remote else None

    def fetch(self, stage_dir: Path) -> None:
        """Bring a finished stage, and the stages it was trained from, into this node's mirror (object stores;
        what is already here is not fetched again: a stage's files never change once it is done)."""
        d: Path | None = stage_dir
        while self.store.remote and d is not None and not (d / "ledger.json").exists():
            self.store.download(self._rel(d), d, skip=("eval-", "trainer"), last="ledger.json")
            d = StageRecord.read(d).parent(d)

    def claim(self, directory: Path) -> contextlib.AbstractContextManager[None]:
        """Hold while producing `directory`; a second claimant waits here, then finds it done."""
        return claims.claim(self.store.url, self.store.remote, self._rel(directory), self.root / ".locks")


def checkpoint_step(name: str) -> int:
    """The optimizer step of a transformers checkpoint directory (checkpoint-N), local or on a store."""
    return int(name.rsplit("-", 1)[-1])


class CheckpointSync:
    """A stage's in-stage checkpoints (transformers' trainer/checkpoint-N directories) mirrored on an object
    store. After each save, every node's first process uploads what its node wrote (with DeepSpeed each node
    writes its own ranks' shards), then rank 0 uploads trainer_state.json, the marker of a whole checkpoint, and
    drops the older ones. Before training, every process brings the newest whole checkpoint to its node."""

    MARKER = "trainer_state.json"

    def __init__(self, store: Store, rel: str) -> None:
        self.store, self.rel = store, rel

    def save(self, checkpoint: Path, *, node_lead: bool, lead: bool, barrier: Any) -> None:
        if node_lead:
            self.store.upload(checkpoint, f"{self.rel}/{checkpoint.name}", exclude=(self.MARKER,))
        barrier()  # every node's shards are up before the marker says the checkpoint is whole
        if lead:
            marker = (checkpoint / self.MARKER).read_bytes()
            self.store.write_bytes(f"{self.rel}/{checkpoint.name}/{self.MARKER}", marker)
            for old in self.store.subdirs(self.rel):
                if old != checkpoint.name:
                    self.store.delete_tree(f"{self.rel}/{old}")
        barrier()

    def restore(self, trainer_dir: Path) -> None:
        """Download the newest whole checkpoint on the store into `trainer_dir`, unless this node has it."""
        whole = [d for d in self.store.subdirs(self.rel) if d.startswith("checkpoint-")
                 and self.store.exists(f"{self.rel}/{d}/{self.MARKER}")]
        if whole:
            newest = max(whole, key=checkpoint_step)
            if not (trainer_dir / newest / self.MARKER).exists():
                self.store.download(f"{self.rel}/{newest}", trainer_dir / newest, last=self.MARKER)
