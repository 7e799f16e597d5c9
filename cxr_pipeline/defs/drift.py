"""New images against the training images -> image_drift: one partition per window (a batch of incoming images).

The work is in ``vision.drift`` (the signals, the MMD test, CBPE); this module finds a window's images, draws the
reference from the training split of the shards, loads the champions (the multi-label one's calibrated
probabilities decide the alarm by default, its features are tested beside them; every champion's outputs are
compared, each at its own input size), calls ``vision.drift.compare``,
logs to MLflow and warns through an asset check when the window drifts. Windows are dynamic partitions: each
external set present is one (``external-<format>``), and so is each window of studies the PACS intake received
(``pacs-NNNN``, ``vision.pacs_windows``), added by the ``drift_windows`` sensor;
the automation sensor runs them (and again after the multi-label champion is retrained); the MIMIC shard
partitions are not windows (they hold training images). The asset depends on the multi-label classifier alone: a
per-finding champion that is training, missing or failing never holds the alarm back, and a retrained one's
outputs show at a window's next run.
"""

from pathlib import Path

import dagster as dg
import numpy as np
import polars as pl

from cxr_pipeline.config import resolve
from cxr_pipeline.data.dicom import header_geometry
from cxr_pipeline.data.external import FORMATS, ExternalSettings, scored_images
from cxr_pipeline.data.shard_reader import Shards, open_images
from cxr_pipeline.defs import needs
from cxr_pipeline.defs.history import latest_metadata
from cxr_pipeline.defs.io import ShardSet, external_shard_settings, table_schema
from cxr_pipeline.defs.keys import EXTERNAL_VALIDATION, IMAGE_DRIFT, MULTILABEL_CLASSIFIER
from cxr_pipeline.defs.metadata import asset_metadata, resolved_metadata, table_metadata
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import ALL_SHARDS_IN, MANIFEST_IN
from cxr_pipeline.fields import params
from cxr_pipeline.files import file_digest, write_parquet
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.settings import paths as current_paths
from cxr_pipeline.vision.checkpoint import MULTILABEL
from cxr_pipeline.vision.drift import Sample, compare, one_per_patient
from cxr_pipeline.vision.external import EXTERNAL_PARTITION, build_external_shards, load_champions
from cxr_pipeline.vision.pacs_windows import load_window, pacs_windows_root, window_names
from cxr_pipeline.vision.registry import registered_name

DRIFT_WINDOWS = dg.DynamicPartitionsDefinition(name="drift_windows")
DriftConfig = dagster_config(IMAGE_DRIFT, "DriftConfig")
FRONTAL = ("PA", "AP")
BOTH_TESTS = ("outputs_mmd", "outputs_p_value", "features_mmd", "features_p_value")
# CBPE assumes the calibration fitted on validate still holds on the window; a drifted window is where it may not
# (docs/monitoring.md, "The benchmark": at test seeds 29, 31 and 37, errors up to 0.25 at levels where every window
# alarmed; 0.023 at most where none did). The alarm's check says so, and so does the run's log.
UNTRUSTED = "CBPE's expected AUC, sensitivity and specificity assume the calibration still holds, which a drifted window's images need not: do not read them as this window's performance"
SHOWN = ("window", "model", "pathology", "drift_score", "p_value", "drifted", "output_ks", "expected_auc", "auc", "auc_estimate_error")


def geometry(root: Path, rows: pl.DataFrame) -> np.ndarray:
    """Each row's source file's (bits stored, rows, columns) from its header (``data.dicom.header_geometry``)."""
    return np.array([header_geometry(root / p) for p in rows["path"]], dtype=np.int64).reshape(-1, 3)


def reference_sample(manifest: pl.DataFrame, shards: Shards, n: int, seed: int, raw: Path | None = None) -> Sample:
    """``n`` frontal images of the **training** split (never validate or test), one per patient, drawn with ``seed``;
    with their source files' bit depth and size where the raw files are at ``raw``."""
    train = one_per_patient(manifest.filter((pl.col("split") == "train") & pl.col("view_position").is_in(list(FRONTAL))), seed)
    lazy, kept = open_images(shards, train)
    idx = np.sort(np.random.default_rng(seed).choice(len(lazy), size=min(n, len(lazy)), replace=False))
    rows = kept[idx.tolist()]
    return Sample(lazy.take(idx), rows["view_position"].to_list(), rows, None if raw is None else geometry(raw, rows))


