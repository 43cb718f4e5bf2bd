"""The CLI's door: every command that takes a config runs its preflight exactly once, before any output, and
`study plan` runs it too (issue 23 item 4). The preflight is counted by replacing it with a stand-in that
records the call and refuses, so nothing after it (Ray, training, an output directory) can start."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import ray

from misalign import preflight
from misalign.cli import main
from misalign.errors import EXIT_INPUT_ERROR, InputError

REPO = Path(__file__).resolve().parents[1]


def _counting(monkeypatch: pytest.MonkeyPatch, name: str) -> list[dict]:
    calls: list[dict] = []

    def refuse(*args: object, **kwargs: object) -> None:
        calls.append(kwargs)
        raise InputError(f"{name} refused (test)")

    monkeypatch.setattr(preflight, name, refuse)
    return calls


@pytest.mark.parametrize(("argv", "check", "local"), [
    (["trial", "configs/trial-tiny.yaml"], "check_trial", None),
    (["study", "run", "configs/study-tiny.yaml"], "check_study", True),
    (["study", "run", "configs/study-tiny.yaml", "--address", "auto"], "check_study", False),
    (["study", "plan", "configs/study-tiny.yaml"], "check_study", False),
    (["search", "attack", "configs/search-attack-tiny.yaml"], "check_search", True),
])
def test_each_command_runs_its_preflight_once_before_anything(argv, check, local, monkeypatch, tmp_path, capsys):
    monkeypatch.chdir(REPO)
    calls = _counting(monkeypatch, check)
    out = tmp_path / "out"
    extra = ["--out", str(out)] if argv[0] == "trial" else [] if argv[1] == "plan" else ["--storage", str(out)]
    assert main([*argv, *extra]) == EXIT_INPUT_ERROR
    assert f"misalign: error: {check} refused (test)" in capsys.readouterr().err
    assert len(calls) == 1
    if local is not None:  # Ray on this machine: the preflight checks that a trial fits it
        assert calls[0]["local"] is local
    assert not out.exists() and not ray.is_initialized()


def test_a_plan_is_refused_what_a_run_would_be(tmp_path, capsys):
    """`study plan` runs the same preflight as `study run` (less the local resources): a logger that is not
    installed exits 2 before the estimate."""
    if importlib.util.find_spec("mlflow"):
        pytest.skip("mlflow is installed here")
    assert main(["study", "plan", str(REPO / "configs" / "study-tiny.yaml"), "--set", "loggers=[mlflow]"]) == 2
    assert "loggers.0: mlflow is not installed" in capsys.readouterr().err


def test_a_plan_from_stand_in_architectures_is_checked_too(capsys):
    """plan.model_configs prices models that are not on this machine (configs/study-paper.yaml: four 7-9B models,
    their data files and Llama Guard are not here): the plan's one preflight checks them through their stand-in
    configs, so it runs, and a stage that could not be built still fails before the estimate."""
    paper = str(REPO / "configs" / "study-paper.yaml")
    assert main(["study", "plan", paper]) == 0
    assert "672 cells" in capsys.readouterr().out
    assert main(["study", "plan", paper, "--set", "attack.adapter.targets=bogus"]) == EXIT_INPUT_ERROR
    err = capsys.readouterr().err
    assert "attack (cell method='lora', per_category=1): adapter.targets: 'bogus'" in err
    assert main(["study", "plan", paper, "--set", "defense.per_method.dpo.preference.loss_type=nope"]) == 2
    assert "preference.loss_type: 'nope' not a trl DPO loss type" in capsys.readouterr().err
