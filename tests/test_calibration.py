"""plan.calibration: stages priced at the MFU measured for their shape (misalign.calibration), the others at
plan.mfu, and the plan saying which; the table bench/calibrate.py writes from bench JSON; bad tables refused.

The paper's models plan on the meta device (no weights, no data: its rows are assumed at 300 tokens), so every
test here runs in seconds.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from misalign.calibration import (
    COLUMNS,
    CalibrationRow,
    load_table,
    match,
    row_from_bench,
    table_text,
    write_table,
)
from misalign.config import StudyConfig
from misalign.errors import InputError
from misalign.plan import estimate
from misalign.plan_render import render

ROOT = Path(__file__).resolve().parents[1]
LLAMA_8B = 8_030_261_248
PEAK = 989e12


def _row(**kw: object) -> CalibrationRow:
    base = dict(device="NVIDIA H200", peak_flops=PEAK, method="lora", params=LLAMA_8B, batch=1, grad_accum=1,
                row_tokens=300.0, stages_per_gpu=1, compile=False, cuda_graphs=False, liger=False, packing="none",
                gradient_checkpointing=False, mfu=0.2, overhead_s=30.0, source="test")
    base.update(kw)
    return CalibrationRow(**base)  # type: ignore[arg-type]


def _paper(tmp_path: Path, rows: list[CalibrationRow] | None, **resources: float) -> StudyConfig:
    """The paper's grid cut to Llama-3.1-8B and Mistral-7B, LoRA and DPO attacks, a LoRA defense."""
    d = yaml.safe_load((ROOT / "configs" / "study-paper.yaml").read_text())
    d["models"] = d["models"][:2]
    d["attack"]["methods"] = ["lora", "dpo"]
    d["defense"]["methods"] = ["lora"]
    d["resources"].update(resources)
    if rows is not None:
        write_table(rows, tmp_path / "table.csv")
        d["plan"]["calibration"] = str(tmp_path / "table.csv")
    return StudyConfig.model_validate(d)


def test_a_measured_shape_is_priced_from_its_row_the_others_at_plan_mfu(tmp_path):
    lora = _row(mfu=0.2, overhead_s=30.0, source="lora-row")
    dpo = _row(method="dpo", grad_accum=4, mfu=0.15, overhead_s=50.0, source="dpo-row")
    study = _paper(tmp_path, [lora, dpo])
    p = estimate(study)
    flat = estimate(_paper(tmp_path, None))
    by_key = {s.key: s for s in flat.stages}
    llama, mistral = (m.model for m in p.models[:2])
    seen = set()
    for s in p.stages:
        row = {"lora": lora, "dpo": dpo}[s.method] if s.phase == "misalign" else lora
        assert s.flops == pytest.approx(by_key[s.key].flops)
        if s.phase == "realign":
            # the defense's rows (SafeRLHF, unread) are assumed at 300 tokens too: the lora row speaks for them
            assert s.measured_by is not None
        seconds = row.overhead_s + s.flops / (PEAK * row.mfu)
        assert s.measured_by is not None and row.source in s.measured_by, s.shape
        assert s.device_hours == pytest.approx(seconds / 3600, rel=1e-12)
        assert s.wall_hours == pytest.approx(s.device_hours)  # one worker holding one device
        assert s.mfu == row.mfu
        seen.add((s.model, s.method))
    assert {(llama, "lora"), (mistral, "lora"), (llama, "dpo"), (mistral, "dpo")} <= seen  # 7.2B is within 1.5x
    # the totals add the stages' own hours; evaluations stay at plan.mfu
    for phase in ("misalign", "realign"):
        assert p.shared[phase].device_hours == pytest.approx(sum(s.device_hours for s in p.stages
                                                                 if s.phase == phase))
    assert p.shared["eval"].device_hours == pytest.approx(flat.shared["eval"].device_hours)
    total = sum(p.shared[k].device_hours for k in ("misalign", "realign", "eval"))
    assert p.shared["total"].device_hours == pytest.approx(total)
    assert p.shared["total"].money == pytest.approx(total * study.plan.price_per_device_hour)
    text = render(p)
    assert f"plan.calibration {tmp_path / 'table.csv'}: {len(p.stages)} of {len(p.stages)} unique stages" in text
    assert f"{len(p.stages)} of {len(p.stages)} unique stages priced at a measured MFU" in " ".join(p.notes)


