"""image_shards + manifest -> classifier[14 pathologies]: one binary CNN per finding, registered in MLflow.

The work is in ``vision.splits`` (the data) and ``vision.fit`` (train, evaluate, save); this asset reads
its configuration, calls them, and records the result in MLflow, the registry and its metadata. The
multi-label model and the report hints are ``defs.multilabel``; the tables read from the classifier
folders are ``defs.classifier_tables``.
"""

import dagster as dg
import polars as pl

from cxr_pipeline.defs import needs
from cxr_pipeline.defs.io import ShardSet
from cxr_pipeline.defs.keys import CLASSIFIER
from cxr_pipeline.defs.manifest import MANIFEST_IN
from cxr_pipeline.defs.metadata import asset_metadata, inline_png, resolved_metadata
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import ALL_SHARDS_IN, asset_factory, every_partition_of
from cxr_pipeline.fields import params
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.settings import ClassifierFiles
from cxr_pipeline.tracking import TrackedRun, register_version, retire_aliases
from cxr_pipeline.vision.registry import registered_name, validation_digest
from cxr_pipeline.vision.train import TrainConfig

CLASSIFIER_CODE_VERSION = "1"
label_partitions = dg.StaticPartitionsDefinition(list(SLUGS))
HEADLINE = ("roc_auc", "average_precision", "accuracy", "f1", "threshold", "n_pos", "n_neg")
TEST_METRICS = ("accuracy", "f1", "sensitivity", "specificity", "roc_auc", "average_precision", "threshold")


ClassifierConfig = dagster_config(CLASSIFIER, "ClassifierConfig")


MODEL_ARTIFACT = "model"  # the run's MLflow model folder: the registered source (see vision.serving)


def log_model(run: TrackedRun, checkpoint) -> None:
    from cxr_pipeline.vision.serving import log_model as log

    log(run, checkpoint, MODEL_ARTIFACT)


def _log_fit(run: TrackedRun, outcome) -> None:
    """The test metrics, training speed, MLflow model, metrics row and curves of a fit, in its MLflow run."""
    row, files = outcome.row, outcome.files
    run.log_metrics({f"test_{k}": v for k, v in row.items() if k in TEST_METRICS and v is not None})
    run.log_metrics({f"test_radiologist_{k}": v for k, v in outcome.radiologist_row.items() if k in TEST_METRICS and v is not None})
    run.log_metrics({"best_epoch": outcome.trained.best_epoch, "train_images_per_second": outcome.trained.images_per_second})
    log_model(run, files.checkpoint)
    run.log_dict({"rows": outcome.rows}, "metrics.json")
    if files.curves.exists():
        run.log_artifact(files.curves)


classifiers_asset = asset_factory("classifiers", CLASSIFIER_CODE_VERSION)


def log_datasets(run: TrackedRun, data, shards, targets: list[str]) -> None:
    """The rows each split used (ids, image content hashes, the policy's targets) as MLflow datasets."""
    splits = {s: data.splits[s].rows.select("dicom_id", "content_hash", *targets) for s in ("train", "validate", "test")}
    run.log_datasets(f"mimic-cxr-{shards.size}px", splits, shards.root)


def saliency_sheet(run: TrackedRun, checkpoint, images, y, p, out) -> dict:
    """Grad-CAM sheet of a few test TPs / FPs / FNs (per finding's best TP for the multi-label model):
    a file, an MLflow artifact and inline metadata. ``y``, ``p``: (n,) or (n, labels) test targets and probabilities."""
    from cxr_pipeline.vision.serving import classifier_saliency_sheet, load_checkpoint, multilabel_saliency_sheet

    model = load_checkpoint(checkpoint)
    if len(model.slugs) > 1:
        sheet = multilabel_saliency_sheet(model, images, y, p, out)
    else:
        sheet = classifier_saliency_sheet(model, images, y, p, out)
    if sheet is None:
        return {"saliency": "no test case to show"}
    run.log_artifact(sheet)
    return {"saliency": inline_png(sheet, "Grad-CAM on test images")}


