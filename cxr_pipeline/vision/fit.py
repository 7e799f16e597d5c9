"""A classifier from manifest and shards to saved files: load, fit, evaluate, save (one pathology's, or
the multi-label model's: ``load_multilabel_data`` / ``fit_multilabel`` at the end).

The Dagster asset calls ``load_data`` then either ``record_untrainable`` or
``fit_and_save``; the CLI and benchmarks can do the same without Dagster. What
lands in the classifier folder (``settings.ClassifierFiles``):

- ``checkpoint/model.safetensors`` + ``config.json`` (architecture, size,
  normalisation, validation-chosen threshold): the registered model's source;
- ``metrics.json``: the metrics row (or the reason it is not trainable);
- ``predictions.parquet``: a probability for every manifest image with a shard;
- ``test_scores.parquet`` and ``roc_pr.png``: the test split's scores and curves.

A label that cannot be trained on the current data leaves no model files
behind from an earlier run (they would read as current).
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cxr_pipeline.config import setting
from cxr_pipeline.data.io import atomic_path, write_parquet
from cxr_pipeline.data.shards import open_images
from cxr_pipeline.labels import LABEL_BY_SLUG, SLUGS
from cxr_pipeline.settings import ClassifierFiles, ClassifierSet
from cxr_pipeline.vision.evaluate import REFERENCE_AUC, evaluate, roc_auc_or_nan, save_curves, stored_threshold
from cxr_pipeline.vision.targets import targets
from cxr_pipeline.vision.train import (
    NORMALISE_MEAN,
    NORMALISE_STD,
    TrainConfig,
    TrainResult,
    loader_workers,
    predict,
    train,
)

SPLITS = ("train", "validate", "test")
RADIOLOGIST = "radiologist"  # the second test set: radiologist-labelled test studies, with those labels
MULTILABEL = "multilabel"  # its folder under classifier/ and its ``model`` value in the metrics rows


def registered_name(label_slug: str) -> str:
    """The MLflow registry name of a classifier: ``cxr-<finding>``, or ``cxr-multilabel`` for the multi-label model."""
    return "cxr-" + label_slug.replace("_", "-")


@dataclass(frozen=True)
class MultilabelConfig(TrainConfig):
    """The per-pathology recipe (``pipeline.yaml``'s ``classifier`` section, read first) and the report hints
    (the ``multilabel_classifier`` section, which may also override any recipe field for this model)."""

    oof_folds: int = setting(
        5,
        "k-fold over training patients for the report prompts' hints: each training image's hint comes from a model "
        "that did not see it (k more trainings of this model); 0 or 1: no out-of-fold hints",
    )


@dataclass
class Split:
    images: object  # vision.images: resident (uint8 tensor (n, size, size)) or streamed from the shards
    targets: object  # float tensor (n,)
    rows: pl.DataFrame  # manifest rows aligned with the images (with content_hash)

    def __post_init__(self) -> None:
        from cxr_pipeline.vision.images import as_images

        self.images = as_images(self.images)  # a tensor in hand is resident


@dataclass
class ClassifierData:
    """A label's usable rows under the label policy, per split, with their images."""

    label_slug: str
    size: int
    uncertain: str
    blank: str
    splits: dict[str, Split]  # train / validate / test (automatic labels) / radiologist
    label_source: str = "chexpert"  # the automatic labels' source (the manifest's label_source)
    mode: str = "resident"  # where the images are: resident or streamed (``vision.images.choose_mode``)

    @property
    def label(self) -> str:
        return LABEL_BY_SLUG[self.label_slug]

    @property
    def counts(self) -> dict[str, int]:
        c = {f"n_{s}": int(self.splits[s].rows.height) for s in SPLITS}
        c.update({f"n_{s}_pos": int(self.splits[s].targets.sum()) for s in SPLITS})
        return c

    @property
    def untrainable_reason(self) -> str | None:
        c = self.counts
        if c["n_train"] == 0 or c["n_train_pos"] in (0, c["n_train"]):
            return (
                f"not trainable: the training split has {c['n_train_pos']} positives of {c['n_train']} "
                f"(uncertain={self.uncertain}, blank={self.blank})"
            )
        return None

    def digest(self) -> str:
        """What the model is fit on: training and validation ids, targets and image contents, and the size."""
        h = hashlib.sha256(f"{self.label_slug}:{self.size}\n".encode())
        for s in ("train", "validate"):
            rows = self.splits[s].rows.select("dicom_id", "target", "content_hash")
            for did, t, ch in rows.iter_rows():
                h.update(f"{s}\t{did}\t{t}\t{ch}\n".encode())
        return h.hexdigest()[:24]


def _label_source(manifest: pl.DataFrame) -> str:
    """The automatic labels' source, as the manifest records it."""
    return manifest["label_source"][0] if manifest.height and "label_source" in manifest.columns else "chexpert"


def _place_splits(named_rows: list[tuple[str, pl.DataFrame]], shard_root: Path, cfg: TrainConfig, device, target) -> tuple[dict, str]:
    """Each split's shard images (resident or streamed, one decision for all: ``cfg.data``, ``cfg.memory_budget``)
    with its targets (``target(rows)``)."""
    import torch

    from cxr_pipeline.vision.images import place

    opened = [(name, *open_images(shard_root, rows, cfg.size)) for name, rows in named_rows]
    placed, mode = place([o[1] for o in opened], cfg.data, torch.device(device or "cpu"), cfg.memory_budget)
    return {name: Split(imgs, target(rows), rows) for (name, _, rows), imgs in zip(opened, placed, strict=True)}, mode


def load_data(manifest: pl.DataFrame, shard_root: Path, label_slug: str, cfg: TrainConfig, device=None) -> ClassifierData:
    """The label's targets under the policy (``cfg.uncertain``, ``cfg.blank``), joined with the shard images
    (``cfg.size``, resolved) of each split: resident on ``device`` or streamed (``cfg.data``)."""
    import torch

    size, uncertain, blank = cfg.size, cfg.uncertain, cfg.blank

    usable = targets(manifest, label_slug, uncertain, blank)
    # radiologist-labelled test studies with the radiologist's labels; blank = not mentioned = negative
    rad = (
        manifest.filter((pl.col("split") == "test") & pl.col("radiologist_labelled"))
        if "radiologist_labelled" in manifest.columns
        else None
    )
    if rad is not None:
        rad = targets(rad.with_columns(pl.col(f"radiologist_{label_slug}").alias(label_slug)), label_slug, uncertain, "zeros")
    named = [*((s, usable.filter(pl.col("split") == s)) for s in SPLITS), (RADIOLOGIST, rad if rad is not None else usable.clear())]
    splits, mode = _place_splits(named, shard_root, cfg, device, lambda rows: torch.tensor(rows["target"].to_numpy(), dtype=torch.float32))
    return ClassifierData(label_slug, size, uncertain, blank, splits, _label_source(manifest), mode)


EVAL_PRECISION = "fp32"


def _patients(rows: pl.DataFrame):
    return rows["subject_id"].to_numpy() if "subject_id" in rows.columns else None


@dataclass
class FitOutcome:
    row: dict  # the metrics row on the test split with the automatic labels
    trained: TrainResult
    files: ClassifierFiles
    test_curve: tuple  # (y, p) of the test split
    radiologist_row: dict  # the radiologist-labelled test studies with the radiologist's labels

    @property
    def rows(self) -> list[dict]:
        """Both rows, as in metrics.json."""
        return [self.row, self.radiologist_row]


def _clear_model_files(files: ClassifierFiles) -> None:
    shutil.rmtree(files.checkpoint, ignore_errors=True)
    for f in (files.predictions, files.test_scores, files.curves, files.saliency, files.resume):
        f.unlink(missing_ok=True)


def _write_json(path: Path, data: dict) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2))


