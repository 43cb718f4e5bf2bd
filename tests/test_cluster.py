"""misalign.cluster without a cluster: the autoscaler's limits read as an autoscaler would use them (cluster.yaml,
autoscaler v2's published node groups, autoscaler v1's monitor process), and the trials they fit. The cluster
files themselves: tests/test_cluster_yaml.py; a study on a real autoscaling cluster:
tests/workflows/test_autoscaling.py."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import yaml

from misalign.cluster import launcher_limits, trials_fit

REPO = Path(__file__).resolve().parents[1]


# ---- the autoscaler's limits, read as an autoscaler would use them (no cluster needed) -------------------------

def test_cluster_yaml_limits_give_the_study_its_full_width():
    """cluster.yaml: 2 on-demand + 6 spot g6e.12xlarge (4 GPUs, 48 CPUs), at most 8 workers: 32 one-GPU trials,
    8 four-GPU ones; the CPU head holds none. A cap below the types' sum keeps the types that hold the most."""
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    limits = launcher_limits(config)
    assert trials_fit(limits, workers=1, cpus=8, gpus=1) == 32
    assert trials_fit(limits, workers=4, cpus=8, gpus=1) == 8
    assert trials_fit(limits, workers=1, cpus=1, gpus=0) == 8 * 48
    config["max_workers"] = 3
    config["available_node_types"]["gpu-spot"]["resources"] = {"CPU": 48, "GPU": 8}
    assert trials_fit(launcher_limits(config), workers=1, cpus=8, gpus=1) == 3 * 6  # 3 spot nodes, 6 by CPU


def test_autoscaler_v2_limits_are_read_from_its_published_config():
    """KubeRay's autoscaler (v2) publishes its node groups in the GCS as a ClusterConfig: the same arithmetic."""
    from ray.core.generated import autoscaler_pb2

    from misalign.cluster import node_groups

    config = autoscaler_pb2.ClusterConfig(node_group_configs=[
        autoscaler_pb2.NodeGroupConfig(name="head", resources={"CPU": 0}, max_count=1),
        autoscaler_pb2.NodeGroupConfig(name="gpu", resources={"CPU": 48, "GPU": 4}, max_count=3)])
    assert trials_fit(node_groups(config), workers=1, cpus=4, gpus=2) == 6


def test_autoscaler_v1_config_is_read_from_its_monitor_process(tmp_path):
    """Autoscaler v1 publishes no limits, only its monitor's pid: the config is read from that process's command
    line where the driver runs beside it; anywhere else (no such process, or not a monitor) nothing is read, and
    the study asks for resources.max_concurrent."""
    from misalign.cluster import monitor_config

    config = tmp_path / "autoscaling.yaml"
    config.write_text(yaml.safe_dump({"max_workers": 2}))
    argv = [sys.executable, "-c", "import time; time.sleep(60)", "monitor.py", f"--autoscaling-config={config}"]
    with subprocess.Popen(argv) as monitor:
        try:
            assert monitor_config(monitor.pid) == {"max_workers": 2}
        finally:
            monitor.kill()
    assert monitor_config(os.getpid()) is None and monitor_config(None) is None
