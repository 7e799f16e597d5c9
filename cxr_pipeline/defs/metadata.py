"""What a materialization records: the MLflow back-link, the files and rows it wrote, tables and
images shown inline, the resolved configuration it ran with."""

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import dagster as dg
import polars as pl

from cxr_pipeline.fields import record
from cxr_pipeline.tracking import TrackedRun
from cxr_pipeline.vision.checkpoint import registered_label


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


def resolved_metadata(cfg: Any) -> dict[str, dg.MetadataValue]:
    """A materialization's record of the configuration it ran with (``resolved_config``)."""

    return {"resolved_config": dg.MetadataValue.json(record(cfg))}


def materialized(
    context: dg.AssetExecutionContext, key: str, metadata: dict[str, Any], data_version: dg.DataVersion
) -> Iterator[dg.MaterializeResult]:
    """The materialization of a table the step wrote: the step's result where ``key`` was selected, else a
    runtime materialization event carrying the same metadata and data version, so that a table written
    beside a selected one (the manifest's rejects) is recorded as what it is, current.

    Dagster refuses a result for an unselected key of a subsettable multi-asset; a runtime
    ``AssetMaterialization`` is its way to record an asset a step wrote. Its data version goes in the
    tags Dagster itself writes for a result's (``dagster/data_version``, user-provided)."""
    if key in {k.to_user_string() for k in context.selected_asset_keys}:
        yield dg.MaterializeResult(asset_key=key, metadata=metadata, data_version=data_version)
        return
    tags = {"dagster/data_version": data_version.value, "dagster/data_version_is_user_provided": "true"}
    context.log_event(
        dg.AssetMaterialization(key, description="written with the selected assets of this step", metadata=metadata, tags=tags)
    )


def fit_metadata(recorded: Any, files: Any) -> dict[str, Any]:
    """A recorded fit (``vision.record.Recorded``) as metadata: the checkpoint, the registered version, the model
    card and the Grad-CAM sheet (inline)."""

    sheet = recorded.saliency
    return {
        "checkpoint": dg.MetadataValue.path(str(files.checkpoint)),
        "registered_model": registered_label(recorded.registration),
        "saliency": inline_png(sheet, "Grad-CAM on test images") if sheet is not None else "no test case to show",
        "model_card": dg.MetadataValue.md(recorded.card.markdown),
        "model_card_uri": recorded.card.uri,
    }
