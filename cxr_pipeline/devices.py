"""One GPU per step: which devices the pipeline may use, and a lease on one of them for the life of a step.

On one host, Dagster's ``gpu`` pool limits how many GPU steps run at once (its limit follows the device
count, ``defs.slots.sync_gpu_pool``), but it does not say *which* GPU a step may use: without more, every
step would land on ``cuda:0``. So where there are several devices each GPU step leases one here: an
exclusive ``flock`` on ``gpu-<id>.lock`` in a node-local folder (``lock_dir``: ``CXR_LOCK_DIR``, else the
system's temporary folder; never ``CXR_HOME``, a volume a cluster shares, where every pod would queue
behind the same ``gpu-0``), tried in device order. The kernel drops a lock when its process exits,
however it exits (``kill -9``, the OOM killer), so a crashed step can never keep a device. A step that
finds every device leased waits for one (the pool makes that rare: it admits N steps).

The lease decides something only there. With one device there is nothing to choose; on a cluster
(``CXR_EXECUTOR`` ``k8s``) the engine gave the step its device (the pod's ``nvidia.com/gpu``), so the
step uses the first device it sees and takes no lock.

``CXR_GPUS`` names the devices: a count (``4``: ``0..3``) or a list of CUDA ordinals (``0,2,5``);
empty: every device torch sees. On a CPU host it simulates a device list (the tests run two
classifier steps at once and see them leased different slots); the step still computes on the CPU.
"""

from __future__ import annotations

import fcntl
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cxr_pipeline.settings import cluster_executor, env


def gpu_ids() -> list[int]:
    """The CUDA ordinals the pipeline may use (``CXR_GPUS``, else every device torch sees; [] on a CPU host)."""
    spec = env("CXR_GPUS").strip()
    if not spec:
        import torch

        return list(range(torch.cuda.device_count()))
    try:
        ids = [int(x) for x in spec.split(",")] if "," in spec else list(range(int(spec)))
    except ValueError:
        raise ValueError(f"CXR_GPUS must be a count (4) or a list of CUDA ordinals (0,2,5), not {spec!r}") from None
    if any(i < 0 for i in ids) or len(set(ids)) != len(ids):
        raise ValueError(f"CXR_GPUS: ordinals must be distinct and not negative, not {spec!r}")
    return ids


def gpu_slots() -> int:
    """How many GPU steps may run at once: one per device, and one on a host without any."""
    return max(1, len(gpu_ids()))


@dataclass
class Lease:
    """A device held by this process until ``release`` or exit."""

    ordinal: int | None  # the CUDA ordinal; None on a host without devices (no lease needed)
    fd: int | None = None

    def device(self, kind: str) -> str:
        """The torch device for a step of this ``kind`` (``cuda`` or ``cpu``) on this lease."""
        return f"cuda:{self.ordinal}" if kind == "cuda" and self.ordinal is not None else kind

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing the descriptor drops the flock
            self.fd = None


def lock_dir() -> Path:
    """Where the device locks live: node-local (``CXR_LOCK_DIR``, else the system's temporary folder)."""
    import tempfile

    return Path(env("CXR_LOCK_DIR") or Path(tempfile.gettempdir()) / "cxr_pipeline-gpu-locks")


def lease(locks: Path | None = None, wait_s: float = 24 * 3600, say: Callable[[str], None] | None = None, poll_s: float = 1.0) -> Lease:
    """Lease the first free device of ``gpu_ids()`` (locks in ``locks``, default ``lock_dir()``), waiting (up to
    ``wait_s``) while all are leased; no lock where there is nothing to decide (no device, one device, or a
    cluster engine that gave the step its device)."""
    ids = gpu_ids()
    if not ids:
        return Lease(None)
    if len(ids) == 1 or cluster_executor():
        return Lease(ids[0] if len(ids) == 1 else 0)
    lock_dir_ = locks or lock_dir()
    lock_dir_.mkdir(parents=True, exist_ok=True)
    deadline, told = time.monotonic() + wait_s, False
    while True:
        for i in ids:
            fd = os.open(lock_dir_ / f"gpu-{i}.lock", os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                continue
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())  # who holds it, for a person looking
            return Lease(i, fd)
        if time.monotonic() > deadline:
            raise TimeoutError(f"no free GPU among {ids} after {wait_s:.0f} s (locks in {lock_dir_})")
        if say and not told:
            say(f"every GPU of {ids} is leased; waiting for one")
            told = True
        time.sleep(poll_s)


def placement() -> dict[str, str]:
    """Where this step runs: the node (the Ray node id in a Ray job, else the host name) and the GPUs it was
    given (``CUDA_VISIBLE_DEVICES`` as the engine set it; empty: none set). Recorded with a GPU step's
    materialization, so a cluster run shows which device on which node computed what."""
    import socket

    node = socket.gethostname()
    if os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR"):  # a Ray job's driver (dagster-ray's ray_executor)
        node = _ray_node_id() or node
    return {"node": node, "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES", "")}


def _ray_node_id() -> str | None:
    """The Ray node this process runs under: the ``--node_id`` of the raylet above it (a Ray job's driver is
    the child of its supervisor, a worker of that node's raylet). Read from the process tree rather than
    ``ray.init``: a driver connects to a raylet by IP address, which names the wrong node when several share
    one (a local multi-node cluster), and connecting costs a second."""
    import psutil

    proc = psutil.Process()
    while proc is not None:
        args = proc.cmdline() if proc.name() == "raylet" else []
        for arg in args:
            if arg.startswith("--node_id="):
                return arg.split("=", 1)[1]
        proc = proc.parent()
    return None
