"""What travels between assets: tables as polars DataFrames, large artefacts as small handles.

``TableIOManager`` stores every table asset (the manifest and its rejects, report pairs, the
classifier metrics and predictions, generated reports, report metrics) as one Parquet file
where ``settings.Paths.table`` names it, written atomically, and hands it to consumers as a
DataFrame parameter. Each stored table's materialization carries Dagster's table schema and row
count, so the catalog shows its columns and size. The demo, the benchmarks and ``predict`` read
the same files through the same ``Paths``.

dagster-polars' ``PolarsParquetIOManager`` is the library made for this, but its newest release
on PyPI (0.27.12) passes ``rechunk=`` to ``polars.scan_parquet``, which polars 2 removed, so every
input load fails with this project's polars; this thin manager does the same for one file per
table asset (no table here is partitioned).

``HandleLoader`` gives the consumers of file assets (shards, classifier checkpoints, the
adapter) a small typed handle to what those assets wrote, never an array or a model: the
shards are opened (memory-mapped) by whoever reads them, batch by batch.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.data.io import write_parquet
from cxr_pipeline.settings import ClassifierFiles, ClassifierSet, Paths, paths


def table_schema(df: pl.DataFrame) -> dg.TableSchema:
    """A polars schema as Dagster's table schema (column name and type)."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype)) for name, dtype in df.schema.items()])


def table_digest(df: pl.DataFrame) -> str:
    """A content digest of a table: the SHA-256 of its Parquet bytes as ``write_parquet`` writes them, so the same
    rows give the same data version (automation starts nothing below a rebuild that changed nothing)."""
    buf = io.BytesIO()
    df.write_parquet(buf, compression="zstd", statistics=True)
    return hashlib.sha256(buf.getvalue()).hexdigest()[:32]


class _UnderHome(dg.ConfigurableIOManager):
    """An IO manager rooted in ``CXR_HOME``'s layout (``settings.Paths``)."""

    home: str
    raw_dir: str

    @classmethod
    def from_env(cls):
        p = paths()
        return cls(home=str(p.home), raw_dir=str(p.raw))

    @property
    def paths(self) -> Paths:
        return Paths(home=Path(self.home), raw=Path(self.raw_dir))


class TableIOManager(_UnderHome):
    """Table assets as Parquet files under ``CXR_HOME`` (``settings.Paths.table``)."""

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame | None) -> None:
        if obj is None:  # an asset that wrote files of its own (MaterializeResult) stores nothing here
            return
        path = write_parquet(obj, self.paths.table(context.asset_key.to_user_string()))
        context.add_output_metadata(
            {
                "path": dg.MetadataValue.path(str(path)),
                "dagster/column_schema": dg.MetadataValue.table_schema(table_schema(obj)),
                "dagster/row_count": dg.MetadataValue.int(obj.height),
            }
        )

    def load_input(self, context: dg.InputContext) -> pl.DataFrame | None:
        """The table; a table never materialized is an error, or None for an input declared optional
        (``AssetIn(metadata={"optional": True})``: the report hints fall back when a classifier table is absent)."""
        key = context.asset_key.to_user_string()
        path = self.paths.table(key)
        if not path.exists():
            if (context.definition_metadata or {}).get("optional"):
                return None
            raise dg.Failure(f"{path}: {key} not materialized yet")
        return pl.read_parquet(path)


@dataclass(frozen=True)
class ShardSet:
    """The image shards (every partition, every size built): ``root(size)`` is what the shard readers open."""

    base: Path

    def root(self, size: int) -> Path:
        return self.base / f"s{size}"


@dataclass(frozen=True)
class Adapter:
    """A trained report adapter: its folder (peft weights, processor and ``cxr_adapter.json``)."""

    dir: Path


class HandleLoader(_UnderHome):
    """Handles to the files a file asset wrote: ``image_shards`` -> ``ShardSet``, ``classifier`` -> ``ClassifierSet``, ``multilabel_classifier`` -> its ``ClassifierFiles``, ``report_adapter`` -> ``Adapter``. Nothing is
    pickled: those assets write their files themselves (atomically) and return no value."""

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        if obj is not None:
            raise TypeError(f"{context.asset_key.to_user_string()}: a file asset returns no value (got {type(obj).__name__})")

    def load_input(self, context: dg.InputContext) -> ShardSet | ClassifierSet | ClassifierFiles | Adapter:
        p, key = self.paths, context.asset_key.to_user_string()
        handles = {
            "image_shards": lambda: ShardSet(p.shards),
            "classifier": lambda: ClassifierSet(p.classifiers),
            "multilabel_classifier": lambda: p.classifier("multilabel"),
            "report_adapter": lambda: Adapter(p.adapter),
        }
        if key not in handles:
            raise KeyError(f"{key}: no handle (handles: {', '.join(handles)})")
        return handles[key]()
