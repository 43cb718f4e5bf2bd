"""Where a study or search keeps what it writes: a local (or NFS) directory, or an object store.

    Store("runs/study-tiny")                      a directory
    Store("s3://bucket/prefix/study-tiny")        S3 (or any S3-compatible server: AWS_ENDPOINT_URL)
    Store("gs://bucket/prefix/study-tiny")        GCS; any other URL that pyarrow or fsspec understands

Every write is atomic: a local file is written beside its target and renamed, an object store's PUT replaces
an object whole. Stages and evaluations are written once, under keys that say what they are, and read many
times, so each node keeps a local mirror of what it downloaded (`mirror`): a stage's adapter is fetched once
per node. Object stores have no file locks: "one trainer per stage" goes through `misalign.claims` instead.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import re
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misalign.errors import InputError
from misalign.runtime import cache_root, write_bytes_atomic, write_stream_atomic

if TYPE_CHECKING:
    import pandas as pd


_READ_TRIES = 20  # reads of an object that keeps changing under the reader before giving up


def is_url(location: str | Path) -> bool:
    return "://" in str(location) and not str(location).startswith("file://")


def redacted(location: str) -> str:
    """A location fit to print: a URL without the credentials it may carry (s3://KEY:SECRET@bucket/...,
    ?secret_key=...)."""
    if not is_url(location):
        return location
    return re.sub(r"^([^:/]+://)[^/@]*@", r"\1", location.split("?", 1)[0])


def _refuse_credentials(url: str) -> None:
    """A URL is kept where it is used (stage records, results, logs), so it must not carry secrets: a password
    (s3://KEY:SECRET@bucket) or a query parameter naming a key, secret or token."""
    from urllib.parse import parse_qsl, urlsplit

    parts = urlsplit(url)
    secret = [k for k, _ in parse_qsl(parts.query) if re.search("key|secret|token|password|credential", k, re.I)]
    if parts.password is not None or secret:
        raise InputError(f"{redacted(url)}: credentials in a URL would be written wherever the URL is kept (stage "
                         "records, results, logs); give them through the environment instead (AWS_ACCESS_KEY_ID "
                         "and AWS_SECRET_ACCESS_KEY, AWS_PROFILE, GOOGLE_APPLICATION_CREDENTIALS)")


class Store:
    """A root location and the few operations a run needs on it, the same for a directory and a bucket."""

    def __init__(self, location: str | Path) -> None:
        location = str(location)
        self.url = location.rstrip("/") if is_url(location) else str(Path(location.removeprefix("file://")))
        self.remote = is_url(self.url)
        if self.remote:
            _refuse_credentials(self.url)
            self.fs, self.base = _filesystem(self.url)
        else:
            from pyarrow import fs as pafs

            self.fs, self.base = pafs.LocalFileSystem(), str(Path(self.url).resolve())

    def __repr__(self) -> str:
        return f"Store({self.url!r})"

    def child(self, rel: str) -> Store:
        return Store(f"{self.url}/{rel}" if self.remote else str(Path(self.url) / rel))

    @property
    def name(self) -> str:
        return self.url.rstrip("/").rsplit("/", 1)[-1]

    @property
    def location(self) -> str:
        """Where any process, on any node, reopens this store: the URL, or the directory's absolute path."""
        return self.url if self.remote else self.base

    @property
    def local(self) -> Path:
        """The root as a local path (a directory store only)."""
        assert not self.remote, "an object store has no local path: use its mirror"
        return Path(self.base)

    @property
    def mirror(self) -> Path:
        """Where this node keeps copies of what it read from (or wrote to) the store: the root itself for a
        directory, a cache directory keyed by the URL for an object store."""
        if not self.remote:
            return Path(self.base)
        return cache_root() / "stores" / hashlib.sha256(self.url.encode()).hexdigest()[:16]

    def _path(self, rel: str) -> str:
        return f"{self.base}/{rel}".rstrip("/") if rel else self.base

    # ---- reading -------------------------------------------------------------------------------------------

    def exists(self, rel: str = "") -> bool:
        from pyarrow import fs as pafs

        return self.fs.get_file_info(self._path(rel)).type != pafs.FileType.NotFound

    def read_bytes(self, rel: str) -> bytes:
        """A file's whole contents, as one version of it. An object store's reader asks for the object's size and
        then reads that many bytes in a second request: an object replaced in between (an attempt log, a claim)
        would give a prefix of the new version. Such a read is noticed (the size has changed) and read again."""
        path = self._path(rel)
        for _ in range(_READ_TRIES):
            try:
                with self.fs.open_input_stream(path) as f:
                    data = f.read()
            except FileNotFoundError:
                raise InputError(f"{self.url}/{rel}: not found") from None
            if not self.remote or len(data) == self.fs.get_file_info(path).size:
                return data
        raise OSError(f"{self.url}/{rel}: the object changed during each of {_READ_TRIES} reads in a row")

    def read_text(self, rel: str) -> str:
        return self.read_bytes(rel).decode()

    def read_json(self, rel: str) -> Any:
        return json.loads(self.read_bytes(rel))

    def read_parquet(self, rel: str) -> pd.DataFrame:
        import pandas as pd  # pandas only where a table is read: model references and stages load without it

        return pd.read_parquet(io.BytesIO(self.read_bytes(rel)))

    def list(self, rel: str = "", suffix: str = "") -> list[str]:
        """Names of the files directly under `rel` ending with `suffix` (sorted); [] when there is none."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        return sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.File and i.path.endswith(suffix))

    def files(self, rel: str = "") -> list[tuple[str, int, int | None]]:
        """(path relative to `rel`, size, modification time in ns where the filesystem gives one) of every file
        under `rel`, at any depth, sorted; [] when there is none."""
        from pyarrow import fs as pafs

        root = self._path(rel)
        infos = self.fs.get_file_info(pafs.FileSelector(root, recursive=True, allow_not_found=True))
        return sorted((i.path[len(root):].lstrip("/"), i.size, i.mtime_ns) for i in infos
                      if i.type == pafs.FileType.File)

    def open(self, rel: str) -> Any:
        """A file's contents as a stream (read in blocks: weights need not fit in memory)."""
        return self.fs.open_input_stream(self._path(rel))

    def subdirs(self, rel: str = "") -> list[str]:
        """Names of the directories (prefixes, on an object store) directly under `rel`."""
        from pyarrow import fs as pafs

        infos = self.fs.get_file_info(pafs.FileSelector(self._path(rel), allow_not_found=True))
        return sorted(Path(i.path).name for i in infos if i.type == pafs.FileType.Directory)

    # ---- writing (atomic) ------------------------------------------------------------------------------------

    def write_bytes(self, rel: str, data: bytes) -> None:
        if self.remote:
            with self.fs.open_output_stream(self._path(rel)) as f:
                f.write(data)
            return
        write_bytes_atomic(Path(self._path(rel)), data)

    def write_text(self, rel: str, text: str) -> None:
        self.write_bytes(rel, text.encode())

    def write_json(self, rel: str, obj: Any) -> None:
        self.write_bytes(rel, json.dumps(obj, indent=2, default=str).encode())

    def write_parquet(self, rel: str, frame: pd.DataFrame) -> None:
        buf = io.BytesIO()
        frame.to_parquet(buf, index=False)
        self.write_bytes(rel, buf.getvalue())

    def delete(self, rel: str) -> None:
        """Remove a file, if it is there."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_file(self._path(rel))

    def delete_tree(self, rel: str) -> None:
        """Remove a directory (every object under a prefix), if it is there."""
        with contextlib.suppress(FileNotFoundError):
            self.fs.delete_dir(self._path(rel))

    # ---- directories between the store and this node --------------------------------------------------------

    def upload(self, local: Path, rel: str, last: str | None = None, skip: tuple[str, ...] = (),
               exclude: tuple[str, ...] = ()) -> int:
        """Copy a local directory's files under `rel` (no-op for a directory store, whose mirror is itself),
        leaving out sub-directories whose name starts with one of `skip` and top-level files named in `exclude`;
        `last` is uploaded after every other file (its presence marks the whole as complete). Returns the bytes
        copied."""
        if not self.remote:
            return 0
        files = sorted(f for f in local.rglob("*") if f.is_file() and not f.name.startswith(".")
                       and not (len(f.relative_to(local).parts) > 1 and f.relative_to(local).parts[0].startswith(skip))
                       and f.relative_to(local).as_posix() not in exclude)
        files.sort(key=lambda f: f.name == last)
        for f in files:
            self.write_bytes(f"{rel}/{f.relative_to(local).as_posix()}", f.read_bytes())
        return sum(f.stat().st_size for f in files)

    def download(self, rel: str, local: Path, skip: tuple[str, ...] = (), last: str | None = None,
                 only: Collection[str] | None = None) -> None:
        """Copy the files under `rel` into a local directory (each file atomically, streamed), leaving out
        sub-directories whose name starts with one of `skip`, or every file not in `only` (paths relative to
        `rel`) when given; `last` is written after every other file."""
        names = [name for name, _, _ in self.files(rel)]
        if not names:
            raise InputError(f"{self.url}/{rel}: not found")
        for sub in sorted(names, key=lambda n: Path(n).name == last):
            if ("/" in sub and sub.split("/")[0].startswith(skip)) or (only is not None and sub not in only):
                continue
            with self.open(f"{rel}/{sub}" if rel else sub) as f:
                write_stream_atomic(local / sub, f)


def _filesystem(url: str) -> tuple[Any, str]:
    """pyarrow's own filesystem for the URL (s3, gs, hdfs), else fsspec's through pyarrow's adapter."""
    from pyarrow import fs as pafs

    try:
        return pafs.FileSystem.from_uri(url)
    except (ValueError, OSError) as e:  # pyarrow's ArrowInvalid is a ValueError
        first = e
    try:
        from fsspec.core import url_to_fs

        fs, path = url_to_fs(url)
        return pafs.PyFileSystem(pafs.FSSpecHandler(fs)), path
    except (ImportError, ValueError, OSError) as e:
        raise InputError(f"{url}: no filesystem understands this URL ({first}; fsspec: {e})") from None


def check_store(store: Store) -> None:
    """The storage is reachable and writable: fail before anything runs (exit 2), not inside a trial."""
    probe = f".probe-{os.getpid()}"
    try:
        store.write_text(probe, "misalign")
        store.delete(probe)
    except InputError:
        raise
    except Exception as e:  # noqa: BLE001 (every backend raises its own errors: say which storage and why)
        raise InputError(f"--storage {store.url}: cannot write there ({type(e).__name__}: {e})") from None
