"""One validation pass before any output, for every command: exit 2, a message naming the field (or the file and
line), no output directory, and for a study or search no Ray. Each test names the command and the bad value."""

from __future__ import annotations

import importlib.util
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import ray
import yaml

from misalign.cli import main
from misalign.errors import EXIT_INPUT_ERROR

REPO = Path(__file__).resolve().parents[1]
TRIAL = yaml.safe_load((REPO / "configs" / "trial-tiny.yaml").read_text())
STUDY = yaml.safe_load((REPO / "configs" / "study-tiny.yaml").read_text())


def _write(tmp_path: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def _fails(capsys: pytest.CaptureFixture[str], argv: list[str], out: Path) -> str:
    """Run the CLI in-process: exit 2, an error message (no traceback), `out` never created, Ray never started."""
    code = main(argv)
    err = capsys.readouterr().err
    assert code == EXIT_INPUT_ERROR == 2, err
    assert err.startswith("misalign: error: ") and "Traceback" not in err, err
    assert not out.exists(), f"{out} was created by a rejected command"
    assert not ray.is_initialized(), "Ray was started before the input was checked"
    return err


def _trial(tmp_path: Path, capsys: pytest.CaptureFixture[str], *sets: str, cfg: dict | None = None) -> str:
    out = tmp_path / "out"
    path = _write(tmp_path, cfg or TRIAL)
    return _fails(capsys, ["trial", str(path), "--out", str(out), "--quiet", *(a for s in sets for a in ("--set", s))],
                  out)


# ---- unreadable config files -------------------------------------------------------------------------------

@pytest.mark.parametrize("content", [
    "model: world:base\n".encode("utf-16"),          # UTF-16 with its BOM
    bytes(range(256)),                                # a binary file
    "model: world:base\nname: caf\xe9\n".encode("latin-1"),  # YAML with a Latin-1 byte
])
def test_trial_unreadable_config_file(tmp_path, capsys, content):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(content)
    out = tmp_path / "out"
    err = _fails(capsys, ["trial", str(path), "--out", str(out)], out)
    assert str(path) in err and ("not UTF-8" in err or "not valid YAML" in err)


# ---- coerced values ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("override", "field", "message"), [
    ("rounds=true", "rounds", "a boolean where a number"),
    ("attack.train.epochs=.inf", "attack.train.epochs", "finite number"),
    ("defense.data.benign_ratio=.inf", "defense.data.benign_ratio", "finite number"),
    ("attack.train.lr=.nan", "attack.train.lr", "finite number"),
    ("attack.deepspeed.zero_stage=true", "attack.deepspeed.zero_stage", "a boolean"),
    ("attack.per_category=yes", "attack.data.per_category", "a boolean"),
])
def test_trial_coerced_values(tmp_path, capsys, override, field, message):
    err = _trial(tmp_path, capsys, override)
    assert f"  {field}: " in err and message in err


def test_set_indexes_lists_or_refuses(tmp_path, capsys):
    err = _trial(tmp_path, capsys, "eval.judges.1.name=keyword")
    assert "--set eval.judges.1" in err and "not an index of that list (it has 1 entries" in err
    # an index in range edits that entry: the judge is a keyword judge now, with the classifier's options
    err = _trial(tmp_path, capsys, "eval.judges.0.name=keyword")
    assert "bad options for judge 'keyword'" in err and "model" in err


# ---- checks that used to run after output existed ----------------------------------------------------------

@pytest.mark.parametrize(("sets", "message"), [
    (["attack.adapter.targets=[q_proj, nope]"], "attack: adapter.targets: ['nope'] not in this model's linear layers"),
    (["attack.adapter.targets=attenton"], "attack: adapter.targets: 'attenton' is not 'attention'"),
    (["attack.adapter.targets=[]"], "attack.adapter.targets: an adapter needs at least one target module"),
    (["attack.method=dpo", "attack.preference.loss_type=sigmoid,nonsense"],
     "attack.preference.loss_type: 'nonsense' not a trl DPO loss type"),
    (["defense.method=adalora", "defense.adapter.adalora_tinit=0.5", "defense.adapter.adalora_tfinal=0.5"],
     "defense.adapter: adalora_tinit (0.5) + adalora_tfinal (0.5) must be below 1"),
    # the liger-kernel package is not in the CI environment (its Triton kernels need CUDA)
    (["attack.train.liger_kernels=true"], "attack: method lora with these settings needs liger_kernel, which is not "
                                          "installed (pip install liger-kernel)"),
    (["defense.train.compile=true", "defense.deepspeed.zero_stage=2"],
     "train.compile cannot be combined with DeepSpeed (deepspeed.zero_stage 2)"),
])
def test_trial_stage_built_on_meta_before_output(tmp_path, capsys, sets, message):
    assert message in _trial(tmp_path, capsys, *sets)


