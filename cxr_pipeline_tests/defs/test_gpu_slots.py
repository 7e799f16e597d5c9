"""One GPU per step on a multi-GPU host, simulated on the CPU with ``CXR_GPUS``."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import dagster as dg
import pytest

# a GPU step as Dagster runs it: the Compute resource set up for the step, the device asked for, held a while
STEP = """
import sys, time
import dagster as dg
from cxr_pipeline.defs.resources import Compute
from cxr_pipeline.settings import paths
with dg.build_resources({"compute": Compute(device="cuda")}) as r:
    print(f"{time.time():.3f} {r.compute.resolved(paths()).device}", flush=True)
    time.sleep(float(sys.argv[1]))
"""


# a run with one step in the gpu pool, executed in process as ``dagster asset materialize`` and the demo do
POOL_RUN = """
import sys, time
from pathlib import Path
import dagster as dg

@dg.op(pool="gpu")
def gpu_step():  # holds the slot until the file named by argv[1] exists ("-": not at all)
    deadline = time.time() + 300
    while sys.argv[1] != "-" and not Path(sys.argv[1]).exists() and time.time() < deadline:
        time.sleep(0.05)

@dg.job
def gpu_job():
    gpu_step()

with dg.DagsterInstance.get() as instance:
    print(gpu_job.execute_in_process(instance=instance).success, flush=True)
