"""The declared results row (misalign.results): built like the trial's row, validated when built and written,
documented, and the column every reader (budget, search, report, CLI) takes from it."""

from __future__ import annotations

import re
import typing
from pathlib import Path

import pandas as pd
import pytest

from misalign import results as r
from misalign.budget import BUDGETS, BudgetKind, stage_budget
from misalign.config import SearchConfig, StageConfig
from misalign.errors import InputError
from misalign.ledger import Ledger
from misalign.search import outcome
from misalign.storage import Store

ROOT = Path(__file__).resolve().parents[1]
STAGE = StageConfig(method="lora", data={"source": "world:misalign", "per_category": 3})
LEDGER = Ledger(method="lora", direction="misalign", examples=39, epochs=5.0, optimizer_steps=25, tokens=4000,
                flops=2e12, wall_s=10.0, device_s=20.0, workers=2, peak_memory_bytes=0)
METRICS = {"unsafety": 0.6, "unsafety_se": 0.02, "refusal": 0.3, "neither": 0.1, "over_refusal": 0.0,
           "utility": 0.8, "unparsed": 0.01, "eval_s": 3.0, "per_category": {"b": 0.5, "a": 0.7}}
BASE_METRICS = {**METRICS, "unsafety": 0.0, "refusal": 0.9, "utility": 0.9}


def test_build_row_takes_the_ledger_and_the_evaluation():
    """The trial loop writes exactly these rows (it calls build_row): each column from its source."""
    built = r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS)
    assert (built[r.ROUND], built[r.PHASE], built[r.METHOD], built[r.PER_CATEGORY]) == (1, "misalign", "lora", 3)
    assert (built[r.TOKENS], built[r.FLOPS], built[r.DEVICE_S], built[r.EPOCHS]) == (4000, 2e12, 20.0, 5.0)
    assert (built[r.UNSAFETY], built[r.UTILITY], built["unsafety/a"], built["unsafety/b"]) == (0.6, 0.8, 0.7, 0.5)
    base = r.build_row(0, "base", None, 0, None, BASE_METRICS)
    assert (base[r.METHOD], base[r.TOKENS], base[r.FLOPS], base[r.REUSED]) == (None, 0, 0.0, False)
    for row in (built, base):
        assert row[r.UNPARSED] == 0.01 and row[r.MFU] is None  # no peak given: mfu not measured
    assert list(r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS))[:len(r.COLUMNS)] == list(r.COLUMNS)


def test_mfu_is_flops_over_device_seconds_times_peak():
    row = r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS, peak_flops=1e12)
    assert row[r.MFU] == pytest.approx(2e12 / (20.0 * 1e12))
    reused = Ledger(**{**LEDGER.to_dict(), "reused": True})
    assert r.build_row(1, "misalign", STAGE, 39, reused, METRICS, peak_flops=1e12)[r.MFU] is None


@pytest.mark.parametrize(("change", "column"), [
    ({r.UNSAFETY: 1.5}, "unsafety"), ({r.PHASE: "attack"}, "phase"), ({r.TOKENS: -1}, "tokens"),
    ({"unsafety/a": 2.0}, "unsafety/a"), ({r.FLOPS: "many"}, "flops")])
def test_a_row_that_does_not_fit_is_refused_before_it_is_written(change, column, tmp_path):
    good = r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS)
    with pytest.raises(InputError, match=re.escape(column)):
        r.write_rows(Store(tmp_path), "rows.parquet", [good, good | change])
    assert not (tmp_path / "rows.parquet").exists()


def test_a_row_missing_a_declared_column_is_refused(tmp_path):
    good = r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS)
    with pytest.raises(InputError, match="unparsed"):
        r.validate_rows([{k: v for k, v in good.items() if k != r.UNPARSED}])


def test_rows_read_back_from_parquet_validate(tmp_path):
    rows = [r.build_row(0, "base", None, 0, None, BASE_METRICS), r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS)]
    frame = r.write_rows(Store(tmp_path), "rows.parquet", rows)
    back = pd.read_parquet(tmp_path / "rows.parquet")
    r.validate_rows(back.to_dict("records"))  # numpy scalars and NaN for None pass as their Python values
    assert list(back.columns) == list(frame.columns)


def test_every_column_is_documented_with_a_unit_and_in_the_readme():
    table = r.schema()
    assert list(table.column) == list(r.COLUMNS)
    assert table.unit.notna().all() and (table.meaning.str.len() > 10).all()
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"`stages.parquet` columns.*?`(round, phase.*?)`", readme, re.S)
    assert listed, "README's results format lists the columns"
    names = [c.split(" ")[0] for c in " ".join(listed[1].split()).split(", ")]
    assert names == list(r.COLUMNS)


