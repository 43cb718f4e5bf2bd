"""How long a study takes on W trial slots, and the W that gives its shortest wall time (`misalign study plan`).

The study runs one Tune trial per cell, in grid order, at most W at once. A cell runs its stages in order (round
1's attack, its defense, round 2's attack, ...), each followed by its evaluation. A stage is trained once: the
first cell to reach it trains it, and a cell that reaches it while another trains it waits in its slot (the
lineage cache's claim); a finished stage is reused at no cost. The first cell of each model also evaluates the
base model. This simulates exactly that, event by event, from the plan's per-stage device-hours, so the
dependency order (attacks before their defenses) and the waits that sharing causes are in the wall time.

What it leaves out: trial start-up, the autoscaler's node start (minutes on a cloud), and that a stage runs at
one MFU whatever its shape (the plan's assumption).
"""

from __future__ import annotations

import heapq
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Step:
    """One thing a cell does in order: train (or reuse, or wait for) stage `key`, `seconds` of wall time, its
    evaluation included."""

    key: str
    seconds: float


@dataclass
class Width:
    slots: int            # trials at once
    wall_s: float         # the study's wall time
    held_s: float         # slot-seconds held: from each cell's start to its end, waits included
    busy_s: float         # slot-seconds training or evaluating

    def to_dict(self) -> dict[str, float]:
        return {"slots": self.slots, "wall_h": self.wall_s / 3600, "held_h": self.held_s / 3600,
                "busy_h": self.busy_s / 3600}


def simulate(cells: Sequence[Sequence[Step]], slots: int) -> Width:
    """Run `cells` (each a list of steps, in grid order) on `slots` trial slots."""
    finish: dict[str, float] = {}       # stage key -> when it is (or will be) done, once a cell claimed it
    events: list[tuple[float, int, int]] = []   # (time, cell, index of its next step)
    started: dict[int, float] = {}
    queue = list(range(len(cells)))[::-1]       # pop() gives grid order
    held = busy = wall = 0.0
    for _ in range(min(slots, len(cells))):
        c = queue.pop()
        started[c] = 0.0
        heapq.heappush(events, (0.0, c, 0))
    while events:
        t, c, i = heapq.heappop(events)
        if i == len(cells[c]):  # the cell is done: its slot takes the next cell
            held += t - started[c]
            wall = max(wall, t)
            if queue:
                nxt = queue.pop()
                started[nxt] = t
                heapq.heappush(events, (t, nxt, 0))
            continue
        step = cells[c][i]
        done = finish.get(step.key)
        if done is None:  # first to reach it: train it
            finish[step.key] = t + step.seconds
            busy += step.seconds
            heapq.heappush(events, (t + step.seconds, c, i + 1))
        else:  # reuse it, after waiting for the cell that trains it
            heapq.heappush(events, (max(t, done), c, i + 1))
    return Width(slots, wall, held, busy)


def widths(cells: Sequence[Sequence[Step]], limit: int | None = None) -> tuple[list[Width], Width]:
    """The wall time at 1, 2, 4, ... slots up to one per cell (or `limit`), and the fewest slots that reach
    the shortest wall time (within 1%)."""
    top = len(cells) if limit is None else max(1, min(limit, len(cells)))
    tried: dict[int, Width] = {}
    n = 1
    while n < top:
        tried[n] = simulate(cells, n)
        n *= 2
    tried[top] = simulate(cells, top)
    shortest = min(w.wall_s for w in tried.values())
    lo = max((s for s, w in tried.items() if w.wall_s > shortest * 1.01), default=0)
    hi = min(s for s, w in tried.items() if w.wall_s <= shortest * 1.01)
    while hi - lo > 1:  # the fewest slots within 1% of the shortest (wall time falls as slots grow)
        mid = (lo + hi) // 2
        tried[mid] = simulate(cells, mid)
        if tried[mid].wall_s <= shortest * 1.01:
            hi = mid
        else:
            lo = mid
    shown = [tried[s] for s in sorted(tried) if s & (s - 1) == 0 or s == top]  # the doubling rows
    return shown, tried[hi]