def external_window(paths, fmt: str, size: int, seed: int) -> tuple[Sample, str]:
    """An external set's frontal images at ``size``, one per patient drawn with ``seed``, with its labels; ("", reason)
    when the set is absent or the views external validation scores hold no frontal one. Its shards are external
    validation's: the same rows (``data.external.scored_images``) built with the same settings
    (``defs.io.external_shard_settings``), reused when already there."""
    cfg: ExternalSettings = resolve(paths, EXTERNAL_VALIDATION, {})
    reason = cfg.absent_reason(fmt, paths.home)
    empty = Sample(np.zeros((0, size, size), np.uint8), [])
    if reason:
        return empty, reason
    folder, _, rows = scored_images(cfg, fmt, paths.home)
    frontal = rows.filter(pl.col("view_position").is_in(list(FRONTAL)))
    if not frontal.height:
        return empty, f"{fmt}: no frontal image among the views external_validation scores ({list(cfg.views) or 'every view'})"
    build_external_shards(paths, fmt, folder, rows, [size], external_shard_settings(paths))
    lazy, kept = open_images(Shards.open(paths.external_shard_root(fmt, size), size, [EXTERNAL_PARTITION]), one_per_patient(frontal, seed))
    return Sample(lazy.take(np.arange(len(lazy))), kept["view_position"].to_list(), kept, geometry(folder, kept)), ""


def pacs_window(paths, name: str, size: int, seed: int) -> tuple[Sample, str]:
    """A window of studies the PACS intake received (``vision.pacs_windows``), one image per patient drawn with
    ``seed``; no labels (CBPE only). ("", reason) when it is missing or kept at other sizes."""
    images, views, rows, reason = load_window(pacs_windows_root(paths), name, size)
    if reason:
        return Sample(images, []), reason
    kept = one_per_patient(rows.with_row_index("_k"), seed)
    idx = kept["_k"].to_numpy()
    shapes = kept.select("bits_stored", "source_rows", "source_cols").to_numpy().astype(np.int64)
    return Sample(images[idx], [views[i] for i in idx], kept.drop("_k", "bits_stored", "source_rows", "source_cols"), shapes), ""


def window_readings(sample: Sample, cfg) -> dict[str, int]:
    """How many of a PACS window's compared images (one per patient, drawn down to ``cfg.max_window`` as
    ``vision.drift.compare`` draws them) were read each way (``reading``: the file's own window or VOI LUT, the
    training images' windows for a file without one, or the percentile window where no such prior was fitted): a
    window read through the percentile window is compared on a reading the training images did not have. {} for an
    external set (its shards are read as its build read them: spec.json's window_prior)."""
    rows = sample.draw(cfg.max_window, cfg.seed).rows
    if rows is None or "reading" not in rows.columns:
        return {}
    return {str(r): int(n) for r, n in rows["reading"].value_counts(sort=True).iter_rows()}


def window_sample(paths, window: str, size: int, seed: int) -> tuple[Sample, str]:
    """The images of ``window``: an external set (``external-<format>``) or a PACS window (``pacs-NNNN``)."""
    if window.startswith("external-"):
        return external_window(paths, window.removeprefix("external-"), size, seed)
    if window.startswith("pacs-"):
        return pacs_window(paths, window, size, seed)
    return Sample(np.zeros((0, size, size), np.uint8), []), f"{window}: not a window this pipeline knows (external-<format>, pacs-NNNN)"


def per_finding_sides(
    paths, manifest, image_shards: ShardSet, window: str, champions: list, cfg, known: dict
) -> tuple[list[tuple], dict[str, str]]:
    """Each per-finding champion with the reference and the window at its own input size (drawn with the same seed,
    so the same patients where every image reads at each size): what ``vision.drift.compare`` compares its
    outputs on (``known``: {size: (reference, window)} already drawn). A size without training shards, or one the
    window cannot be read at, leaves that size's champions out: ({name: why} beside the sides). The alarm rests
    on the multi-label champion alone, so a per-finding champion never stops it."""
    sides, left, by_size = [], {}, dict(known)
    for champ in champions:
        size = champ.model.size
        if size not in by_size:
            try:
                shards = image_shards.at(size)
            except dg.Failure as e:
                by_size[size] = str(e.description)
            else:
                window_at, reason = window_sample(paths, window, size, cfg.seed)
                by_size[size] = reason or (reference_sample(manifest, shards, cfg.reference, cfg.seed), window_at)
        if isinstance(by_size[size], str):
            left[champ.name] = by_size[size]
        else:
            sides.append((champ, *by_size[size]))
    return sides, left


def per_finding_champions(run, uri: str, log) -> list:
    """The per-finding champions registered, each loaded through MLflow's loader; one that fails to load is left
    out with a warning naming it (its outputs are a signal beside the alarm, which must not fail with it)."""
    out = []
    for name in [registered_name(s) for s in SLUGS]:
        try:
            out += load_champions(run.client, uri, [name])
        except Exception as e:  # any loader error: the model's files, its flavour, its dependencies
            log.warning(f"image_drift: champion {name} could not be loaded ({type(e).__name__}); its outputs are not compared")
    return out