def _headline(row: dict, keys: tuple[str, ...], prefix: str = "") -> dict:
    """The metrics shown in the asset's metadata, rounded."""
    return {prefix + k: (round(row[k], 4) if isinstance(row[k], float) else row[k]) for k in keys if row.get(k) is not None}


def register_classifier(run: TrackedRun, data, row: dict) -> dict:
    """The fit's checkpoint as a new registry version; champion on a better **validation** AUC.

    Selecting on test AUC would make the champion's test figure optimistic (it won on that very
    set); the test AUC is recorded as a tag beside it.
    """
    val_auc = row.get("val_roc_auc")
    test_auc = row["roc_auc"] if row["evaluable"] else None
    return register_version(
        run,
        registered_name(data.label_slug),
        MODEL_ARTIFACT,
        score_tag="val_auc",
        score=val_auc if val_auc is not None and val_auc == val_auc else None,
        description=f"Binary {data.label} classifier on chest radiographs (cxr_pipeline)",
        tags={"pathology": data.label, "test_auc": "nan" if test_auc is None else f"{test_auc:.6f}"},
        data_version=validation_digest(data),
    )


ALL_CLASSIFIERS = every_partition_of(CLASSIFIER)
# what a classifier reads: the manifest (a table), every shard partition (a handle to the files)
TRAINING_INPUTS = {
    "manifest": MANIFEST_IN,
    "image_shards": ALL_SHARDS_IN,
}


def _fit_metadata(outcome, reg: dict, files) -> dict:
    """A trained classifier's materialization metadata: headline test metrics, training, registry."""
    row, result = outcome.row, outcome.trained
    md = {**_headline(row, HEADLINE), **_headline(outcome.radiologist_row, ("roc_auc", "n_pos", "n_neg"), "radiologist_")}
    md.update(evaluable=row["evaluable"], reason=row["reason"], best_epoch=result.best_epoch, epochs_run=result.epochs_run)
    md.update(resumed_from_epoch=result.resumed_from, train_images_per_second=round(result.images_per_second, 1))
    md.update(checkpoint=dg.MetadataValue.path(str(files.checkpoint)), registered_model=registered_label(reg))
    return md


def registered_label(reg: dict) -> str:
    return f"{reg['name']} v{reg['version']}" + (" (champion)" if reg["champion"] else "")


def epoch_logger(run: TrackedRun):
    return lambda row: run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"]))


