"""The small helpers every asset shares: metadata of a materialization, specs and decorator
arguments, config to domain dataclass, upstream data versions."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from cxr_pipeline.settings import Paths, image_size, read_pipeline_config
from cxr_pipeline.tracking import TrackedRun


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


def asset_factory(group: str, code_version: str):
    """``@asset(name, deps, description, kinds, **more)`` for the assets of one group (same group, same code version)."""

    def asset(name: str, deps: list, description: str, kinds: set[str], **more: Any):
        return dg.asset(name=name, deps=deps, group_name=group, code_version=code_version, kinds=kinds, description=description, **more)

    return asset


def every_partition_of(key: str) -> dg.AssetDep:
    """A dependency on all partitions of ``key`` (a classifier reads every shard partition)."""
    return dg.AssetDep(key, partition_mapping=dg.AllPartitionMapping())


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


def inline_png(path: Path, alt: str) -> dg.MetadataValue:
    """A PNG shown inline in the asset's metadata (Dagster renders Markdown images with data URIs)."""
    import base64

    return dg.MetadataValue.md(f"![{alt}](data:image/png;base64,{base64.b64encode(Path(path).read_bytes()).decode()})")


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


def report_shard_size(configured: int, base: str = "") -> int:
    """The report model's image size: configured, else its base's tile (``CXR_VLM_BASE``, or the tiny base's).
    The real 11B sees 560-px tiles: reading the CNN's 224-px shards would throw that resolution away."""
    import os

    from cxr_pipeline.reports.vlm import base_tile_size

    return configured or base_tile_size(base or os.environ.get("CXR_VLM_BASE") or None)


def needed_shard_sizes(paths: Paths) -> list[int]:
    """Every shard size a consumer will read under ``pipeline.yaml``: the classifiers' and the report model's."""
    cfg = read_pipeline_config(paths)
    cls, rep = cfg.get("classifier", {}), cfg.get("report_adapter", {})
    return sorted({shard_size(int(cls.get("size", 0))), report_shard_size(int(rep.get("size", 0)), str(rep.get("base", "")))})


def effective_config(context: dg.AssetExecutionContext, config: dg.Config, paths: Paths, section: str | None = None) -> dg.Config:
    """The run's config: the asset's defaults, under ``$CXR_HOME/pipeline.yaml``'s section, under
    what this run's own run config sets (field by field). ``section``: read another asset's
    section of the file (the multi-label model follows the per-pathology ``classifier`` recipe).

    Dagster hands an asset its defaults wherever the run config is silent (runs started by
    automation, a schedule, a plain Materialize click); reading the file here, when the run
    starts, makes all of those follow the user's configuration.
    """
    op = context.op_def.name
    name = section or op
    from_file = read_pipeline_config(paths).get(name, {})
    unknown = sorted(set(from_file) - set(type(config).model_fields))
    if unknown:
        raise dg.Failure(f"{paths.pipeline_config}: {name}: unknown field(s) {', '.join(unknown)}")
    explicit = (context.run_config.get("ops", {}).get(op) or {}).get("config") or {}
    return type(config)(**{**config.model_dump(), **from_file, **explicit})


def latest_metadata(instance: dg.DagsterInstance, key: str, partition: str | None, field: str):
    """A field of the latest materialization's metadata of ``key`` (one partition, or unpartitioned), or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(field)
    return None if value is None else value.value
