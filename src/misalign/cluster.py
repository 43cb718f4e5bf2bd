"""The Ray side of a study or search: start or join Ray, check the storage from every node, build DeepSpeed's
ops once per node, size the trials to the cluster, and the per-process settings a trial or worker needs."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import threading
import uuid
from typing import Any

from misalign.config import ResourceSettings, StudyConfig
from misalign.errors import InputError
from misalign.storage import Store

# read by Ray Train's controller when Ray starts: measured here, they cut a fit's teardown from 3-5 s to ~1 s;
# trials stay in the working directory, so relative data paths in a config mean what they say; and Tune's older
# reporter, which honours verbose=0 (the newer one prints its experiment table and a TensorBoard hint whatever
# verbose says): the [study] and [search] lines are the progress a user reads
_RAY_ENV = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.2", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0",
            "RAY_CHDIR_TO_TRIAL_DIR": "0", "RAY_AIR_NEW_OUTPUT": "0"}
# the environment every trial and worker needs, wherever Ray places it (never credentials: nodes bring their
# own, from an instance role or their environment)
_PROPAGATED_ENV = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "DS_ACCELERATOR", "TORCH_EXTENSIONS_DIR",
                   "TOKENIZERS_PARALLELISM", "TRL_EXPERIMENTAL_SILENCE", "MISALIGN_CACHE", "HF_HOME",
                   "AWS_ENDPOINT_URL", "AWS_DEFAULT_REGION", "AWS_REGION", "MISALIGN_CLAIM_TTL_S")


def init_ray(address: str | None, dashboard: bool = True) -> None:
    """Join the cluster at `address`, or start a local Ray sized to this machine (the CPUs this process holds)."""
    import ray

    from misalign.runtime import cpus_held

    for k, v in _RAY_ENV.items():
        os.environ.setdefault(k, v)
    env = {k: os.environ[k] for k in (*_PROPAGATED_ENV, *_RAY_ENV) if k in os.environ}
    if ray.is_initialized():
        return
    # inside a Ray job, ray.init refuses env vars the job's runtime env already sets: keep the job's
    job_env = json.loads(os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR", "{}")).get("runtime_env", {}).get("env_vars", {})
    env = {k: v for k, v in env.items() if k not in job_env}
    address = address or os.environ.get("RAY_ADDRESS")  # set inside a Ray job: join that cluster
    # every worker takes a SIGTERM mid-stage as a preemption notice: save at the next step (misalign.preemption)
    runtime_env = {"env_vars": env, "worker_process_setup_hook": "misalign.preemption.in_ray_worker"}
    if address:
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=True, logging_level=logging.WARNING)
    else:
        # Ray turns token authentication on for a new local cluster and says so at WARNING on every start; it is
        # what we want, not a problem (setting RAY_AUTH_MODE ourselves instead leaves ray.init's cached config
        # without the token it then generates)
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        # the dashboard (bound to 127.0.0.1) serves the state API Ray Train's controller polls; trials without
        # Train workers do not need it, and it costs about 2 s of start-up. "local": a new Ray of our own, never
        # one a `ray start` left running on this machine
        ray.init(address="local", num_cpus=cpus_held(), include_dashboard=dashboard, runtime_env=runtime_env,
                 logging_level=logging.WARNING)  # Ray's and Tune's INFO lines (started, wrote state) are not ours
    _sigterm_stops_like_ctrl_c()


def _sigterm_stops_like_ctrl_c() -> None:
    """A SIGTERM (a scheduler ending the job, `kill`, a preempted head node) stops a study or search as Ctrl-C
    does: Tune ends the running trials and saves its state, and the command says what is unfinished (a rerun
    resumes). ray.init leaves Ray's own handler in place, which aborts the driver with a stack dump (exit 134)."""
    def stop(signum: int, frame: Any) -> None:
        on_interrupt = signal.getsignal(signal.SIGINT)
        if callable(on_interrupt):  # Tune's during its run (a graceful stop), else Python's (KeyboardInterrupt)
            on_interrupt(signal.SIGINT, frame)
        else:  # SIGINT ignored, as in a script's background job
            raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, stop)


