"""The cluster files, checked with Ray's own code and offline: no AWS, no Kubernetes, no running cluster.

- cluster.yaml goes through the preparation `ray up` applies (prepare_config: the AWS provider's defaults,
  setup commands merged per node kind, per-type worker limits) and then Ray's schema check (validate_config,
  against ray/autoscaler/ray-schema.json). What `ray up` does after that (resource autodetection, IAM, VPC,
  launching) calls AWS and is not run. A broken copy must fail the same check. Its storage setup command is
  run (sudo stubbed): the S3 placeholder stops it, a bucket is exported to every node, EFS mounts when set.
- rayjobs/rayjob.yaml: its RayCluster spec goes through the conversion the KubeRay autoscaler applies to a
  running cluster's spec (ending in the same validate_config); the RayJob fields KubeRay needs are checked,
  the bucket through IRSA by default and its documented PVC option switched on.
- No shipped file, runtime env or pod env holds a storage credential.
- rayjobs/runtime_env.yaml: ray.runtime_env.RuntimeEnv accepts it, and Ray's packaging with its excludes
  leaves the local state out of the upload.
- rayjobs/submit.sh: bash -n, shellcheck when installed, the command it builds (--dry-run), its refusals.
"""

from __future__ import annotations

import copy
import os
import re
import shlex
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest
import yaml

pytest.importorskip("ray.autoscaler", reason="the cluster checks use Ray's own code (the study extra)")

import jsonschema  # noqa: E402  (a Ray autoscaler dependency)
from ray.autoscaler._private.kuberay.autoscaling_config import (  # noqa: E402
    _derive_autoscaling_config_from_ray_cr,
)
from ray.autoscaler._private.util import prepare_config, validate_config  # noqa: E402
from ray.runtime_env import RuntimeEnv  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CLUSTER_YAML = REPO / "cluster.yaml"
RAYJOB_YAML = REPO / "rayjobs" / "rayjob.yaml"
RUNTIME_ENV_YAML = REPO / "rayjobs" / "runtime_env.yaml"
SUBMIT_SH = REPO / "rayjobs" / "submit.sh"
CONSTRAINTS = REPO / "constraints" / "ci.txt"

SHARED = "/mnt/shared"  # the shared-filesystem option (EFS, a PVC)
BUCKET_PLACEHOLDER = "s3://REPLACE_ME/misalign/runs"  # the default storage, until the user names a bucket
# what must never be written into a shipped file or a job's runtime env: storage credentials come from the
# nodes' instance role (cluster.yaml) or service account (rayjob.yaml)
CREDENTIAL_NAMES = (
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "GOOGLE_APPLICATION_CREDENTIALS",
)
# vCPUs and GPUs of GPU instance types: a worker type's resources must match its InstanceType (the autoscaler
# plans with the declared numbers).
KNOWN_GPU_INSTANCES = {
    "g5.12xlarge": (48, 4),
    "g6e.12xlarge": (48, 4),
    "g6e.48xlarge": (192, 8),
    "p4d.24xlarge": (96, 8),
    "p5.48xlarge": (192, 8),
}


def cluster() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def prepared(config: dict) -> dict:
    """What `ray up` hands to validate_config, minus the AWS lookups."""
    return prepare_config(copy.deepcopy(config))


def worker_types(config: dict) -> dict:
    return {name: t for name, t in config["available_node_types"].items() if name != config["head_node_type"]}


def pinned(package: str) -> str:
    for line in CONSTRAINTS.read_text().splitlines():
        if line.lower().startswith(f"{package}=="):
            return line.split("==", 1)[1]
    raise AssertionError(f"{package} is not pinned in {CONSTRAINTS}")


def ray_start_args(commands: list[str]) -> list[str]:
    """The arguments of the `ray start` command among commands, with the environment assignments before it."""
    starts = [shlex.split(c) for c in commands if "ray start" in c]
    assert len(starts) == 1, commands
    tokens = starts[0]
    return tokens[tokens.index("ray") - 1 :]


# cluster.yaml: Ray's validation


def test_cluster_yaml_passes_rays_validation():
    raw = cluster()
    assert raw["provider"]["type"] == "aws" and raw["provider"]["region"]
    validate_config(prepared(raw))


def _misspell_top_level(c: dict) -> None:
    c["idle_timout_minutes"] = c.pop("idle_timeout_minutes")


def _wrong_type(c: dict) -> None:
    c["max_workers"] = "eight"


def _no_resources(c: dict) -> None:
    del c["available_node_types"]["gpu-spot"]["resources"]


