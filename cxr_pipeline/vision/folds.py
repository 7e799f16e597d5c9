"""Out-of-fold predictions of the multi-label recipe: k fold models over the training patients, each applied
to the fold it did not see, so that no training image's report hint comes from a model that saw it.
Together with the final model's held-out predictions they make the report hints table."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl

from cxr_pipeline.labels import SLUGS
from cxr_pipeline.vision.calibration import apply, calibrated_threshold, fit_platt
from cxr_pipeline.vision.checkpoint import ClassifierFiles, ClassifierSet, calibration_maps, read_config
from cxr_pipeline.vision.evaluate import choose_threshold, stored_threshold
from cxr_pipeline.vision.fit import EVAL_PRECISION
from cxr_pipeline.vision.multilabel import MultilabelData
from cxr_pipeline.vision.splits import RADIOLOGIST
from cxr_pipeline.vision.train import TrainConfig, loader_workers, predict, train


def assign_folds(rows: pl.DataFrame, k: int, seed: int = 0) -> pl.DataFrame:
    """``rows`` (with ``subject_id``) with a ``fold`` column in 0..k-1: whole patients per fold, shuffled."""
    import numpy as np

    patients = rows["subject_id"].unique().sort().to_numpy()
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {p: int(i % k) for i, p in zip(order, patients, strict=True)}
    return rows.with_columns(pl.col("subject_id").replace_strict(fold_of, return_dtype=pl.Int32).alias("fold"))


@dataclass(frozen=True)
class OutOfFold:
    """The fold models' predictions and how each was read."""

    table: pl.DataFrame  # dicom_id, fold, per slug: calibrated probability, threshold_{slug} (calibrated), call_{slug}
    trained_on: dict[int, set[str]]  # per fold, the ids its model trained on (for the audit in the tests)
    fits: dict[int, dict[str, dict]]  # per fold and slug: {"threshold": on the network's scores, "calibration": map}


def fit_out_of_fold(data: MultilabelData, cfg: TrainConfig, device, k: int, log: Callable[[str], None] | None = None) -> OutOfFold:
    """Out-of-fold probabilities for every training image: k multi-label models, each trained on the
    training patients outside one fold (early stopping on the validation split) and applied to that
    fold only, so no image's hint comes from a model that saw it. Each fold model's thresholds and calibration
    are its own, chosen and fitted on the validation split as the final model's are (``evaluate.choose_threshold``,
    ``calibration.fit_platt``): five models with their own score scales are not read at one model's thresholds.
    The table holds calibrated probabilities, each threshold carried through its fold's map (for display), and
    each call, read on the fold network's score at its validation threshold (``call_column``): the map clips
    scores within ``calibration._EPS`` of 0 or 1 and rounds to Float32, so near the ends two scores either side of
    a threshold can become one probability, and a call read through the map would flip."""
    import numpy as np

    sp = data.splits["train"]
    rows = assign_folds(sp.rows, k, cfg.seed)
    folds = rows["fold"].to_numpy()
    parts, trained_on, fits = [], {}, {}
    for f in range(k):
        inside, outside = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        if len(inside) == 0:
            continue
        if log:
            log(f"out-of-fold model {f + 1}/{k}: trains on {len(outside)} images, predicts {len(inside)}")
        val = data.splits["validate"]
        res = train(sp.images.subset(outside), sp.targets[outside], val.images, val.targets, cfg, device)  # a view, not a copy

        def probs(images, model=res.model):
            out = predict(model, images, device, cfg.eval_batch_size, EVAL_PRECISION, cfg.channels_last, loader_workers(cfg, device))
            return out.reshape(-1, len(SLUGS))

        p, p_val, y_val = probs(sp.images.subset(inside)), probs(val.images), val.targets.numpy()
        known = ~np.isnan(y_val)
        fits[f] = {
            s: {
                "threshold": float(choose_threshold(y_val[known[:, j], j], p_val[known[:, j], j])[0]),
                "calibration": fit_platt(y_val[known[:, j], j], p_val[known[:, j], j]),
            }
            for j, s in enumerate(SLUGS)
        }
        ids = rows["dicom_id"].to_numpy()
        trained_on[f] = set(ids[outside].tolist())
        part = pl.DataFrame({"dicom_id": ids[inside], "fold": np.full(len(inside), f, dtype=np.int32)})
        part = part.with_columns(pl.Series(s, apply(fits[f][s]["calibration"], p[:, j]), dtype=pl.Float32) for j, s in enumerate(SLUGS))
        part = part.with_columns(pl.Series(call_column(s), p[:, j] >= fits[f][s]["threshold"]) for j, s in enumerate(SLUGS))
        at = {s: calibrated_threshold(fit["calibration"], fit["threshold"]) for s, fit in fits[f].items()}
        parts.append(part.with_columns(pl.lit(t).alias(threshold_column(s)) for s, t in at.items()))
    schema = {c: t for c, t in HINT_SCHEMA.items() if c not in ("split", "source")}
    return OutOfFold(pl.concat(parts) if parts else pl.DataFrame(schema=schema), trained_on, fits)


