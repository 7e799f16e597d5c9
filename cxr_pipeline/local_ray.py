"""A local Ray cluster of two nodes on loopback, for the cluster test and ``benchmarks/scale_out.py``: a head and a
worker node (two raylets, each its own ports, one GPU declared on each), started with ``ray start`` as on two
machines, and stopped with ``ray stop --force`` (which stops every Ray process of this machine).

It lives in the package, not beside the tests, so that the benchmark does not import the test tree (#46); the
pytest fixtures stay in ``cxr_pipeline_tests/test_ray_cluster.py``. Like ``demo``, it needs a source checkout
(the repository's ``dagster.yaml``) and the environment's ``ray``, ``dagster`` and ``python`` executables."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import psutil

from cxr_pipeline.settings import write_pipeline_config

ROOT = Path(__file__).resolve().parent.parent  # the source checkout: its dagster.yaml
BIN = Path(sys.executable).parent  # the environment's executables: ray, dagster, python
HEAD_ONLY = "cxr_test_head"  # a resource only the head declares: pins a job there


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str  # the job server (dashboard) the executor submits to
    env: dict  # PATH and Ray's settings, for processes that talk to the cluster
    worker_raylet_port: int  # the second node's raylet
    temp: str  # the cluster's temporary folder (its raylets' sockets live there)

    def node_ids(self) -> dict[str, str]:
        """{"head" | "worker": Ray node id} of the running nodes, from their raylets' command lines."""
        ids = {}
        for p in psutil.process_iter(["name", "cmdline"]):
            args = dict(a.split("=", 1) for a in (p.info["cmdline"] or []) if a.startswith("--") and "=" in a)
            if p.info["name"] == "raylet" and args.get("--raylet_socket_name", "").startswith(self.temp):
                ids["worker" if args.get("--node_manager_port") == str(self.worker_raylet_port) else "head"] = args["--node_id"]
        return ids

    def kill_worker(self) -> int:
        """``kill -9`` the worker node: its raylet and every process under it; how many were killed."""
        raylets = [
            p for p in psutil.process_iter(["cmdline"]) if f"--node_manager_port={self.worker_raylet_port}" in (p.info["cmdline"] or [])
        ]
        assert len(raylets) == 1, "the worker node's raylet is not running"
        doomed = [raylets[0], *raylets[0].children(recursive=True)]
        for p in doomed:
            try:
                p.send_signal(signal.SIGKILL)
            except psutil.NoSuchProcess:
                pass
        return len(doomed)


def _ray_start(env: dict, *args: str) -> None:
    done = subprocess.run([str(BIN / "ray"), "start", *args], env=env, capture_output=True, text=True, timeout=180)
    if done.returncode:
        raise RuntimeError(f"ray start {' '.join(args)}:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")


@contextmanager
def two_node_cluster(cpus_per_node: int = 4) -> Iterator[Cluster]:
    """The cluster, one GPU declared per node; the head notices a dead node in about 3 s (Ray's default: ~30 s)."""
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # Ray's socket paths must stay short
    env = {**os.environ, "PATH": f"{BIN}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0"}
    env.update(RAY_health_check_period_ms="1000", RAY_health_check_timeout_ms="1000", RAY_health_check_failure_threshold="3")
    gcs, dashboard, worker_raylet = free_port(), free_port(), free_port()
    common = ["--node-ip-address=127.0.0.1", f"--num-cpus={cpus_per_node}", "--num-gpus=1", f"--memory={64 * 2**30}"]
    common.append("--disable-usage-stats")

    def ports(raylet: int) -> list[str]:
        names = ("object-manager", "dashboard-agent-listen", "dashboard-agent-grpc", "runtime-env-agent", "metrics-export")
        return [f"--node-manager-port={raylet}", *(f"--{n}-port={free_port()}" for n in names)]

    head = ["--head", f"--port={gcs}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}", f"--temp-dir={temp}"]
    try:
        _ray_start(env, *head, *common, *ports(free_port()), f'--resources={{"{HEAD_ONLY}": 1}}')
        _ray_start(env, f"--address=127.0.0.1:{gcs}", *common, *ports(worker_raylet))
        yield Cluster(f"http://127.0.0.1:{dashboard}", env, worker_raylet, temp)
    finally:
        subprocess.run([str(BIN / "ray"), "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


def materialize_cmd(partition: str) -> list[str]:
    """``dagster asset materialize`` of one classifier partition: each its own run, as a user launches it."""
    cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "cxr_pipeline.definitions", "--select", "classifier"]
    return [*cmd, "--partition", partition]


def classifier_inputs(layout, recipe: dict) -> dict:
    """``layout`` (a ``settings.Paths``) with ``recipe`` as its pipeline.yaml, its own Dagster instance, and the
    classifiers' inputs (the manifest, the ten shard partitions) built on one host; the environment a run in it
    is started with (add ``CXR_EXECUTOR``)."""

    dagster_home = layout.home / "dagster"
    write_pipeline_config(layout, recipe, "test configuration")
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "DAGSTER_HOME")}
    env.update(CXR_HOME=str(layout.home), CXR_RAW_DIR=str(layout.raw), DAGSTER_HOME=str(dagster_home))
    env.update(MLFLOW_DISABLE_TELEMETRY="true", HF_HUB_OFFLINE="1")
    dagster_home.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", dagster_home / "dagster.yaml")
    script = "from cxr_pipeline.demo import _Runner; from cxr_pipeline.data.shard_reader import PARTITIONS as P; r = _Runner(); "
    script += "ok = r('manifest_job') and all([r('shards_job', p) for p in P]); raise SystemExit(0 if ok else 1)"
    done = subprocess.run([str(BIN / "python"), "-c", script], env={**env, "CXR_EXECUTOR": "in_process"}, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"building the classifiers' inputs in {Path(layout.home)}:\n{done.stderr[-3000:]}")
    return env


def set_gpu_pool(env: dict, limit: int) -> None:
    """What a cluster deployment does: the ``gpu`` pool's limit set to the cluster's GPUs (the code leaves it alone
    under a cluster executor)."""
    done = subprocess.run(
        [str(BIN / "dagster"), "instance", "concurrency", "set", "gpu", str(limit)], env=env, capture_output=True, text=True
    )
    if done.returncode:
        raise RuntimeError(done.stderr[-2000:])
