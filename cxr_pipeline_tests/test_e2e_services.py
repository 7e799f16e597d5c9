"""A real client end to end: Dagster webserver + daemon and an MLflow server on local ports.

Launches a materialization through the GraphQL API the UI uses, polls it to
success, finds its MLflow run through MLflow's REST API, and shuts everything
down (each server in its own session, so the whole process group is signalled:
`dagster dev` started without job control ignores SIGTERM otherwise).
"""

from __future__ import annotations

import os
import shutil
import time

import pytest

from cxr_pipeline_tests.services import BIN, ROOT, free_port, mlflow_runs_for, mlflow_server, post, start, stop, wait_http


@pytest.mark.slow(minutes=0.7)
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
    mlflow = mlflow_server(mport, f"sqlite:///{tmp_path / 'mlflow.db'}", tmp_path / "artifacts", env, tmp_path / "mlflow.log")
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
        runs = mlflow_runs_for(f"http://127.0.0.1:{mport}/api/2.0/mlflow", run_id)
        assert len(runs) == 1
        tags = {t["key"]: t["value"] for t in runs[0]["data"]["tags"]}
        assert tags["dagster.asset_key"] == "manifest,manifest_rejects" and runs[0]["info"]["status"] == "FINISHED"

        # the daemon evaluates the automation sensor (on by default) in the code location without error
        query = """query { sensorOrError(sensorSelector: {repositoryLocationName: "cxr_pipeline.definitions",
                   repositoryName: "__repository__", sensorName: "automation"}) {
                   ... on Sensor { sensorState { status ticks(limit: 5) { status error { message } } } } } }"""
        ticks: list = []
        deadline = time.time() + 120
        while time.time() < deadline:
            state = post(gql, {"query": query})["data"]["sensorOrError"]["sensorState"]
            ticks = [t for t in state["ticks"] if t["status"] != "STARTED"]
            if ticks:
                break
            time.sleep(2)
        assert state["status"] == "RUNNING"
        assert ticks and all(t["status"] in ("SUCCESS", "SKIPPED") for t in ticks), ticks
    finally:
        stop(dagster)
        stop(mlflow)
    assert dagster.poll() is not None and mlflow.poll() is not None
