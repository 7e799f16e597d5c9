"""A real cluster run (#34): classifier steps on a local Ray cluster of two nodes (two raylets, each its own
ports, each declaring one GPU), submitted by dagster-ray's ``ray_executor`` (``CXR_EXECUTOR=ray``). Ray gives
each step its GPU (``CUDA_VISIBLE_DEVICES``); the step computes on the CPU here, where torch sees no CUDA.
Then the second node is lost (``kill -9``) while a step trains there: Dagster's retry re-runs the step on the
head, which resumes from the step's checkpoint. The cluster is started and stopped here, on loopback only.

What this does not show: a real GPU, or nodes on separate machines (a shared file system instead of one disk)."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import dagster as dg
import pytest

from cxr_pipeline.local_ray import HEAD_ONLY, Cluster, classifier_inputs, materialize_cmd, set_gpu_pool, two_node_cluster
from cxr_pipeline.settings import Paths, write_pipeline_config
from cxr_pipeline.vision.checkpoint import ClassifierSet
from cxr_pipeline_tests.services import ROOT

TINY = {
    "manifest": {"views": [], "one_image_per_subject": False},
    "image_shards": {"sizes": [32], "workers": 1},
    "classifier": {"size": 32, "epochs": 1, "batch_size": 16, "accumulation": 1, "bootstrap": 20, "blank": "zeros"},
    "compute": {"threads": 1},  # two steps at once on this 2-core machine, one core each
}
PARTITIONS = ("support_devices", "no_finding", "lung_opacity", "pleural_effusion")


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    with two_node_cluster() as c:
        yield c


@dataclass
class Home:
    layout: Paths
    env: dict  # what a run on the cluster is started with (CXR_EXECUTOR=ray)


@pytest.fixture(scope="module")
def home(cluster, replica, tmp_path_factory) -> Home:
    """The test's CXR_HOME with the classifiers' inputs built on one host (the manifest, ten shard partitions)."""
    layout = Paths(home=tmp_path_factory.mktemp("ray") / "home", raw=replica)
    base = {**cluster.env, **classifier_inputs(layout, TINY)}
    assert base["DAGSTER_HOME"] == str(layout.dagster_home), "DAGSTER_HOME is set: the test would use that instance"
    set_gpu_pool(base, 2)
    return Home(layout, {**base, "CXR_EXECUTOR": "ray", "RAY_ADDRESS": cluster.address})


def _materialize(env: dict, partition: str) -> subprocess.CompletedProcess:
    return subprocess.run(materialize_cmd(partition), env=env, cwd=ROOT, capture_output=True, text=True, timeout=1200)


def _latest(instance: dg.DagsterInstance, partition: str) -> tuple[dict, str]:
    """The latest classifier materialization of ``partition``: its metadata values and its run id."""
    (rec,) = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey("classifier"), asset_partitions=[partition]), limit=1
    ).records
    return {k: v.value for k, v in rec.asset_materialization.metadata.items()}, rec.event_log_entry.run_id


def _step_span(instance: dg.DagsterInstance, run_id: str) -> tuple[float, float]:
    """When the classifier step of a run computed: its STEP_START and STEP_SUCCESS, as the step process logged them."""
    events = instance.all_logs(run_id, of_type={dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS})
    times = {e.dagster_event_type: e.timestamp for e in events}
    return times[dg.DagsterEventType.STEP_START], times[dg.DagsterEventType.STEP_SUCCESS]


def _ray_jobs(address: str, wait: float = 60) -> list:
    """The classifier steps' Ray jobs, once each has reported its end (a job ends a moment after its driver)."""
    from ray.job_submission import JobSubmissionClient

    client, deadline = JobSubmissionClient(address), time.time() + wait
    while True:
        jobs = [j for j in client.list_jobs() if (j.metadata or {}).get("dagster/op") == "classifier"]
        if all(j.status.is_terminal() for j in jobs) or time.time() > deadline:
            return jobs
        time.sleep(1)