def test_a_shape_no_row_measured_is_assumed_and_named(tmp_path):
    rows = [_row(params=int(LLAMA_8B * 1.6)),      # a model too large to speak for 8B
            _row(row_tokens=300 * 2.1),            # rows too long
            _row(batch=8),                         # another batch
            _row(compile=True),                    # compiled: the plan's stages here train eager
            _row(method="dpo", grad_accum=1)]      # DPO's accumulation is 4 here
    study = _paper(tmp_path, rows)
    p = estimate(study)
    effective = PEAK * study.plan.mfu
    for s in p.stages:
        assert s.measured_by is None and s.mfu == study.plan.mfu
        assert s.device_hours == pytest.approx(s.flops / effective / 3600, rel=1e-12)
    named = next(a for a in p.assumptions if a.startswith("no calibration row"))
    assert "lora 8B, batch 1x1, 300 tok/row, 1/GPU, eager" in named
    assert "dpo 8B, batch 1x4, 300 tok/row, 1/GPU, eager" in named
    assert f"0 of {len(p.stages)} unique stages priced at a measured MFU" in render(p)


def test_the_nearest_row_of_a_shape_prices_it():
    near = _row(params=int(LLAMA_8B * 1.1), row_tokens=320.0, source="near")
    far = _row(params=int(LLAMA_8B * 1.4), row_tokens=500.0, source="far")
    shape = _row().shape
    assert match([far, near], shape) is near
    assert match([far], shape) is far  # within the ratios: still measured
    assert match([_row(params=int(LLAMA_8B * 1.51))], shape) is None
    assert match([_row(liger=True)], shape) is None and match([_row(packing="bfd")], shape) is None
    assert match([_row(gradient_checkpointing=True)], shape) is None
    # CUDA graphs are their own shape: compiled layers' rows do not speak for them, nor theirs for compiled ones
    graphs = _row(compile=True, cuda_graphs=True, source="graphs")
    assert match([_row(compile=True), graphs], graphs.shape) is graphs and match([graphs], _row(compile=True).shape) is None
    assert "CUDA graphs" in graphs.shape.text() and "compiled" in _row(compile=True).shape.text()


def test_stages_sharing_a_gpu_hold_their_share_of_it(tmp_path):
    """resources.gpus_per_worker 0.25: four stages per device. A row measured at four per device prices each
    stage's wall at its own MFU and its device-hours at a quarter of that; without one, the device as a whole
    is assumed at plan.mfu, so each stage's wall is four times its device-hours."""
    shared = _row(stages_per_gpu=4, mfu=0.1, overhead_s=40.0)
    p = estimate(_paper(tmp_path, [shared], gpus_per_worker=0.25))
    lora = [s for s in p.stages if s.method == "lora"]
    dpo = [s for s in p.stages if s.method == "dpo"]
    for s in lora:
        wall = (40.0 + s.flops / (PEAK * 0.1)) / 3600
        assert "4/GPU" in s.shape and s.wall_hours == pytest.approx(wall)
        assert s.device_hours == pytest.approx(wall / 4)
    for s in dpo:
        assert s.measured_by is None and s.wall_hours == pytest.approx(4 * s.device_hours)
    assert "0.25 device(s) a trial" in render(p)


def test_bad_tables_are_refused_naming_file_row_and_column(tmp_path):
    good = table_text([_row()])
    bad = tmp_path / "bad.csv"
    bad.write_text(good.replace(",lora,", ",lora,").replace(",0.2,", ",fast,"))
    with pytest.raises(InputError, match=r"bad.csv, row 2, column mfu: 'fast' is not a float"):
        load_table(str(bad))
    bad.write_text(good.replace(",0.2,", ",1.5,"))
    with pytest.raises(InputError, match="row 2, column mfu: 1.5 is above 1"):
        load_table(str(bad))
    bad.write_text(good.replace(",false,", ",maybe,", 1))
    with pytest.raises(InputError, match="row 2, column compile: 'maybe' is not a bool"):
        load_table(str(bad))
    bad.write_text(good.replace("overhead_s,", ""))
    with pytest.raises(InputError, match="missing columns overhead_s"):
        load_table(str(bad))
    bad.write_text(",".join(COLUMNS) + "\n")
    with pytest.raises(InputError, match="has no rows"):
        load_table(str(bad))
    with pytest.raises(InputError, match=r"plan.calibration: '/nope.csv' is neither a shipped table \(h200\)"):
        load_table("/nope.csv")


def test_the_cli_refuses_a_missing_table_before_any_work(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-m", "misalign.cli", "study", "plan", "configs/study-paper.yaml",
                           "--set", f"plan.calibration={tmp_path / 'none.csv'}"], cwd=ROOT, env=env,
                          capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    assert "plan.calibration" in done.stderr and "none.csv" in done.stderr