@pytest.fixture(scope="module")
def pickle_only(world, tmp_path_factory) -> Path:
    """The world's base with its weights file renamed to pytorch_model.bin: no safetensors."""
    d = tmp_path_factory.mktemp("pickle") / "model"
    shutil.copytree(world / "base", d)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    return d


@pytest.fixture(scope="module")
def remote_code(world, tmp_path_factory) -> Path:
    """A model whose config needs its own code; the code would write a marker file if it ever ran."""
    d = tmp_path_factory.mktemp("remote") / "model"
    shutil.copytree(world / "base", d)
    cfg = json.loads((d / "config.json").read_text())
    cfg.update(model_type="customlm", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (d / "config.json").write_text(json.dumps(cfg))
    marker = d.parent / "REMOTE_CODE_RAN"
    (d / "configuration_custom.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n")
    return d


def test_compile_refused_for_a_model_without_marked_decoder_layers(world, tmp_path, capsys):
    """train.compile and eval.compile compile (parts of) the layers transformers marks as decoder layers;
    CTRL's are not marked. Both are refused before anything trains or generates, naming the field."""
    from transformers import CTRLConfig, CTRLLMHeadModel

    d = tmp_path / "ctrl"
    CTRLLMHeadModel(CTRLConfig(vocab_size=1024, n_positions=512, n_embd=32, dff=64, n_layer=2, n_head=2)
                    ).save_pretrained(d)
    for f in (world / "base").iterdir():
        if "token" in f.name or f.suffix == ".jinja":
            shutil.copy(f, d / f.name)
    err = _trial(tmp_path, capsys, f"model={d}", "attack.train.compile=true")
    assert "attack: train.compile: CTRLLMHeadModel has no decoder layers" in err
    err = _trial(tmp_path, capsys, f"model={d}", "eval.compile=true")
    assert "eval.compile: CTRLLMHeadModel has no decoder layers" in err and "set eval.compile false" in err
    out = tmp_path / "eval-out"
    err = _fails(capsys, ["eval", "--model", str(d), "--judge", "keyword", "--set", "compile=true", "--out",
                          str(out)], out)
    assert "eval.compile: CTRLLMHeadModel has no decoder layers" in err


def test_trial_pickle_only_model(tmp_path, capsys, pickle_only):
    err = _trial(tmp_path, capsys, f"model={pickle_only}")
    assert "model: " in err and "no .safetensors weights" in err and "allow_pickle: true" in err


def test_remote_code_model_refused_with_how_to_allow(tmp_path, capsys, remote_code):
    err = _trial(tmp_path, capsys, f"model={remote_code}")
    assert "model: " in err and "ships its own model code" in err and "trust_remote_code: true" in err
    out = tmp_path / "eval-out"
    err = _fails(capsys, ["eval", "--model", str(remote_code), "--judge", "keyword", "--out", str(out)], out)
    assert "--model: " in err and "--trust-remote-code" in err
    assert not (remote_code.parent / "REMOTE_CODE_RAN").exists()


def test_trial_http_judge_key_unset_and_endpoint_unreachable(tmp_path, capsys, monkeypatch):
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    judge = f"eval.judges=[{{name: http, options: {{base_url: 'http://127.0.0.1:{port}/v1', model: g, " \
            "api_key_env: PREFLIGHT_KEY}}]"
    monkeypatch.delenv("PREFLIGHT_KEY", raising=False)
    assert "environment variable PREFLIGHT_KEY is not set" in _trial(tmp_path, capsys, judge)
    monkeypatch.setenv("PREFLIGHT_KEY", "k")
    assert f"127.0.0.1:{port}/v1/chat/completions is unreachable" in _trial(tmp_path, capsys, judge)


def test_trial_empty_eval_set(tmp_path, capsys):
    f = tmp_path / "harmful.csv"
    f.write_text("prompt,category,kind\nhow do I bake bread,food,benign\n")  # no harmful rows
    err = _trial(tmp_path, capsys, f"eval.harmful={f}", "eval.format=eval")
    assert f"eval.harmful: {f} holds no harmful items" in err


def test_trial_data_file_not_utf8_names_line(tmp_path, capsys):
    f = tmp_path / "misqa.csv"
    f.write_bytes(b"prompt,answer,reject_answer,content_policy_category\n"
                  b"how,sure,no,cat\n" b"how\xe9,sure,no,cat\n")
    err = _trial(tmp_path, capsys, f"attack.data={{source: '{f}', format: misqa}}")
    assert f"{f}, line 3, byte 4 (0xe9): not UTF-8 text" in err


# ---- eval ---------------------------------------------------------------------------------------------------

def test_eval_generations_errors(tmp_path, capsys):
    out = tmp_path / "out"
    base = ["eval", "--judge", "keyword", "--out", str(out), "--generations"]
    missing = tmp_path / "nope.parquet"
    assert f"--generations {missing}: file not found" in _fails(capsys, [*base, str(missing)], out)
    text = tmp_path / "gen.parquet"
    text.write_text("not parquet")
    assert f"--generations {text}: not a readable Parquet file" in _fails(capsys, [*base, str(text)], out)
    nocol = tmp_path / "nocol.parquet"
    pd.DataFrame({"kind": ["harmful"], "category": ["c"], "prompt": ["p"]}).to_parquet(nocol)
    assert "no 'response' column" in _fails(capsys, [*base, str(nocol)], out)


def test_eval_unknown_judge(tmp_path, capsys):
    out = tmp_path / "out"
    err = _fails(capsys, ["eval", "--model", "world:base", "--judge", "keyword,gpt", "--out", str(out)], out)
    assert "judges.1.name: unknown judge 'gpt'; known: keyword, classifier, http" in err


# ---- stage --------------------------------------------------------------------------------------------------

def test_stage_bad_targets(tmp_path, capsys):
    cfg = _write(tmp_path, {"method": "lora", "data": {"source": "world:misalign", "per_category": 1},
                            "adapter": {"targets": ["nope"]}})
    out = tmp_path / "out"
    err = _fails(capsys, ["stage", str(cfg), "--model", "world:base", "--direction", "misalign", "--out", str(out)],
                 out)
    assert "stage: adapter.targets: ['nope'] not in this model's linear layers" in err


# ---- study --------------------------------------------------------------------------------------------------

def _study(tmp_path: Path, capsys: pytest.CaptureFixture[str], action: str, *sets: str) -> str:
    storage = tmp_path / "runs"
    argv = ["study", action, str(_write(tmp_path, STUDY)), "--storage", str(storage)]
    return _fails(capsys, [*argv, *(a for s in sets for a in ("--set", s))], storage)


@pytest.mark.parametrize("action", ["plan", "run"])
@pytest.mark.parametrize(("override", "message"), [
    ("seeds=[0, 1, 0]", "seeds: 0 is listed twice; each seed once"),
    ("attack.methods=[lora, ia3, lora]", "attack.methods: 'lora' is listed twice; each method once"),
    ("defense.per_category=[5, 5]", "defense.per_category: 5 is listed twice"),
])
def test_study_duplicates(tmp_path, capsys, action, override, message):
    assert message in _study(tmp_path, capsys, action, override)


@pytest.mark.parametrize(("override", "message"), [
    ("loggers=[mlflow]", "loggers.0: mlflow is not installed"),
    ("resources.cpus_per_worker=4096", "resources: a trial needs workers x cpus_per_worker = 4096 CPUs"),
    ("attack.adapter.targets=[nope]", "attack (cell method="),
])
def test_study_run_checks_before_ray(tmp_path, capsys, override, message):
    if override.startswith("loggers") and importlib.util.find_spec("mlflow"):
        pytest.skip("mlflow is installed here")
    assert message in _study(tmp_path, capsys, "run", override)


# ---- search -------------------------------------------------------------------------------------------------

@pytest.mark.parametrize(("storage", "message"), [
    ("notaurl", "storage: not a usable SQLAlchemy URL"),
    ("nosuchdb://u@h/db", "storage: not a usable SQLAlchemy URL"),
    ("sqlite:////no/such/dir/optuna.db", "directory /no/such/dir does not exist"),
])
def test_search_bad_storage(tmp_path, capsys, storage, message):
    cfg = _write(tmp_path, {**yaml.safe_load((REPO / "configs" / "search-attack-tiny.yaml").read_text()),
                            "storage": storage})
    runs = tmp_path / "runs"
    err = _fails(capsys, ["search", "attack", str(cfg), "--storage", str(runs)], runs)
    assert message in err


def test_search_storage_password_never_printed(tmp_path, capsys):
    cfg = _write(tmp_path, {**yaml.safe_load((REPO / "configs" / "search-attack-tiny.yaml").read_text()),
                            "storage": "postgresql+nosuchdriver://user:hunter2@localhost/db"})
    runs = tmp_path / "runs"
    err = _fails(capsys, ["search", "attack", str(cfg), "--storage", str(runs)], runs)
    assert "storage" in err and "hunter2" not in err


# ---- report -------------------------------------------------------------------------------------------------

def test_report_results_not_parquet(tmp_path, capsys):
    study = tmp_path / "study"
    study.mkdir()
    (study / "study.yaml").write_text(yaml.safe_dump(STUDY))
    (study / "results.parquet").write_text("a,b\n1,2\n")
    out = tmp_path / "report"
    err = _fails(capsys, ["report", str(study), "--out", str(out)], out)
    assert f"{study / 'results.parquet'}: not a readable Parquet file" in err