@classifiers_asset(
    CLASSIFIER,
    [],
    "One binary CNN per CheXpert observation: best-validation-loss weights (safetensors), test metrics with CIs, MLflow run and registered model.",
    {"pytorch", "safetensors"},
    partitions_def=label_partitions,
    ins=TRAINING_INPUTS,
    **needs.CNN.asset_args(),
)
def classifier(
    context: dg.AssetExecutionContext,
    manifest: pl.DataFrame,
    image_shards: ShardSet,
    config: ClassifierConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    from cxr_pipeline.vision.fit import fit_and_save
    from cxr_pipeline.vision.splits import load_data

    label_slug, paths = context.partition_key, storage.paths
    cfg: TrainConfig = run_settings(context, paths)
    hw = compute.resolved(paths)
    files, shards = paths.classifier(label_slug), image_shards.at(cfg.size)
    data = load_data(manifest, shards, label_slug, cfg, hw.device)
    context.log.info(f"{data.label}: {data.counts} on {hw.description}, images {data.mode}")
    with mlflow.run(context, {"pathology": data.label}) as run:
        run.log_params({**params(cfg), **hw.params, **data.counts, "images": data.mode})
        if data.untrainable_reason:  # rare labels on small subsets: record why, keep no model, never crash the backfill
            return _untrainable(context, run, data, files, cfg)
        log_datasets(run, data, shards, ["target"])
        outcome = fit_and_save(data, manifest, shards, cfg, hw.device, files, log=context.log.info, on_epoch=epoch_logger(run))
        md = _record_fit(run, data, outcome, files, manifest, paths.raw)
    context.log.info(f"registered {md['registered_model']}")
    md.update(data.counts, images=data.mode, **hw.placement)
    return dg.MaterializeResult(metadata=asset_metadata(run, **md, **resolved_metadata(cfg)))


def _untrainable(
    context: dg.AssetExecutionContext, run: TrackedRun, data, files: ClassifierFiles, cfg: TrainConfig
) -> dg.MaterializeResult:
    """A label the current data cannot train: its 'not trainable' rows, no model files, and the registry's aliases retired."""
    from cxr_pipeline.vision.fit import record_untrainable

    context.log.warning(f"{data.label}: {data.untrainable_reason}")
    record_untrainable(data, files)
    retired = retire_aliases(run.client, registered_name(data.label_slug), data.untrainable_reason)
    md = {"evaluable": False, "reason": data.untrainable_reason, "retired_aliases": dg.MetadataValue.json(retired)}
    return dg.MaterializeResult(metadata=asset_metadata(run, **md, **data.counts, **resolved_metadata(cfg)))


def _record_fit(run: TrackedRun, data, outcome, files: ClassifierFiles, manifest: pl.DataFrame, raw_dir) -> dict:
    """A fit in MLflow (metrics, model, curves), the registry (a new version, its model card) and a Grad-CAM sheet;
    its metadata."""
    _log_fit(run, outcome)
    reg = register_classifier(run, data, outcome.row)
    c = data.counts
    counts = {s: {"images": c[f"n_{s}"], "positives": c[f"n_{s}_pos"]} for s in ("train", "validate", "test")}
    card = publish_model_card(run, reg, files, outcome.rows, counts, manifest, data.digest(), raw_dir)
    sheet = saliency_sheet(run, files.checkpoint, data.splits["test"].images, *outcome.test_curve, files.saliency)
    return {**_fit_metadata(outcome, reg, files), **sheet, **card}


def publish_model_card(
    run: TrackedRun, reg: dict, files: ClassifierFiles, rows: list[dict], counts: dict, manifest: pl.DataFrame, digest: str, raw_dir
) -> dict:
    """The registered version's model card (``vision.model_card``), generated from the checkpoint and the metrics
    rows: Markdown and JSON artifacts under ``model_card/`` in the run, and the version's description (which
    MLflow's UI renders as Markdown) links them and carries the Markdown. Returns the materialization metadata."""
    import json

    from cxr_pipeline.vision.model_card import build_card, data_source

    config = json.loads((files.checkpoint / "config.json").read_text())
    views = sorted(v for v in manifest["view_position"].unique().to_list() if v) if "view_position" in manifest.columns else []
    md, card = build_card(
        name=reg["name"],
        version=str(reg["version"]),
        run_id=run.run_id,
        config=config,
        rows=rows,
        counts=counts,
        views=views,
        manifest_version=digest,
        source=data_source(raw_dir),
    )
    return write_model_card(run.client, reg["name"], str(reg["version"]), run.run_id, md, card, files)


def write_model_card(client, name: str, version: str, run_id: str, md: str, card: dict, files: ClassifierFiles) -> dict:
    """The card as artifacts of the version's run (``model_card/``), in its description, and in the classifier's
    folder (``model_card.json``, with the version it belongs to: how the subgroup audit finds the card to add its
    gaps to). Returns the materialization metadata."""
    import json
    import tempfile
    from pathlib import Path

    from cxr_pipeline.files import atomic_path
    from cxr_pipeline.vision.model_card import CARD_DIR, CARD_JSON, CARD_MD

    with tempfile.TemporaryDirectory() as d:
        folder = Path(d) / CARD_DIR
        folder.mkdir()
        (folder / CARD_MD).write_text(md)
        (folder / CARD_JSON).write_text(json.dumps(card, indent=1, default=str))
        client.log_artifacts(run_id, str(folder), CARD_DIR)
    link = f"runs:/{run_id}/{CARD_DIR}/{CARD_MD}"
    client.update_model_version(name, version, description=f"Model card: `{link}` (JSON beside it)\n\n{md}")
    with atomic_path(files.model_card) as tmp:
        tmp.write_text(json.dumps({"name": name, "version": version, "run_id": run_id, "card": card}, indent=1, default=str))
    return {"model_card": dg.MetadataValue.md(md), "model_card_uri": link}
