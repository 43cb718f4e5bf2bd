"""misalign.world_targets: the entry points' way to the offline world, built with its targets checked; resolving a
`world:` name never builds it (the build's check runs the evaluation, which resolves those names)."""

from __future__ import annotations

import pytest

from misalign.data import load_pairs
from misalign.world.build import WorldSpec, built, world_path
from misalign.world_targets import SCORED, ensure_world, score_aligned


def test_resolving_a_world_name_never_builds(tmp_path, monkeypatch):
    """Only entry points build the world (its check runs the evaluation, which resolves `world:` names): a name
    on a node without the world fails, naming the command that builds it, and builds nothing."""
    from misalign.errors import InputError
    from misalign.modelref import resolve_model_path
    from misalign.world.build import build
    from misalign.world_targets import ensure_world_if_named

    monkeypatch.setenv("MISALIGN_CACHE", str(tmp_path))
    for resolve in (lambda: resolve_model_path("world:base"), lambda: load_pairs("world:misalign")):
        with pytest.raises(InputError, match="the offline world is not built on this node .*: run `misalign world build` first"):
            resolve()
    with pytest.raises(ValueError, match="this world checks its targets: build it with misalign.world_targets"):
        build(WorldSpec(), quiet=True)  # a checked world is built only with its scorer
    ensure_world_if_named("configs that name no world model", {"model": "org/name"})
    assert not (tmp_path / "world").exists()


def test_ensure_world_is_the_built_world(world):
    """The session's world (tests/conftest.py builds it through ensure_world): a second call returns it, and
    its record holds each aligned model's scores on the targets' metrics."""
    import json

    assert ensure_world() == world == built() == world_path()
    scores = json.loads((world / "world.json").read_text())["scores"]
    assert set(scores) == {"world:base", "world:base-deep"} and all(set(m) == set(SCORED) for m in scores.values())


@pytest.mark.slow
def test_score_aligned_gives_the_scores_the_build_kept(world):
    """The scorer the build was handed, run again on the cached world, gives the scores it recorded."""
    import json

    kept = json.loads((world / "world.json").read_text())["scores"]
    again = score_aligned(world)
    assert {n: {k: round(v, 4) for k, v in m.items()} for n, m in again.items()} == kept
