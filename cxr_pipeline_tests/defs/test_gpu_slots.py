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
