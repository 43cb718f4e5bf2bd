"""misalign.modelref: what a model string stands for (world:NAME, a local path, a URL, a hub id, a hub id pinned
to a revision) and where this node finds its files. URL models live on fsspec's in-memory filesystem here (the
same Store operations a bucket gets; moto's S3 in tests/workflows/test_object_storage.py); the node cache is a
temporary directory."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest

from misalign.cache import record
from misalign.errors import InputError
from misalign.modelref import (
    config_path,
    has_safetensors,
    hub_cache,
    is_hub_id,
    model_files,
    pinned_revision,
    resolve_model_path,
    url_mirror,
    visible,
)

SHA = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture
def bucket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A model's files on memory://, and the node cache in tmp_path."""
    monkeypatch.setenv("MISALIGN_CACHE", str(tmp_path / "cache"))
    fs = fsspec.filesystem("memory")
    files = {"config.json": b'{"model_type": "llama"}', "tokenizer.json": b"{}",
             "model.safetensors": b"\x00" * 64, ".cache/partial": b"x", "sub/extra.txt": b"e"}
    for name, data in files.items():
        fs.pipe(f"/models-{tmp_path.name}/tiny/{name}", data)
    yield f"memory://models-{tmp_path.name}/tiny"
    fs.rm(f"/models-{tmp_path.name}", recursive=True)


@pytest.fixture
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A local HF cache holding org/tiny at SHA, with refs/main pointing at it; offline."""
    snapshot = tmp_path / "hub" / "models--org--tiny" / "snapshots" / SHA
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text(SHA)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return snapshot


def test_what_a_reference_names(tmp_path: Path) -> None:
    assert is_hub_id("meta-llama/Llama-3.1-8B-Instruct") and is_hub_id("org/name@v2")
    assert not is_hub_id("world:base") and not is_hub_id("s3://b/m") and not is_hub_id(str(tmp_path))


def test_pinned_revisions_are_org_name_at_revision(tmp_path: Path) -> None:
    assert pinned_revision(f"org/name@{SHA}") == ("org/name", SHA)
    assert pinned_revision("org/name@main") == ("org/name", "main")
    for ref in ("org/name", "name@main", "a/b/c@main", "org/name@", "org/name@a@b", "world:base@x",
                "s3://b/m@v1"):
        assert pinned_revision(ref) is None, ref
    local = tmp_path / "org" / "name@v1"
    local.mkdir(parents=True)
    assert pinned_revision(str(local)) is None  # a local path wins


def test_unpinned_references_resolve_to_themselves(tmp_path: Path) -> None:
    assert resolve_model_path("meta-llama/Llama-3.1-8B-Instruct") == "meta-llama/Llama-3.1-8B-Instruct"
    assert resolve_model_path(str(tmp_path)) == config_path(str(tmp_path)) == str(tmp_path)


def test_hub_cache_follows_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME"):
        monkeypatch.delenv(var, raising=False)
    assert hub_cache() == Path.home() / ".cache" / "huggingface" / "hub"
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert hub_cache() == tmp_path / "xdg" / "huggingface" / "hub"
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert hub_cache() == tmp_path / "home" / "hub"
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "direct"))
    assert hub_cache() == tmp_path / "direct"


def test_a_pinned_id_resolves_to_its_snapshot(hub: Path) -> None:
    assert resolve_model_path("org/tiny@main") == resolve_model_path(f"org/tiny@{SHA}") == str(hub)
    assert config_path("org/tiny@main") == str(hub)


def test_a_revision_not_in_the_cache_is_an_input_error(hub: Path) -> None:
    with pytest.raises(InputError, match=r"org/tiny@v2: this revision is not in the local HF cache"):
        resolve_model_path("org/tiny@v2")


def test_has_safetensors_of_local_and_pinned_models(hub: Path, tmp_path: Path) -> None:
    assert has_safetensors("org/tiny@main") is None  # its small files do not say: the loader decides
    (hub / "model.safetensors").write_bytes(b"\x00")
    assert has_safetensors("org/tiny@main") is True
    local = tmp_path / "local"
    local.mkdir()
    (local / "pytorch_model.bin").write_bytes(b"\x00")
    assert has_safetensors(str(local)) is False
    (local / "model.safetensors").write_bytes(b"\x00")
    assert has_safetensors(str(local)) is True
    assert has_safetensors("org/not-here") is None


def test_a_url_model_lists_its_visible_files(bucket: str) -> None:
    assert visible("config.json") and visible("sub/x") and not visible(".cache/x") and not visible("a/.tmp")
    assert [(name, size) for name, size, _ in model_files(bucket)] == [
        ("config.json", 23), ("model.safetensors", 64), ("sub/extra.txt", 1), ("tokenizer.json", 2)]
    assert has_safetensors(bucket) is True
    with pytest.raises(InputError, match="no objects under this prefix"):
        model_files(bucket + "-absent")


def test_a_url_model_is_mirrored_once_with_or_without_its_weights(bucket: str, tmp_path: Path) -> None:
    light = Path(config_path(bucket))
    assert sorted(p.relative_to(light).as_posix() for p in light.rglob("*") if p.is_file()) == [
        "config.json", "sub/extra.txt", "tokenizer.json"]  # no weights: what checks and plans read
    full = Path(resolve_model_path(bucket))
    assert full == url_mirror(bucket, model_files(bucket)) and full.parent == tmp_path / "cache" / "models"
    assert (full / "model.safetensors").read_bytes() == b"\x00" * 64 and not (full / ".cache").exists()
    assert json.loads(record(full).read_text()) == {"url": bucket, "files": 4}  # `misalign cache` lists it
    (full / "marker").write_text("kept")
    assert Path(resolve_model_path(bucket)) == full and (full / "marker").exists()  # not downloaded again
    assert Path(config_path(bucket)) == full  # once the whole mirror is here, checks read it too


def test_a_changed_object_gives_a_fresh_mirror(bucket: str) -> None:
    before = url_mirror(bucket, model_files(bucket))
    fsspec.filesystem("memory").pipe(bucket.removeprefix("memory:/") + "/config.json", b"{}")
    assert url_mirror(bucket, model_files(bucket)) != before


def test_a_url_model_without_a_config_is_refused_for_its_config(bucket: str) -> None:
    fsspec.filesystem("memory").rm(bucket.removeprefix("memory:/") + "/config.json")
    with pytest.raises(InputError, match="no config.json under this prefix"):
        config_path(bucket)


def test_a_world_model_is_its_directory_in_the_built_world(world: Path) -> None:
    assert resolve_model_path("world:base") == config_path("world:base") == str(world / "base")
    assert (Path(resolve_model_path("world:base")) / "config.json").is_file()
    assert has_safetensors("world:base") is True
