"""Dagster resources (where the data is, where state goes, MLflow, the compute device) and the
small helpers every asset shares: the metadata of a materialization, the GPU-asset settings."""

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from cxr_pipeline import __version__
from cxr_pipeline.settings import Paths, image_size, paths
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

    @classmethod
    def from_env(cls) -> "MlflowTracking":
        p = paths()
        # a tracking server keeps the artifacts (proxied to its own store); a database URI keeps them under CXR_HOME
        remote = p.tracking_uri.startswith(("http://", "https://"))
        return cls(tracking_uri=p.tracking_uri, artifact_root=None if remote else str(p.mlflow_artifacts))

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
            closed = close_orphaned_runs(run, context.instance, keys, partition, context.run_id)
            if closed:
                context.log.info(f"marked {closed} MLflow run(s) KILLED: left RUNNING by ended Dagster runs of the same asset")
            yield run


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


def mlflow_metadata(run: TrackedRun) -> dict[str, dg.MetadataValue]:
    """The back-link every materialization carries."""
    return {"mlflow_run_id": dg.MetadataValue.text(run.run_id), "mlflow_run": dg.MetadataValue.url(run.url)}


def asset_metadata(run: TrackedRun | None, path: Path | None = None, rows: int | None = None, **extra: Any) -> dict[str, Any]:
    """A materialization's metadata: the file it wrote, its row count, anything else, the MLflow back-link."""
    md: dict[str, Any] = {}
    if path is not None:
        md["path"] = dg.MetadataValue.path(str(path))
    if rows is not None:
        md["dagster/row_count"] = int(rows)
    md.update(extra)
    if run is not None:
        md.update(mlflow_metadata(run))
    return md


def asset_specs(
    keys: Mapping[str, tuple[str, set[str]]],
    *,
    deps: list[str],
    group: str,
    code_version: str,
    partitions_def: dg.PartitionsDefinition | None = None,
) -> list[dg.AssetSpec]:
    """The specs of a multi-asset whose keys are computed together: ``{key: (description, kinds)}``."""
    return [
        dg.AssetSpec(
            key,
            deps=deps,
            group_name=group,
            code_version=code_version,
            partitions_def=partitions_def,
            description=description,
            kinds=kinds,
        )
        for key, (description, kinds) in keys.items()
    ]


def selected_keys(context: dg.AssetExecutionContext) -> set[str]:
    """The asset keys this step was asked for (a multi-asset may be subset)."""
    return {k.to_user_string() for k in context.selected_asset_keys}


# On Kubernetes (docker/helm/values.yaml) the step pod of a GPU asset asks for one GPU.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}


def gpu_asset() -> dict[str, Any]:
    """Decorator arguments of every GPU asset: the ``gpu`` pool, the GPU request on Kubernetes, one retry."""
    return {"pool": "gpu", "op_tags": GPU_TAGS, "retry_policy": dg.RetryPolicy(max_retries=1, delay=10)}


def table_metadata(df: pl.DataFrame, limit: int = 50) -> dg.TableMetadataValue:
    """A polars frame as Dagster table metadata (first ``limit`` rows)."""
    cols = []
    for name, dtype in df.schema.items():
        t = "int" if dtype.is_integer() else "float" if dtype.is_float() else "bool" if dtype == pl.Boolean else "string"
        cols.append(dg.TableColumn(name, t))
    # every record needs every field: a missing value is shown as "-"
    records = [dg.TableRecord({k: ("-" if v is None else v) for k, v in row.items()}) for row in df.head(limit).iter_rows(named=True)]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=cols))


def to_dataclass(config: dg.Config, cls, **overrides):
    """The domain dataclass ``cls`` from the Dagster config fields of the same names."""
    import dataclasses

    values = config.model_dump()
    kwargs = {f.name: values[f.name] for f in dataclasses.fields(cls) if f.name in values}
    return cls(**{**kwargs, **overrides})


def upstream_data_version(context: dg.AssetExecutionContext, key: str, *, is_source: bool) -> str:
    """The latest recorded data version of an upstream asset, or 'unobserved'."""
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    rec = context.instance.get_latest_data_version_record(dg.AssetKey(key), is_source=is_source)
    if rec is None:
        return "unobserved"
    dv = extract_data_version_from_entry(rec.event_log_entry)
    return dv.value if dv else "unobserved"


def shard_size(configured: int) -> int:
    """A config's image size; 0 means ``CXR_IMAGE_SIZE`` (224), read now, when the run starts."""
    return configured or image_size()


class Compute(dg.ConfigurableResource):
    """Where training and inference run: ``auto`` picks CUDA when present, else the CPU."""

    device: str = "auto"
    threads: int = 0  # CPU threads for torch; 0 = all cores

    def torch_device(self):
        import torch

        if self.threads:
            torch.set_num_threads(self.threads)
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def describe(self) -> str:
        import torch

        dev = self.torch_device()
        if dev.type == "cuda":
            return f"cuda: {torch.cuda.get_device_name(dev)}"
        return f"cpu: {torch.get_num_threads()} threads"
