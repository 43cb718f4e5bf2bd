"""The stage's TrainerCallbacks and the resumable checkpoints they keep (misalign.stage trains with them).

- `stage_callbacks`: a progress line per logging step, and AdaLoRA's rank reallocation after every step;
- `checkpoint_callback`: with each of transformers' checkpoints (OUT/trainer/checkpoint-N), this rank's token,
  FLOP and time counts (`counts_file`), the WHOLE marker once every rank wrote everything, the copy on the
  object store (misalign.lineage.CheckpointSync), and the note that a preemption notice was answered;
- `last_checkpoint`: the newest whole checkpoint, which a retried stage resumes from.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from misalign import preemption
from misalign.lineage import checkpoint_step
from misalign.runtime import barrier, local_rank, rank, world_size, write_json_atomic

if TYPE_CHECKING:
    from misalign.ledger import FlopCounter
    from misalign.lineage import CheckpointSync


WHOLE = "misalign-whole.json"  # in a checkpoint directory: every rank's files and counts are in it


def last_checkpoint(trainer_dir: Path) -> Path | None:
    """The newest checkpoint every rank finished writing (the WHOLE marker), or None."""
    done = [p for p in trainer_dir.glob("checkpoint-*") if (p / WHOLE).exists()]
    return max(done, key=lambda p: checkpoint_step(p.name), default=None)


def stage_callbacks(label: str, show: bool, adalora_model: Any | None) -> list[Any]:
    """Every stage's callbacks: its progress lines, and AdaLoRA's reallocation when it trains AdaLoRA."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        """One line per logging step: stage, step, loss (rank 0 only)."""

        def on_log(self, args: Any, state: Any, control: Any, logs: dict | None = None, **kw: Any) -> None:
            if show and state.is_world_process_zero and logs and "loss" in logs:
                print(f"  [{label}] step {state.global_step}/{state.max_steps} loss {logs['loss']:.4f}", flush=True)

    class AdaLoraAllocator(TrainerCallback):
        """AdaLoRA's rank reallocation must run after every optimizer step (the paper's code never called it)."""

        def on_optimizer_step(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            adalora_model.base_model.update_and_allocate(state.global_step)

    return [Progress()] + ([AdaLoraAllocator()] if adalora_model is not None else [])


def checkpoint_callback(counter: FlopCounter, sync: CheckpointSync | None, spent_s: Callable[[], float]) -> Any:
    from transformers import TrainerCallback

    class Checkpointed(TrainerCallback):
        """With each checkpoint: this rank's token and FLOP sums and the stage's seconds so far (a resumed
        stage's ledger still counts every step and its cost), and the checkpoint mirrored on the store when
        there is one (misalign.lineage.CheckpointSync)."""

        def on_save(self, args: Any, state: Any, control: Any, **kw: Any) -> None:
            checkpoint = Path(args.output_dir) / f"checkpoint-{state.global_step}"
            write_json_atomic(counts_file(checkpoint), {"sums": counter.state(), "seconds": spent_s()})
            # transformers writes trainer_state.json (and drops the older checkpoint) before this runs, and
            # under DeepSpeed before every rank wrote its RNG state: only this marker, written once every rank
            # has written everything, makes a checkpoint one to resume from
            barrier()
            if local_rank() == 0:
                write_json_atomic(checkpoint / WHOLE, {"step": state.global_step, "ranks": world_size()})
            barrier()
            if sync is not None:
                sync.save(checkpoint, node_lead=local_rank() == 0, lead=rank() == 0, barrier=barrier)
            if rank() == 0:
                preemption.saved()

    return Checkpointed()


def counts_file(checkpoint: Path) -> Path:
    """This rank's token, FLOP and time counts up to `checkpoint`, kept inside it."""
    return checkpoint / f"misalign-counts-rank{rank()}.json"
