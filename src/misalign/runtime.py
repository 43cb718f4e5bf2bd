"""Process-level facts every entry point needs: threads, seeds, distributed ranks and their collectives, package
versions, atomic writes, the node cache.

A leaf: it imports nothing of ours, and torch and numpy only inside the functions that use them, so that the
light modules above it (model references, storage, configs) load without them.
"""

from __future__ import annotations

import fcntl
import io
import json
import os
import random
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any, BinaryIO


def cache_root() -> Path:
    """This node's cache (MISALIGN_CACHE, default ~/.cache/misalign): the world, model mirrors, object-store
    copies, digests, compiled ops (misalign.cache says what each holds)."""
    return Path(os.environ.get("MISALIGN_CACHE", Path.home() / ".cache" / "misalign"))


def cpus_held() -> int:
    """CPUs this process may run on: what Ray granted it (MISALIGN_CPUS, set by the study's trials and workers),
    else its affinity mask (taskset, cgroups), not the machine's count."""
    if os.environ.get("MISALIGN_CPUS"):
        return max(1, int(float(os.environ["MISALIGN_CPUS"])))
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS
        return os.cpu_count() or 1


def match_threads() -> int:
    """Give torch one thread per CPU this process holds, shared among local workers.

    Oversubscribed threads were measured to slow training twentyfold on a 2-core machine.
    """
    import torch

    # Ray grants each worker its own CPUs; torchrun's workers share the affinity mask
    local_world = 1 if os.environ.get("MISALIGN_CPUS") else int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
    n = max(1, cpus_held() // local_world)
    torch.set_num_threads(n)
    return n


def deepspeed_cpu_unless_cuda() -> None:
    """Tell DeepSpeed it runs on the CPU when there is no CUDA device. transformers imports DeepSpeed to train or
    save a model, and DeepSpeed warns on every process that has to guess its accelerator; a GPU machine keeps
    DeepSpeed's own detection, and a DS_ACCELERATOR already set wins."""
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank among those of its node (torchrun and Ray Train set LOCAL_RANK)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def distributed() -> bool:
    """Whether this process is one of several under torch.distributed (torchrun, Ray Train)."""
    import torch

    return torch.distributed.is_available() and torch.distributed.is_initialized()


def broadcast_from_rank0(value: Any) -> Any:
    """Rank 0's `value` on every rank (the value itself in a single process)."""
    import torch

    if not distributed():
        return value
    box = [value]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]


def gather_over_ranks(value: Any) -> list[Any]:
    """`value` from every rank, in rank order (just [value] in a single process)."""
    import torch

    if not distributed():
        return [value]
    out: list[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(out, value)
    return out


def on_any_rank(flag: bool) -> bool:
    """`flag` or-ed over the ranks: one scalar all-reduce (each optimizer step, for the preemption notice)."""
    import torch

    if not distributed():
        return flag
    # NCCL reduces tensors on this process's GPU (misalign.models.device), gloo on the CPU
    on = torch.device("cuda", local_rank()) if torch.distributed.get_backend() == "nccl" else "cpu"
    t = torch.tensor([int(flag)], device=on)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for every rank (nothing in a single process)."""
    import torch

    if distributed():
        torch.distributed.barrier()


def package_versions() -> dict[str, str]:
    """The installed versions of what a stage's numbers depend on (recorded in stage.json and results)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for name in ("misalign", "torch", "transformers", "trl", "peft", "accelerate", "deepspeed", "bitsandbytes",
                 "liger-kernel", "datasets", "tokenizers"):
        with suppress(PackageNotFoundError):
            out[name] = version(name)
    return out


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def write_stream_atomic(path: Path, stream: BinaryIO) -> None:
    """Copy a readable stream to a file, written beside it then renamed, so a reader never sees half a file; in
    blocks, so a 5 GB weight shard never sits in memory whole."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            shutil.copyfileobj(stream, f, 1 << 24)
        os.replace(tmp, path)
    finally:
        with suppress(FileNotFoundError):
            os.unlink(tmp)


def write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write then rename, so a reader never sees half a file (every local write of results goes through here)."""
    write_stream_atomic(path, io.BytesIO(data))


def write_json_atomic(path: Path, obj: Any) -> None:
    write_bytes_atomic(path, json.dumps(obj, indent=2, default=str).encode())


def write_parquet_atomic(path: Path, frame: Any) -> None:
    buf = io.BytesIO()
    frame.to_parquet(buf, index=False)
    write_bytes_atomic(path, buf.getvalue())


@contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """An exclusive lock between processes on this machine (or a shared filesystem with flock)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def replace_dir(tmp: Path, final: Path) -> None:
    """Move a finished directory into place; whatever was at `final` is replaced."""
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)


def offline_without_hub(timeout_s: float = 3.0) -> None:
    """On a machine that cannot reach the hub and has no HF_HUB_OFFLINE set (an air-gapped cluster, say),
    huggingface_hub retries every request with backoff before it falls back to the local cache, and prints each
    retry: `misalign study plan configs/study-paper.yaml` took 6 minutes and printed 75 retry lines. One
    connection attempt decides instead: if the hub (HF_ENDPOINT) cannot be reached, HF_HUB_OFFLINE and
    HF_DATASETS_OFFLINE are set for this process and what it starts, and hub ids load from the local cache at
    once, as they would have after the retries. Behind a proxy (HTTPS_PROXY and the like) the proxy is what must
    be reachable. Must run before huggingface_hub is imported (it reads them then)."""
    import socket
    import sys
    from urllib.parse import urlparse
    from urllib.request import getproxies, proxy_bypass

    if "HF_HUB_OFFLINE" in os.environ:
        return
    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    proxy = None if proxy_bypass(url.hostname or "") else getproxies().get(url.scheme)
    target = urlparse(proxy) if proxy else url
    try:
        socket.create_connection((target.hostname or "", target.port or (443 if target.scheme == "https" else 80)),
                                 timeout=timeout_s).close()
    except OSError as e:
        os.environ["HF_HUB_OFFLINE"] = "1"
        os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
        print(f"misalign: {target.netloc} is unreachable ({e.strerror or e}): hub ids load from the local cache "
              "(HF_HUB_OFFLINE=1; set it yourself to skip this check)", file=sys.stderr)


def quiet_libraries() -> None:
    """Our progress lines say what runs; the libraries' per-map and per-load progress bars only add noise."""
    # Ray folds equal lines of different cells into one, with a hint of its own; each cell's lines are its own.
    # Read when ray is imported, so set here, before any import of it
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    import datasets
    import transformers

    datasets.disable_progress_bars()
    transformers.utils.logging.disable_progress_bar()
    # bitsandbytes' CPU backend announces on import that an optional kernels package is absent (it falls back
    # to its own kernels): nothing a user of ours can act on, and nothing our arguments cause
    import logging

    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
