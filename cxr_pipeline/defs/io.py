"""What travels between assets: tables as polars DataFrames, large artefacts as small handles.

``TableIOManager`` stores every table asset (the manifest and its rejects, report pairs, the
classifier metrics and predictions, the report hints, generated reports, report metrics) as one
Parquet file where ``settings.Paths.table`` names it, written atomically, and hands it to consumers
as a DataFrame parameter. Each stored table's materialization carries Dagster's table schema with
every column's meaning (``columns``) and its row count, so the catalog shows what each column holds.
An asset that writes its tables itself (the manifest writes its rejects whatever is selected) goes
through the same :func:`write_table`. The demo, the benchmarks and ``predict`` read the same files
through the same ``Paths``.

dagster-polars' ``PolarsParquetIOManager`` is the library made for this, but its newest release
on PyPI (0.27.12) passes ``rechunk=`` to ``polars.scan_parquet``, which polars 2 removed, so every
input load fails with this project's polars; this thin manager does the same for one file per
table asset (no table here is partitioned).

``HandleLoader`` gives the consumers of file assets (shards, classifier checkpoints, the
adapter) a small typed handle to what those assets wrote, never an array or a model: the
shards are opened (memory-mapped) by whoever reads them, batch by batch, through the checked
``data.shard_reader.Shards`` handle that ``ShardSet.at(size)`` returns.

Both take the storage resource (``CxrStorage``): one root for everything under ``CXR_HOME``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.columns import describe
from cxr_pipeline.config import resolve
from cxr_pipeline.data.shard_reader import Shards, ShardsNotBuilt
from cxr_pipeline.data.shards import ShardSettings
from cxr_pipeline.data.voi import WindowPrior
from cxr_pipeline.data.window_prior import RawUnreadable, kept_window_prior, training_window_prior
from cxr_pipeline.defs.needs import failure
from cxr_pipeline.defs.resources import CxrStorage
from cxr_pipeline.fields import ConfigError
from cxr_pipeline.files import file_digest, write_parquet
from cxr_pipeline.reports.vlm import read_adapter_card
from cxr_pipeline.settings import Paths
from cxr_pipeline.vision.checkpoint import MULTILABEL, ClassifierFiles, ClassifierSet


def table_schema(key: str, df: pl.DataFrame) -> dg.TableSchema:
    """A table's schema as Dagster shows it: each column's name, type and meaning (``columns.describe``)."""
    return dg.TableSchema(columns=[dg.TableColumn(name, str(dtype), description=describe(key, name)) for name, dtype in df.schema.items()])


@dataclass(frozen=True)
class WrittenTable:
    """A table asset's file as written: its materialization metadata and its content's data version."""

    metadata: dict[str, dg.MetadataValue]
    data_version: dg.DataVersion


def write_table(paths: Paths, key: str, df: pl.DataFrame) -> WrittenTable:
    """Write a table asset's Parquet file atomically; its metadata (path, column schema, row count) and data
    version (the SHA-256 of the bytes written: the same rows give the same version, so automation starts
    nothing below a rebuild that changed nothing)."""
    path = write_parquet(df, paths.table(key))
    metadata = {
        "path": dg.MetadataValue.path(str(path)),
        "dagster/column_schema": dg.MetadataValue.table_schema(table_schema(key, df)),
        "dagster/row_count": dg.MetadataValue.int(df.height),
    }
    return WrittenTable(metadata, dg.DataVersion(file_digest(path)))


class TableIOManager(dg.ConfigurableIOManager):
    """Table assets as Parquet files under ``CXR_HOME`` (``settings.Paths.table``)."""

    storage: CxrStorage

    def handle_output(self, context: dg.OutputContext, obj: pl.DataFrame | None) -> None:
        if obj is None:  # an asset that wrote its files itself (MaterializeResult) stores nothing here
            return
        context.add_output_metadata(write_table(self.storage.paths, context.asset_key.to_user_string(), obj).metadata)

    def load_input(self, context: dg.InputContext) -> pl.DataFrame:
        """The table; a table never materialized is an error that names it."""
        key = context.asset_key.to_user_string()
        path = self.storage.paths.table(key)
        if not path.exists():
            raise failure(f"{path}: {key} not materialized yet")
        return pl.read_parquet(path)


@dataclass(frozen=True)
class ShardSet:
    """The image shards (every partition, every size built): ``at(size)`` is the handle the shard readers take."""

    paths: Paths

    def at(self, size: int) -> Shards:
        """The shards at ``size``, checked against their ``spec.json`` (``Shards.open``). A size never built fails
        the run, naming the size, how to build it and the sizes ``image_shards`` builds now (the builder's own
        resolution, ``config.resolve``): a size set only in a consumer's run config is not among them, and
        reading it must not silently yield no images."""
        try:
            return Shards.open(self.paths.shard_root(size), size)
        except ShardsNotBuilt as e:
            raise failure(f"{e}; image_shards now builds {_built_sizes(self.paths)}") from None
        except ValueError as e:
            raise failure(str(e)) from None

    def window_prior(self, size: int, log: Callable[[str], None] | None = None) -> WindowPrior | None:
        """The windows the training images were read through at ``size`` (``data.window_prior``, kept beside the
        assets and fitted again when the training sample changes): what a trained checkpoint carries, so that its
        served model reads a file without a window by the rule external validation and the drift monitor read such
        files by. Training needs only the shards: where the raw training files cannot be read (a node without the
        raw root), the prior last fitted is used, or none, and ``log`` says so."""
        try:
            return training_window_prior(self.paths, size)
        except RawUnreadable as e:  # only the raw root missing here: any other error fails the run
            kept = kept_window_prior(self.paths, size)
            if log is not None:
                log(
                    f"window prior not fitted ({e}); the checkpoint carries {'the last one fitted' if kept else 'none (the percentile window)'}"
                )
            return kept


def _built_sizes(paths: Paths) -> str:
    """The sizes ``image_shards`` resolves now, as an error message shows them."""

    try:
        return f"{resolve(paths, 'image_shards').sizes} px"
    except (ConfigError, OSError, ValueError) as e:  # a broken pipeline.yaml: say so, the run fails anyway
        return f"no sizes ({e})"


def external_shard_settings(paths: Paths) -> ShardSettings:
    """``image_shards`` resolved as its own run resolves it (images per shard, decode processes, and with ``sizes``
    null every size a consumer reads, the report adapter's included): how external validation and the drift monitor
    build an external set's shared shard folder, decoded at MIMIC's level (the largest). One function for both: the
    folder records the level, and two readers resolving it differently rebuilt each other's. A section that cannot
    be resolved (a bad field; a base model whose ``preprocessor_config.json`` cannot be read, which sets the report
    adapter's size) fails the run without a retry."""

    try:
        return resolve(paths, "image_shards", {})
    except (ConfigError, OSError, ValueError) as e:
        raise failure(f"image_shards (the level an external set is decoded at): {e}") from None


@dataclass(frozen=True)
class Adapter:
    """A trained report adapter: its folder (peft weights, processor, the card) and what it was trained with
    (``card``: base, quantisation, image size, prompt variant; ``reports.vlm.write_adapter_card``)."""

    dir: Path
    card: dict

    @property
    def size(self) -> int:
        """The shard size the adapter was trained on, which generation must read."""
        return int(self.card["size"])

    @property
    def base(self) -> Path:
        return Path(self.card["base"])


class HandleLoader(dg.ConfigurableIOManager):
    """Handles to the files a file asset wrote: ``image_shards`` -> ``ShardSet``, ``classifier`` -> ``ClassifierSet``,
    ``multilabel_classifier`` -> its ``ClassifierFiles``, ``report_adapter`` -> ``Adapter``. Nothing is pickled: those
    assets write their files themselves (atomically) and return no value."""

    storage: CxrStorage

    def handle_output(self, context: dg.OutputContext, obj: object) -> None:
        if obj is not None:
            raise TypeError(f"{context.asset_key.to_user_string()}: a file asset returns no value (got {type(obj).__name__})")

    def load_input(self, context: dg.InputContext) -> ShardSet | ClassifierSet | ClassifierFiles | Adapter:
        p, key = self.storage.paths, context.asset_key.to_user_string()
        handles = {
            "image_shards": lambda: ShardSet(p),
            "classifier": lambda: ClassifierSet.of(p),
            "multilabel_classifier": lambda: ClassifierSet.of(p).classifier(MULTILABEL),
            "report_adapter": lambda: _adapter(p.adapter),
        }
        if key not in handles:
            raise KeyError(f"{key}: no handle (handles: {', '.join(handles)})")
        return handles[key]()


def _adapter(folder: Path) -> Adapter:

    try:
        return Adapter(folder, read_adapter_card(folder))
    except FileNotFoundError as e:
        raise failure(f"report_adapter not materialized yet: {e}") from None
