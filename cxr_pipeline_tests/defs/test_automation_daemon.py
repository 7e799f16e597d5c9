"""Automation through the real daemon over one whole data change.

As a user meets it: every asset materialized (``cxr_pipeline.demo.run_all``, as
``make demo`` does) under the configuration in ``$CXR_HOME/pipeline.yaml``, then
``dagster dev`` (webserver + daemon) on that state with the automation sensor
evaluated every few seconds. An observation of unchanged data starts nothing;
new patients start, run by run: the manifest once, exactly the shard partitions
whose rows changed once each, each classifier once, the summaries once, the
report branch once after the predictions; every run succeeds; then an unchanged
observation starts nothing again.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter

import polars as pl
import pytest

from cxr_pipeline.data.shards import partition_fingerprints
from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.settings import Paths, write_pipeline_config
from cxr_pipeline_tests.services import BIN, ROOT, free_port, post, start, stop, wait_http

INTERVAL = 1  # automation sensor evaluations, seconds (one takes about 1 s idle, bench_automation; 2 s: 343-360 s in all, 1 s: 335 s)
TINY = {
    # one torch thread: the training step shares the two cores with the next runs' starting processes (three runs at
    # once, dagster.yaml), and two OpenMP threads wait on each other while one is descheduled (a classifier's first
    # epoch took 5.4 s there against 1.3 s in-process; with one thread the 14 classifier runs took 124 s, not 147 s, one
    # run each, the whole test 404 s, within its earlier spread of 393 to 432 s)
    "compute": {"threads": 1},
    "manifest": {"views": ["PA", "AP"], "one_image_per_subject": False},
    "image_shards": {"sizes": [32], "workers": 1},
    "classifier": {"size": 32, "epochs": 1, "batch_size": 16, "accumulation": 1, "bootstrap": 20, "blank": "zeros"},
    "report_adapter": {"size": 32, "max_steps": 2, "batch_size": 2, "accumulation": 1, "max_train_pairs": 8},
    "generated_reports": {"max_new_tokens": 4, "max_test_pairs": 4, "batch_size": 4},
}
LOCATION = {"repositoryLocationName": "cxr_pipeline.definitions", "repositoryName": "__repository__"}
RUNS = """query { runsOrError(limit: 500) { ... on Runs { results {
  runId status startTime endTime tags { key value } assetSelection { path } } } } }"""
ACTIVE = {"QUEUED", "NOT_STARTED", "STARTING", "STARTED", "CANCELING", "MANAGED"}


class Dagster:
    def __init__(self, port: int):
        self.gql = f"http://127.0.0.1:{port}/graphql"

    def runs(self) -> list[dict]:
        out = []
        for r in post(self.gql, {"query": RUNS})["data"]["runsOrError"]["results"]:
            tags = {t["key"]: t["value"] for t in r["tags"]}
            keys = sorted("/".join(a["path"]) for a in (r["assetSelection"] or []))
            out.append({**r, "tags": tags, "keys": keys, "partition": tags.get("dagster/partition")})
        return out

    def observe(self) -> str:
        body = {
            "query": """mutation($p: ExecutionParams!) { launchRun(executionParams: $p) {
              __typename ... on LaunchRunSuccess { run { runId } } ... on PythonError { message } } }""",
            "variables": {"p": {"selector": {**LOCATION, "jobName": "observe_raw"}, "runConfigData": {}}},
        }
        res = post(self.gql, body)["data"]["launchRun"]
        assert res["__typename"] == "LaunchRunSuccess", res
        return res["run"]["runId"]

    def sensor_ticks(self) -> int:
        query = """query { sensorOrError(sensorSelector: {repositoryLocationName: "cxr_pipeline.definitions",
                   repositoryName: "__repository__", sensorName: "automation"}) {
                   ... on Sensor { sensorState { ticks(limit: 1000) { status error { message } } } } } }"""
        ticks = post(self.gql, {"query": query})["data"]["sensorOrError"]["sensorState"]["ticks"]
        failed = [t for t in ticks if t["status"] == "FAILURE"]
        assert not failed, failed[0]["error"]
        return sum(t["status"] != "STARTED" for t in ticks)  # the evaluations that finished

    def settle(self, known: set[str], quiet: float, deadline: float, log, ticks: int = 2) -> list[dict]:
        """Wait until no run is active and nothing new started for ``quiet`` seconds and ``ticks`` finished automation
        evaluations (on a loaded machine one can take 30 s: a fixed quiet time let the test stop while the evaluation
        that would request the next run was under way); two suffice: the second began after the first had finished,
        so after the last change. The runs not in ``known``."""
        last_change, seen, ticks_then = time.time(), None, self.sensor_ticks()
        while time.time() < deadline:
            runs = [r for r in self.runs() if r["runId"] not in known]
            state = sorted((r["runId"], r["status"]) for r in runs)
            if state != seen:
                seen, last_change, ticks_then = state, time.time(), self.sensor_ticks()
            quiet_for = time.time() - last_change
            if not any(r["status"] in ACTIVE for r in runs) and quiet_for >= quiet and self.sensor_ticks() - ticks_then >= ticks:
                return sorted(runs, key=lambda r: r["startTime"] or 0)
            time.sleep(2)
        raise AssertionError(f"automation did not settle: {[(r['keys'], r['partition'], r['status']) for r in runs]}\n{log()}")


def materialized(runs: list[dict]) -> Counter:
    """How many runs materialized each (asset, partition)."""
    return Counter((k, r["partition"]) for r in runs for k in r["keys"] if k != "raw_mimic_cxr")


@pytest.mark.solo  # its runs are processes of their own: on one core beside another worker, 637 s instead of 343 s
@pytest.mark.slow(minutes=6)
def test_one_data_change_runs_each_asset_once_with_current_inputs(tmp_path):
    raw, home = tmp_path / "raw", tmp_path / "home"
    layout = Paths(home=home, raw=raw)
    generate(SynthConfig(patients=8, seed=11, source_rows=48), raw)
    write_pipeline_config(layout, TINY, "test configuration")
    env = {
        **os.environ,
        "CXR_HOME": str(home),
        "CXR_RAW_DIR": str(raw),
        "DAGSTER_HOME": str(layout.dagster_home),
        "CXR_AUTOMATION_INTERVAL": str(INTERVAL),
        "CXR_OBSERVE_CRON": "0 0 1 1 *",  # the test observes by launching the observation job itself
        "CXR_EXECUTOR": "in_process",
        "HF_HUB_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
    }
    env.pop("MLFLOW_TRACKING_URI", None)
    # the state `make demo` leaves: every asset materialized in order, the source observed
    script = "from cxr_pipeline.demo import ensure_dagster_home, run_all; ensure_dagster_home(); raise SystemExit(0 if run_all() else 1)"
    done = subprocess.run([sys.executable, "-c", script], env=env, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]

    port = free_port()
    log = tmp_path / "dagster.log"
    proc = start([str(BIN / "dagster"), "dev", "-w", str(ROOT / "workspace.yaml"), "-h", "127.0.0.1", "-p", str(port)], env, log)
    try:
        wait_http(f"http://127.0.0.1:{port}/server_info", 180, proc, log)
        d = Dagster(port)
        tail = lambda: log.read_text()[-4000:]  # noqa: E731
        deadline = time.time() + 120
        while d.sensor_ticks() < 2 and time.time() < deadline:  # the daemon's first evaluations record the state
            time.sleep(1)
        known = {r["runId"] for r in d.runs()}

        # 1. an observation of unchanged data starts nothing
        observed = d.observe()
        quiet = d.settle(known, INTERVAL, time.time() + 180, tail)
        assert [r["runId"] for r in quiet] == [observed] and quiet[0]["status"] == "SUCCESS"
        known |= {observed}

        # 2. new patients: each asset once, after its inputs
        before = partition_fingerprints(pl.read_parquet(layout.manifest))
        generate(SynthConfig(patients=12, seed=11, source_rows=48), raw)
        observed = d.observe()
        runs = d.settle(known, INTERVAL, time.time() + 1500, tail)
        after = partition_fingerprints(pl.read_parquet(layout.manifest))
        changed = {p for p in after if after[p] != before[p]}
        assert changed and len(changed) < len(after)
        assert [r for r in runs if r["status"] != "SUCCESS"] == []
        counts = materialized(runs)
        expected = Counter({("manifest", None): 1, ("manifest_rejects", None): 1})
        expected.update({(k, p): 1 for p in changed for k in ("image_shards", "shard_rejects")})
        expected.update({("classifier", s): 1 for s in SLUGS})
        expected.update(
            {
                (k, None): 1
                for k in ("multilabel_classifier", "report_hints", "classifier_metrics", "classifier_predictions", "subgroup_metrics")
            }
        )
        expected.update({(k, None): 1 for k in ("report_pairs", "report_adapter", "generated_reports", "report_metrics")})
        assert counts == expected, f"runs: {[(r['keys'], r['partition']) for r in runs]}"

        # ... in order: nothing started before what it reads had finished
        def last_end(key):
            return max(r["endTime"] for r in runs if key in r["keys"])

        def first_start(key):
            return min(r["startTime"] for r in runs if key in r["keys"])

        order = [
            ("manifest", "image_shards"),
            ("manifest", "report_pairs"),
            ("image_shards", "classifier"),
            ("classifier", "classifier_predictions"),
            ("image_shards", "multilabel_classifier"),
            ("multilabel_classifier", "classifier_metrics"),
            ("classifier_metrics", "subgroup_metrics"),
            ("multilabel_classifier", "report_adapter"),
            ("classifier_predictions", "report_adapter"),
            ("image_shards", "report_adapter"),
            ("report_pairs", "report_adapter"),
            ("report_adapter", "generated_reports"),
            ("generated_reports", "report_metrics"),
        ]
        for parent, child in order:
            assert last_end(parent) <= first_start(child), f"{child} started before {parent} finished"
        known |= {r["runId"] for r in runs}

        # 3. observed again, unchanged: nothing
        observed = d.observe()
        quiet = d.settle(known, INTERVAL, time.time() + 180, tail)
        assert [r["runId"] for r in quiet] == [observed]
    finally:
        stop(proc)
    assert proc.poll() is not None
