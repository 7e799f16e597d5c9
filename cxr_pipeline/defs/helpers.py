"""The small helpers every asset shares: metadata of a materialization, specs and decorator
arguments, config to domain dataclass, upstream data versions."""

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from cxr_pipeline.settings import Paths
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


def dagster_config(section: str, name: str) -> type[dg.Config]:
    """The Dagster run config of an asset, generated from its ``pipeline.yaml`` section's dataclass
    (``cxr_pipeline.config``): same fields, types, defaults and descriptions, so the launchpad and
    ``dagster asset materialize --config`` accept exactly what ``pipeline.yaml`` does, with no second list."""
    import typing

    import pydantic

    from cxr_pipeline.config import field_docs, sections

    hints = typing.get_type_hints(sections()[section])

    def dagster_type(t):  # Dagster config has lists, not tuples
        if typing.get_origin(t) is tuple:
            return list[typing.get_args(t)[0]]
        return t

    fields = {
        d.name: (dagster_type(hints[d.name]), pydantic.Field(default=d.default, description=_field_description(d)))
        for d in field_docs(section)
    }
    doc = f"``pipeline.yaml`` section ``{section}``: this run's own values override the file's, field by field."
    return pydantic.create_model(name, __base__=dg.Config, __doc__=doc, **fields)


def _field_description(d) -> str:
    if d.auto:
        return f"{d.doc}. null: auto ({d.auto})"
    if d.null:
        return f"{d.doc}. null: {d.null}"
    return d.doc


def run_settings(
    context: dg.AssetExecutionContext, paths: Paths, section: str | None = None, derived: Mapping[str, Any] | None = None
) -> Any:
    """The resolved configuration this run uses (``config.resolve``): the section's defaults, under
    ``$CXR_HOME/pipeline.yaml``, under what this run's own run config sets (field by field), every auto
    worked out. ``section`` defaults to the asset's own name.

    Dagster hands an asset its defaults wherever the run config is silent (runs started by automation,
    a schedule, a plain Materialize click); reading the file here, when the run starts, makes all of
    those follow the user's configuration. A bad file or field fails the run, naming both.
    """
    from cxr_pipeline.config import ConfigError, resolve

    op = context.op_def.name
    explicit = (context.run_config.get("ops", {}).get(op) or {}).get("config") or {}
    try:
        return resolve(paths, section or op, explicit, derived)
    except ConfigError as e:
        raise dg.Failure(str(e)) from None


def resolved_metadata(cfg: Any) -> dict[str, dg.MetadataValue]:
    """A materialization's record of the configuration it ran with (``resolved_config``)."""
    from cxr_pipeline.config import record

    return {"resolved_config": dg.MetadataValue.json(record(cfg))}


def upstream_data_version(context: dg.AssetExecutionContext, key: str, *, is_source: bool) -> str:
    """The latest recorded data version of an upstream asset, or 'unobserved'."""
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    rec = context.instance.get_latest_data_version_record(dg.AssetKey(key), is_source=is_source)
    if rec is None:
        return "unobserved"
    dv = extract_data_version_from_entry(rec.event_log_entry)
    return dv.value if dv else "unobserved"


def latest_metadata(instance: dg.DagsterInstance, key: str, partition: str | None, field: str):
    """A field of the latest materialization's metadata of ``key`` (one partition, or unpartitioned), or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(field)
    return None if value is None else value.value


# assets computed with another asset's section (built by the same step)
_SECTION_OF = {"manifest_rejects": "manifest", "shard_rejects": "image_shards"}


def with_config_versions(assets: list, paths: Paths) -> list:
    """Each configured asset's code version followed by its ``pipeline.yaml`` section's digest
    (``config.section_digest``), so the UI shows which assets' configuration changed since they were last
    materialized. Dagster treats a changed code version as stale but never as a reason to start a run
    (the automation conditions look at data versions only): a user re-runs them when they choose."""
    from cxr_pipeline.config import section_digest, sections

    def versioned(spec: dg.AssetSpec) -> dg.AssetSpec:
        key = spec.key.to_user_string()
        section = _SECTION_OF.get(key, key)
        if section not in sections():
            return spec
        return spec.replace_attributes(code_version=f"{spec.code_version or '1'}+cfg.{section_digest(paths, section)}")

    return [a.map_asset_specs(versioned) if isinstance(a, dg.AssetsDefinition) else a for a in assets]
