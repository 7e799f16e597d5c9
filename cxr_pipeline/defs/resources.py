"""Dagster resources: where the data is, where state goes, MLflow, and the compute device."""

import hashlib
import importlib
import json
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import PrivateAttr

from cxr_pipeline import __version__
from cxr_pipeline.config import resolve
from cxr_pipeline.defs.needs import WARM_TAG, failure
from cxr_pipeline.defs.run_config import section_model
from cxr_pipeline.defs.slots import record_run_worker
from cxr_pipeline.devices import lease, placement
from cxr_pipeline.fields import ConfigError, params
from cxr_pipeline.settings import Paths, paths, read_pipeline_config
from cxr_pipeline.tracking import TrackedRun, tracked_run


class CxrStorage(dg.ConfigurableResource):
    """The dataset root (``CXR_RAW_DIR``) and the state root (``CXR_HOME``)."""

    raw_dir: str
    home: str

    @classmethod
    def from_env(cls) -> "CxrStorage":
        p = paths()
        return cls(raw_dir=str(p.raw), home=str(p.home))

    @property
    def paths(self) -> Paths:
        """The one layout of everything under ``CXR_HOME`` (``settings.Paths``)."""
        return Paths(home=Path(self.home), raw=Path(self.raw_dir))


class MlflowTracking(dg.ConfigurableResource):
    """One MLflow run per asset materialization, tagged with its Dagster lineage."""

    tracking_uri: str
    experiment: str = "cxr_pipeline"
    artifact_root: str | None = None
    pipeline_config: str = ""  # $CXR_HOME/pipeline.yaml: its content goes into every run's params

    @classmethod
    def from_env(cls) -> "MlflowTracking":
        p = paths()
        # a tracking server keeps the artifacts (proxied to its own store); a database URI keeps them under CXR_HOME
        remote = p.tracking_uri.startswith(("http://", "https://"))
        return cls(
            tracking_uri=p.tracking_uri, artifact_root=None if remote else str(p.mlflow_artifacts), pipeline_config=str(p.pipeline_config)
        )

    @contextmanager
    def run(
        self, context: dg.AssetExecutionContext | dg.OpExecutionContext, extra_tags: Mapping[str, Any] | None = None
    ) -> Iterator[TrackedRun]:
        keys = sorted(k.to_user_string() for k in context.selected_asset_keys) if context.has_assets_def else []
        partition = context.partition_key if context.has_partition_key else ""
        code_versions = {}
        if context.has_assets_def:
            for k in context.selected_asset_keys:
                cv = context.assets_def.code_versions_by_key.get(k)
                if cv:
                    code_versions[k.to_user_string()] = cv
        tags = {
            "dagster.run_id": context.run_id,
            "dagster.asset_key": ",".join(keys),
            "dagster.partition": partition,
            "dagster.code_version": ",".join(f"{k}={v}" for k, v in sorted(code_versions.items())),
            "dagster.job": context.job_name,
            "cxr_pipeline.version": __version__,
            **(extra_tags or {}),
        }
        name = ",".join(keys) + (f"[{partition}]" if partition else "")
        with tracked_run(
            name,
            tags,
            experiment=self.experiment,
            tracking_uri=self.tracking_uri,
            artifact_root=Path(self.artifact_root) if self.artifact_root else None,
        ) as run:
            context.log.info(f"MLflow run {run.run_id}: {run.url}")
            self._log_pipeline_config(run)
            closed = close_orphaned_runs(run, context.instance, keys, partition, context.run_id)
            if closed:
                context.log.info(f"marked {closed} MLflow run(s) KILLED: left RUNNING by ended Dagster runs of the same asset")
            yield run

    def _log_pipeline_config(self, run: TrackedRun) -> None:
        """Every run records the configuration file it started under (params, and its digest as a tag)."""
        if not self.pipeline_config or not Path(self.pipeline_config).exists():
            return
        f = Path(self.pipeline_config)
        config = read_pipeline_config(Paths(home=f.parent, raw=f.parent))
        run.log_params(config_params(config))
        run.set_tags({"cxr_pipeline.config_sha256": hashlib.sha256(f.read_bytes()).hexdigest()[:16]})