def _skipped(run, paths, window: str, reason: str, cfg) -> dg.MaterializeResult:
    """An empty table that says why (no champion, an absent set, a window this pipeline does not know). A window
    compared before whose images are gone since (a PACS window past ``pacs_windows_kept``, a set removed) keeps
    its last comparison: a re-run after a retrained champion must not erase it."""
    run.set_tags({"skipped": reason})
    path = paths.image_drift / f"{window}.parquet"
    if path.exists() and (last := pl.read_parquet(path)).height:
        stands = f"{reason}; the last comparison stands ({last['model'][0]})"
        return _result(run, path, last, cfg, reason=stands, champions_compared=last["model"].n_unique())
    path = write_parquet(pl.DataFrame(), path)
    md = asset_metadata(run, path, 0, reason=reason, compared=False, **resolved_metadata(cfg))
    return dg.MaterializeResult(metadata=md, data_version=dg.DataVersion(file_digest(path)))


def _log_metrics(run, table: pl.DataFrame, readings: dict[str, int]) -> dict:
    """In MLflow: the window's figures (the drift score, its p-value, the tolerance in force and the alarm as 1 or 0,
    both MMD tests, the histogram distance, the sizes); per finding, the multi-label champion's expected and measured AUC as ``<finding>.expected_auc`` and
    ``<finding>.auc``, and every champion's output shift as ``<registered name>.<finding>.output_ks``; a PACS window's
    ``window_readings`` as ``reading.<how>`` (spaces as underscores). Returns the readings as metadata."""
    run.log_metrics({f"reading.{k.replace(' ', '_')}": float(n) for k, n in readings.items()})
    first = table.row(0, named=True)
    window = ("drift_score", "p_value", "tolerance", "drifted", *BOTH_TESTS, "histogram_distance", "n_window", "n_reference")
    run.log_metrics({k: float(first[k]) for k in window})
    multi = table.filter(pl.col("model").str.starts_with(registered_name(MULTILABEL) + " "))
    run.log_metrics(
        {f"{r['slug']}.expected_auc": r["expected_auc"] for r in multi.iter_rows(named=True) if r["expected_auc"] == r["expected_auc"]}
    )
    run.log_metrics({f"{r['slug']}.auc": r["auc"] for r in multi.iter_rows(named=True) if r["auc"] is not None})
    run.log_metrics({f"{r['model'].rsplit(' v', 1)[0]}.{r['slug']}.output_ks": r["output_ks"] for r in table.iter_rows(named=True)})
    return {"readings": dg.MetadataValue.json(readings)} if readings else {}


def _result(run, path, table: pl.DataFrame, cfg, **extra) -> dg.MaterializeResult:
    """The window's metadata: the alarm and the drift score up front, a few columns shown, every column described."""
    first = table.row(0, named=True)
    shown = table.select([c for c in SHOWN if c in table.columns]).with_columns(pl.col(pl.Float64).round(4))
    md = {
        "table": table_metadata(shown),
        **{k: float(first[k]) for k in ("drift_score", "p_value", "histogram_distance")},
        **({"tolerance": float(first["tolerance"])} if first.get("tolerance") is not None else {}),
        **{k: float(first[k]) for k in BOTH_TESTS if first.get(k) is not None},
        # a table written before a9eea7c (a last comparison standing) alarmed on the features and names no signal
        "signal": str(first.get("signal") or "features"),
        "drifted": bool(first["drifted"]),
        "n_window": int(first["n_window"]),
        "dagster/column_schema": dg.MetadataValue.table_schema(table_schema(IMAGE_DRIFT, table)),
        **extra,
    }
    return dg.MaterializeResult(
        metadata=asset_metadata(run, path, table.height, **md, **resolved_metadata(cfg)), data_version=dg.DataVersion(file_digest(path))
    )


