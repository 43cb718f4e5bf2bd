"""Model references: what a model string in a config stands for, and where this node finds its files.

    world:NAME                            a model of the offline world (misalign.world), built on first use
    /path/to/model                        a local directory
    s3://bucket/models/llama-8b           a model on object storage (any URL misalign.storage reads), mirrored
                                          once per node under the node cache
    meta-llama/Llama-3.1-8B-Instruct      a hub id: whatever revision the hub serves, or the local HF cache holds
    ORG/NAME@REVISION                     a hub id pinned to a commit, branch or tag: its snapshot in the HF cache

`resolve_model_path` gives the directory the loader reads (weights included); `config_path` one with the config
and tokenizer only, which checks and plans read without downloading weights. Loading itself is misalign.models'.
This module imports neither torch nor transformers, and nothing of ours that does at import time.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path

from misalign.cache import note_use
from misalign.errors import InputError
from misalign.runtime import cache_root, file_lock
from misalign.storage import Store, is_url, redacted


def has_safetensors(model: str, config_dir: str | None = None) -> bool | None:
    """Whether a local or object-store model holds .safetensors weights at its top level; None for a hub id
    whose files are not all here (the loader decides: it takes safetensors only unless allow_pickle).
    `config_dir`: config_path(model), when the caller has it already (a pinned id's is fetched from the hub)."""
    if is_url(model):
        return any("/" not in name and name.endswith(".safetensors") for name, _, _ in model_files(model))
    if pinned_revision(model):  # its small files only: a sharded model's index says, else the loader decides
        light = Path(config_dir or config_path(model))
        return True if any(light.glob("*.safetensors*")) else None
    local = Path(resolve_model_path(model))
    return any(local.glob("*.safetensors")) if local.is_dir() else None


def resolve_model_path(ref: str) -> str:
    """world:NAME -> the world's cached model directory; a URL -> this node's mirror of it (downloaded once); a
    pinned hub id ORG/NAME@REVISION -> its snapshot in the HF cache (downloaded if missing and the hub is
    reachable); anything else (a path, an HF id) as it is."""
    if ref.startswith("world:"):
        # here, not at the top: the world package imports its builder (torch, transformers, and the evaluation
        # that checks the models it builds, which resolves model references through this module)
        from misalign.world import world_model

        return str(world_model(ref.removeprefix("world:")))
    if is_url(ref):
        return str(_mirrored(ref, weights=True))
    pinned = pinned_revision(ref)
    return _hub_snapshot(*pinned, weights=True) if pinned else ref


def config_path(ref: str) -> str:
    """Where a model's config and tokenizer are read without its weights: for a URL or a pinned hub id, a copy
    of its small files only (what checks and plans need); anything else, resolve_model_path's."""
    if is_url(ref):
        return str(_mirrored(ref, weights=False))
    pinned = pinned_revision(ref)
    return _hub_snapshot(*pinned, weights=False) if pinned else resolve_model_path(ref)


# ---- hub models pinned to a revision ----------------------------------------------------------------------
# `meta-llama/Llama-3.1-8B-Instruct@0e9e39f2...` (a commit, or a branch or tag) loads that revision on every
# node: an unpinned id loads whatever the hub serves when a node first downloads it, so two nodes could train
# two revisions under one key. Pinned models load from their snapshot directory, never asking the hub again.

# files a pinned snapshot never needs: the original checkpoints some repos ship beside their HF weights
_HUB_SKIP = ["original/*", "*.pth", "*.pt", "*.ckpt", "*.h5", "*.msgpack", "*.gguf", "*.onnx", "*.tflite"]


def is_hub_id(ref: str) -> bool:
    """Whether a model reference names a hub repository (pinned or not): not the world, a URL or a local path."""
    return not (ref.startswith("world:") or is_url(ref) or Path(ref).exists())


def pinned_revision(ref: str) -> tuple[str, str] | None:
    """(repo id, revision) of ORG/NAME@REVISION; None for any other reference (a local path wins)."""
    if ref.count("@") != 1 or not is_hub_id(ref):
        return None
    repo, revision = ref.split("@")
    return (repo, revision) if repo.count("/") == 1 and revision else None


def hub_cache() -> Path:
    """The HF hub cache, read from the environment now (huggingface_hub reads it once, when imported)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache").expanduser() / "huggingface" / "hub"


def _hub_snapshot(repo: str, revision: str, *, weights: bool) -> str:
    from huggingface_hub import snapshot_download

    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    skip = _HUB_SKIP + ([] if weights else [f"*{suffix}" for suffix in WEIGHT_SUFFIXES])
    try:
        return snapshot_download(repo, revision=revision, cache_dir=hub_cache(), ignore_patterns=skip,
                                 local_files_only=offline)
    except Exception as e:  # noqa: BLE001 (huggingface_hub's own errors say why: no such revision, offline, ...)
        where = "in the local HF cache (HF_HUB_OFFLINE is set)" if offline else "on the hub or in the local cache"
        raise InputError(f"{repo}@{revision}: this revision is not {where} ({type(e).__name__}: "
                         f"{str(e).splitlines()[0][:300]})") from None


# ---- models on object storage -----------------------------------------------------------------------------
# A URL model (s3://bucket/models/llama-8b) is mirrored once per node under the cache, keyed by its URL and its
# objects' listing (names, sizes, mtimes), so a changed object gives a fresh mirror. A mirror is downloaded
# into a temporary directory beside it and renamed into place: nobody sees half a model, and a file lock keeps
# a second process on the node waiting instead of downloading it again.

# weight formats, left out of the light mirror that checks and plans read
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack")


def visible(rel: str) -> bool:
    """Whether a file (its path inside a model directory) is part of the model: dot-files and dot-directories
    (caches, partial downloads, editor files) are not."""
    return not any(part.startswith(".") for part in rel.split("/"))


def model_files(url: str) -> list[tuple[str, int, int | None]]:
    """(name relative to the prefix, size, mtime in ns or None) of a URL model's files, dot-files left out as a
    local directory's identity leaves them out; InputError when the prefix holds none."""
    try:
        files = [f for f in Store(url).files() if visible(f[0])]
    except OSError as e:  # the store's own error (no such bucket, access denied), which says which
        raise InputError(f"{redacted(url)}: cannot list the model's files ({e})") from None
    if not files:
        raise InputError(f"{redacted(url)}: no objects under this prefix (a model's directory holds config.json "
                         "and its weights)")
    return files


def url_mirror(url: str, files: list[tuple[str, int, int | None]]) -> Path:
    """Where this node keeps (or will keep) the whole mirror of a URL model with this listing."""
    key = hashlib.sha256(json.dumps([url, files]).encode()).hexdigest()[:16]
    return cache_root() / "models" / key


def _mirrored(url: str, *, weights: bool) -> Path:
    """A complete node-local copy of a URL model: every file (`weights`), or every file but the weights."""
    files = model_files(url)
    full = url_mirror(url, files)
    if full.exists() or weights:
        target, wanted = full, files
    else:
        if "config.json" not in {name for name, _, _ in files}:
            raise InputError(f"{redacted(url)}: no config.json under this prefix (a model's directory holds one)")
        target = full.with_name(f"{full.name}-config")
        wanted = [f for f in files if not f[0].endswith(WEIGHT_SUFFIXES)]
    if not target.exists():
        _download_mirror(url, wanted, target, announce=weights)
    note_use(target, redacted(url), files=len(wanted))  # `misalign cache prune` removes long-unused ones
    return target


def _download_mirror(url: str, wanted: list[tuple[str, int, int | None]], target: Path, *, announce: bool) -> None:
    """Download `wanted` of a URL model's files into `target`, once per node (under a lock; beside it, then
    renamed); `announce`: say so (a whole model, weights included)."""
    with file_lock(target.parent / ".locks" / target.name):
        if target.exists():  # another process on this node finished it while this one waited
            return
        for stale in target.parent.glob(f".{target.name}.*"):  # left by a process killed mid-download
            shutil.rmtree(stale, ignore_errors=True)
        if announce:
            gib = sum(size for _, size, _ in wanted) / 2**30
            print(f"[models] {redacted(url)} -> node cache ({len(wanted)} files, {gib:.2f} GiB)", file=sys.stderr,
                  flush=True)
        tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}."))
        try:
            Store(url).download("", tmp, only={name for name, _, _ in wanted})
            # the mirror is keyed by the listing: an object rewritten since then must not enter it under that key
            changed = [name for name, size, _ in wanted if (tmp / name).stat().st_size != size]
            if changed:
                raise RuntimeError(f"{redacted(url)}: {', '.join(changed[:5])} changed while this node downloaded "
                                   "the model; run again once the model's files stay put")
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
