"""GPU pool slots: on one host the limit follows the device count, and a run whose worker is gone gives its
slots back. On a cluster (``CXR_EXECUTOR`` ``k8s``) the deployment owns the limit and the code never writes it:
every process that loads the code there (the code server, each step's pod, the daemon's sensor) sees no GPU
or one, and would set the limit of the whole cluster to 1.

Dagster frees a run's pool slots once the run is over (``run_monitoring.free_slots_after_run_end_seconds``),
but a run whose worker process was killed (``kill -9``, the OOM killer) is never over: nobody is left
to report its end, the default run launcher cannot see that the process is gone, and its ``gpu`` slot
stays taken, so every later GPU step waits forever. Each GPU step therefore records its run worker
(host, pid, process start time) as a run tag, and ``release_dead_runs`` marks failed, with the reason,
every in-progress run holding or waiting for a pool slot whose recorded worker no longer exists on this
host, and frees its slots. A run killed before its GPU step began has no such tag: killed while its step
waited for the slot, its queued step is later *given* the freed slot (Dagster assigns a freed slot to the
oldest waiting step) and keeps it for good. For such a run on this host (the default run launcher, or a
run executed in process) the worker is the process its executor named when the run started: Dagster
logs it as an engine event ("Executing steps in process (pid: N)", "Started process for run (pid: N)").
The sweep runs in the daemon (``dead_run_sensor``), when the code location loads
(``dagster dev``/``make ui`` start, and every ``dagster asset materialize``, which so finds a slot held
by a dead run, says so and frees it). A worker on another host
(a Kubernetes pod) is left to dagster-k8s' run monitoring.
"""

from __future__ import annotations

import multiprocessing
import os
import socket

import dagster as dg

from cxr_pipeline.devices import gpu_slots
from cxr_pipeline.settings import cluster_executor

GPU_POOL = "gpu"
WORKER_TAG = "cxr/run_worker"


def worker_tag() -> str:
    """``host:pid:start`` of this step's run worker: the step process itself when steps run in the run's
    process, else its parent (the multiprocess executor starts each step as a child of the run worker)."""
    import psutil

    pid = os.getppid() if multiprocessing.parent_process() is not None else os.getpid()
    return f"{socket.gethostname()}:{pid}:{psutil.Process(pid).create_time():.3f}"


def record_run_worker(instance: dg.DagsterInstance, run_id: str) -> None:
    """Tag the run with its worker (``worker_tag``), once."""
    run = instance.get_run_by_id(run_id)
    if run is not None and WORKER_TAG not in run.tags:
        instance.add_run_tags(run_id, {WORKER_TAG: worker_tag()})


def worker_gone(tag: str) -> bool:
    """True when the recorded worker ran on this host and that process (same pid, same start) is gone.

    ``start`` is the process's start time, or ``<=T`` where only a time it had started by is known (``run_worker``)."""
    import psutil

    host, pid, start = tag.rsplit(":", 2)
    if host != socket.gethostname():
        return False
    try:
        created = psutil.Process(int(pid)).create_time()
    except psutil.NoSuchProcess:
        return True
    if start.startswith("<="):
        return created > float(start[2:]) + 0.01  # started after the run's worker named itself: the pid was reused
    return abs(created - float(start)) > 0.01  # pid reused by another process


def run_worker(instance: dg.DagsterInstance, run: dg.DagsterRun) -> str | None:
    """The run's worker as ``worker_gone`` reads it: the tag its GPU step recorded; else, where every run of this
    instance runs on this host (the default run launcher; not a cluster), the first process a run event names
    (its executor's, or the run launcher's worker), as started by that event's time; else None (unknown)."""

    if WORKER_TAG in run.tags:
        return run.tags[WORKER_TAG]
    if cluster_executor() or not isinstance(instance.run_launcher, dg.DefaultRunLauncher):
        return None  # a worker in another container or pod: its pid means nothing here
    records = instance.get_records_for_run(run.run_id, of_type=dg.DagsterEventType.ENGINE_EVENT, limit=50).records
    for record in records:
        data = record.event_log_entry.dagster_event.event_specific_data
        pid = (getattr(data, "metadata", None) or {}).get("pid")
        if pid is not None:
            return f"{socket.gethostname()}:{pid.value}:<={record.event_log_entry.timestamp}"
    return None


def sync_gpu_pool(instance: dg.DagsterInstance) -> int | None:
    """On one host, set the ``gpu`` pool's limit to the devices the pipeline may use (``devices.gpu_slots``) and
    return it; on a cluster leave the deployment's limit alone and return None."""

    if cluster_executor():
        return None
    n = gpu_slots()
    storage = instance.event_log_storage
    if storage.get_concurrency_info(GPU_POOL).slot_count != n:
        storage.set_concurrency_slots(GPU_POOL, n)
    return n


def release_dead_runs(instance: dg.DagsterInstance, log=None) -> list[str]:
    """Fail the in-progress runs holding or awaiting a pool slot whose worker is gone, and free their slots.

    Also frees the slots of runs already over (what run monitoring would do a minute later). Returns the
    ids of the runs it marked failed.
    """
    say = log or (lambda _m: None)
    storage = instance.event_log_storage
    run_ids: set[str] = set()
    for key in storage.get_concurrency_keys():
        info = storage.get_concurrency_info(key)
        run_ids |= {s.run_id for s in info.claimed_slots} | {s.run_id for s in info.pending_steps}
    failed = []
    for run_id in sorted(run_ids):
        run = instance.get_run_by_id(run_id)
        if run is not None and not run.is_finished:
            tag = run_worker(instance, run)
            if tag is None or not worker_gone(tag):
                continue
            reason = f"its run worker (pid {tag.rsplit(':', 2)[1]} on {socket.gethostname()}) is gone: killed or out of memory"
            instance.report_run_failed(run, message=f"Marked failed by cxr_pipeline: {reason}; its pool slots are freed.")
            failed.append(run_id)
            say(f"run {run_id}: {reason}; marked failed and its pool slots freed")
        storage.free_concurrency_slots_for_run(run_id)
    return failed


@dg.sensor(
    name="dead_run_sensor",
    minimum_interval_seconds=30,
    default_status=dg.DefaultSensorStatus.RUNNING,
    description="Every 30 s: runs whose worker process is gone are marked failed and their GPU pool slots freed; "
    "on one host the gpu pool's limit is kept at the device count (on a cluster the deployment sets it).",
)
def dead_run_sensor(context: dg.SensorEvaluationContext) -> dg.SkipReason:
    sync_gpu_pool(context.instance)
    failed = release_dead_runs(context.instance, context.log.warning)
    return dg.SkipReason(f"released {len(failed)} dead run(s)" if failed else "no dead runs")


def release_on_load() -> None:
    """At code-location load: the same sweep, when a persistent instance is configured; never fails the load."""
    import sys
    import warnings

    # a multiprocess executor's step is a child of its run worker, which swept when it loaded the code
    if not os.environ.get("DAGSTER_HOME") or multiprocessing.parent_process() is not None:
        return
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with dg.DagsterInstance.get() as instance:
                sync_gpu_pool(instance)
                release_dead_runs(instance, lambda m: print(f"cxr_pipeline: {m}", file=sys.stderr))
    except Exception as e:  # an instance that cannot be opened here is reported by Dagster itself
        print(f"cxr_pipeline: dead-run sweep skipped: {type(e).__name__}: {e}", file=sys.stderr)