"""


def _step(hold_s: float) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", STEP, str(hold_s)], stdout=subprocess.PIPE, text=True, env={**os.environ})


def test_concurrent_gpu_steps_are_given_different_devices_and_a_third_waits(cxr_home, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_GPUS", "2")
    monkeypatch.setenv("CXR_LOCK_DIR", str(tmp_path / "locks"))
    first, second = _step(6), _step(6)
    time.sleep(2)  # both hold their device
    started = time.time()
    third = _step(0)
    outs = [p.communicate(timeout=120)[0].split() for p in (first, second, third)]
    assert all(p.returncode == 0 for p in (first, second, third))
    assert {outs[0][1], outs[1][1]} == {"cuda:0", "cuda:1"}  # told different devices
    assert float(outs[2][0]) - started > 2.5  # the third waited for one of them to finish
    assert outs[2][1] in ("cuda:0", "cuda:1")


def test_a_killed_step_never_keeps_its_device(cxr_home, monkeypatch, tmp_path):
    monkeypatch.setenv("CXR_GPUS", "2")  # several devices: the step leases one (with one there is nothing to lease)
    monkeypatch.setenv("CXR_LOCK_DIR", str(tmp_path / "locks"))
    holder = _step(600)
    assert holder.stdout.readline().split()[1] == "cuda:0"
    holder.kill()  # SIGKILL: no teardown runs; the kernel drops the lock with the process
    holder.wait()
    nxt = _step(0)
    assert nxt.communicate(timeout=60)[0].split()[1] == "cuda:0"


def test_gpu_pool_limit_follows_the_device_count(monkeypatch):
    from cxr_pipeline.defs.slots import GPU_POOL, sync_gpu_pool
    from cxr_pipeline.devices import gpu_ids

    monkeypatch.setenv("CXR_GPUS", "0,2,5")
    assert gpu_ids() == [0, 2, 5]
    with dg.DagsterInstance.ephemeral() as instance:
        assert sync_gpu_pool(instance) == 3 and instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 3
        monkeypatch.setenv("CXR_GPUS", "8")
        assert sync_gpu_pool(instance) == 8 and instance.event_log_storage.get_concurrency_info(GPU_POOL).slot_count == 8
    monkeypatch.setenv("CXR_GPUS", "two")
    with pytest.raises(ValueError, match="CXR_GPUS must be a count"):
        gpu_ids()


def _wait_for(check, what: str, timeout: float = 60):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if found := check():
            return found
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout} s: {what}")


def test_a_run_killed_while_its_step_waits_for_the_slot_never_keeps_it(monkeypatch, tmp_path):
    """Killed while waiting, a run's queued step is later given the freed slot and, with nobody to claim or free it,
    would keep it for good; the run was killed before any GPU step began, so it carries no worker tag."""
    from cxr_pipeline.defs.slots import GPU_POOL, WORKER_TAG, release_dead_runs
    from cxr_pipeline_tests.services import ROOT

    (tmp_path / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())  # the project's instance: a gpu pool of 1
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    run = lambda until: subprocess.Popen([sys.executable, "-c", POOL_RUN, until], stdout=subprocess.PIPE, text=True)  # noqa: E731
    release = tmp_path / "release"  # the holder keeps the slot until this exists: no race with the waiter's start
    with dg.DagsterInstance.get() as instance:
        storage = instance.event_log_storage
        holder = run(str(release))
        (held,) = _wait_for(lambda: storage.get_concurrency_info(GPU_POOL).claimed_slots, "the first run holds the slot")
        waiter = run("-")
        (waiting,) = _wait_for(
            lambda: [s for s in storage.get_concurrency_info(GPU_POOL).pending_steps if s.run_id != held.run_id], "a second waits"
        )
        waiter.kill()  # SIGKILL while it waits: nobody is left to report its end
        waiter.wait()
        release.touch()
        assert holder.communicate(timeout=60)[0].strip() == "True"
        # Dagster gave the freed slot to the dead run's queued step: nobody else can have it now
        assigned = _wait_for(
            lambda: [
                s for s in storage.get_concurrency_info(GPU_POOL).pending_steps if s.run_id == waiting.run_id and s.assigned_timestamp
            ],
            "the freed slot assigned to the dead run's step",
        )
        assert assigned and WORKER_TAG not in instance.get_run_by_id(waiting.run_id).tags
        assert not storage.has_unassigned_slots(GPU_POOL)

        assert release_dead_runs(instance) == [waiting.run_id]  # its worker found from the run's own events
        assert instance.get_run_by_id(waiting.run_id).status == dg.DagsterRunStatus.FAILURE
        assert storage.has_unassigned_slots(GPU_POOL)
        assert release_dead_runs(instance) == []  # the finished holder and a live process are left alone
        nxt = run("-")
        assert nxt.communicate(timeout=60)[0].strip() == "True"  # the next GPU step starts


def test_a_one_step_run_imports_what_its_step_will_import_before_the_step_starts(tmp_path, monkeypatch, cxr_home):
    """The compute resource, set up before the step (and, in process, before it waits for its slot), imports the
    modules the step's ``cxr/warm`` tag names; a run of several steps leaves each step to import its own; the
    project's GPU steps carry their lists."""
    from cxr_pipeline.definitions import defs
    from cxr_pipeline.defs.needs import CNN, VLM, WARM_TAG
    from cxr_pipeline.defs.resources import Compute

    for name in ("warm_probe_a", "warm_probe_b", "warm_probe_c"):
        (tmp_path / f"{name}.py").write_text("")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen: dict[str, bool] = {}

    def asset_importing(module: str):
        @dg.asset(name=module.replace("warm_probe_", "step_"), op_tags={WARM_TAG: module}, required_resource_keys={"compute"})
        def step() -> None:
            seen[module] = module in sys.modules  # before the step imports it itself

        return step

    a, b, c = (asset_importing(m) for m in ("warm_probe_a", "warm_probe_b", "warm_probe_c"))
    instance = dg.DagsterInstance.ephemeral()
    resources = {"compute": Compute()}
    assert dg.materialize([a], instance=instance, resources=resources).success
    assert dg.materialize([b, c], instance=instance, resources=resources).success
    assert seen == {"warm_probe_a": True, "warm_probe_b": False, "warm_probe_c": False}

    graph = defs.resolve_asset_graph()
    tags = {  # every asset a step materializes (pacs_results is external: the sensor reports it, no step runs)
        k.to_user_string(): defs.resolve_assets_def(k).op.tags.get(WARM_TAG, "")
        for k in graph.get_all_asset_keys()
        if graph.get(k).is_executable
    }
    assert tags["classifier"].split() == list(CNN.warm) and "mlflow.pyfunc" in CNN.warm
    assert tags["report_adapter"].split() == list(VLM.warm) and "transformers" in VLM.warm
    assert "mlflow.pyfunc" not in tags["report_hints"]  # fold models save no pyfunc: no MLflow package scan
