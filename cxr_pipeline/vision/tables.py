"""The tables read back from the classifier folders: every model's metrics rows, test scores, curves and
per-image predictions (``classifier_metrics``, ``classifier_predictions`` and the subgroup audit read them)."""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from cxr_pipeline.labels import LABEL_BY_SLUG, SLUGS, slug
from cxr_pipeline.vision.calibration import CALIBRATION_COLUMNS, apply
from cxr_pipeline.vision.checkpoint import MULTILABEL, ClassifierSet, calibration_maps
from cxr_pipeline.vision.evaluate import METRICS, REFERENCE_AUC
from cxr_pipeline.vision.splits import RADIOLOGIST


def metrics_table(paths: ClassifierSet) -> pl.DataFrame:
    """Every pathology's metrics row (trained or not), in label order, beside the seeds' reference AUC.

    Columns are the same whether or not any pathology could be trained, so a table of
    untrainable rows only is still a table.
    """

    rows = [{"model": "per_pathology", **r} for s in SLUGS if (f := paths.classifier(s).metrics).exists() for r in _metrics_rows(f)]
    if (f := paths.classifier(MULTILABEL).metrics).exists():
        rows += [{**r, "model": MULTILABEL} for r in _metrics_rows(f)]
    if not rows:
        return pl.DataFrame()
    df = pl.DataFrame(rows, infer_schema_length=None)
    floats = [m for m in METRICS] + [f"{m}_{b}" for m in METRICS for b in ("lo", "hi")] + ["threshold", "val_roc_auc", *CALIBRATION_COLUMNS]
    typed = {**dict.fromkeys(floats, pl.Float64), "bootstrap_skipped": pl.Int64, "uncertain_policy": pl.String, "blank_policy": pl.String}
    typed.update(calibration=pl.String, calibration_fit=pl.String, ece_binning=pl.String)  # rows written before calibration: null
    df = df.with_columns(pl.lit(None, dtype).alias(c) for c, dtype in typed.items() if c not in df.columns)
    df = df.with_columns(pl.col("pathology").replace_strict(REFERENCE_AUC, default=None, return_dtype=pl.Float64).alias("reference_auc"))
    order = {LABEL_BY_SLUG[s]: i for i, s in enumerate(SLUGS)}
    return df.sort(
        pl.col("pathology").replace_strict(order, return_dtype=pl.Int32),
        pl.col("test_labels") == RADIOLOGIST,
        pl.col("model") == MULTILABEL,
    )


def _metrics_rows(path: Path) -> list[dict]:
    """metrics.json: a list of rows, one per test label source (a single row before there were two)."""
    data = json.loads(path.read_text())
    return data if isinstance(data, list) else [{"test_labels": "chexpert", **data}]


def curves_of_test_split(paths: ClassifierSet, slugs: list[str]) -> dict[str, tuple]:
    """(y, p) of the test split for each slug that has scores."""
    curves = {}
    for s in slugs:
        f = paths.classifier(s).test_scores
        if f.exists():
            sc = pl.read_parquet(f)
            curves[LABEL_BY_SLUG[s]] = (sc["target"].to_numpy(), sc["prob"].to_numpy())
    return curves


def test_scores_table(paths: ClassifierSet) -> pl.DataFrame:
    """Every model's test-split scores, long: model, slug, dicom_id, target, prob (what the metrics are computed from).

    The multi-label model's rows carry no target (its targets are the manifest's under the same policy)."""
    parts = [
        pl.read_parquet(f).select(pl.lit("per_pathology").alias("model"), pl.lit(s).alias("slug"), "dicom_id", "target", "prob")
        for s in SLUGS
        if (f := paths.classifier(s).test_scores).exists()
    ]
    if (f := paths.classifier(MULTILABEL).predictions).exists():
        wide = pl.read_parquet(f).filter(pl.col("split") == "test")
        long = wide.unpivot(index="dicom_id", on=[s for s in SLUGS if s in wide.columns], variable_name="slug", value_name="prob")
        parts.append(long.select(pl.lit(MULTILABEL).alias("model"), "slug", "dicom_id", pl.lit(None, pl.Float64).alias("target"), "prob"))
    schema = {"model": pl.String, "slug": pl.String, "dicom_id": pl.String, "target": pl.Float64, "prob": pl.Float32}
    return pl.concat([p.cast(schema) for p in parts]) if parts else pl.DataFrame(schema=schema)


def predictions_table(paths: ClassifierSet) -> tuple[pl.DataFrame | None, list[str]]:
    """One row per image, one probability column per trained pathology."""
    wide, done = None, []
    for s in SLUGS:
        f = paths.classifier(s).predictions
        if not f.exists():
            continue
        p = pl.read_parquet(f).select("dicom_id", "split", pl.col("prob").alias(s))
        wide = p if wide is None else wide.join(p.drop("split"), on="dicom_id", how="full", coalesce=True)
        done.append(s)
    return (wide.sort("dicom_id") if wide is not None else None), done


def reliability_of_test_split(paths: ClassifierSet, slugs: list[str]) -> dict[str, tuple]:
    """(y, score, calibrated probability) of the test split for each per-finding model with scores, the map read
    from its checkpoint (``vision.calibration``; identity for a checkpoint from before calibration)."""

    out = {}
    for label, (y, p) in curves_of_test_split(paths, slugs).items():
        calibration = calibration_maps(paths.classifier(slug(label))).get(slug(label))
        out[label] = (y, p, apply(calibration, p))
    return out
