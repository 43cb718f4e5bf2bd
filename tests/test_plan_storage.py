"""misalign.plan_storage: the plan's bytes kept and moved, on lineages small enough to add up by hand."""

from __future__ import annotations

from misalign.plan_storage import STAGE_RECORD_BYTES, Bytes, Moved, cell_moved, kept, stage_bytes

R = STAGE_RECORD_BYTES


def test_a_stage_keeps_its_adapter_or_its_weights_and_tokenizer() -> None:
    adapter = stage_bytes(full=False, total=1000, trainable=10, dtype_bytes=2, tokenizer=50.0, evals=7.0)
    assert (adapter.adapters, adapter.weights, adapter.evals, adapter.records) == (20.0, 0.0, 7.0, R)
    assert adapter.total == 20 + 7 + R
    full = stage_bytes(full=True, total=1000, trainable=1000, dtype_bytes=4, tokenizer=50.0, evals=7.0)
    assert (full.adapters, full.weights, full.total) == (0.0, 4050.0, 4050 + 7 + R)


def test_bytes_add_by_kind() -> None:
    b = Bytes(adapters=1, evals=2)
    b.add(Bytes(weights=10, records=3), times=2)
    assert (b.adapters, b.weights, b.evals, b.records, b.total) == (1, 20, 2, 6, 29)


def test_kept_with_and_without_sharing() -> None:
    a, d = Bytes(adapters=100), Bytes(adapters=10)
    # 2 cells share attack a, each with its own defense; one model, base evaluation 5 bytes
    out = kept(stages=[a, d, d], uses=[a, d, a, d], base_eval=5, models=1, cells=2)
    assert out["shared"].total == 100 + 10 + 10 + 5
    assert out["unshared"].total == 2 * (100 + 10) + 2 * 5


def test_moved_per_cell() -> None:
    m = Moved()
    m.add(read=10, written=30)
    m.add(read=0, written=4)
    assert (m.cells, m.read, m.written, m.max_per_cell, m.per_cell) == (2, 10, 34, 40, 22)


def test_a_cell_that_trains_its_whole_lineage_reads_the_root_once() -> None:
    lineage = [Bytes(adapters=100), Bytes(adapters=10)]
    assert cell_moved(lineage, [True, True], root=1000.0, base_eval=5.0) == (1000.0, 110 + 5)


def test_a_cell_reusing_its_attack_reads_the_root_and_the_attacks_adapter() -> None:
    lineage = [Bytes(adapters=100), Bytes(adapters=10)]
    assert cell_moved(lineage, [False, True], root=1000.0, base_eval=None) == (1100.0, 10.0)


def test_a_reused_full_stage_replaces_the_root_and_the_adapters_before_it() -> None:
    lineage = [Bytes(adapters=100), Bytes(weights=800), Bytes(adapters=10), Bytes(adapters=1)]
    assert cell_moved(lineage, [False, False, False, True], root=1000.0, base_eval=None) == (810.0, 1.0)


def test_a_cell_that_trains_nothing_reads_nothing() -> None:
    lineage = [Bytes(adapters=100)]
    assert cell_moved(lineage, [False], root=1000.0, base_eval=5.0) == (0.0, 5.0)
    assert cell_moved(lineage, [False], root=1000.0, base_eval=None) == (0.0, 0.0)