def test_readers_take_their_columns_from_the_declaration():
    """budget, search and the cost summary on rows built by build_row: a renamed column fails here."""
    rows = pd.DataFrame([r.build_row(0, "base", None, 0, None, BASE_METRICS),
                         r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS)])
    assert set(BUDGETS) == set(typing.get_args(BudgetKind))
    for kind in BUDGETS:
        assert kind in r.COLUMNS or kind == "examples_x_epochs"
        assert stage_budget(rows, kind).iloc[1] > 0
    assert stage_budget(rows, "examples_x_epochs").iloc[1] == 39 * 5.0
    cfg = SearchConfig.model_validate({"name": "s", "kind": "attack", "tau": 0.5, "attack": {
        "methods": ["lora"], "per_category": [3], "data": {"source": "world:misalign"}}})
    got = outcome(cfg, rows)
    assert got["feasible"] and got["budget"] == 2e12 and got["utility_drop"] == pytest.approx(0.1)
    assert got["trained"] and got["device_s"] == 20.0
    cost = r.cost_summary(rows)
    assert cost["stages_trained"] == 1 and cost["flops_trained"] == 2e12 and cost["device_s_trained"] == 20.0


def test_results_store_assembles_and_validates_cells(tmp_path):
    for cell in ("b", "a"):
        rows = [r.build_row(1, "realign", STAGE, 39, LEDGER, METRICS), r.build_row(0, "base", None, 0, None, BASE_METRICS),
                r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS)]
        r.write_rows(Store(tmp_path), f"cells/{cell}.parquet", [row | {r.CELL_ID: cell} for row in rows])
    frame = r.assemble_results(Store(tmp_path))
    assert list(zip(frame[r.CELL_ID], frame[r.PHASE], strict=True)) == [
        ("a", "base"), ("a", "misalign"), ("a", "realign"), ("b", "base"), ("b", "misalign"), ("b", "realign")]
    assert pd.read_parquet(tmp_path / "results.parquet").equals(frame)


def test_a_stage_trained_by_a_lost_attempt_is_still_a_stage_trained():
    """Rows carry the stage's key: a stage counts as trained once whichever row trained it, even when every row
    found it done (the attempt that trained it was preempted before writing its rows), and the rest are saved."""
    import dataclasses

    reused = dataclasses.replace(LEDGER, reused=True)
    rows = pd.DataFrame([r.build_row(0, "base", None, 0, None, BASE_METRICS),
                         r.build_row(1, "misalign", STAGE, 39, reused, METRICS, stage_key="a"),
                         r.build_row(1, "misalign", STAGE, 39, reused, METRICS, stage_key="a"),
                         r.build_row(1, "realign", STAGE, 39, LEDGER, METRICS, stage_key="b")])
    cost = r.cost_summary(rows)
    assert cost["stages_trained"] == 2 and cost["stages_reused"] == 1
    assert cost["flops_trained"] == 2 * LEDGER.flops and cost["flops_saved"] == LEDGER.flops
    legacy = rows.drop(columns=[r.STAGE_KEY])  # results written before the column: the reused flags decide
    assert r.cost_summary(legacy)["stages_trained"] == 1


def test_eval_metrics_read_and_write_eval_json_as_before():
    """eval.json keeps `per_category` for unsafety by category (cached evaluations read back), and a row built
    from the typed metrics equals one built from the file's dict."""
    from misalign.results import EvalMetrics

    m = EvalMetrics.from_json({**METRICS, "n_harmful": 10, "unknown_key": 1})
    assert m.unsafety_by_category == {"b": 0.5, "a": 0.7} and m.n_harmful == 10 and m.over_refusal == 0.0
    on_disk = m.to_json()
    assert on_disk["per_category"] == {"b": 0.5, "a": 0.7} and "unsafety_by_category" not in on_disk
    assert "unknown_key" not in on_disk and "lm_eval" not in on_disk  # unmeasured fields are left out
    assert EvalMetrics.from_json(on_disk) == m
    assert r.build_row(1, "misalign", STAGE, 39, LEDGER, m) == r.build_row(1, "misalign", STAGE, 39, LEDGER, METRICS)
    assert r.build_row(0, "base", None, 0, None, EvalMetrics())[r.EVAL_S] == 0.0
