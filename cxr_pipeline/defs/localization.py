"""The champions + the boxes -> localization_metrics: does each model's Grad-CAM point at the finding?

The work is in ``vision.localization`` (ChestX-ray8's measures, the baselines, the intervals) and
``vision.localization_data`` (the boxed images, the contact sheet); this module reads config, loads the registered
champions (as external_validation does), calls them, logs to MLflow and returns metadata.
"""

import dagster as dg
import polars as pl

from cxr_pipeline.config import resolve
from cxr_pipeline.data.external import ExternalSettings, scored_images
from cxr_pipeline.data.shard_reader import Shards
from cxr_pipeline.defs import needs
from cxr_pipeline.defs.io import ShardSet
from cxr_pipeline.defs.keys import CLASSIFIER, EXTERNAL_VALIDATION, LOCALIZATION_METRICS, MULTILABEL_CLASSIFIER
from cxr_pipeline.defs.metadata import asset_metadata, inline_png, resolved_metadata, table_metadata
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import ALL_SHARDS_IN, MANIFEST_IN, classifiers_asset, every_partition_of
from cxr_pipeline.fields import params
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.vision.checkpoint import MULTILABEL
from cxr_pipeline.vision.external import EXTERNAL_PARTITION, load_champions
from cxr_pipeline.vision.localization import summary
from cxr_pipeline.vision.localization_data import localize
from cxr_pipeline.vision.registry import registered_name

LocalizationConfig = dagster_config(LOCALIZATION_METRICS, "LocalizationConfig")
SHOWN = ("dataset", "model", "method", "pathology", "n_images", "level", "pointing", "pointing_lo", "pointing_hi")
SHOWN += ("pointing_vs_mean_box", "pointing_vs_mean_box_lo", "pointing_vs_mean_box_hi", "pointing_vs_box_prior_lo", "pointing_ceiling")
SHOWN += ("iobb_10", "iobb_25", "iobb_50")


def _nih(paths, size: int):
    """(scored rows, folder, shard opener) of the NIH-format set when external_validation has built its shards at
    ``size``; None otherwise (the table then has internal rows only)."""
    cfg: ExternalSettings = resolve(paths, EXTERNAL_VALIDATION, {})
    if cfg.absent_reason("nih", paths.home) or not (paths.external_shard_root("nih", size) / EXTERNAL_PARTITION).is_dir():
        return None
    folder, _, rows = scored_images(cfg, "nih", paths.home)
    return rows, folder, lambda s: Shards.open(paths.external_shard_root("nih", s), s, [EXTERNAL_PARTITION])


@classifiers_asset(
    LOCALIZATION_METRICS,
    [every_partition_of(CLASSIFIER), MULTILABEL_CLASSIFIER, every_partition_of(EXTERNAL_VALIDATION)],
    "Where each champion's Grad-CAM points, scored against boxes as ChestX-ray8 scores it: per champion and finding with boxes, "
    "on the test split's boxed images, IoBB accuracy at T = 0.1 to 0.9 (the map cut into boxes at a level chosen on validate) and "
    "the pointing game, with patient-bootstrap intervals, beside two baselines that never see the image (the finding's mean "
    "training box, a uniform map over the region of all training boxes); the NIH-format set's boxes too where present.",
    {"polars", "parquet"},
    ins={"manifest": MANIFEST_IN, "image_shards": ALL_SHARDS_IN},
    **needs.CNN.asset_args(),
)
def localization_metrics(
    context: dg.AssetExecutionContext,
    config: LocalizationConfig,
    manifest: pl.DataFrame,
    image_shards: ShardSet,
    storage: CxrStorage,
    mlflow: MlflowTracking,
) -> dg.Output:

    paths = storage.paths
    cfg = run_settings(context, paths)
    with mlflow.run(context) as run:
        run.log_params(params(cfg))
        names = [registered_name(s) for s in SLUGS] + [registered_name(MULTILABEL)]
        champions = load_champions(run.client, mlflow.tracking_uri, names)
        nih = _nih(paths, champions[0].model.size) if champions else None
        result = localize(paths, manifest, image_shards.at, champions, cfg, nih)
        if result.skipped:
            run.set_tags({"skipped": result.skipped})
        else:
            run.log_table(result.table, "localization_metrics")
            run.log_metrics({k: float(v) for k, v in result.counts.items()})
            for kind, s in summary(result.table.filter(pl.col("dataset") == "mimic") if result.table.height else result.table).items():
                run.log_metrics({f"{kind}.median_pointing": s["pointing"], f"{kind}.median_pointing_vs_mean_box": s["vs_mean_box"]})
            for png in result.sheets.values():
                run.log_artifact(png)
    for note in result.notes or []:
        context.log.info(note)
    if result.skipped:
        context.log.warning(f"localization skipped: {result.skipped}")
        return dg.Output(result.table, metadata=asset_metadata(run, reason=result.skipped, **resolved_metadata(cfg)))
    if not result.table.height:  # boxes and champions, but no finding with both boxed test images and training boxes
        context.log.warning("localization: no finding has boxed test images and training boxes; the table is empty")
        return dg.Output(
            result.table, metadata=asset_metadata(run, reason="no finding with boxed test and training images", **resolved_metadata(cfg))
        )
    shown = result.table.select([c for c in SHOWN if c in result.table.columns]).with_columns(pl.col(pl.Float64).round(3))
    md = {"table": table_metadata(shown), **result.counts}
    md.update({f"sheet_{k}": inline_png(v, f"localization contact sheet, {k}") for k, v in result.sheets.items()})
    return dg.Output(result.table, metadata=asset_metadata(run, **md, **resolved_metadata(cfg)))
