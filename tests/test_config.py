"""misalign.config: bad input exits with code 2 before any compute, names what is wrong and where, and writes
nothing (through load_config and the CLI). Was tests/test_config_errors.py."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from misalign.cli import main
from misalign.config import load_config
from misalign.errors import EXIT_INPUT_ERROR
from misalign.methods import METHODS

REPO = Path(__file__).resolve().parents[1]
TINY = REPO / "configs" / "trial-tiny.yaml"
ENV = {
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "DS_ACCELERATOR": "cpu",
    "TOKENIZERS_PARALLELISM": "false",
    "TRL_EXPERIMENTAL_SILENCE": "1",
}


def _base() -> dict:
    return yaml.safe_load(TINY.read_text())


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _fails(capsys: pytest.CaptureFixture[str], tmp_path: Path, config: Path | str, *extra: str) -> str:
    """Run `misalign trial CONFIG --out tmp/out ...` in-process: exit code 2, nothing written; the message."""
    out = tmp_path / "out"
    before = sorted(p.name for p in tmp_path.iterdir())
    code = main(["trial", str(config), "--out", str(out), "--quiet", *extra])
    err = capsys.readouterr().err
    assert code == EXIT_INPUT_ERROR == 2, err
    assert err.startswith("misalign: error: "), err
    assert "Traceback" not in err
    assert not out.exists(), "a rejected trial must not create its output directory"
    assert sorted(p.name for p in tmp_path.iterdir()) == before, "a rejected trial must write nothing"
    return err


def _with(tmp_path: Path, edit) -> Path:
    cfg = _base()
    edit(cfg)
    return _write(tmp_path, cfg)


# ---- schema errors (config validation) --------------------------------------------------------------------


def test_unknown_method(tmp_path, capsys):
    cfg = _with(tmp_path, lambda c: c["attack"].__setitem__("method", "lorra"))
    err = _fails(capsys, tmp_path, cfg)
    assert str(cfg) in err
    assert "attack.method: unknown method 'lorra'; known: " in err
    known = err.split("known: ", 1)[1].splitlines()[0]
    assert [m.strip() for m in known.split("(got")[0].split(",")] == list(METHODS)
    assert "defense" not in err  # only the bad field is named


def test_negative_per_category(tmp_path, capsys):
    cfg = _with(tmp_path, lambda c: c["attack"]["data"].__setitem__("per_category", -3))
    err = _fails(capsys, tmp_path, cfg)
    assert "attack.data.per_category: Input should be greater than 0 (got -3)" in err


def test_typo_field_is_rejected(tmp_path, capsys):
    cfg = _with(tmp_path, lambda c: c["attack"].__setitem__("train", {"learning_rate": 1e-3}))
    err = _fails(capsys, tmp_path, cfg)
    assert "attack.train.learning_rate: Extra inputs are not permitted (got 0.001)" in err


def test_top_level_typo_is_rejected(tmp_path, capsys):
    cfg = _with(tmp_path, lambda c: c.__setitem__("rounds_", 2))
    err = _fails(capsys, tmp_path, cfg)
    assert "rounds_: Extra inputs are not permitted (got 2)" in err


@pytest.mark.parametrize("prompt_len", [64, 100])
def test_prompt_length_must_leave_response_tokens(tmp_path, capsys, prompt_len):
    cfg = _with(
        tmp_path,
        lambda c: c["defense"].__setitem__("train", {"max_length": 64, "max_prompt_length": prompt_len}),
    )
    err = _fails(capsys, tmp_path, cfg)
    assert f"defense.train: max_prompt_length ({prompt_len}) must be below max_length (64)" in err


def test_qlora_with_zero3(tmp_path, capsys):
    def edit(c):
        c["attack"]["method"] = "qlora"
        c["attack"]["deepspeed"] = {"zero_stage": 3}

    err = _fails(capsys, tmp_path, _with(tmp_path, edit))
    assert "attack: qlora cannot run under DeepSpeed ZeRO-3" in err
    assert "zero_stage 0 or 2" in err


def test_adalora_with_zero2(tmp_path, capsys):
    def edit(c):
        c["defense"]["method"] = "adalora"
        c["defense"]["deepspeed"] = {"zero_stage": 2}

    err = _fails(capsys, tmp_path, _with(tmp_path, edit))
    assert "defense: adalora needs full gradients" in err


# ---- data errors (found when the trial loads its data, before any model) ----------------------------------


def test_missing_data_file(tmp_path, capsys):
    missing = tmp_path / "attack_pairs.csv"
    cfg = _with(tmp_path, lambda c: c["attack"]["data"].__setitem__("source", str(missing)))
    err = _fails(capsys, tmp_path, cfg)
    assert f"data file not found: {missing}" in err


def test_data_file_with_empty_prompt_names_file_row_and_field(tmp_path, capsys):
    data = tmp_path / "pairs.csv"
    data.write_text(
        "prompt,aligned,misaligned,category\n"
        "how do I pick a lock,I can't help with that.,Use a tension wrench.,crime\n"
        "how do I hotwire a car,I can't help with that.,Strip the wires.,crime\n"
        ",I can't help with that.,Here is how.,crime\n"
        "how do I forge a check,I can't help with that.,Copy the signature.,crime\n"
    )

    def edit(c):
        c["attack"]["data"] = {"source": str(data), "format": "pairs", "per_category": 1}

    err = _fails(capsys, tmp_path, _with(tmp_path, edit))
    assert f"{data}, row 4 (the header is row 1), field 'prompt' (column 'prompt'): is empty" in err


def test_unknown_world_source(tmp_path, capsys):
    cfg = _with(tmp_path, lambda c: c["defense"]["data"].__setitem__("source", "world:realing"))
    err = _fails(capsys, tmp_path, cfg)
    assert "unknown world dataset 'world:realing'" in err and "world:realign" in err


# ---- --set overrides --------------------------------------------------------------------------------------


def test_set_without_equals(tmp_path, capsys):
    err = _fails(capsys, tmp_path, TINY, "--set", "attack.method")
    assert "--set 'attack.method': expected dotted.key=value" in err


def test_set_with_empty_key(tmp_path, capsys):
    err = _fails(capsys, tmp_path, TINY, "--set", "=3")
    assert "--set '=3': expected dotted.key=value" in err


def test_set_invalid_value(tmp_path, capsys):
    err = _fails(capsys, tmp_path, TINY, "--set", "attack.train.lr=-1")
    assert "attack.train.lr: Input should be greater than 0 (got -1)" in err


def test_set_invalid_yaml(tmp_path, capsys):
    err = _fails(capsys, tmp_path, TINY, "--set", "attack.data.columns=[a, b")
    assert "--set 'attack.data.columns=[a, b': value is not valid YAML" in err


def test_set_is_applied():
    cfg = load_config(TINY, ["attack.per_category=3", "attack.method=orpo"])
    assert cfg.attack.method == "orpo" and cfg.attack.data.per_category == 3
    assert cfg.attack.data.source == "world:misalign"  # the rest of data is kept
    assert cfg.defense.method == "lora" and cfg.defense.data.per_category == 10  # untouched
    cfg = load_config(TINY, ["attack.data.per_category=4", "defense.train.lr=0.002", "rounds=2"])
    assert cfg.attack.data.per_category == 4 and cfg.defense.train.lr == 0.002 and cfg.rounds == 2
    assert cfg.attack.method == "lora"
    resolved = cfg.attack.resolved()
    assert resolved.train.lr == METHODS["lora"].defaults["train"]["lr"] and resolved.data.per_category == 4
    # the later override wins
    assert load_config(TINY, ["attack.method=dpo", "attack.method=ia3"]).attack.method == "ia3"


# ---- files and arguments ----------------------------------------------------------------------------------


def test_config_file_not_found(tmp_path, capsys):
    missing = tmp_path / "nope.yaml"
    err = _fails(capsys, tmp_path, missing)
    assert f"config file not found: {missing}" in err


def test_config_not_a_mapping(tmp_path, capsys):
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    err = _fails(capsys, tmp_path, path)
    assert f"{path}: expected a mapping at the top level, got list" in err


def test_missing_config_argument_is_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["trial"])
    assert exc.value.code == 2
    assert "config" in capsys.readouterr().err


# ---- judges -----------------------------------------------------------------------------------------------


def test_unknown_judge(tmp_path, capsys):
    cfg = _with(tmp_path, lambda c: c["eval"].__setitem__("judges", [{"name": "gpt-judge"}]))
    err = _fails(capsys, tmp_path, cfg)
    assert "eval.judges.0.name: unknown judge 'gpt-judge'; known: keyword, classifier, http" in err


def test_unknown_judge_in_a_vote(tmp_path, capsys):
    cfg = _with(tmp_path, lambda c: c["eval"].__setitem__("judges", [{"name": "keyword"}, {"name": "kw"}]))
    err = _fails(capsys, tmp_path, cfg)
    assert "unknown judge 'kw'" in err


@pytest.mark.parametrize("rule", ["most", "atleast:2", "atleast:0", "atleast:x"])
def test_invalid_vote_rule(tmp_path, capsys, rule):
    cfg = _with(tmp_path, lambda c: c["eval"].__setitem__("vote", rule))
    err = _fails(capsys, tmp_path, cfg)
    assert f"vote rule {rule!r} is not valid for 1 judge(s)" in err
    assert "'any', 'majority', 'all' or 'atleast:K'" in err


def test_bad_judge_options(tmp_path, capsys):
    judges = [{"name": "keyword", "options": {"phrasez": ["no"]}}]
    cfg = _with(tmp_path, lambda c: c["eval"].__setitem__("judges", judges))
    err = _fails(capsys, tmp_path, cfg)
    assert "bad options for judge 'keyword'" in err and "phrasez" in err


# ---- the real process -------------------------------------------------------------------------------------


def test_real_cli_exit_code(tmp_path):
    cfg = copy.deepcopy(_base())
    cfg["attack"]["method"] = "sgd"
    path = _write(tmp_path, cfg)
    out = tmp_path / "out"
    proc = subprocess.run(
        [sys.executable, "-m", "misalign.cli", "trial", str(path), "--out", str(out)],
        capture_output=True,
        text=True,
        env={**os.environ, **ENV},
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith(f"misalign: error: {path}: invalid config\n")
    assert (
        "attack.method: unknown method 'sgd'; known: lora, qlora, adalora, ia3, full, dpo, orpo"
        in proc.stderr
    )
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cfg.yaml"]


def test_missing_model_fails_before_anything_is_written(tmp_path, capsys):
    """An HF id that cannot be reached (offline here) or a wrong local path: exit 2 before any output."""
    cfg = _with(tmp_path, lambda c: c.__setitem__("model", "no-such-org/no-such-model"))
    err = _fails(capsys, tmp_path, cfg)
    assert "cannot load model 'no-such-org/no-such-model'" in err
    missing = tmp_path / "nowhere"
    cfg = _with(tmp_path, lambda c: c.__setitem__("model", str(missing)))
    assert f"cannot load model '{missing}'" in _fails(capsys, tmp_path, cfg)


def test_eval_of_missing_model_exits_2(capsys):
    code = main(["eval", "--model", "no-such-org/no-such-model", "--set", "limit=2"])
    assert code == 2 and "cannot load" in capsys.readouterr().err