def record_untrainable(data: ClassifierData, files: ClassifierFiles) -> list[dict]:
    """'Not trainable' metrics rows (one per test label source); the previous model's files are removed,
    not left as if current."""
    rows = []
    for split, source in (("test", data.label_source), (RADIOLOGIST, RADIOLOGIST)):
        n, pos = data.splits[split].rows.height, int(data.splits[split].targets.sum())
        row = {"pathology": data.label, "slug": data.label_slug, "test_labels": source, "evaluable": False}
        row.update(uncertain_policy=data.uncertain, blank_policy=data.blank)
        rows.append({**row, "reason": data.untrainable_reason, "n_test": n, "n_pos": pos, "n_neg": n - pos})
    _clear_model_files(files)
    _write_json(files.metrics, rows)
    return rows


def fit_and_save(
    data: ClassifierData,
    manifest: pl.DataFrame,
    shard_root: Path,
    cfg: TrainConfig,
    device,
    files: ClassifierFiles,
    *,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> FitOutcome:
    """Train (resuming a killed run of the same config and data), evaluate on ``device``, write the folder."""
    files.dir.mkdir(parents=True, exist_ok=True)
    sp = data.splits
    result = train(
        sp["train"].images,
        sp["train"].targets,
        sp["validate"].images,
        sp["validate"].targets,
        cfg,
        device,
        checkpoint_dir=files.dir,
        log=log,
        on_epoch=on_epoch,
        data_digest=data.digest(),
    )

    def probs(images):
        # fp32 whatever the training precision: bf16 logits have 8 significant bits, and the ties
        # they create move ROC-AUC and the chosen threshold
        return predict(result.model, images, device, cfg.eval_batch_size, EVAL_PRECISION, cfg.channels_last, loader_workers(cfg, device))

    p_val, p_test, p_rad = probs(sp["validate"].images), probs(sp["test"].images), probs(sp[RADIOLOGIST].images)
    y_test, y_val = sp["test"].targets.numpy(), sp["validate"].targets.numpy()
    common = {"pathology": data.label, "slug": data.label_slug, "best_epoch": result.best_epoch, "epochs_run": result.epochs_run}
    common.update(train_seconds=round(result.seconds, 1), val_roc_auc=roc_auc_or_nan(y_val, p_val))
    common.update(uncertain_policy=data.uncertain, blank_policy=data.blank)
    # both test sets use the threshold chosen on validation (automatic labels); resampling is by
    # patient whenever a patient has more than one test image
    row = evaluate(y_test, p_test, y_val, p_val, n_boot=cfg.bootstrap, seed=cfg.seed, groups=_patients(sp["test"].rows))
    row = {**row, **common, "test_labels": data.label_source}
    rad = evaluate(
        sp[RADIOLOGIST].targets.numpy(), p_rad, y_val, p_val, n_boot=cfg.bootstrap, seed=cfg.seed, groups=_patients(sp[RADIOLOGIST].rows)
    )
    if not sp[RADIOLOGIST].rows.height:
        rad["reason"] = "no radiologist-labelled test images"
    rad_row = {**rad, **common, "test_labels": RADIOLOGIST}

    # every manifest image that has a shard gets a probability (report generation uses them), streamed in
    # order from the shards: never a second copy of the images
    all_imgs, all_rows = open_images(shard_root, manifest.select("dicom_id", "split"), data.size)
    write_parquet(
        all_rows.select("dicom_id", "split").with_columns(pl.Series("prob", probs(all_imgs), dtype=pl.Float32)), files.predictions
    )
    scores = sp["test"].rows.select("dicom_id", "target").with_columns(pl.Series("prob", p_test, dtype=pl.Float32))
    write_parquet(scores, files.test_scores)

    _save_checkpoint(result.model, files, checkpoint_config(cfg, data, row["threshold"]))
    _write_json(files.metrics, [row, rad_row])
    files.resume.unlink(missing_ok=True)  # finished: the next materialization trains afresh
    if row["evaluable"]:
        save_curves({data.label: (y_test, p_test)}, files.curves, title=f"{data.label} ({cfg.arch})")
    else:
        files.curves.unlink(missing_ok=True)
    return FitOutcome(row=row, trained=result, files=files, test_curve=(y_test, p_test), radiologist_row=rad_row)


def _save_checkpoint(model, files: ClassifierFiles, config: dict) -> None:
    """``model.safetensors`` (no pickle) and ``config.json``, each written atomically."""
    from safetensors.torch import save_file

    files.checkpoint.mkdir(parents=True, exist_ok=True)
    with atomic_path(files.checkpoint / "model.safetensors") as tmp:
        save_file({k: v.contiguous() for k, v in model.cpu().state_dict().items()}, str(tmp))
    _write_json(files.checkpoint / "config.json", config)


def checkpoint_config(cfg: TrainConfig, data: ClassifierData, threshold: float) -> dict:
    """What a reader of the checkpoint needs to apply it (no pickle: the weights are safetensors)."""
    return {
        "arch": cfg.arch,
        "dropout": cfg.dropout,
        "size": data.size,
        "pathology": data.label,
        "threshold": threshold,
        "normalise": {"mean": NORMALISE_MEAN, "std": NORMALISE_STD},
        "input": "grey uint8 letterboxed, repeated to 3 channels",
        "training_config": trained_with(cfg, data.size),
    }


def trained_with(cfg: TrainConfig, size: int) -> dict:
    """The resolved recipe a checkpoint was trained with, recorded whole in its ``config.json``."""
    import dataclasses

    from cxr_pipeline.config import record

    return record(dataclasses.replace(cfg, size=size, loader_workers=loader_workers(cfg)))


def metrics_table(paths: ClassifierSet) -> pl.DataFrame:
    """Every pathology's metrics row (trained or not), in label order, beside the seeds' reference AUC.

    Columns are the same whether or not any pathology could be trained, so a table of
    untrainable rows only is still a table.
    """
    from cxr_pipeline.vision.evaluate import METRICS

    rows = [{"model": "per_pathology", **r} for s in SLUGS if (f := paths.classifier(s).metrics).exists() for r in _metrics_rows(f)]
    if (f := paths.classifier(MULTILABEL).metrics).exists():
        rows += [{**r, "model": MULTILABEL} for r in _metrics_rows(f)]
    if not rows:
        return pl.DataFrame()
    df = pl.DataFrame(rows, infer_schema_length=None)
    floats = [m for m in METRICS] + [f"{m}_{b}" for m in METRICS for b in ("lo", "hi")] + ["threshold", "val_roc_auc"]
    typed = {**dict.fromkeys(floats, pl.Float64), "bootstrap_skipped": pl.Int64, "uncertain_policy": pl.String, "blank_policy": pl.String}
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


def validation_digest(data: ClassifierData | MultilabelData) -> str:
    """What a validation score is computed on: a digest of the validation rows' ids, image content and targets.
    The registry compares champions only between versions with the same digest (``tracking.register_version``)."""
    rows = data.splits["validate"].rows
    cols = [c for c in rows.columns if c in ("dicom_id", "content_hash", "target") or c.startswith("t_")]
    return hashlib.sha256(rows.select(sorted(cols)).sort("dicom_id").write_csv().encode()).hexdigest()[:16]


def report_hints(
    multilabel: ClassifierFiles, predictions: pl.DataFrame | None, metrics: pl.DataFrame | None
) -> tuple[pl.DataFrame | None, dict[str, float], str]:
    """The classifier probabilities report prompts and the retrieval baseline use, their per-finding
    thresholds, and where they come from.

    The multi-label model's (``multilabel``: its files): out-of-fold for training images (a hint never
    comes from a model that saw the image, so training prompts are as good as test prompts, not better),
    out-of-sample for the other splits, with its validation-chosen thresholds. Without them
    (``oof_folds`` 0 or 1), the per-pathology ``predictions`` table, in-sample on the training split and
    named so, with the thresholds of the ``metrics`` table.
    """
    if multilabel.hints.exists():
        config = json.loads((multilabel.checkpoint / "config.json").read_text())
        return pl.read_parquet(multilabel.hints), config.get("thresholds", {}), "multilabel_out_of_fold"
    if predictions is not None:
        rows = (
            metrics.filter((pl.col("model") == "per_pathology") & (pl.col("test_labels") != RADIOLOGIST)) if metrics is not None else None
        )
        thresholds = {r["slug"]: stored_threshold(r["threshold"]) for r in rows.iter_rows(named=True)} if rows is not None else {}
        return predictions, thresholds, "per_pathology_in_sample"
    return None, {}, "none"


# --- the multi-label model: one backbone, 14 logits, masked loss -----------------------------------


@dataclass
class MultilabelData:
    """Every manifest image with at least one usable label; targets (n, 14) in ``SLUGS`` order, NaN where
    the policy leaves a label out (the loss does not count it)."""

    size: int
    uncertain: str
    blank: str
    splits: dict[str, Split]
    label_source: str = "chexpert"
    mode: str = "resident"

    def digest(self) -> str:
        h = hashlib.sha256(f"{MULTILABEL}:{self.size}:{self.uncertain}:{self.blank}\n".encode())
        for s in ("train", "validate"):
            sp = self.splits[s]
            for (did, ch), y in zip(sp.rows.select("dicom_id", "content_hash").iter_rows(), sp.targets.numpy().tolist(), strict=True):
                h.update(f"{s}\t{did}\t{ch}\t{y}\n".encode())
        return h.hexdigest()[:24]


def _target_matrix(rows: pl.DataFrame, uncertain: str, blank: str) -> pl.DataFrame:
    """``rows`` with one Float32 column per label (``t_<slug>``): the policy's 0/1 target, null if unusable."""
    out = rows
    for s in SLUGS:
        t = targets(rows, s, uncertain, blank).select("dicom_id", pl.col("target").cast(pl.Float32).alias(f"t_{s}"))
        out = out.join(t, on="dicom_id", how="left", maintain_order="left")
    return out


def load_multilabel_data(manifest: pl.DataFrame, shard_root: Path, cfg: TrainConfig, device=None) -> MultilabelData:
    """All 14 labels' targets under the policy, joined with the shard images of each split (resident or streamed)."""
    import torch

    size, uncertain, blank = cfg.size, cfg.uncertain, cfg.blank

    tcols = [f"t_{s}" for s in SLUGS]
    m = _target_matrix(manifest, uncertain, blank)
    m = m.filter(pl.any_horizontal(pl.col(tcols).is_not_null()))
    rad = None
    if "radiologist_labelled" in manifest.columns:
        rad = manifest.filter((pl.col("split") == "test") & pl.col("radiologist_labelled"))
        rad = _target_matrix(rad.with_columns(pl.col(f"radiologist_{s}").alias(s) for s in SLUGS), uncertain, "zeros")

    def target(rows: pl.DataFrame):
        y = rows.select(tcols).to_numpy().astype("float32") if rows.height else torch.zeros(0, len(SLUGS)).numpy()
        return torch.from_numpy(y).reshape(-1, len(SLUGS))

    named = [*((s, m.filter(pl.col("split") == s)) for s in SPLITS), (RADIOLOGIST, m.clear() if rad is None else rad)]
    splits, mode = _place_splits(named, shard_root, cfg, device, target)
    return MultilabelData(size, uncertain, blank, splits, _label_source(manifest), mode)


def fit_multilabel(
    data: MultilabelData,
    manifest: pl.DataFrame,
    shard_root: Path,
    cfg: TrainConfig,
    device,
    files: ClassifierFiles,
    *,
    log: Callable[[str], None] | None = None,
    on_epoch: Callable[[dict], None] | None = None,
) -> tuple[list[dict], TrainResult]:
    """Train the multi-label model and evaluate each label exactly as a per-pathology model is
    (validation-chosen threshold, bootstrap CIs by patient, both test label sources); rows carry
    ``model: multilabel``. Writes checkpoint, metrics.json and a wide predictions.parquet."""
    import numpy as np

    files.dir.mkdir(parents=True, exist_ok=True)
    sp = data.splits
    result = train(
        sp["train"].images, sp["train"].targets, sp["validate"].images, sp["validate"].targets, cfg, device,
        checkpoint_dir=files.dir, log=log, on_epoch=on_epoch, data_digest=data.digest(),
    )  # fmt: skip

    def probs(images):
        p = predict(result.model, images, device, cfg.eval_batch_size, EVAL_PRECISION, cfg.channels_last, loader_workers(cfg, device))
        return p.reshape(-1, len(SLUGS))

    p_val, p_test, p_rad = probs(sp["validate"].images), probs(sp["test"].images), probs(sp[RADIOLOGIST].images)
    y_val, y_test, y_rad = (sp[s].targets.numpy() for s in ("validate", "test", RADIOLOGIST))
    rows, thresholds = [], {}
    for j, s in enumerate(SLUGS):
        kv = ~np.isnan(y_val[:, j])
        common = {"pathology": LABEL_BY_SLUG[s], "slug": s, "model": MULTILABEL, "best_epoch": result.best_epoch}
        common.update(epochs_run=result.epochs_run, train_seconds=round(result.seconds, 1), uncertain_policy=data.uncertain)
        common.update(blank_policy=data.blank, val_roc_auc=roc_auc_or_nan(y_val[kv, j], p_val[kv, j]))
        for split, source, y, p in (("test", data.label_source, y_test, p_test), (RADIOLOGIST, RADIOLOGIST, y_rad, p_rad)):
            k = ~np.isnan(y[:, j])
            groups = _patients(sp[split].rows.filter(pl.Series(k))) if len(k) else None
            row = evaluate(y[k, j], p[k, j], y_val[kv, j], p_val[kv, j], n_boot=cfg.bootstrap, seed=cfg.seed, groups=groups)
            rows.append({**row, **common, "test_labels": source})
        thresholds[s] = rows[-2]["threshold"]

    all_imgs, all_rows = open_images(shard_root, manifest.select("dicom_id", "split"), data.size)  # streamed, as above
    p_all = probs(all_imgs)
    write_parquet(
        all_rows.select("dicom_id", "split").with_columns(pl.Series(s, p_all[:, j], dtype=pl.Float32) for j, s in enumerate(SLUGS)),
        files.predictions,
    )
    config = {"arch": cfg.arch, "dropout": cfg.dropout, "size": data.size, "labels": [LABEL_BY_SLUG[s] for s in SLUGS]}
    config.update(thresholds=thresholds, normalise={"mean": NORMALISE_MEAN, "std": NORMALISE_STD}, outputs=len(SLUGS))
    config["training_config"] = trained_with(cfg, data.size)
    _save_checkpoint(result.model, files, config)
    _write_json(files.metrics, rows)
    files.resume.unlink(missing_ok=True)
    return rows, result


# --- out-of-fold hints for the report prompts -------------------------------------------------------


def assign_folds(rows: pl.DataFrame, k: int, seed: int = 0) -> pl.DataFrame:
    """``rows`` (with ``subject_id``) with a ``fold`` column in 0..k-1: whole patients per fold, shuffled."""
    import numpy as np

    patients = rows["subject_id"].unique().sort().to_numpy()
    order = np.random.default_rng(seed).permutation(len(patients))
    fold_of = {p: int(i % k) for i, p in zip(order, patients, strict=True)}
    return rows.with_columns(pl.col("subject_id").replace_strict(fold_of, return_dtype=pl.Int32).alias("fold"))


def fit_out_of_fold(
    data: MultilabelData, cfg: TrainConfig, device, k: int, log: Callable[[str], None] | None = None
) -> tuple[pl.DataFrame, dict[int, set[str]]]:
    """Out-of-fold probabilities for every training image: k multi-label models, each trained on the
    training patients outside one fold (early stopping on the validation split) and applied to that
    fold only, so no image's hint comes from a model that saw it. Returns (``dicom_id``, ``fold``,
    one column per slug) and, per fold, the ids its model trained on (for the audit in the tests)."""
    import numpy as np

    sp = data.splits["train"]
    rows = assign_folds(sp.rows, k, cfg.seed)
    folds = rows["fold"].to_numpy()
    parts, trained_on = [], {}
    for f in range(k):
        inside, outside = np.flatnonzero(folds == f), np.flatnonzero(folds != f)
        if len(inside) == 0:
            continue
        if log:
            log(f"out-of-fold model {f + 1}/{k}: trains on {len(outside)} images, predicts {len(inside)}")
        val = data.splits["validate"]
        res = train(sp.images.subset(outside), sp.targets[outside], val.images, val.targets, cfg, device)  # a view, not a copy
        p = predict(
            res.model, sp.images.subset(inside), device, cfg.eval_batch_size, EVAL_PRECISION, cfg.channels_last, loader_workers(cfg, device)
        )
        p = p.reshape(-1, len(SLUGS))
        ids = rows["dicom_id"].to_numpy()
        trained_on[f] = set(ids[outside].tolist())
        part = pl.DataFrame({"dicom_id": ids[inside], "fold": np.full(len(inside), f, dtype=np.int32)})
        parts.append(part.with_columns(pl.Series(s, p[:, j], dtype=pl.Float32) for j, s in enumerate(SLUGS)))
    schema = {"dicom_id": pl.String, "fold": pl.Int32, **dict.fromkeys(SLUGS, pl.Float32)}
    return (pl.concat(parts) if parts else pl.DataFrame(schema=schema)), trained_on


def hint_predictions(oof: pl.DataFrame, all_predictions: pl.DataFrame) -> pl.DataFrame:
    """The probabilities report prompts and retrieval use: out-of-fold for training images, the
    final model's (out-of-sample) for every other split. ``source`` says which."""
    other = all_predictions.filter(pl.col("split") != "train").with_columns(
        pl.lit(None, pl.Int32).alias("fold"), pl.lit("held_out").alias("source")
    )
    train = oof.join(all_predictions.select("dicom_id", "split"), on="dicom_id", how="left").with_columns(
        pl.lit("out_of_fold").alias("source")
    )
    cols = ["dicom_id", "split", "fold", "source", *SLUGS]
    return pl.concat([train.select(cols), other.select(cols)]).sort("dicom_id")