@dg.asset(
    name=IMAGE_DRIFT,
    group_name="monitoring",
    partitions_def=DRIFT_WINDOWS,
    deps=[MULTILABEL_CLASSIFIER],
    ins={"manifest": MANIFEST_IN, "image_shards": ALL_SHARDS_IN},
    kinds={"polars", "parquet"},
    description="Does a window of new images still look like the training images? Per window (a dynamic partition: each external "
    "set, external-<format>, and each window of studies the PACS intake received, pacs-NNNN) against frontal training-split "
    "images, one per patient: the multi-label champion's calibrated probabilities by MMD with a permutation p-value (the drift "
    "score and the alarm: p < alpha and the score at least image_drift.tolerance; image_drift.signal: features to alarm on its pooled features, tested beside them either "
    "way), beside the intensity histogram distance, the view mix and "
    "each champion's output shift per finding (the multi-label one's and each per-finding one's); CBPE's expected AUC, sensitivity and specificity from calibrated probabilities, and the "
    "measured ones where the window has labels.",
    **needs.CNN.asset_args(),
)
def image_drift(
    context: dg.AssetExecutionContext,
    config: DriftConfig,
    manifest: pl.DataFrame,
    image_shards: ShardSet,
    storage: CxrStorage,
    mlflow: MlflowTracking,
) -> dg.MaterializeResult:
    paths, window = storage.paths, context.partition_key
    cfg = run_settings(context, paths)
    with mlflow.run(context) as run:
        run.log_params({**params(cfg), "window": window})
        multi = load_champions(run.client, mlflow.tracking_uri, [registered_name(MULTILABEL)])
        reason = "" if multi else "no multi-label champion is registered yet"
        if not reason:
            champ = multi[0]
            sample, reason = window_sample(paths, window, champ.model.size, cfg.seed)
            if not reason and len(sample.images) < 2:
                reason = f"{window}: {len(sample.images)} patient(s) after one image per patient; the test needs at least 2"
        if reason:
            context.log.warning(f"image_drift {window} skipped: {reason}")
            return _skipped(run, paths, window, reason, cfg)
        reference = reference_sample(manifest, image_shards.at(champ.model.size), cfg.reference, cfg.seed, paths.raw)
        fmt = window.removeprefix("external-") if window.startswith("external-") else "pacs"
        rest = per_finding_champions(run, mlflow.tracking_uri, context.log)
        others, left = per_finding_sides(paths, manifest, image_shards, window, rest, cfg, {champ.model.size: (reference, sample)})
        for name, why in left.items():
            context.log.warning(f"image_drift {window}: {name}'s outputs are not compared: {why}")
        table = pl.DataFrame(compare(window, reference, sample, champ, cfg, fmt, others), infer_schema_length=None)
        path = write_parquet(table, paths.image_drift / f"{window}.parquet")
        run.log_table(table, "image_drift")
        first = table.row(0, named=True)
        readings = _log_metrics(run, table, window_readings(sample, cfg))
    said, log = ("drifts", context.log.warning) if first["drifted"] else ("does not drift", context.log.info)
    log(
        f"{window} {said}: MMD² of the {first['signal']} {first['drift_score']:.4f}, p = {first['p_value']:.4f} (alpha {cfg.alpha}, "
        f"tolerance {cfg.alarm_tolerance})" + (f"; {UNTRUSTED}" if first["drifted"] else "")
    )
    return _result(run, path, table, cfg, champions_compared=table["model"].n_unique(), **readings)


@dg.asset_check(
    asset=IMAGE_DRIFT,
    partitions_def=DRIFT_WINDOWS,
    blocking=False,
    description="Warns when the window drifts from the training images (the MMD test's p-value below the configured alpha and its "
    "drift score at least the tolerance).",
)
def image_drift_alarm(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
    part = context.partition_key
    drifted = latest_metadata(context.instance, IMAGE_DRIFT, part, "drifted")
    p = latest_metadata(context.instance, IMAGE_DRIFT, part, "p_value")
    if drifted is None:  # the window was not compared: say why, rather than "no drift"
        reason = latest_metadata(context.instance, IMAGE_DRIFT, part, "reason") or "no comparison recorded"
        return dg.AssetCheckResult(
            passed=True, severity=dg.AssetCheckSeverity.WARN, metadata={"compared": False}, description=f"{part} not compared: {reason}"
        )
    score = latest_metadata(context.instance, IMAGE_DRIFT, part, "drift_score")
    said = f"drift score {score}, p = {p}"
    return dg.AssetCheckResult(
        passed=not drifted,
        severity=dg.AssetCheckSeverity.WARN,
        metadata={
            "p_value": float(p) if p is not None else -1.0,
            "drift_score": float(score) if score is not None else -1.0,
            "drifted": bool(drifted),
        },
        description=f"{part} drifts from the training images ({said}); {UNTRUSTED}" if drifted else f"{part}: no drift ({said})",
    )


@dg.sensor(name="drift_windows", minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING)
def drift_windows(context: dg.SensorEvaluationContext) -> dg.SensorResult:
    """Each external set present, and each window of studies the PACS intake closed, becomes a window (a partition
    of image_drift); the automation sensor then runs it (a missing partition), and runs it again when the
    multi-label champion is retrained. A set dropped into its folder later becomes a window then."""
    paths = current_paths()
    cfg: ExternalSettings = resolve(paths, EXTERNAL_VALIDATION, {})
    present = [f"external-{fmt}" for fmt in FORMATS if not cfg.absent_reason(fmt, paths.home)] + window_names(pacs_windows_root(paths))
    new = [k for k in present if not context.instance.has_dynamic_partition(DRIFT_WINDOWS.name, k)]
    return dg.SensorResult(dynamic_partitions_requests=[DRIFT_WINDOWS.build_add_request(new)] if new else [])