def check_storage(store: Store, storage_given: bool) -> int:
    """On a multi-node cluster every node must reach the study's storage (the same mounted directory, or the
    bucket): checked with a task on each node that reads a marker the driver wrote. Returns the node count."""
    import ray

    nodes = alive_nodes()
    if len(nodes) <= 1:
        return len(nodes)
    if not storage_given:
        raise InputError(f"this Ray cluster has {len(nodes)} nodes: pass --storage, an object-store URL "
                         "(s3://bucket/prefix, gs://...) or a directory every node mounts (NFS, EFS, Lustre)")
    marker = f".visible-{uuid.uuid4().hex}"
    store.write_text(marker, "misalign")

    @ray.remote(num_cpus=0)
    def sees(url: str, rel: str) -> bool:
        try:
            return Store(url).exists(rel)
        except Exception:  # noqa: BLE001 (no route, no credentials: this node cannot use the storage)
            return False

    try:
        seen = on_every_node(sees, nodes, store.url, marker)
    finally:
        store.delete(marker)
    blind = [n["NodeManagerAddress"] for n, ok in zip(nodes, seen, strict=True) if not ok]
    if blind:
        raise InputError(f"--storage {store.url} is not reachable from node(s) {', '.join(blind)}: mount the same "
                         "filesystem at the same path on every node, or give every node access to the bucket")
    return len(nodes)


def needs_deepspeed_ops(cfg: StudyConfig) -> tuple[bool, bool]:
    zero = [s for side in cfg.stage_configs() for s in side.values() if s.deepspeed.zero_stage is not None]
    return bool(zero), any(s.deepspeed.offload for s in zero)


def prebuild_deepspeed_ops(offload: bool) -> list[str]:
    """Compile DeepSpeed's ops once on every node before trials start (else the first trial pays 30-40 s each)."""
    import ray

    @ray.remote(num_cpus=0)
    def build(with_adam: bool) -> str:
        from deepspeed.accelerator import get_accelerator

        acc = get_accelerator()
        built = []
        if acc.device_name() == "cpu":
            acc.create_op_builder("ShareMemCommBuilder").load()
            built.append("shm_comm")
        if with_adam:
            acc.create_op_builder("CPUAdamBuilder").load()
            built.append("cpu_adam")
        return ",".join(built) or "none"

    return on_every_node(build, alive_nodes(), offload)


def alive_nodes() -> list[dict[str, Any]]:
    import ray

    return [n for n in ray.nodes() if n["Alive"]]


def on_every_node(task: Any, nodes: list[dict[str, Any]], *args: Any) -> list[Any]:
    """Run a remote function once on each node (pinned there), results in the nodes' order."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    return ray.get([task.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                    .remote(*args) for n in nodes])


def max_concurrent(cfg: StudyConfig) -> int:
    """Trials at once: Tune must not start trials whose Train workers cannot be placed. On an autoscaling
    cluster, what it can grow to (a cluster that starts with no workers would otherwise run one trial at a time)."""
    r = cfg.resources
    if r.max_concurrent:
        return r.max_concurrent
    largest = autoscaler_limits()
    if largest is None:
        return max(1, trials_fit([(n["Resources"], 1) for n in alive_nodes()], r.workers, r.cpus_per_worker,
                                 r.gpus_per_worker))
    fits = trials_fit(largest, r.workers, r.cpus_per_worker, r.gpus_per_worker)
    if fits < 1:  # a type with no declared resources (the launcher fills them in), or none that fits a trial
        raise InputError(f"no node type this cluster's autoscaler may launch declares the resources a trial asks "
                         f"for ({trial_asks(r)}): set resources.max_concurrent to the trials the study may run at once")
    return fits


def trial_asks(r: ResourceSettings) -> str:
    """What one trial asks the cluster for, in words."""
    return (f"{r.workers} worker(s) x {r.cpus_per_worker:g} CPU"
            + (f" + {r.gpus_per_worker:g} GPU" if r.gpus_per_worker else ""))


def trials_fit(nodes: list[tuple[dict[str, float], int]], workers: int, cpus: float, gpus: float) -> int:
    """Trials of `workers` x (cpus, gpus) that nodes (resources, count) hold, a worker never split across two."""
    per_node = [(int(res.get("CPU", 0) // cpus) if not gpus else
                 min(int(res.get("CPU", 0) // cpus), int(res.get("GPU", 0) // gpus)), count) for res, count in nodes]
    return sum(fit * count for fit, count in per_node) // workers


def autoscaler_limits() -> list[tuple[dict[str, float], int]] | None:
    """The node types an autoscaler may launch, as (resources, most nodes), head included; None where no
    autoscaler manages the cluster (a local Ray, `ray start` by hand). InputError where one does but its limits
    cannot be read: then resources.max_concurrent must say how wide the study may go."""
    from ray._private.state import state

    config = state.get_cluster_config()  # autoscaler v2 (KubeRay's default) publishes its config in the GCS
    if config is not None and config.node_group_configs:
        return node_groups(config)
    report = _autoscaler_report()
    if report is None:
        return None
    # v1 publishes no limits, only its status: read them from its config file when the driver runs where the
    # autoscaler does (cluster.yaml's and the RayJob's driver run on the head)
    launcher = monitor_config(report.get("monitor_pid"))
    if launcher is None:
        raise InputError(_UNREADABLE)
    return launcher_limits(launcher)


def node_groups(config: Any) -> list[tuple[dict[str, float], int]]:
    """An autoscaler v2 ClusterConfig's node groups as (resources, most nodes)."""
    groups = [(dict(g.resources), g.max_count) for g in config.node_group_configs]
    if any(count < 0 for _, count in groups):
        raise InputError(_UNBOUNDED)
    return groups


