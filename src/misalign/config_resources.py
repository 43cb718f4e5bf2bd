"""What a trial holds and what its cost estimate assumes: `ResourceSettings` and `PlanSettings`."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from misalign.config_base import Strict


class ResourceSettings(Strict):
    """What one trial holds. One worker trains in the Tune trial's own process; several launch one Ray Train
    TorchTrainer per trial (gloo on CPUs, NCCL on GPUs) that runs all of the trial's stages."""

    workers: int = Field(1, ge=1, description="training workers per trial (DeepSpeed/DDP ranks)")
    cpus_per_worker: float = Field(1, gt=0, description="CPUs each worker holds (torch threads match it)")
    gpus_per_worker: float = Field(0, ge=0, description="GPUs each worker holds (0: CPU training)")
    placement: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = Field(
        "PACK", description="how a trial's workers are placed on nodes (Ray placement group strategy)")
    max_concurrent: int | None = Field(
        None, ge=1, description="trials at once (None: as many as the cluster's CPUs/GPUs hold, or on an "
        "autoscaling cluster can grow to; required where its autoscaler's limits cannot be read)")
    start_timeout_s: float = Field(
        1800, gt=0, description="stop the run when no trial could start for this long: the cluster cannot hold "
        "one, and no node the autoscaler added so far could (time for an autoscaler to add GPU nodes included)")


class PlanSettings(Strict):
    """`misalign study plan`: how analytic FLOPs become device-hours and money."""

    device: str = Field("NVIDIA H100 SXM (bf16 dense)", description="the device the estimate is for")
    peak_flops: float = Field(989e12, gt=0, description="the device's peak FLOP/s at the training precision")
    mfu: float = Field(0.35, gt=0, le=1, description="model FLOPs utilization assumed (share of peak reached) "
                       "for evaluation and for stages no plan.calibration row speaks for")
    calibration: str | None = Field(
        None, description="MFU measured per stage shape (misalign.calibration): a shipped table's name (h200) or "
                          "a CSV from bench/calibrate.py; each stage whose shape it measured is priced at its MFU "
                          "and overhead, the others at plan.mfu (the plan says which)")
    price_per_device_hour: float | None = Field(None, ge=0, description="currency per device-hour (money line)")
    devices_per_node: int = Field(1, ge=1, description="devices (GPUs) a cluster node holds: node-hours = device-"
                                                       "hours held / this")
    tokens_per_example: int = Field(
        300, ge=1, description="assumed prompt+response tokens of a training example when its data is unreadable")
    categories: int = Field(13, ge=1, description="assumed categories when a stage's data file is unreadable")
    model_configs: dict[str, str] = Field(
        default_factory=dict, description="model -> a local config.json, for models whose hub config is unreachable")
