"""misalign.attempts: a cell's attempts on the study's store, how an attempt that never ended is settled
(a lost node: a preemption; a dead process on a live node: a failure), the limits, and the work lost."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from misalign.attempts import (
    CRASHED,
    DONE,
    FAILED,
    NODE_LOST,
    NOTICED,
    RUNNING,
    Attempt,
    CellAttempts,
    preemption_summary,
)
from misalign.storage import Store


def alive(node: str) -> float | None:
    return None


def test_lost_work_runs_from_the_last_keep_or_the_start() -> None:
    a = Attempt(run=1.0, node="n", started=100.0, workers=4, ended=160.0)
    a.settle_lost()
    assert a.lost_s == 60.0 and a.lost_device_s == 240.0
    a.kept_at = 150.0
    a.settle_lost()
    assert a.lost_s == 10.0 and a.lost_device_s == 40.0
    a.kept_at = 170.0  # kept after its recorded end (clocks of two nodes): never negative
    a.settle_lost()
    assert a.lost_s == 0.0
    assert Attempt(run=1.0, node="n", started=0.0).lost_device_s == 0.0  # not settled: nothing counted


def test_attempts_are_kept_on_the_store_and_read_back(tmp_path: Path) -> None:
    cell = CellAttempts(Store(tmp_path), "abc")
    assert cell.path == "attempts/abc.json" and cell.load().history == []
    first = cell.begin(run=1.0, node="n1", workers=2, node_gone=alive)
    assert first.outcome == RUNNING and first.workers == 2
    cell.kept()
    cell.end(DONE)
    again = CellAttempts(Store(tmp_path), "abc").load()
    assert again.history == cell.history and again.history[0].outcome == DONE
    assert again.history[0].kept_at is not None and again.history[0].lost_s is None  # done: nothing lost


def test_an_unfinished_attempt_on_a_lost_node_is_a_preemption(tmp_path: Path) -> None:
    cell = CellAttempts(Store(tmp_path), "abc")
    first = cell.begin(run=1.0, node="spot-1", workers=2, node_gone=alive)
    died = first.started + 30.0
    second = cell.begin(run=1.0, node="spot-2", workers=2, node_gone=lambda node: died if node == "spot-1" else None)
    assert first.outcome == NODE_LOST and first.ended == died and first.lost_s == 30.0
    assert "node was lost" in first.error and second.outcome == RUNNING
    assert cell.preemptions() == 1 and cell.failures(1.0) == 0


def test_an_unfinished_attempt_on_a_live_node_is_a_crash(tmp_path: Path) -> None:
    cell = CellAttempts(Store(tmp_path), "abc")
    first = cell.begin(run=1.0, node="n1", workers=1, node_gone=alive)
    cell.begin(run=1.0, node="n1", workers=1, node_gone=alive)
    assert first.outcome == CRASHED and "process died" in first.error
    assert first.ended is not None and first.ended <= time.time()
    assert cell.failures(1.0) == 1 and cell.preemptions() == 0


def test_failures_count_per_run_and_preemptions_have_their_own_limit(tmp_path: Path) -> None:
    cell = CellAttempts(Store(tmp_path), "abc")
    for outcome in (FAILED, FAILED, NOTICED):
        cell.begin(run=1.0, node="n", workers=1, node_gone=alive)
        cell.end(outcome, error="x" * 1000)
    assert len(cell.history[0].error) == 500  # errors are cut
    assert cell.failures(1.0) == 2 and cell.failures(2.0) == 0 and cell.preemptions() == 1
    assert cell.given_up(1.0, max_failures=1, max_preemptions=5)
    assert not cell.given_up(1.0, max_failures=2, max_preemptions=5)
    assert not cell.given_up(2.0, max_failures=1, max_preemptions=1)  # a rerun of the command retries failures
    assert cell.given_up(2.0, max_failures=1, max_preemptions=0)


def test_the_summary_counts_every_cell(tmp_path: Path) -> None:
    store = Store(tmp_path)
    lost = {"started": 0.0, "ended": 10.0, "lost_s": 10.0}
    cells = {"a": [Attempt(1.0, "n", workers=2, outcome=NOTICED, **lost), Attempt(1.0, "n", 20.0, outcome=DONE)],
             "b": [Attempt(1.0, "n", workers=3, outcome=FAILED, **lost),
                   Attempt(1.0, "n", workers=1, outcome=NODE_LOST, **lost),
                   Attempt(1.0, "n", workers=1, outcome=CRASHED, **lost), Attempt(1.0, "n", 50.0, outcome=DONE)]}
    for cell_id, history in cells.items():
        store.write_json(f"attempts/{cell_id}.json", [vars(a) for a in history])
    store.write_text("attempts/notes.txt", "not an attempt file")
    # lost device-seconds: 10 s x (2 + 3 + 1 + 1) workers
    assert preemption_summary(store) == {"preemptions": 2, "noticed": 1, "nodes_lost": 1, "failures": 2,
                                         "lost_device_s": 70.0}
    assert preemption_summary(Store(tmp_path / "empty")) == {"preemptions": 0, "noticed": 0, "nodes_lost": 0,
                                                             "failures": 0, "lost_device_s": 0.0}


@pytest.mark.parametrize("outcome", [FAILED, NOTICED])
def test_an_interrupted_end_settles_its_lost_work(tmp_path: Path, outcome: str) -> None:
    cell = CellAttempts(Store(tmp_path), "abc")
    cell.begin(run=1.0, node="n", workers=3, node_gone=alive)
    cell.end(outcome)
    a = cell.history[-1]
    assert a.outcome == outcome and a.lost_s is not None and a.lost_device_s == pytest.approx(3 * a.lost_s)
