"""A cell's attempts, kept on the study's store (attempts/CELL.json): who ran it, where, how it ended, and what
an interruption cost. They tell preemptions from failures, which Tune cannot: a spot reclaim kills the node
without a word, and Ray marks a lost actor "preempted" only when its own autoscaler drained the node for that.

- An attempt that ends by a preemption notice (misalign.preemption) says so itself.
- An attempt that never ended is settled by the next one: its node is gone (a reclaimed spot instance, a lost
  node: a preemption), or its node is still there and only the process died (a failure: out of memory, a crash).
- Preemptions do not use up `max_failures` (spot capacity is the cluster's business, not the cell's); they have
  their own limit, `max_preemptions`. Failures count within one run of the study command: rerunning it retries
  the cells that failed.
- Each attempt records when its work was last kept (an in-stage checkpoint on the store, or a finished stage
  and its evaluation); an interrupted attempt lost the wall time from then to its end, on every worker. A lost
  node's end is when Ray declared it dead, so that figure is an upper bound: it includes the health checks'
  delay in noticing (15 s by Ray's defaults).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field

from misalign.storage import Store

ATTEMPTS = "attempts"
# how attempts end; a preemption is either kind of lost node
DONE, FAILED, CRASHED, NOTICED, NODE_LOST, RUNNING = "done", "failed", "crashed", "preempted", "node lost", "running"
PREEMPTIONS = (NOTICED, NODE_LOST)
FAILURES = (FAILED, CRASHED)


@dataclass
class Attempt:
    run: float                   # when the study command that started it began (failures count per run)
    node: str
    started: float
    workers: int = 1
    kept_at: float | None = None  # when its work was last saved for a retry (a checkpoint, a finished stage)
    ended: float | None = None
    outcome: str = RUNNING
    error: str = ""
    lost_s: float | None = None  # wall seconds of work it lost (from kept_at, or its start, to its end)

    def settle_lost(self) -> None:
        """The work it lost: from when it was last kept (or its start) to its end."""
        assert self.ended is not None
        self.lost_s = round(max(0.0, self.ended - (self.kept_at or self.started)), 3)

    @property
    def lost_device_s(self) -> float:
        return (self.lost_s or 0.0) * self.workers


@dataclass
class CellAttempts:
    """The attempts of one cell on `store` (the study directory)."""

    store: Store
    cell_id: str
    history: list[Attempt] = field(default_factory=list)

    @property
    def path(self) -> str:
        return f"{ATTEMPTS}/{self.cell_id}.json"

    def load(self) -> CellAttempts:
        if self.store.exists(self.path):
            self.history = [Attempt(**a) for a in self.store.read_json(self.path)]
        return self

    def _save(self) -> None:
        self.store.write_json(self.path, [asdict(a) for a in self.history])

    def failures(self, run: float) -> int:
        return sum(a.outcome in FAILURES and a.run == run for a in self.history)

    def preemptions(self) -> int:
        return sum(a.outcome in PREEMPTIONS for a in self.history)

    def given_up(self, run: float, max_failures: int, max_preemptions: int) -> bool:
        """Past either limit: no more attempts in this run of the command."""
        return self.failures(run) > max_failures or self.preemptions() > max_preemptions

    def begin(self, run: float, node: str, workers: int, node_gone: Callable[[str], float | None]) -> Attempt:
        """Settle an attempt that never ended (`node_gone(node)`: when that node died, None if it lives), then
        start this one."""
        now = time.time()
        for a in self.history:
            if a.outcome == RUNNING:
                gone = node_gone(a.node)
                a.outcome = NODE_LOST if gone is not None else CRASHED
                a.ended = gone if gone is not None else now  # a crash's end is not known: bounded by now
                a.settle_lost()
                a.error = a.error or ("its node was lost (spot reclaim, drain or crash of the node)"
                                      if gone is not None else "its process died on a node that still lives")
        attempt = Attempt(run=run, node=node, started=now, workers=workers)
        self.history.append(attempt)
        self._save()
        return attempt

    def kept(self) -> None:
        """The current attempt's work so far is saved: a retry starts from here."""
        self.history[-1].kept_at = time.time()
        self._save()

    def end(self, outcome: str, error: str = "") -> None:
        a = self.history[-1]
        a.ended, a.outcome, a.error = time.time(), outcome, error[:500]
        if outcome != DONE:
            a.settle_lost()
        self._save()


def preemption_summary(store: Store) -> dict[str, float]:
    """Over every cell of a study: preemptions (noticed, node lost), failures, and the device-seconds that
    interrupted attempts lost."""
    out = {"preemptions": 0, "noticed": 0, "nodes_lost": 0, "failures": 0, "lost_device_s": 0.0}
    for name in store.list(ATTEMPTS, suffix=".json"):
        for a in CellAttempts(store, name[:-5]).load().history:
            out["noticed"] += a.outcome == NOTICED
            out["nodes_lost"] += a.outcome == NODE_LOST
            out["failures"] += a.outcome in FAILURES
            if a.outcome != DONE:
                out["lost_device_s"] += a.lost_device_s
    out["preemptions"] = out["noticed"] + out["nodes_lost"]
    out["lost_device_s"] = round(out["lost_device_s"], 1)
    return out
