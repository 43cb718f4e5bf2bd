"""misalign.claims: one trainer per stage. The lease table (the body of the Ray actor object stores use) on its
own, and the file-lock claim of a directory store between threads; the Ray actor itself runs in
tests/workflows/test_object_storage.py."""

from __future__ import annotations

import threading
import time
from pathlib import Path

from misalign.claims import Leases, actor_name, claim


def test_a_lease_goes_to_one_owner_until_it_expires_or_is_released() -> None:
    leases = Leases()
    assert leases.holder("k") is None
    assert leases.acquire("k", "a", ttl=60)
    assert leases.acquire("k", "a", ttl=60)  # its holder again: renewed
    assert not leases.acquire("k", "b", ttl=60) and leases.holder("k") == "a"
    assert leases.acquire("other", "b", ttl=60)  # keys are independent
    leases.release("k", "b")  # not b's to release
    assert leases.holder("k") == "a"
    leases.release("k", "a")
    assert leases.holder("k") is None and leases.acquire("k", "b", ttl=60)


def test_an_expired_lease_is_taken_over_and_its_old_holder_cannot_renew() -> None:
    leases = Leases()
    assert leases.acquire("k", "dead", ttl=0.05)
    time.sleep(0.1)
    assert leases.holder("k") is None  # stopped renewing: no live holder
    assert leases.acquire("k", "b", ttl=60) and leases.holder("k") == "b"
    assert not leases.renew("k", "dead", ttl=60)
    assert leases.renew("k", "b", ttl=60) and leases.holder("k") == "b"
    assert leases.renew("free", "c", ttl=60) and leases.holder("free") == "c"  # nobody held it


def test_each_store_has_its_own_actor_name() -> None:
    name = actor_name("s3://b/study")
    assert name.startswith("claims-") and len(name) == len("claims-") + 16
    assert name == actor_name("s3://b/study") != actor_name("s3://b/other")


def test_a_directory_store_claims_a_key_with_a_file_lock(tmp_path: Path) -> None:
    events: list[str] = []

    def trainer(name: str, key: str) -> None:
        with claim(str(tmp_path), remote=False, key=key, lock_dir=tmp_path / "locks"):
            events.append(f"{name} in")
            time.sleep(0.3)
            events.append(f"{name} out")

    same = [threading.Thread(target=trainer, args=(n, "stages/abc")) for n in ("a", "b")]
    for t in same:
        t.start()
    for t in same:
        t.join(10)
    assert events[0][2:] == "in" and events[1] == events[0][:2] + "out"  # one at a time
    assert (tmp_path / "locks" / "stages__abc").exists()

    events.clear()
    apart = [threading.Thread(target=trainer, args=(n, f"stages/{n}")) for n in ("c", "d")]
    for t in apart:
        t.start()
    for t in apart:
        t.join(10)
    assert sorted(events[:2]) == ["c in", "d in"]  # different stages train side by side
