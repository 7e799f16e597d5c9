"""Starting and stopping real servers in tests: free ports, health polling, whole-process-group shutdown."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


def benchmark(name: str):
    """``benchmarks/<name>.py`` as a module, loaded by its path (the scripts are not a package, and another
    installed distribution ships a top-level ``benchmarks``): for the tests that compare with a benchmark's
    reference, the old path it times."""
    spec = importlib.util.spec_from_file_location(f"cxr_benchmark_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def post(url: str, body: dict, timeout: float = 10) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_http(url: str, seconds: float, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.time() + seconds
    while time.time() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except Exception:
            time.sleep(0.5)
    raise AssertionError(f"{url} did not answer in {seconds}s:\n{log.read_text()[-3000:]}")


def start(cmd: list[str], env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(timeout=10)


def mlflow_server(port: int, backend_uri: str, artifacts: Path, env: dict, log: Path) -> subprocess.Popen:
    """``mlflow server`` with one worker and no job consumers (the defaults start 4 workers, about 3 GB)."""
    cmd = [str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    cmd += ["--backend-store-uri", backend_uri, "--artifacts-destination", str(artifacts)]
    return start(cmd, {**env, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", "MLFLOW_DISABLE_TELEMETRY": "true"}, log)


def mlflow_runs_for(api: str, dagster_run_id: str, experiment: str = "cxr_pipeline") -> list[dict]:
    """The MLflow runs tagged with a Dagster run id, found through MLflow's REST API."""
    exp = json.loads(urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name={experiment}", timeout=10).read())
    body = {"experiment_ids": [exp["experiment"]["experiment_id"]], "filter": f"tags.`dagster.run_id` = '{dagster_run_id}'"}
    return post(f"{api}/runs/search", body).get("runs", [])