def hint_predictions(
    oof: pl.DataFrame, all_predictions: pl.DataFrame, thresholds: dict[str, float], calibrations: dict[str, dict] | None = None
) -> pl.DataFrame:
    """The probabilities report prompts and retrieval use, their thresholds and calls: out-of-fold for
    training images (each at its fold model's thresholds), the final model's (out-of-sample) for every other
    split (at the final model's ``thresholds``, on its network scores: each call is read there, and the
    probability and the threshold are carried through its ``calibrations`` for display). ``source`` says which."""
    calibrations = calibrations or {}
    other = all_predictions.filter(pl.col("split") != "train")
    other = other.with_columns(_raw_calls(thresholds)).with_columns(
        pl.lit(None, pl.Int32).alias("fold"),
        pl.lit("held_out").alias("source"),
        *(pl.Series(s, apply(calibrations.get(s), other[s].to_numpy()), dtype=pl.Float32) for s in SLUGS),
        *(pl.lit(calibrated_threshold(calibrations.get(s), thresholds[s])).alias(threshold_column(s)) for s in SLUGS),
    )
    train = oof.join(all_predictions.select("dicom_id", "split"), on="dicom_id", how="left").with_columns(
        pl.lit("out_of_fold").alias("source")
    )
    cols = list(HINT_SCHEMA)
    return pl.concat([train.select(cols), other.select(cols)], how="vertical_relaxed").sort("dicom_id")


def threshold_column(slug: str) -> str:
    """The hints table's column holding a finding's threshold carried through the calibration map: for display
    beside the probability, not for deciding the call (``call_column``: near 0 or 1 the map ties scores)."""
    return f"threshold_{slug}"


def call_column(slug: str) -> str:
    """The hints table's column holding a finding's call: the network's score at or above its validation threshold,
    decided before calibration, so that a consumer reads the network's call rather than re-deriving it from two
    calibrated values that the map's clip and Float32 rounding can tie or reorder."""
    return f"call_{slug}"


def _raw_calls(thresholds: dict[str, float | None]) -> list[pl.Expr]:
    """Each finding's call on the network's scores (the columns as they are, before calibration) at its threshold;
    null where there is no score or no threshold."""
    return [
        (pl.col(s) >= t if t is not None else pl.lit(None, pl.Boolean)).alias(call_column(s)) for s, t in thresholds.items() if s in SLUGS
    ]


HINT_SCHEMA = {
    "dicom_id": pl.String,
    "split": pl.String,
    "fold": pl.Int32,
    "source": pl.String,
    **dict.fromkeys(SLUGS, pl.Float32),
    **{threshold_column(s): pl.Float64 for s in SLUGS},
    **{call_column(s): pl.Boolean for s in SLUGS},
}


@dataclass(frozen=True)
class ReportHints:
    """The report hints table and how it was made."""

    table: pl.DataFrame  # HINT_SCHEMA: one row per manifest image with a shard
    source: str  # multilabel_out_of_fold, or per_pathology_in_sample when no fold models are trained
    folds: int  # fold models trained (0: none)

    @property
    def out_of_fold_images(self) -> int:
        return int((self.table["source"] == "out_of_fold").sum())