@pytest.mark.slow(minutes=2.9)
def test_classifier_steps_on_two_ray_nodes_each_on_its_own_device(cluster, home, monkeypatch):
    from ray.job_submission import JobStatus

    monkeypatch.setenv("DAGSTER_HOME", str(home.layout.dagster_home))  # this process reads the same instance
    # four classifier partitions at once on the cluster: two compute (one per declared GPU), the others wait
    with ThreadPoolExecutor(len(PARTITIONS)) as threads:
        results = list(threads.map(lambda p: _materialize(home.env, p), PARTITIONS))
    assert all(r.returncode == 0 for r in results), [r.stderr[-2000:] for r in results if r.returncode]
    jobs = _ray_jobs(cluster.address)
    assert len(jobs) == len(PARTITIONS) and all(j.status == JobStatus.SUCCEEDED for j in jobs), [(j.submission_id, j.status) for j in jobs]
    with dg.DagsterInstance.get() as instance:
        on_ray = {p: _latest(instance, p) for p in PARTITIONS}
        spans = {p: _step_span(instance, run_id) for p, (_, run_id) in on_ray.items()}
    # both nodes computed; at most two steps at once (one per declared GPU); a device is (node, GPU id), and
    # steps that overlapped never shared one
    nodes = cluster.node_ids()
    devices = {p: (md["node"], md["cuda_visible_devices"]) for p, (md, _) in on_ray.items()}
    assert {node for node, _ in devices.values()} == set(nodes.values()) and all(gpu != "" for _, gpu in devices.values())
    assert {j.driver_node_id for j in jobs} == set(nodes.values())  # as Ray itself reports it
    assert max(sum(1 for s, e in spans.values() if s <= t < e) for t, _ in spans.values()) <= 2
    for a in PARTITIONS:
        for b in PARTITIONS:
            if a != b and spans[a][0] < spans[b][1] and spans[b][0] < spans[a][1]:
                assert devices[a] != devices[b], (a, b, devices)

    # the same partitions on one host (in this process): the same metrics (thread counts may differ)
    from cxr_pipeline.definitions import build_defs

    for k, v in home.env.items():
        if k.startswith(("CXR_", "DAGSTER_", "MLFLOW_")):
            monkeypatch.setenv(k, v)
    monkeypatch.setenv("CXR_EXECUTOR", "in_process")
    job = build_defs().resolve_job_def("classifier_job")
    with dg.DagsterInstance.get() as instance:
        for p in PARTITIONS:
            assert job.execute_in_process(instance=instance, partition_key=p).success
        one_host = {p: _latest(instance, p) for p in PARTITIONS}
    for p in PARTITIONS:
        (ray_md, ray_run), (host_md, host_run) = on_ray[p], one_host[p]
        assert host_run != ray_run
        a, b = ray_md["roc_auc"], host_md["roc_auc"]
        assert (a != a and b != b) or abs(a - b) <= 0.005, (p, a, b)


@pytest.mark.slow(minutes=1.2)
def test_a_lost_node_s_step_is_retried_on_the_surviving_node_and_resumes(cluster, home, monkeypatch):
    from mlflow import MlflowClient
    from ray.job_submission import JobStatus, JobSubmissionClient

    from cxr_pipeline.tracking import get_client
    from cxr_pipeline.vision.registry import registered_name

    partition = "edema"
    # long enough to be killed mid-training: an epoch checkpoint first, then many more epochs to go
    write_pipeline_config(home.layout, {**TINY, "classifier": {**TINY["classifier"], "epochs": 6, "patience": 6}}, "lost node")
    nodes = cluster.node_ids()
    assert set(nodes) == {"head", "worker"}, "the previous test left a node down"
    ray = JobSubmissionClient(cluster.address)
    # the head's GPU is taken, so Ray places the step on the worker
    hold = ray.submit_job(entrypoint="sleep 3600", entrypoint_num_gpus=1, entrypoint_resources={HEAD_ONLY: 1})
    deadline = time.time() + 60
    while ray.get_job_status(hold) != JobStatus.RUNNING and time.time() < deadline:
        time.sleep(0.5)
    resume = ClassifierSet.of(home.layout).classifier(partition).resume
    run = subprocess.Popen(materialize_cmd(partition), env=home.env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 300
        while not resume.exists() and run.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        assert resume.exists(), "the step wrote no epoch checkpoint"
        (step,) = [j for j in _ray_jobs(cluster.address, wait=0) if not j.status.is_terminal()]
        assert step.driver_node_id == nodes["worker"]
        assert cluster.kill_worker() >= 2  # the raylet and the step's driver at least
        ray.stop_job(hold)  # the head's GPU is free for the retry
        out, _ = run.communicate(timeout=900)
    finally:
        if run.poll() is None:
            run.kill()
    assert run.returncode == 0, out[-4000:]

    monkeypatch.setenv("DAGSTER_HOME", str(home.layout.dagster_home))
    with dg.DagsterInstance.get() as instance:
        md, run_id = _latest(instance, partition)
        retries = instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_UP_FOR_RETRY)
    assert len(retries) == 1  # the lost attempt, noticed by dagster-ray's health check of its Ray job
    assert "failed health check" in retries[0].dagster_event.event_specific_data.error.message
    assert md["node"] == nodes["head"] and md["resumed_from_epoch"] >= 1  # on the surviving node, from the checkpoint
    assert not resume.exists()  # finished: the next materialization trains afresh
    monkeypatch.setenv("CXR_HOME", str(home.layout.home))
    client, _ = get_client()
    assert isinstance(client, MlflowClient)
    versions = client.search_model_versions(f"name = '{registered_name(partition)}'")
    assert len(versions) == 1  # the killed attempt registered nothing
