"""misalign.schedule: the grid's wall time on W trial slots, in dependency order with shared stages trained once,
on cases small enough to work out by hand, and on the paper's plan."""

from __future__ import annotations

import pytest

from misalign.schedule import Step, simulate, widths

# two cells share one attack (10 s with its evaluation) and each has its own defense (5 s)
SHARED = [[Step("attack", 10), Step("defense-1", 5)], [Step("attack", 10), Step("defense-2", 5)]]


def test_one_slot_runs_the_cells_one_after_the_other_and_trains_a_shared_stage_once():
    w = simulate(SHARED, 1)
    assert (w.wall_s, w.held_s, w.busy_s) == (20, 20, 20)  # attack, defense-1, then defense-2 alone


def test_a_cell_waits_in_its_slot_for_the_shared_stage_another_trains():
    w = simulate(SHARED, 2)
    # cell 2 holds its slot from 0 while cell 1 trains the attack, then runs its defense from 10 to 15
    assert (w.wall_s, w.held_s, w.busy_s) == (15, 30, 20)


def test_a_defense_never_starts_before_its_attack_however_many_slots():
    chain = [[Step(f"a{i}", 3), Step(f"d{i}", 4)] for i in range(5)]
    assert simulate(chain, 100).wall_s == 7  # every cell at once: each cell's chain, 3 + 4


def test_widths_gives_the_fewest_slots_for_the_shortest_wall_time():
    independent = [[Step(f"s{i}", 10)] for i in range(6)]
    shown, best = widths(independent)
    assert [w.slots for w in shown] == [1, 2, 4, 6] and [w.wall_s for w in shown] == [60, 30, 20, 10]
    assert best.slots == 6 and best.wall_s == 10
    shown, best = widths(SHARED)
    assert best.slots == 2 and best.wall_s == 15
    # wall time 20 at 3 to 5 slots (one cell of 6 left over at each), 10 only at 6
    assert widths(independent, limit=5)[1].slots == 3


@pytest.mark.parametrize("workers", [1, 2])
def test_the_paper_plan_names_its_width(workers):
    from misalign.config import StudyConfig, load_config
    from misalign.plan import estimate
    from misalign.plan_render import render

    study = load_config("configs/study-paper.yaml", schema=StudyConfig,
                        overrides=[f"resources.workers={workers}", "plan.devices_per_node=4"])
    plan = estimate(study)
    best = plan.best_width
    assert 1 < best["slots"] <= plan.cells
    one = plan.widths[0]
    assert one["slots"] == 1 and one["wall_h"] == pytest.approx(one["busy_h"])  # one slot: never waits
    # one slot trains every unique stage (spread over the trial's workers) and runs every evaluation (on one
    # device), back to back
    training = plan.shared["misalign"].device_hours + plan.shared["realign"].device_hours
    assert one["busy_h"] == pytest.approx(training / workers + plan.shared["eval"].device_hours, rel=1e-6)
    assert best["wall_h"] < one["wall_h"] / 10
    assert "shortest wall time" in render(plan) and "node(s) of 4 device(s)" in render(plan)