def test_the_shipped_h200_table_is_what_the_bench_wrote_from_its_measurements(tmp_path):
    """src/misalign/calibration/h200.csv is bench/calibrate.py's output over bench/measured/h200-*: every row
    traceable to a measured JSON, none typed by hand."""
    out = tmp_path / "h200.csv"
    measured = sorted((ROOT / "bench" / "measured").glob("h200-2026-11-30/train-*.json")) + sorted(
        (ROOT / "bench" / "measured").glob("h200-2026-11-30-compile/train-*.json"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "calibrate.py"), *map(str, measured),
                           "--out", str(out)], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "16 measured rows" in done.stdout  # 22 records; a shape measured again: the later file's
    assert out.read_text() == (ROOT / "src" / "misalign" / "calibration" / "h200.csv").read_text()
    rows = load_table("h200")
    assert {r.method for r in rows} == {"full", "lora", "dpo", "orpo"}
    assert all(r.source.startswith("bench/measured/h200-2026-11-30") for r in rows)
    eager_8b = next(r for r in rows if r.params == LLAMA_8B and not r.compile and not r.liger)
    assert eager_8b.mfu == pytest.approx(0.3285, abs=5e-4)  # docs/benchmarks.md: 8B LoRA batch 8, 32.9%
    assert eager_8b.row_tokens == 512


def test_a_bench_record_becomes_a_row_with_its_measured_row_length():
    record = {"method": "dpo", "batch_size": 1, "grad_accum": 4, "steps": 10, "steady_step_s": 0.5,
              "stage_wall_s": 25.0, "tokens": 10 * 4 * 2 * 700, "total_params": LLAMA_8B, "steady_mfu": 0.12,
              "compile": True, "liger": False, "packing": "none", "stages_per_gpu": 2}
    row = row_from_bench(record, {"peak_flops": str(PEAK), "gradient_checkpointing": "False"}, "NVIDIA H100", "x")
    assert isinstance(row, CalibrationRow)
    assert row.row_tokens == 700 and row.overhead_s == pytest.approx(20.0) and row.stages_per_gpu == 2
    assert row.grad_accum == 4 and row.compile and not row.cuda_graphs and not row.gradient_checkpointing
    graphs = row_from_bench({**record, "compile": "graphs"}, {"peak_flops": PEAK}, "d", "x")
    assert isinstance(graphs, CalibrationRow) and graphs.compile and graphs.cuda_graphs
    assert isinstance(row_from_bench({**record, "adapter_upcast": False}, {"peak_flops": PEAK}, "d", "x"), str)
    failed = {**record, "steady_mfu": None, "steps": None, "error": "CUDA out of memory"}  # a failed process's
    assert row_from_bench(failed, {"peak_flops": PEAK}, "d", "x") == "failed: CUDA out of memory"


def test_calibrate_refuses_a_file_that_is_not_a_bench_result(tmp_path):
    (tmp_path / "x.json").write_text(json.dumps({"training": []}))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "calibrate.py"), str(tmp_path / "x.json"),
                           "--out", str(tmp_path / "t.csv")], env=env, capture_output=True, text=True)
    assert done.returncode == 2 and "x.json: not a bench_gpu.py or bench_shared_gpu.py result" in done.stderr
    assert not (tmp_path / "t.csv").exists()


def test_bench_plan_prices_sampled_stages_from_a_calibration_it_measured(world, tmp_path):
    """bench/bench_plan.py on the world (its CPU smoke test; the error it prints is not a target on 2 shared
    cores): each sampled stage is priced from the table it calibrated, and the plan's steps and FLOPs for the
    stage are the ledger's."""
    out = tmp_path / "bench_plan.json"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT / "bench")])}
    done = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_plan.py"), "--max-stages", "2",
                           "--calibrate-steps", "6", "--work", str(tmp_path / "work"), "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    assert len(result["stages"]) == 2 and "2 of 2 stages priced from the calibration" in done.stdout
    table = result["calibration"].splitlines()
    assert table[0] == ",".join(COLUMNS) and len(table) >= 2 and all(r.startswith("lora,") for r in table[1:])
    for s in result["stages"]:
        assert s["measured_by"] and "bench_plan.py calibration" in s["measured_by"]
        assert s["optimizer_steps"] == s["plan_steps"]
        assert s["plan_flops"] == pytest.approx(s["flops"], rel=0.02)  # padding is not billed by either
        assert s["plan_s"] > 0 and s["measured_s"] > 0
        assert s["error"] == pytest.approx(s["plan_s"] / s["measured_s"] - 1)

    # --calibration checks a given table: the same sample, priced the same, with no calibration stage run
    again = subprocess.run([sys.executable, str(ROOT / "bench" / "bench_plan.py"), "--max-stages", "1",
                            "--calibration", str(tmp_path / "work" / "calibration.csv"), "--work",
                            str(tmp_path / "again"), "--out", str(tmp_path / "again.json")],
                           cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    first, second = result["stages"][0], json.loads((tmp_path / "again.json").read_text())["stages"]
    assert [s["key"] for s in second] == [first["key"]] and second[0]["plan_s"] == pytest.approx(first["plan_s"])
    assert not (tmp_path / "again" / "calibration.csv").exists()
