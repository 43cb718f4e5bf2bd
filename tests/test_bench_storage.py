"""bench/bench_storage.py runs (on the tiny study, so it stays fast) and records what docs/benchmarks.md cites."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"


@pytest.fixture
def bench_storage(monkeypatch):
    monkeypatch.syspath_prepend(str(BENCH))  # the bench scripts import their shared `common` module
    spec = importlib.util.spec_from_file_location("bench_storage", BENCH / "bench_storage.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("common", None)


def test_bench_storage_writes_its_json(world, bench_storage, tmp_path, capsys):
    out = tmp_path / "storage.json"
    bench_storage.main(["--config", "configs/study-tiny.yaml", "--out", str(out)])
    r = json.loads(out.read_text())
    assert (r["study"], r["cells"], r["unique_stages"]) == ("study-tiny", 40, 48)
    assert set(r["storage"]) == {"shared", "unshared"}
    m = r["moved"]
    assert m["cells"] == 40 and m["per_cell"] == pytest.approx((m["read"] + m["written"]) / 40)
    # with sharing each stage is written once: the cells write what the study keeps
    assert m["written"] == pytest.approx(r["storage"]["shared"]["total"])
    assert 0 < r["storage"]["shared"]["total"] < r["storage"]["unshared"]["total"]
    assert sum(r["per_model"].values()) <= r["storage"]["shared"]["total"]
    (model,) = r["models"]
    assert (model["model"], model["config_dtype"], model["stored_dtypes"]) == ("world:base", "fp32", ["fp32"])
    assert r["assumptions"] == [] and "machine" in r and "date" in r
    assert "moved (with sharing)" in capsys.readouterr().out