_UNREADABLE = ("this Ray cluster is autoscaled, and its autoscaler's limits cannot be read from here (Ray's "
               "autoscaler v1 publishes none, and this driver is not on the head node): set resources.max_concurrent "
               "to the trials the cluster holds at its largest (e.g. cluster.yaml: 8 GPU workers x 4 GPUs / "
               "gpus_per_worker), or the study runs as many trials as the nodes it has now hold")
_UNBOUNDED = ("this Ray cluster's autoscaler has a node group without a maximum: set resources.max_concurrent to "
              "the trials the study may run at once")


def _autoscaler_report() -> dict[str, Any] | None:
    """The autoscaler's last status, when a real one (not Ray's read-only stand-in, which every head runs and
    which names each node type node_<node id>) manages the cluster."""
    import ray
    from ray._private.ray_constants import DEBUG_AUTOSCALING_STATUS
    from ray.experimental.internal_kv import _internal_kv_get

    raw = _internal_kv_get(DEBUG_AUTOSCALING_STATUS)
    if not raw:
        return None
    status = json.loads(raw)
    report = status.get("autoscaler_report") or {}
    types = {*(report.get("node_type_mapping") or {}).values(), *(report.get("pending_launches") or {})}
    readonly = {f"node_{n['NodeID']}" for n in ray.nodes()}
    return status if types - readonly else None


def monitor_config(pid: int | None) -> dict[str, Any] | None:
    """The cluster config the autoscaler process `pid` was started with, if it runs on this machine."""
    import psutil
    import yaml

    try:
        args = psutil.Process(pid).cmdline() if pid else []
    except (psutil.Error, ValueError):
        return None
    paths = [a.split("=", 1)[1] for a in args if a.startswith("--autoscaling-config=")]
    if not paths or not any("monitor" in a for a in args):
        return None
    try:
        with open(os.path.expanduser(paths[0])) as f:
            return yaml.safe_load(f)
    except OSError:
        return None


def launcher_limits(config: dict[str, Any]) -> list[tuple[dict[str, float], int]]:
    """A cluster launcher config's node types as (resources, most nodes): each type's max_workers (the head
    type once), all worker types together at most the cluster's max_workers, the types that hold the most
    first (what an autoscaler asked for that much would launch)."""
    types = config.get("available_node_types", {})
    head = config.get("head_node_type")
    cap = config.get("max_workers", sum(t.get("max_workers", 0) for n, t in types.items() if n != head))
    out = [(types[head].get("resources", {}), 1)] if head in types else []
    workers = sorted(((t.get("resources", {}), t.get("max_workers", 0)) for n, t in types.items() if n != head),
                     key=lambda rc: (rc[0].get("GPU", 0), rc[0].get("CPU", 0)), reverse=True)
    for res, count in workers:
        out.append((res, min(count, cap)))
        cap -= out[-1][1]
    return out


def hold_assigned_resources(default_cpus: float) -> None:
    """Torch threads = the CPUs Ray granted this process (Ray sets no affinity mask to read them from); a
    fraction of a GPU is recorded (MISALIGN_GPU_SHARE) so generation sizes its batches to that share of the
    device's memory, not to what is free at the moment (another trial may hold the rest)."""
    import ray

    assigned = ray.get_runtime_context().get_assigned_resources()
    os.environ["MISALIGN_CPUS"] = str(max(1, int(assigned.get("CPU", default_cpus))))
    os.environ["MISALIGN_NODE"] = ray.get_runtime_context().get_node_id()
    gpu = assigned.get("GPU", 0)
    if 0 < gpu < 1:
        os.environ["MISALIGN_GPU_SHARE"] = str(gpu)
    else:  # Ray reuses worker processes: a share recorded for an earlier task must not outlive it
        os.environ.pop("MISALIGN_GPU_SHARE", None)


def single_process_group_env() -> None:
    """DeepSpeed needs a process group even for one process; a launcher would set these, the trial does.
    Kept for the actor's life: Tune reuses it, and the group, once made, stays."""
    if "MASTER_PORT" not in os.environ:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))


def tune_storage(store: Store) -> dict[str, Any]:
    """RunConfig/Tuner arguments that put Tune's (or Train's) experiment on the store: a directory, or the
    bucket through the store's own pyarrow filesystem (so an S3-compatible endpoint reaches Ray too)."""
    if store.remote:
        return {"storage_path": store.base, "storage_filesystem": store.fs}
    return {"storage_path": str(store.local)}