def report_hints(
    cfg: TrainConfig,
    device,
    multilabel: ClassifierFiles,
    predictions: pl.DataFrame,
    metrics: pl.DataFrame,
    load: Callable[[], MultilabelData],
    log: Callable[[str], None] | None = None,
    calibrations: dict[str, dict] | None = None,
) -> ReportHints:
    """The classifier probabilities the report prompts and the retrieval baseline read, their thresholds and
    their calls, one row per image.

    With ``cfg.oof_folds`` k > 1: the multi-label model's (``multilabel``: its files), out-of-fold for training
    images (k fold models over the training patients, their data from ``load``: a hint never comes from a model
    that saw the image, so training prompts are as good as test prompts, not better), each read at its fold
    model's validation-chosen thresholds; the final model's for the other splits, at its thresholds. Otherwise the
    per-pathology ``predictions`` (the ``classifier_predictions`` table), in-sample on the training split and
    named so, at the thresholds of the ``metrics`` table (``classifier_metrics``), each model's probabilities
    and threshold carried through its calibration (``calibrations``: slug -> map, from its checkpoint).

    Every probability in the table is calibrated (``vision.calibration``; the prompts print them, so they
    should read as probabilities) and every threshold is carried through the same map, for display. Every call
    (``call_column``) is decided on the network's score at the validation threshold, before the map: the map is
    only non-decreasing at its clip (scores within ``calibration._EPS`` of 0 or 1 become one probability), so
    the findings a prompt names are read from the calls, never from a probability against a carried threshold.
    """
    if cfg.oof_folds > 1:
        final = pl.read_parquet(multilabel.predictions)
        config = read_config(multilabel.checkpoint)
        oof = fit_out_of_fold(load(), cfg, device, cfg.oof_folds, log=log).table
        table = hint_predictions(oof, final, dict(config.thresholds), dict(config.calibration))
        return ReportHints(_hint_table(table), "multilabel_out_of_fold", cfg.oof_folds)
    rows = metrics.filter((pl.col("model") == "per_pathology") & (pl.col("test_labels") != RADIOLOGIST))
    thresholds = {r["slug"]: stored_threshold(r["threshold"]) for r in rows.iter_rows(named=True)}
    calibrations = calibrations or {}
    in_sample = pl.when(pl.col("split") == "train").then(pl.lit("in_sample")).otherwise(pl.lit("held_out"))
    table = predictions.with_columns(pl.lit(None, pl.Int32).alias("fold"), in_sample.alias("source"))
    table = table.with_columns(_raw_calls({s: t for s, t in thresholds.items() if s in table.columns}))
    table = table.with_columns(
        pl.Series(s, apply(calibrations.get(s), table[s].to_numpy()), dtype=pl.Float32) for s in SLUGS if s in table.columns
    )
    at = {s: calibrated_threshold(calibrations.get(s), t) if t is not None else None for s, t in thresholds.items()}
    table = table.with_columns(pl.lit(at.get(s), pl.Float64).alias(threshold_column(s)) for s in SLUGS)
    return ReportHints(_hint_table(table), "per_pathology_in_sample", 0)


def per_finding_calibrations(classifiers: ClassifierSet, metrics: pl.DataFrame) -> dict[str, dict]:
    """Each per-finding model's calibration map (from its checkpoint), for the findings in ``metrics``
    (``classifier_metrics``); a checkpoint written before calibration gives none (its scores are used as they are)."""
    out = {}
    for s in metrics.filter(pl.col("model") == "per_pathology")["slug"].unique().to_list():
        out.update(calibration_maps(classifiers.classifier(s)))
    return out


def _hint_table(table: pl.DataFrame) -> pl.DataFrame:
    """``table`` in ``HINT_SCHEMA`` (a finding no model was trained for: null), sorted by image."""
    missing = [pl.lit(None, dtype).alias(c) for c, dtype in HINT_SCHEMA.items() if c not in table.columns]
    return table.with_columns(missing).select(list(HINT_SCHEMA)).cast(HINT_SCHEMA).sort("dicom_id")