def _misspell_node_type_key(c: dict) -> None:
    c["available_node_types"]["gpu-spot"]["min_worker"] = c["available_node_types"]["gpu-spot"].pop(
        "min_workers"
    )


def _fractional_gpu(c: dict) -> None:
    c["available_node_types"]["gpu-ondemand"]["resources"]["GPU"] = 0.5


def _unknown_head_type(c: dict) -> None:
    c["head_node_type"] = "cpu-head"


def _min_above_max(c: dict) -> None:
    c["available_node_types"]["gpu-spot"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize(
    ("break_it", "named"),
    [
        (_misspell_top_level, "idle_timout_minutes"),
        (_wrong_type, "eight"),
        (_no_resources, "resources"),
        (_misspell_node_type_key, "min_worker"),
        (_fractional_gpu, "0.5"),
        (_unknown_head_type, "head_node_type"),
        (_min_above_max, "max_workers"),
    ],
)
def test_broken_cluster_yaml_fails_rays_validation(break_it, named):
    broken = cluster()
    break_it(broken)
    with pytest.raises((jsonschema.ValidationError, ValueError), match=re.escape(named)):
        validate_config(prepared(broken))


# cluster.yaml: what the study needs from it


def test_head_runs_the_driver_only_with_the_dashboard_on_localhost():
    raw = cluster()
    head = raw["available_node_types"][raw["head_node_type"]]
    assert head["resources"] == {"CPU": 0}  # no task or trial is placed on the head
    assert "InstanceMarketOptions" not in head["node_config"]  # on-demand: never preempted
    assert prepared(raw)["available_node_types"][raw["head_node_type"]]["max_workers"] == 0
    args = ray_start_args(raw["head_start_ray_commands"])
    assert "--head" in args
    dashboard_host = [a for a in args if a.startswith("--dashboard-host")]
    assert dashboard_host == ["--dashboard-host=127.0.0.1"]
    assert "0.0.0.0" not in " ".join(raw["head_start_ray_commands"])


def test_gpu_workers_on_demand_and_spot_with_their_own_limits():
    raw = cluster()
    workers = worker_types(raw)
    spot, on_demand = [], []
    for name, node_type in workers.items():
        resources, node_config = node_type["resources"], node_type["node_config"]
        assert resources.get("GPU", 0) >= 1, name
        # set explicitly, not left to the global default
        assert 0 <= node_type["min_workers"] <= node_type["max_workers"], name
        if node_config["InstanceType"] in KNOWN_GPU_INSTANCES:
            cpus, gpus = KNOWN_GPU_INSTANCES[node_config["InstanceType"]]
            assert (resources["CPU"], resources["GPU"]) == (cpus, gpus), name
        market = node_config.get("InstanceMarketOptions", {}).get("MarketType")
        (spot if market == "spot" else on_demand).append(name)
        assert market in (None, "spot"), name
    assert spot and on_demand, workers


def test_autoscaling_settings():
    raw = cluster()
    assert raw["idle_timeout_minutes"] > 0
    assert raw["upscaling_speed"] > 0
    assert raw["max_workers"] >= max(t["max_workers"] for t in worker_types(raw).values())
    assert sum(t["min_workers"] for t in worker_types(raw).values()) <= raw["max_workers"]


def _install_steps(commands: list[str], repo_dir: str) -> tuple[int, int, str]:
    """(index of the torch install, index of the project install, the project install's constraints file)."""
    torch_at = project_at = None
    constraints = ""
    for i, command in enumerate(commands):
        tokens = shlex.split(command)
        if "install" not in tokens or not {"torch", "-e"} & set(tokens):
            continue
        assert command.startswith(f"cd {repo_dir} && "), command  # relative paths are the repository's
        if "torch" in tokens and torch_at is None:
            torch_at = i
            assert "-c" in tokens, command
        if "-e" in tokens:
            project_at = i
            assert tokens[tokens.index("-e") + 1].startswith(".[study"), command
            constraints = tokens[tokens.index("-c") + 1]
    assert torch_at is not None and project_at is not None, commands
    return torch_at, project_at, constraints


def test_nodes_install_the_project_with_the_pinned_constraints(tmp_path):
    raw = cluster()
    repo_dirs = [remote for remote, local in raw["file_mounts"].items() if local == "."]
    assert repo_dirs == ["~/misalign"]  # the working tree, rsynced to every node
    config = prepared(raw)

    # head: the pinned CPU torch first, then the project, both against constraints/ci.txt
    torch_at, project_at, constraints = _install_steps(config["head_setup_commands"], repo_dirs[0])
    assert torch_at < project_at and constraints == "constraints/ci.txt"

    # GPU workers: the same pins with the CUDA build of the pinned torch version
    torch_at, project_at, constraints = _install_steps(config["worker_setup_commands"], repo_dirs[0])
    assert torch_at < project_at
    writes = [c for c in config["worker_setup_commands"] if f"> {constraints}" in c]
    assert len(writes) == 1, "the GPU workers' constraints file is written by one setup command"
    home = tmp_path / "home"
    home.mkdir()
    (home / "misalign").symlink_to(REPO)  # run that command as written, on this repository
    subprocess.run(["bash", "-c", writes[0]], env={**os.environ, "HOME": str(home)}, check=True)
    gpu_pins = Path(constraints.replace("~", str(home))).read_text().splitlines()
    cpu_pins = CONSTRAINTS.read_text().splitlines()
    assert f"torch=={pinned('torch').removesuffix('+cpu')}" in gpu_pins
    assert [p for p in gpu_pins if not p.startswith("torch==")] == [
        p for p in cpu_pins if not p.startswith("torch==")
    ]


def test_token_auth_is_required_and_distributed_to_every_node():
    raw = cluster()
    assert raw["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    for commands in (raw["head_start_ray_commands"], raw["worker_start_ray_commands"]):
        assert ray_start_args(commands)[:3] == ["RAY_AUTH_MODE=token", "ray", "start"]
    assert any(c.startswith("test -s ~/.ray/auth_token ||") for c in raw["setup_commands"])
    assert "RAY_AUTH_MODE=disabled" not in CLUSTER_YAML.read_text()


def _storage_command(config: dict) -> str:
    commands = [c for c in config["setup_commands"] if "MISALIGN_STORAGE=" in c]
    assert len(commands) == 1, "one setup command chooses the study's storage"
    return commands[0]


def _run_storage_command(command: str, tmp_path: Path) -> tuple[subprocess.CompletedProcess, str, str]:
    """Run the storage setup command as a node would, with sudo and mountpoint stubbed to log their arguments
    (nothing is mounted here). Returns the result, the ~/.bashrc it left, and what sudo was asked to do."""
    home, stubs = tmp_path / "home", tmp_path / "bin"
    home.mkdir(parents=True, exist_ok=True)
    stubs.mkdir(parents=True, exist_ok=True)
    bashrc = home / ".bashrc"
    if not bashrc.exists():
        bashrc.write_text("export PATH=/x:$PATH\n")
    log = tmp_path / "sudo.log"
    (stubs / "sudo").write_text(f'#!/bin/sh\necho "$*" >> {log}\n')
    (stubs / "mountpoint").write_text("#!/bin/sh\nexit 1\n")
    for stub in stubs.iterdir():
        stub.chmod(0o755)
    env = {**os.environ, "HOME": str(home), "PATH": f"{stubs}{os.pathsep}{os.environ['PATH']}"}
    result = subprocess.run(["bash", "-c", command], env=env, capture_output=True, text=True)
    return result, bashrc.read_text(), log.read_text() if log.exists() else ""


def test_object_storage_is_the_default_on_every_node(tmp_path):
    raw = cluster()
    config = prepared(raw)
    command = _storage_command(raw)
    for kind in ("head_setup_commands", "worker_setup_commands"):
        assert command in config[kind], kind  # on every node
    assert f"MISALIGN_STORAGE={BUCKET_PLACEHOLDER};" in command

    # as shipped: the placeholder stops `ray up` with a message that says what to set
    result, bashrc, sudo = _run_storage_command(command, tmp_path / "as-shipped")
    assert result.returncode == 1
    assert "cluster.yaml: set MISALIGN_STORAGE" in result.stderr
    assert "MISALIGN_STORAGE" not in bashrc and sudo == ""

    # a bucket: exported to every shell of the node (and so to `ray start`, the study and its trials) with the
    # cluster's region; nothing is mounted. Idempotent: a second run leaves one line.
    bucket = "s3://my-bucket/misalign/runs"
    for _ in range(2):
        result, bashrc, sudo = _run_storage_command(
            command.replace(BUCKET_PLACEHOLDER, bucket), tmp_path / "bucket"
        )
        assert result.returncode == 0, result.stderr
    region = raw["provider"]["region"]
    exports = [line for line in bashrc.splitlines() if "MISALIGN_STORAGE" in line]
    assert exports == [f"export MISALIGN_STORAGE={bucket} AWS_REGION={region}"]
    assert bashrc.startswith("export PATH=/x:$PATH\n")  # the rest of the profile is kept
    assert sudo == ""


def test_nodes_reach_the_bucket_with_an_instance_profile_and_check_it():
    raw = cluster()
    for name, node_type in worker_types(raw).items():
        assert node_type["node_config"]["IamInstanceProfile"] == {"Name": "misalign-worker"}, name
    # the head gets Ray's default role (ray up creates it, with EC2 and S3 access) unless one is set
    head = raw["available_node_types"][raw["head_node_type"]]["node_config"]
    assert "IamInstanceProfile" not in head
    # every node checks, once the project is installed, that it can write to the storage
    config = prepared(raw)
    for kind in ("head_setup_commands", "worker_setup_commands"):
        commands = config[kind]
        checks = [
            i for i, c in enumerate(commands) if "check_store(Store(os.environ['MISALIGN_STORAGE']))" in c
        ]
        installs = [i for i, c in enumerate(commands) if "pip install" in c and "-e" in shlex.split(c)]
        assert len(checks) == 1 and installs and checks[0] > max(installs), kind
        assert checks[0] > commands.index(_storage_command(raw)), kind


def test_efs_stays_an_option_that_mounts_on_every_node(tmp_path):
    raw = cluster()
    command = _storage_command(raw)
    assert re.search(rf"mount -t nfs4 .* {SHARED}\b", command)
    assert "EFS=;" in command  # off unless set
    efs = "fs-0123.efs.us-west-2.amazonaws.com"
    shared = command.replace(BUCKET_PLACEHOLDER, f"{SHARED}/runs")

    # on /mnt/shared without a file system to mount there: refused
    result, bashrc, sudo = _run_storage_command(shared, tmp_path / "no-efs")
    assert result.returncode == 1 and "set EFS" in result.stderr
    assert "MISALIGN_STORAGE" not in bashrc and sudo == ""

    # EFS set: mounted at /mnt/shared with AWS's NFS options, and the study's storage is there
    result, bashrc, sudo = _run_storage_command(shared.replace("EFS=;", f"EFS={efs};"), tmp_path / "efs")
    assert result.returncode == 0, result.stderr
    mounts = [line.split() for line in sudo.splitlines() if line.startswith("mount ")]
    assert len(mounts) == 1
    assert mounts[0][:3] == ["mount", "-t", "nfs4"] and mounts[0][-2:] == [f"{efs}:/", SHARED]
    assert "nfsvers=4.1" in mounts[0][4]
    assert f"export MISALIGN_STORAGE={SHARED}/runs AWS_REGION=" in bashrc


def test_cluster_commands_are_valid_bash():
    config = prepared(cluster())
    kinds = (
        "head_setup_commands",
        "worker_setup_commands",
        "head_start_ray_commands",
        "worker_start_ray_commands",
    )
    for command in (c for kind in kinds for c in config[kind]):
        result = subprocess.run(["bash", "-n", "-c", command], capture_output=True, text=True)
        assert result.returncode == 0, (command, result.stderr)


# the runtime environment of the job


def runtime_env() -> dict:
    return yaml.safe_load(RUNTIME_ENV_YAML.read_text())


def test_runtime_env_is_accepted_by_ray(monkeypatch):
    data = runtime_env()
    monkeypatch.chdir(REPO)  # submit.sh runs `ray job submit` here: local paths are the repository's
    RuntimeEnv(**data)
    assert set(data) <= RuntimeEnv.known_fields
    assert not {"pip", "conda", "uv", "container", "image_uri"} & set(data), "the nodes have the dependencies"
    assert list(data)[-1] == "env_vars"  # submit.sh --env appends to it
    assert data["env_vars"]["TOKENIZERS_PARALLELISM"] == "false"
    assert data["env_vars"]["RAY_CHDIR_TO_TRIAL_DIR"] == "0"  # relative data paths work in every trial
    # the caches are node-local (each node's own disk); the study itself lives in its --storage
    for name in ("HF_HOME", "MISALIGN_CACHE", "TORCH_EXTENSIONS_DIR"):
        assert data["env_vars"][name].startswith("${HOME}/.cache/"), name
    assert not any(SHARED in str(v) for v in data["env_vars"].values())
    assert not set(CREDENTIAL_NAMES) & set(data["env_vars"])


def test_the_drivers_own_runtime_env_merges_with_the_jobs():
    """misalign.study.init_ray calls ray.init(runtime_env={"env_vars": ...}) with variables it reads from the
    driver's environment, which inside a job holds the job's env_vars. ray.init merges the two like this
    (ray._private.worker) and refuses keys present in both unless RAY_OVERRIDE_JOB_RUNTIME_ENV=1 is set in the
    driver's environment, i.e. in the job's env_vars."""
    from ray.runtime_env.runtime_env import _merge_runtime_env

    job = runtime_env()
    driver = {"env_vars": dict(job["env_vars"])}  # the worst case: the driver repeats every one of them
    override = job["env_vars"].get("RAY_OVERRIDE_JOB_RUNTIME_ENV") == "1"
    merged = _merge_runtime_env(job, driver, override=override)
    assert merged is not None, "ray.init inside the job would fail: conflicting runtime env"
    assert (merged["py_modules"], merged["excludes"]) == (job["py_modules"], job["excludes"])


def test_runtime_env_excludes_leave_local_state_out_of_the_upload(tmp_path):
    from ray._private.runtime_env.packaging import create_package

    tree = tmp_path / "repo"
    kept = ["src/misalign/cli.py", "configs/study-tiny.yaml", "bench/bench_stage.py", "docs/config.md"]
    left_out = [
        ".git/config",
        ".venv/bin/python",
        "runs/study/stages.parquet",
        "bench/results/bench_stage.json",
        "src/misalign/__pycache__/cli.cpython-311.pyc",
        ".pytest_cache/README.md",
        "src/misalign.egg-info/PKG-INFO",
    ]
    for name in kept + left_out:
        (tree / name).parent.mkdir(parents=True, exist_ok=True)
        (tree / name).write_text("x")
    package = tmp_path / "package.zip"
    create_package(str(tree), package, include_gitignore=False, excludes=runtime_env()["excludes"])
    uploaded = set(zipfile.ZipFile(package).namelist())
    assert set(kept) <= uploaded
    assert not set(left_out) & uploaded


# rayjobs/rayjob.yaml (KubeRay)


def rayjob(text: str | None = None) -> dict:
    documents = list(yaml.safe_load_all(RAYJOB_YAML.read_text() if text is None else text))
    assert len(documents) == 1
    return documents[0]


def with_pvc_option(text: str) -> str:
    """rayjob.yaml with its documented [pvc] option switched on as its header says: "# [pvc] " deleted where it
    starts a line, and the entrypoint line the [pvc] one replaces deleted."""
    marker = re.compile(r"^(\s*)# \[pvc\] ")
    option = [marker.sub(r"\1", line) for line in text.splitlines() if marker.match(line)]
    assert option, "rayjob.yaml documents the PVC option"
    out = []
    for line in text.splitlines():
        if marker.match(line):
            out.append(marker.sub(r"\1", line))
        elif not (
            line.lstrip().startswith("entrypoint:")
            and any(o.lstrip().startswith("entrypoint:") for o in option)
        ):
            out.append(line)
    return "\n".join(out) + "\n"


def pod_templates(spec: dict) -> list[dict]:
    return [spec["headGroupSpec"]["template"]] + [g["template"] for g in spec["workerGroupSpecs"]]


def test_rayjob_manifest_has_what_kuberay_needs():
    job = rayjob()
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    assert spec["entrypoint"] == (
        f"misalign study run configs/study-paper.yaml --address auto --storage {BUCKET_PLACEHOLDER}"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] > 0
    assert spec["submissionMode"] == "K8sJobMode"
    cluster_spec = spec["rayClusterSpec"]
    assert cluster_spec["rayVersion"] == pinned("ray")  # the Ray the project pins and the image carries
    assert cluster_spec["enableInTreeAutoscaling"] is True
    assert cluster_spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0

    head = cluster_spec["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0"
    head_container = head["template"]["spec"]["containers"][0]
    assert {"containerPort": 8265, "name": "dashboard"} in head_container["ports"]
    assert "nvidia.com/gpu" not in head_container["resources"]["limits"]

    capacity_types = set()
    for group in cluster_spec["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 < group["maxReplicas"], group["groupName"]
        pod = group["template"]["spec"]
        assert int(pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        capacity_types.add(pod["nodeSelector"]["eks.amazonaws.com/capacityType"])
    assert capacity_types == {"ON_DEMAND", "SPOT"}

    images = {
        c["image"]
        for t in [*pod_templates(cluster_spec), spec["submitterPodTemplate"]]
        for c in t["spec"]["containers"]
    }
    assert len(images) == 1, images  # one image built from the project, everywhere


def _mounts(template: dict) -> dict[str, dict]:
    """mount path -> the volume mounted there, in a pod template's first container."""
    volumes = {v["name"]: v for v in template["spec"]["volumes"]}
    return {m["mountPath"]: volumes[m["name"]] for m in template["spec"]["containers"][0]["volumeMounts"]}


def test_rayjob_storage_is_the_bucket_through_irsa_with_node_local_caches():
    spec = rayjob()["spec"]
    assert f"--storage {BUCKET_PLACEHOLDER}" in spec["entrypoint"]
    runtime_env_vars = yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]
    for template in pod_templates(spec["rayClusterSpec"]):
        pod = template["spec"]
        # the pods' AWS identity is a service account annotated with an IAM role (IRSA), the same everywhere
        assert pod["serviceAccountName"] == "misalign"
        env = {e["name"]: e for e in pod["containers"][0]["env"]}
        assert env["AWS_REGION"]["value"]
        mounts = _mounts(template)
        # no shared volume by default: no claim at all
        assert not any("persistentVolumeClaim" in v for v in pod["volumes"])
        assert SHARED not in mounts
        # the caches the runtime env puts under ${HOME}/.cache (the image's HOME is /home/ray) are on a volume
        # on the node's disk
        assert (
            "emptyDir" in mounts["/home/ray/.cache"]
            and "medium" not in mounts["/home/ray/.cache"]["emptyDir"]
        )
        for name in ("HF_HOME", "MISALIGN_CACHE"):
            assert runtime_env_vars[name].startswith("${HOME}/.cache/"), name
    # the submitter only talks to the Ray cluster: no AWS identity
    assert "serviceAccountName" not in spec["submitterPodTemplate"]["spec"]


def test_rayjob_pvc_option_is_documented_and_valid():
    text = with_pvc_option(RAYJOB_YAML.read_text())
    job = rayjob(text)
    spec = job["spec"]
    assert spec["entrypoint"] == (
        f"misalign study run configs/study-paper.yaml --address auto --storage {SHARED}/runs"
    )
    for template in pod_templates(spec["rayClusterSpec"]):
        assert _mounts(template)[SHARED]["persistentVolumeClaim"] == {"claimName": "misalign-shared"}
    # still a cluster spec the KubeRay autoscaler accepts
    ray_cluster = {
        "metadata": {"name": "misalign-study", "namespace": "default"},
        "spec": spec["rayClusterSpec"],
    }
    _derive_autoscaling_config_from_ray_cr(ray_cluster)
    # the claim itself is in the README (ReadWriteMany, apart from the job)
    readme = (REPO / "rayjobs" / "README.md").read_text()
    assert "name: misalign-shared" in readme and "ReadWriteMany" in readme


def test_no_storage_credentials_in_shipped_files():
    """Nodes reach the bucket with an instance role / a service account: no key in a file, a runtime env, or
    a pod's environment."""
    shipped = [CLUSTER_YAML, *sorted((REPO / "rayjobs").iterdir()), REPO / "README.md"]
    key_id = re.compile(r"\b(AKIA|ASIA)[0-9A-Z]{16}\b")
    assignment = re.compile(
        rf"\b({'|'.join(CREDENTIAL_NAMES)})\s*[:=]|aws_secret_access_key|secret_access_key\s*="
    )
    for path in shipped:
        text = path.read_text()
        assert not key_id.search(text), path
        assert not assignment.search(text), (path, assignment.search(text))
    spec = rayjob()["spec"]
    for template in [*pod_templates(spec["rayClusterSpec"]), spec["submitterPodTemplate"]]:
        for container in template["spec"]["containers"]:
            names = {e["name"] for e in container.get("env", [])}
            assert not set(CREDENTIAL_NAMES) & names
    for env_vars in (runtime_env()["env_vars"], yaml.safe_load(spec["runtimeEnvYAML"])["env_vars"]):
        assert not set(CREDENTIAL_NAMES) & set(env_vars)


def test_rayjob_token_auth_from_a_secret_on_every_ray_process():
    spec = rayjob()["spec"]
    envs = [c.get("env", []) for t in pod_templates(spec["rayClusterSpec"]) for c in t["spec"]["containers"]]
    envs.append(spec["submitterPodTemplate"]["spec"]["containers"][0]["env"])
    envs.append(spec["rayClusterSpec"]["autoscalerOptions"]["env"])
    for env in envs:
        by_name = {e["name"]: e for e in env}
        assert by_name["RAY_AUTH_MODE"]["value"] == "token"
        token = by_name["RAY_AUTH_TOKEN"]
        assert "value" not in token  # never inline
        assert token["valueFrom"]["secretKeyRef"]["key"] == "auth_token"


def test_rayjob_optional_credentials_reach_head_and_workers():
    for template in pod_templates(rayjob()["spec"]["rayClusterSpec"]):
        sources = template["spec"]["containers"][0]["envFrom"]
        assert {"secretRef": {"name": "misalign-secrets", "optional": True}} in sources


def test_rayjob_cluster_spec_through_the_kuberay_autoscaler_conversion():
    spec = rayjob()["spec"]["rayClusterSpec"]
    ray_cluster = {"metadata": {"name": "misalign-study", "namespace": "default"}, "spec": spec}
    config = _derive_autoscaling_config_from_ray_cr(ray_cluster)  # runs validate_config itself
    node_types = config["available_node_types"]
    assert node_types.pop("headgroup")["resources"]["CPU"] == 0
    for group in spec["workerGroupSpecs"]:
        node_type = node_types[group["groupName"]]
        gpus = int(group["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        assert node_type["resources"]["GPU"] == gpus
        assert (node_type["min_workers"], node_type["max_workers"]) == (
            group["minReplicas"],
            group["maxReplicas"],
        )
    assert config["idle_timeout_minutes"] == spec["autoscalerOptions"]["idleTimeoutSeconds"] / 60


def test_rayjob_runtime_env_matches_the_submit_runtime_env():
    kuberay = yaml.safe_load(rayjob()["spec"]["runtimeEnvYAML"])
    assert Path(kuberay["working_dir"]).is_absolute()  # the source in the image
    RuntimeEnv(**{**kuberay, "working_dir": str(REPO)})  # (that path exists in the image, not here)
    submit = runtime_env()
    assert kuberay["excludes"] == submit["excludes"]
    assert kuberay["env_vars"] == submit["env_vars"]


# rayjobs/submit.sh


def test_submit_script_is_valid_bash():
    assert os.access(SUBMIT_SH, os.X_OK)
    subprocess.run(["bash", "-n", str(SUBMIT_SH)], check=True)


def test_submit_script_is_shellcheck_clean():
    if shutil.which("shellcheck") is None:
        pytest.skip("shellcheck is not installed")
    result = subprocess.run(["shellcheck", str(SUBMIT_SH)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout


BUCKET = "s3://my-bucket/misalign/runs"


def submit(
    args: list[str],
    home: Path,
    cwd: Path = REPO,
    token: str | None = "test-token",
    secret: str | None = None,
    storage: str | None = BUCKET,
):
    """Run submit.sh with a clean environment: the token, OPENAI_API_KEY and MISALIGN_STORAGE (the default
    STORAGE) only as given."""
    unset = ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "OPENAI_API_KEY", "MISALIGN_STORAGE", *CREDENTIAL_NAMES)
    env = {k: v for k, v in os.environ.items() if k not in unset}
    env["HOME"] = str(home)
    if token is not None:
        env["RAY_AUTH_TOKEN"] = token
    if storage is not None:
        env["MISALIGN_STORAGE"] = storage
    if secret is not None:
        env["OPENAI_API_KEY"] = secret
    return subprocess.run([str(SUBMIT_SH), *args], cwd=cwd, env=env, capture_output=True, text=True)


def test_submit_builds_the_ray_job_submit_command(tmp_path):
    # STORAGE defaults to MISALIGN_STORAGE (cluster.yaml sets the same variable on the nodes)
    result = submit(["--dry-run", "configs/study-tiny.yaml"], tmp_path)
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    at = tokens.index("--")
    options, entrypoint = tokens[:at], tokens[at + 1 :]
    assert options == [
        "ray", "job", "submit",
        "--address", "http://127.0.0.1:8265",
        "--working-dir", ".",
        "--runtime-env", "rayjobs/runtime_env.yaml",
    ]  # fmt: skip
    assert entrypoint == [
        "misalign", "study", "run", "configs/study-tiny.yaml", "--address", "auto", "--storage", BUCKET
    ]  # fmt: skip

    # from elsewhere, with the token in a file, every argument given, extra study arguments passed through
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("test-token")
    args = [
        "--no-wait",
        "--dry-run",
        str(REPO / "configs" / "study-tiny.yaml"),
        "/fsx/runs",
        "http://h:8265",
    ]
    # (STORAGE given: it beats MISALIGN_STORAGE)
    result = submit([*args, "--", "--set", "a b"], tmp_path, cwd=tmp_path, token=None)
    assert result.returncode == 0, result.stderr
    tokens = shlex.split(result.stdout)
    at = tokens.index("--")
    assert "--no-wait" in tokens[:at] and tokens[tokens.index("--address") + 1] == "http://h:8265"
    assert tokens[at + 1 :] == [
        "misalign", "study", "run", "configs/study-tiny.yaml", "--address", "auto",
        "--storage", "/fsx/runs", "--set", "a b",
    ]  # fmt: skip


def test_submit_forwards_named_variables_to_the_job(tmp_path, monkeypatch):
    result = submit(
        ["--dry-run", "--env", "OPENAI_API_KEY", "configs/study-tiny.yaml"], tmp_path, secret="sk-test_1"
    )
    assert result.returncode == 0, result.stderr
    command, header, *rest = result.stdout.splitlines()
    sent = shlex.split(command)[shlex.split(command).index("--runtime-env") + 1]
    assert header == f"# {sent}:" and sent != "rayjobs/runtime_env.yaml"
    assert not Path(sent).exists()  # the private copy is gone once the script exits
    assert "sk-test_1" not in result.stdout
    forwarded = yaml.safe_load("\n".join(rest))
    assert forwarded["env_vars"] == {**runtime_env()["env_vars"], "OPENAI_API_KEY": "<hidden>"}
    monkeypatch.chdir(REPO)
    RuntimeEnv(**forwarded)


@pytest.mark.parametrize(
    "storage",
    [
        "s3://my-bucket/misalign/runs",
        "gs://my-bucket/runs",
        "abfs://container/runs",
        "file:///fsx/runs",
        f"{SHARED}/runs",
    ],
)
def test_submit_accepts_object_store_urls_and_absolute_paths(tmp_path, storage):
    for args, env in ((["configs/study-tiny.yaml", storage], None), (["configs/study-tiny.yaml"], storage)):
        result = submit(["--dry-run", *args], tmp_path, storage=env)
        assert result.returncode == 0, result.stderr
        tokens = shlex.split(result.stdout)
        assert tokens[tokens.index("--storage") + 1] == storage


@pytest.mark.parametrize(
    ("case", "says"),
    [
        ("no token", "auth token"),
        ("config outside the repository", "outside this repository"),
        ("missing config", "no config file"),
        ("relative storage", "absolute path"),
        ("relative storage from MISALIGN_STORAGE", "absolute path"),
        ("dot-relative storage", "absolute path"),
        ("relative file URL", "needs an absolute path"),
        ("a scheme and nothing else", "object-store URL"),
        ("no storage", "no STORAGE"),
        ("the placeholder bucket", "placeholder"),
        ("forwarding storage credentials", "never go into the job"),
        ("forwarding an unset variable", "OPENAI_API_KEY is not set"),
        ("no arguments", "Usage:"),
    ],
)
def test_submit_refuses_with_a_clear_message(tmp_path, case, says):
    outside = tmp_path / "study.yaml"
    outside.write_text("name: x\n")
    tiny = ["--dry-run", "configs/study-tiny.yaml"]
    args, token, storage = {
        "no token": (tiny, None, BUCKET),
        "config outside the repository": (["--dry-run", str(outside)], "t", BUCKET),
        "missing config": (["--dry-run", "configs/no-such-study.yaml"], "t", BUCKET),
        "relative storage": ([*tiny, "runs"], "t", BUCKET),
        "relative storage from MISALIGN_STORAGE": (tiny, "t", "runs"),
        "dot-relative storage": ([*tiny, "./runs"], "t", BUCKET),
        "relative file URL": ([*tiny, "file://runs"], "t", BUCKET),
        "a scheme and nothing else": ([*tiny, "s3://"], "t", BUCKET),
        "no storage": (tiny, "t", None),
        "the placeholder bucket": ([*tiny, BUCKET_PLACEHOLDER], "t", BUCKET),
        "forwarding storage credentials": (
            ["--dry-run", "--env", "AWS_SECRET_ACCESS_KEY", *tiny[1:]],
            "t",
            BUCKET,
        ),
        "forwarding an unset variable": (["--dry-run", "--env", "OPENAI_API_KEY", *tiny[1:]], "t", BUCKET),
        "no arguments": ([], "t", BUCKET),
    }[case]
    result = submit(args, tmp_path, token=token, storage=storage)
    assert result.returncode == 2
    assert says in result.stderr
    assert result.stdout == ""
