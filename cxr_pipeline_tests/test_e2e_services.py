"""A real client end to end: Dagster webserver + daemon and an MLflow server on local ports.

Launches a materialization through the GraphQL API the UI uses, polls it to
success, finds its MLflow run through MLflow's REST API, and shuts everything
down (each server in its own session, so the whole process group is signalled:
`dagster dev` started without job control ignores SIGTERM otherwise).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent


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


@pytest.mark.slow
def test_graphql_launch_and_mlflow_rest(replica_copy, tmp_path):
    home = tmp_path / "home"
    dh = home / "dagster"
    dh.mkdir(parents=True)
    shutil.copy(ROOT / "dagster.yaml", dh / "dagster.yaml")
    mport, dport = free_port(), free_port()
    env = {
        **os.environ,
        "CXR_HOME": str(home),
        "CXR_RAW_DIR": str(replica_copy),
        "DAGSTER_HOME": str(dh),
        "MLFLOW_TRACKING_URI": f"http://127.0.0.1:{mport}",
        "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    mlflow = start(
        [
            str(BIN / "mlflow"),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(mport),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{tmp_path / 'mlflow.db'}",
            "--artifacts-destination",
            str(tmp_path / "artifacts"),
        ],
        env,
        tmp_path / "mlflow.log",
    )
    dagster = start(
        [str(BIN / "dagster"), "dev", "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(dport)],
        env,
        tmp_path / "dagster.log",
    )
    try:
        wait_http(f"http://127.0.0.1:{mport}/health", 120, mlflow, tmp_path / "mlflow.log")
        wait_http(f"http://127.0.0.1:{dport}/server_info", 180, dagster, tmp_path / "dagster.log")
        gql = f"http://127.0.0.1:{dport}/graphql"
        launch = post(
            gql,
            {
                "query": """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
                  __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
                "variables": {
                    "p": {
                        "selector": {
                            "repositoryLocationName": "cxr_pipeline.definitions",
                            "repositoryName": "__repository__",
                            "jobName": "manifest_job",
                        },
                        "runConfigData": {},
                    }
                },
            },
        )
        res = launch["data"]["launchRun"]
        assert res["__typename"] == "LaunchRunSuccess", res
        run_id = res["run"]["runId"]
        status = None
        deadline = time.time() + 240
        while time.time() < deadline:
            status = post(
                gql, {"query": "query($id: ID!) { runOrError(runId: $id) { ... on Run { status } } }", "variables": {"id": run_id}}
            )["data"]["runOrError"]["status"]
            if status in ("SUCCESS", "FAILURE", "CANCELED"):
                break
            time.sleep(1)
        assert status == "SUCCESS", (tmp_path / "dagster.log").read_text()[-3000:]
        api = f"http://127.0.0.1:{mport}/api/2.0/mlflow"
        exp = json.loads(urllib.request.urlopen(f"{api}/experiments/get-by-name?experiment_name=cxr_pipeline", timeout=10).read())[
            "experiment"
        ]
        found = post(f"{api}/runs/search", {"experiment_ids": [exp["experiment_id"]], "filter": f"tags.`dagster.run_id` = '{run_id}'"})
        runs = found.get("runs", [])
        assert len(runs) == 1
        tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
        assert tags["dagster.asset_key"] == "manifest,manifest_rejects" and runs[0]["info"]["status"] == "FINISHED"
    finally:
        stop(dagster)
        stop(mlflow)
    assert dagster.poll() is not None and mlflow.poll() is not None
