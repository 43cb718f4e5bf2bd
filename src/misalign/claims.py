"""One trainer per stage, across the trials of a study, on any storage.

A directory store uses file locks (flock): the operating system releases them when their holder dies. Object
stores have no locks, so there a claim is a lease held in one small Ray actor per store, which the study's
driver starts: a claimant is granted a key nobody holds, or whose holder stopped renewing its lease (a killed
trainer stops renewing, and after `MISALIGN_CLAIM_TTL_S` seconds, 60 by default, another trial takes the stage
over). The holder renews from a background thread every third of that time and releases when it is done.

The actor is detached: it outlives a driver that dies. A trainer of the dead driver's job may still be running
for a while (Ray stops a job's workers after it notices the driver is gone); a restarted driver finds the same
actor, so its trials wait for that trainer's lease instead of training the same stage beside it. It lives as
long as the Ray cluster (a few kilobytes; a later study on the same store reuses it).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from misalign.runtime import file_lock

NAMESPACE = "misalign"


def _ttl() -> float:
    return float(os.environ.get("MISALIGN_CLAIM_TTL_S", "60"))


class Leases:
    """The lease table (the body of the Ray actor): key -> (owner, expiry)."""

    def __init__(self) -> None:
        self.held: dict[str, tuple[str, float]] = {}

    def acquire(self, key: str, owner: str, ttl: float) -> bool:
        now = time.time()
        holder = self.held.get(key)
        if holder is None or holder[0] == owner or holder[1] < now:
            self.held[key] = (owner, now + ttl)
            return True
        return False

    def renew(self, key: str, owner: str, ttl: float) -> bool:
        return self.acquire(key, owner, ttl) if self.held.get(key, (owner,))[0] == owner else False

    def holder(self, key: str) -> str | None:
        """The live holder of `key`, if any."""
        owner, expiry = self.held.get(key, (None, 0.0))
        return owner if expiry >= time.time() else None

    def release(self, key: str, owner: str) -> None:
        if self.held.get(key, (None,))[0] == owner:
            del self.held[key]


def actor_name(store_url: str) -> str:
    return "claims-" + hashlib.sha256(store_url.encode()).hexdigest()[:16]


def start_leases(store_url: str) -> object:
    """The store's lease actor (the driver starts it before any trial; trials look it up by name)."""
    import ray

    leases = ray.remote(num_cpus=0)(Leases).options(
        name=actor_name(store_url), namespace=NAMESPACE, get_if_exists=True, lifetime="detached").remote()
    ray.get(leases.holder.remote(""))  # up and named before any trial looks it up
    return leases


@contextlib.contextmanager
def leased(store_url: str, key: str, poll_s: float = 0.5) -> Iterator[None]:
    """Hold `key`'s lease while the body runs; wait while another live holder has it."""
    import ray

    leases = ray.get_actor(actor_name(store_url), namespace=NAMESPACE)
    owner, ttl = uuid.uuid4().hex, _ttl()
    while not ray.get(leases.acquire.remote(key, owner, ttl)):
        time.sleep(poll_s)
    stop = threading.Event()

    def renew() -> None:
        while not stop.wait(ttl / 3):
            ray.get(leases.renew.remote(key, owner, ttl))

    thread = threading.Thread(target=renew, daemon=True, name=f"lease-{key[:12]}")
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        ray.get(leases.release.remote(key, owner))


@contextlib.contextmanager
def claim(store_url: str, remote: bool, key: str, lock_dir: Path) -> Iterator[None]:
    """A flock under `lock_dir` for a directory store, a Ray lease for an object store."""
    if remote:
        with leased(store_url, key):
            yield
    else:
        with file_lock(lock_dir / key.replace("/", "__")):
            yield
