"""What an asset's step needs to run: a GPU or not, CPUs, memory, shared memory. Declared once, beside each
asset (``NEEDS`` in its module), and translated here into each executor's terms:

- one host (multiprocess, in-process): a GPU step takes a slot of Dagster's ``gpu`` pool (``defs.slots``);
- Kubernetes (``dagster-k8s/config``, read by dagster-k8s' ``k8s_job_executor`` and run launcher): CPU and
  memory requests, a memory limit, ``nvidia.com/gpu`` as a limit, the GPU node pool's tolerations and node
  selector (``CXR_K8S_GPU_TOLERATIONS``, ``CXR_K8S_GPU_NODE_SELECTOR``: they differ between clusters; NVIDIA's
  by default), and a memory-backed ``/dev/shm`` (the container default of 64 MB kills PyTorch loader workers);
- Ray (``dagster-ray/config``, read by dagster-ray's ``ray_executor``): the step's Ray job reserves
  ``num_cpus``, ``num_gpus`` and ``memory`` on the node Ray places it on, which gives it its GPU
  (``CUDA_VISIBLE_DEVICES``).

A GPU step also gets one retry: a lost node or an evicted pod re-runs it, and training resumes from its
checkpoint.

``warm``: the libraries the step imports inside its function (the package keeps torch, MLflow and the like out of
module heads, so that loading the code location stays light), carried as the ``cxr/warm`` op tag; the compute
resource imports them when the run starts (``resources.warm_up``), while a buffered run waits for its pool slot.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import dagster as dg

from cxr_pipeline.defs.slots import GPU_POOL
from cxr_pipeline.settings import env

SHM_VOLUME = "dshm"
WARM_TAG = "cxr/warm"


def _quantity(gib: float) -> str:
    """GiB as a Kubernetes quantity (whole MiB)."""
    return f"{round(gib * 1024)}Mi"


@dataclass(frozen=True)
class Needs:
    """One step's needs: ``gpus`` devices, ``cpus`` cores, ``memory_gib`` of memory, ``shm_gib`` of /dev/shm."""

    gpus: int = 0
    cpus: float = 1.0
    memory_gib: float = 2.0
    shm_gib: float = 0.0
    warm: tuple[str, ...] = ()

    def k8s_config(self) -> dict[str, Any]:
        """The ``dagster-k8s/config`` tag: the step pod's resources, GPU scheduling and shared memory."""
        requests = {"cpu": f"{self.cpus:g}", "memory": _quantity(self.memory_gib)}
        # CPU limit = request: the step sizes its threads and workers by its quota (settings.usable_cpus)
        limits: dict[str, str] = dict(requests)
        container: dict[str, Any] = {"resources": {"requests": requests, "limits": limits}}
        pod: dict[str, Any] = {}
        if self.gpus:
            limits["nvidia.com/gpu"] = str(self.gpus)
            pod["tolerations"] = json.loads(env("CXR_K8S_GPU_TOLERATIONS"))
            selector = json.loads(env("CXR_K8S_GPU_NODE_SELECTOR"))
            if selector:
                pod["node_selector"] = selector
        if self.shm_gib:
            container["volume_mounts"] = [{"name": SHM_VOLUME, "mount_path": "/dev/shm"}]
            pod["volumes"] = [{"name": SHM_VOLUME, "empty_dir": {"medium": "Memory", "size_limit": _quantity(self.shm_gib)}}]
        return {"container_config": container, **({"pod_spec_config": pod} if pod else {})}

    def ray_config(self) -> dict[str, Any]:
        """The ``dagster-ray/config`` tag: what the step's Ray job reserves (Ray's memory is in bytes)."""
        return {"num_cpus": self.cpus, "num_gpus": self.gpus, "memory": int(self.memory_gib * 2**30)}

    def tags(self) -> dict[str, Any]:
        """The op tags every executor reads its part of."""
        tags: dict[str, Any] = {"dagster-k8s/config": self.k8s_config(), "dagster-ray/config": self.ray_config()}
        return {**tags, WARM_TAG: " ".join(self.warm)} if self.warm else tags

    def asset_args(self) -> dict[str, Any]:
        """Decorator arguments of an asset with these needs: op tags; for a GPU step the ``gpu`` pool and one retry."""
        args: dict[str, Any] = {"op_tags": self.tags()}
        if self.gpus:
            args.update(pool=GPU_POOL, retry_policy=dg.RetryPolicy(max_retries=1, delay=10))
        return args


def failure(message: str) -> dg.Failure:
    """A step's failure that a retry cannot mend (an input not built, a configuration error, a broken manifest).
    Why: a GPU step is retried once after 10 s (``Needs.asset_args``), for a lost node or a killed process, and Dagster
    retries a ``Failure`` too unless it says otherwise; this one says so, and the step fails at once rather than
    after 10 s and the same error again. (A run the daemon launched may still be retried whole by ``dagster.yaml``'s
    ``run_retries``, which does not know the cause; it is left on for the failures a retry does mend.)"""
    return dg.Failure(message, allow_retries=False)


# What the project's steps need, by kind; each asset module names the one it uses (``NEEDS``).
TABLE = Needs(cpus=1, memory_gib=4)  # metrics, predictions, pairs, report metrics: polars over small tables
MANIFEST = Needs(cpus=1, memory_gib=8)  # MIMIC-CXR's CSVs (377k images) in polars
# what a torch step imports besides torch: 6-9 s of a fresh run's process on 2 cores (the daemon's runs are fresh)
_TORCH_STEP = ("torchvision", "sklearn.metrics", "mlflow")
# a classifier: loader workers, images resident or streamed; it saves an MLflow pyfunc and draws figures
CNN = Needs(gpus=1, cpus=4, memory_gib=16, shm_gib=8, warm=(*_TORCH_STEP, "mlflow.pyfunc", "matplotlib.pyplot", "captum.attr"))
# fold models (report_hints): trained and scored, no model saved
CNN_FOLDS = Needs(gpus=1, cpus=4, memory_gib=16, shm_gib=8, warm=_TORCH_STEP)
# the 11B base is loaded on the host before it is quantised
VLM = Needs(gpus=1, cpus=4, memory_gib=48, shm_gib=8, warm=(*_TORCH_STEP, "transformers", "peft"))


def shards(workers: int) -> Needs:
    """A shard partition: one CPU per decode worker (``image_shards.workers``) and memory for their decodes."""
    return Needs(cpus=workers, memory_gib=2 + workers)
