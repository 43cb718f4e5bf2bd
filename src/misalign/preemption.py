"""The preemption notice: a training process that gets SIGTERM saves a checkpoint at its next optimizer step and
stops, so a noticed preemption (a spot reclaim, a node drain) loses under one step instead of up to
`checkpoint_every`.

SIGTERM is how a drain or a spot notice reaches a process. Python runs signal handlers on the main thread, and
a Ray worker's main thread sets Ray's own SIGTERM handler (exit at once) after the job's
`worker_process_setup_hook` ran: the hook (`in_ray_worker`, set by misalign.cluster.init_ray) therefore wraps
the handler Ray installs rather than installing one that Ray would replace. Elsewhere, `install()` sets it.

While a stage trains (`listening()`), the handler only raises a flag; the stage's callback (`NoticeCallback`)
agrees on it across ranks at each optimizer step's end, asks the trainer to save and stop, and the stage then
raises `StagePreempted` (the stage is not finished: its next attempt resumes from that checkpoint). Outside a
stage the previous handler runs (Ray's: the worker exits), since nothing there is worth a grace period.
"""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

Handler = Callable[[int, Any], Any]

_notice = threading.Event()
_noticed_at: list[float] = []
_listeners = 0
_lock = threading.Lock()


class StagePreempted(RuntimeError):
    """A stage stopped by a preemption notice, after saving a checkpoint at `step` (its retry resumes there)."""

    def __init__(self, label: str, step: int, notice_to_saved_s: float) -> None:
        self.step, self.notice_to_saved_s = step, notice_to_saved_s
        super().__init__(f"{label}: preemption notice (SIGTERM); saved a checkpoint at step {step} "
                         f"{notice_to_saved_s:.1f}s after the notice and stopped")


def _with_notice(previous: Any) -> Handler:
    def handler(signum: int, frame: Any) -> Any:
        with _lock:
            training = _listeners > 0
        if training:
            if not _notice.is_set():
                _noticed_at.append(time.time())
            _notice.set()
            return None
        if callable(previous):
            return previous(signum, frame)
        raise SystemExit(128 + signum)  # SIG_DFL's effect, as an exception the process can unwind

    return handler


def install() -> None:
    """Put the notice in front of this process's SIGTERM handler (main thread only)."""
    signal.signal(signal.SIGTERM, _with_notice(signal.getsignal(signal.SIGTERM)))


def in_ray_worker() -> None:
    """Ray's `worker_process_setup_hook`: wrap the SIGTERM handler the worker's main loop sets next."""
    import ray._private.utils as ray_utils

    ray_set = ray_utils.set_sigterm_handler
    if getattr(ray_set, "misalign_notice", False):
        return

    def set_with_notice(handler: Handler) -> None:
        ray_set(_with_notice(handler))

    set_with_notice.misalign_notice = True  # type: ignore[attr-defined]
    ray_utils.set_sigterm_handler = set_with_notice
    if threading.current_thread() is threading.main_thread():  # a handler already set gets the notice too
        install()


@contextlib.contextmanager
def listening() -> Iterator[None]:
    """While a stage trains: SIGTERM raises the notice instead of ending the process."""
    global _listeners
    with _lock:
        _listeners += 1
    try:
        yield
    finally:
        with _lock:
            _listeners -= 1


def consume_notice() -> float:
    """Seconds from the notice to now (the stage has saved), and the notice cleared: a process that outlives
    it (a test, a worker whose node was not taken after all) trains its next stage normally."""
    at = _noticed_at.pop() if _noticed_at else time.time()
    _noticed_at.clear()
    _notice.clear()
    return time.time() - at


_saved_listeners: list[Callable[[], None]] = []


@contextlib.contextmanager
def on_saved(listener: Callable[[], None]) -> Iterator[None]:
    """Call `listener` after each in-stage checkpoint this process saves (a cell's attempt log notes it)."""
    _saved_listeners.append(listener)
    try:
        yield
    finally:
        _saved_listeners.remove(listener)


def saved() -> None:
    for listener in list(_saved_listeners):
        listener()


def notice_callback(any_rank: Callable[[bool], bool]) -> Any:
    """The trainer callback: at each optimizer step's end, if any rank got the notice (`any_rank` agrees on it
    across ranks, so every rank saves and stops at the same step), save a checkpoint and stop training."""
    from transformers import TrainerCallback

    class NoticeCallback(TrainerCallback):
        stopped_at: int | None = None

        def on_step_end(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            if any_rank(_notice.is_set()):
                control.should_save = True
                control.should_training_stop = True
                self.stopped_at = state.global_step

    return NoticeCallback()
