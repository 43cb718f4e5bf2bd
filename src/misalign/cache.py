"""The node cache (MISALIGN_CACHE, default ~/.cache/misalign): what it holds, and pruning what runs no longer use.

A node keeps, under the cache root:
- models/: mirrors of models on object storage, one per version of the bucket's files (an 8B model is 16 GB,
  and every changed listing is a new mirror beside the old ones);
- stores/: this node's copies of object-store study directories (the stages it read or wrote);
  each of these two kinds has a record beside it: its URL, and (its mtime) its last use by a run;
- world/, digests/ (memoized sha256 of model weights), torch_extensions/ (compiled DeepSpeed ops).

`misalign cache` lists them with their sizes and last use; `misalign cache prune --older-than DAYS` removes the
model mirrors and store copies no run has used for that long. A run that needs one again downloads again what
it reads: models stay in their bucket, and a study's stages and results in its storage, never only here.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from misalign.runtime import cache_root, file_lock, write_bytes_atomic
from misalign.storage import Store, redacted

_KINDS = {"models": "model mirror", "stores": "object-store copy", "world": "world", "digests": "digests",
          "torch_extensions": "compiled ops"}
PRUNED = {_KINDS["models"], _KINDS["stores"]}  # what prune removes: copies of what a bucket keeps
_WHOLE = {"digests", "torch_extensions"}  # listed as one entry each: many small files, nothing to choose among


@dataclass(frozen=True)
class Entry:
    kind: str
    path: Path
    bytes: int
    last_used: float  # epoch seconds
    source: str = ""  # a model mirror's URL


def record(entry: Path) -> Path:
    """The record beside a model mirror or store copy: its URL; its mtime is the entry's last use."""
    return entry.with_name(entry.name + ".json")


def note_use(entry: Path, url: str, **details: object) -> None:
    """Record that a run uses `entry` now (the URL must be redacted)."""
    path = record(entry)
    if path.exists():
        os.utime(path)
    else:
        write_bytes_atomic(path, json.dumps({"url": url, **details}).encode())


def note_store_use(store: Store) -> None:
    """Record that a run uses this node's copy of an object store (a directory store is its own copy)."""
    if store.remote:
        note_use(store.mirror, redacted(store.url))


def _tree(path: Path) -> tuple[int, float]:
    """Bytes under path and the newest mtime there (symlinks are not followed). A running study writes and
    renames files in its copy meanwhile: one gone before it is read is left out."""
    size, newest = 0, path.lstat().st_mtime
    for f in [path] if not path.is_dir() or path.is_symlink() else path.rglob("*"):
        try:
            st = f.lstat()
        except FileNotFoundError:
            continue
        size += st.st_size if stat.S_ISREG(st.st_mode) else 0
        newest = max(newest, st.st_mtime)
    return size, newest


def entries(root: Path | None = None) -> list[Entry]:
    root = root or cache_root()
    found: list[Entry] = []
    for sub, kind in _KINDS.items():
        top = root / sub
        if not top.is_dir() or top.is_symlink():  # a test node's world links to the machine's: not this cache's
            continue
        paths = [top] if sub in _WHOLE else [p for p in sorted(top.iterdir())
                                             if p.is_dir() and not p.name.startswith(".")]
        for path in paths:
            size, last = _tree(path)
            source = ""
            if record(path).exists():
                source, last = json.loads(record(path).read_text())["url"], record(path).stat().st_mtime
            found.append(Entry(kind, path, size, last, source))
    return found


def prune(older_than_days: float, dry_run: bool = False, root: Path | None = None) -> list[Entry]:
    """Remove the model mirrors and store copies unused for `older_than_days`; what was (or, `dry_run`, would
    be) removed. A model mirror goes under the lock its download takes, so never one being written. A run finds
    an existing mirror or copy without a lock, so prune with a margin of days beyond the longest trial."""
    cutoff = time.time() - older_than_days * 86400
    return [e for e in entries(root) if e.kind in PRUNED and e.last_used < cutoff
            and (dry_run or _remove_unused(e.path, cutoff))]


def _remove_unused(entry: Path, cutoff: float) -> bool:
    """Remove `entry` and its record unless a run used it after `cutoff` (while prune ran); whether it did."""
    with file_lock(entry.parent / ".locks" / entry.name):
        if record(entry).exists() and record(entry).stat().st_mtime >= cutoff:
            return False
        gone = entry.with_name(f".{entry.name}.pruned")  # a download of this key clears it if we die here
        shutil.rmtree(gone, ignore_errors=True)  # left by a prune that died
        os.replace(entry, gone)
        record(entry).unlink(missing_ok=True)
        shutil.rmtree(gone)
    return True


def describe(e: Entry, root: Path) -> dict[str, object]:
    return {**asdict(e), "path": str(e.path.relative_to(root)),
            "last_used": time.strftime("%Y-%m-%d %H:%M", time.localtime(e.last_used))}