def config_params(config: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """``pipeline.yaml`` as flat MLflow params: ``pipeline.<asset>.<field>``."""
    return {
        f"pipeline.{op}.{k}": json.dumps(v) if isinstance(v, list | dict) else str(v) for op, sec in config.items() for k, v in sec.items()
    }


def close_orphaned_runs(
    run: TrackedRun, instance: dg.DagsterInstance, asset_keys: list[str], partition: str, by_run_id: str, limit: int = 1000
) -> int:
    """Mark KILLED the MLflow runs of these assets and partition whose Dagster run is over.

    A killed process never ends its MLflow run, which would stay RUNNING in every
    comparison. Once its Dagster run is marked ended (run monitoring, or the retry
    that re-executes it), the next run of any of the same assets closes it: an
    orphan tagged ``manifest,manifest_rejects`` is closed by a run of ``manifest``
    alone. Runs whose Dagster run is still going, or unknown to this instance's
    storage, are left.
    """
    client = run.client
    wanted = set(asset_keys)
    closed = 0
    for other in client.search_runs([run.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=limit):
        t = other.data.tags
        if other.info.run_id == run.run_id or t.get("dagster.partition", "") != partition:
            continue
        if not wanted & set(filter(None, t.get("dagster.asset_key", "").split(","))):
            continue
        dagster_run = instance.get_run_by_id(t.get("dagster.run_id", ""))
        if dagster_run is not None and dagster_run.is_finished:
            client.set_tag(other.info.run_id, "cxr_pipeline.closed_by_dagster_run", by_run_id)
            client.set_terminated(other.info.run_id, status="KILLED")
            closed += 1
    return closed


@dataclass(frozen=True)
class Hardware:
    """A step's compute, resolved once: the settings it ran with, the torch device (its leased GPU on a
    machine with several) and how to say so."""

    settings: Any  # config.ComputeSettings, every auto worked out
    device: Any  # torch.device
    placement: dict  # the node and the GPUs the engine gave the step (devices.placement)

    @property
    def description(self) -> str:
        """The device as a log line says it: the GPU's name, or the CPU threads torch uses."""
        import torch

        if self.device.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(self.device)}"
        return f"cpu: {torch.get_num_threads()} threads"

    @property
    def params(self) -> dict[str, str]:
        """The settings as MLflow params (``compute.<field>``)."""

        return params(self.settings, "compute.")


class _Compute(dg.ConfigurableResource):
    """Where training and inference run: ``pipeline.yaml``'s ``compute`` section (``config.ComputeSettings``),
    resolved once per step (``resolved``: ``auto`` is CUDA when present, else the CPU); a field set in a run's
    resource config overrides the file for that run.

    For the life of a step it holds a lease on one GPU where that decides something (``devices.lease``: on
    one machine with N GPUs the ``gpu`` pool admits N steps and each is given its own device; on a cluster
    the engine gives the step its device), and it records the run's worker process so that a run killed
    mid-step gives its pool slot back (``defs.slots``)."""

    _lease: Any = PrivateAttr(default=None)
    _resolved: Any = PrivateAttr(default=None)

    @contextmanager
    def yield_for_execution(self, context: dg.InitResourceContext) -> Iterator["_Compute"]:

        if context.instance is not None and context.run_id:
            record_run_worker(context.instance, context.run_id)
            warm_up(context.instance, context.dagster_run)
        held = lease(say=context.log.info if context.log else None)
        self._lease, self._resolved = held, None  # resolved again for each run (pipeline.yaml may have changed)
        if held.ordinal is not None and context.log:
            context.log.info(f"leased GPU slot {held.ordinal}")
        try:
            yield self
        finally:
            held.release()

    def resolved(self, paths: Paths) -> Hardware:
        """The step's settings and device (torch's CPU threads set), worked out on the first call and kept."""
        if self._resolved is None:
            self._resolved = self._resolve(paths)
        return self._resolved

    def _resolve(self, paths: Paths) -> Hardware:
        import torch

        explicit = {k: v for k, v in self.model_dump().items() if v is not None}
        try:
            s = resolve(paths, "compute", explicit)
        except ConfigError as e:
            raise failure(str(e)) from None
        torch.set_num_threads(s.threads)

        return Hardware(s, torch.device(self._lease.device(s.device) if self._lease is not None else s.device), placement())


def warm_up(instance: dg.DagsterInstance, run: dg.DagsterRun | None) -> list[str]:
    """For a run of one step: import what the step will import (its ``cxr/warm`` op tag, ``needs.Needs.warm``) now,
    while the resources are set up; returns the modules imported.

    Why: automation launches each asset (partition) as a run of its own, a fresh process, and ``dagster.yaml``
    buffers one run beyond the ``gpu`` pool's free slots. With the in-process executor (``CXR_EXECUTOR=in_process``)
    the resources are set up before the step waits for its slot, so the imports (torch's companions, MLflow, and
    for a step that saves a pyfunc MLflow's map of installed packages, which its first ``save_model`` builds: 2.2 s
    here) happen during that wait instead of after it. With the multiprocess executor (the default) the run's
    worker claims the slot before it starts the step's process, where this runs: there it changes nothing, the
    step would import the same at its start (an untrainable finding's step, which saves no model, pays the unused
    imports, about 3 s). A run of several steps imports nothing here: each step imports its own.
    """
    if run is None or not run.execution_plan_snapshot_id:
        return []
    plan = instance.get_execution_plan_snapshot(run.execution_plan_snapshot_id)
    todo = set(plan.step_keys_to_execute or [])
    steps = [step for step in plan.steps if step.key in todo]
    if len(steps) != 1:
        return []
    modules = list(dict.fromkeys((steps[0].tags or {}).get(WARM_TAG, "").split()))
    for name in modules:
        importlib.import_module(name)
    if "mlflow.pyfunc" in modules:
        # MLflow's own cache, filled by its first requirements check (private: if a later MLflow renames it, the
        # warm-up skips it and the first save pays as before)
        from mlflow.utils import requirements_utils

        init = getattr(requirements_utils, "_init_modules_to_packages_map", None)
        if callable(init):
            init()
    return modules


# ``Compute`` with one optional field per ``ComputeSettings`` field (null: as ``pipeline.yaml`` says)
Compute = section_model("compute", "Compute", _Compute, optional=True)
