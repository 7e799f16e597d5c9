"""External validation: every champion classifier scored on another hospital's images (``data.external``).

For each registered champion (each per-finding model and the multi-label model) and each finding it outputs that
the dataset can score (``data.harmonisation.HARMONISATION``): the ROC AUC with a patient-bootstrap interval,
sensitivity and specificity at the model's **internal** validation threshold (no threshold is re-chosen on the
external set: that would use its labels), the calibration error of the calibrated probabilities (and of the
network's scores), and the change of each from the model's own internal test split (its run's ``metrics.json``,
the automatic labels). Targets follow the label policy the model was trained with (its checkpoint's recipe), as on
the internal test split.

The images go through the same shard builder as MIMIC's (one decode, letterboxed), into each dataset's own shard
root, incrementally; a corrupt file is rejected by name and counted.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from cxr_pipeline.data.external import NULL_IS_UNSCORABLE, ExternalSettings, scored_findings, scored_images
from cxr_pipeline.data.shard_reader import Shards, open_images
from cxr_pipeline.data.shards import ShardSettings, build_sizes
from cxr_pipeline.data.window_prior import training_window_prior
from cxr_pipeline.labels import LABEL_BY_SLUG, slug
from cxr_pipeline.vision.calibration import calibration_row
from cxr_pipeline.vision.checkpoint import CHAMPION, load_registered
from cxr_pipeline.vision.evaluate import evaluate_at
from cxr_pipeline.vision.splits import RADIOLOGIST
from cxr_pipeline.vision.targets import targets
from cxr_pipeline.vision.train import TrainConfig

EXTERNAL_PARTITION = "all"  # an external set's shards are one partition folder
INTERNAL_METRICS = ("roc_auc", "sensitivity", "specificity", "ece_after")


@dataclass
class Champion:
    """A registered champion, loaded: its network (``vision.checkpoint.LoadedClassifier``, which carries the label
    policy it was trained with) and its internal test rows."""

    name: str  # the registry name, cxr-<finding> or cxr-multilabel
    version: str
    model: Any  # vision.checkpoint.LoadedClassifier
    internal: dict[str, dict]  # slug -> its metrics.json row on the internal test split (automatic labels)

    @property
    def kind(self) -> str:
        return self.model.config.kind

    @property
    def policy(self) -> dict[str, str]:
        """The uncertain / blank policy the model was trained with: from the model itself (its checkpoint's recipe);
        for a checkpoint that did not record it, from its internal metrics rows (which always did); for a version
        with neither, the recipe's defaults (``TrainConfig``)."""
        first = next(iter(self.internal.values()), {})
        rows = {k: first[f"{k}_policy"] for k in ("uncertain", "blank") if first.get(f"{k}_policy")}
        defaults = {"uncertain": TrainConfig.uncertain, "blank": TrainConfig.blank}
        return {**defaults, **rows, **self.model.config.policy}


def load_champions(client, uri: str, names: list[str], alias: str = CHAMPION) -> list[Champion]:
    """Every one of ``names`` with a version under ``alias``: its model through MLflow's loader, its internal rows
    from its run's metrics."""
    out = []
    for reg in load_registered(client, uri, names, alias):
        rows = reg.internal_rows(client)  # a version logged without its rows: scored, without a change from internal
        internal = {
            slug(r["pathology"]): r for r in rows if r.get("test_labels") != RADIOLOGIST and r.get("pathology") in LABEL_BY_SLUG.values()
        }
        out.append(Champion(reg.name, reg.version, reg.model, internal))
    return out


# Formats whose files hold detector values and no window (PadChest's 16-bit PNGs). CheXpert's JPGs and NIH's 8-bit
# PNGs are display images, already windowed: a window prior cannot change how they read.
WINDOWLESS = frozenset({"padchest"})


def build_external_shards(paths, fmt: str, folder: Path, rows: pl.DataFrame, sizes: list[int], shards: ShardSettings) -> dict:
    """The selected rows' images into the dataset's shard root at every size (one decode per file, incremental),
    built as MIMIC's are (``shards``: the resolved ``image_shards`` settings, images per shard and workers): decoded
    at the level MIMIC's shards are (the largest of ``shards.sizes``), a format whose files carry no window
    (``WINDOWLESS``) read through the windows the training images were read through (``data.window_prior``, fitted
    at that level); returns {size: BuildResult}.

    Settings whose ``sizes`` is still null are refused: guessing the level from ``sizes`` had external validation
    (its champions' largest size) and the drift monitor (every consumer's) decode one set at two levels, each run
    rebuilding the folder the other had built."""

    if not shards.sizes:
        raise ValueError(
            "build_external_shards: image_shards.sizes is null (settings not resolved); pass "
            "config.resolve(paths, 'image_shards'), whose sizes are every size a shard consumer reads"
        )
    outs = {s: paths.external_shard_root(fmt, s) / EXTERNAL_PARTITION for s in sizes}
    level = max(shards.sizes)
    prior = training_window_prior(paths, level) if fmt in WINDOWLESS else None
    spec = dataclasses.replace(shards.spec(sizes[0]), prior=prior, decode_at=level)
    return build_sizes(folder, outs, rows.select("dicom_id", "path"), spec)


def score_champion(champ: Champion, fmt: str, rows: pl.DataFrame, scores: np.ndarray, n_boot: int, seed: int) -> list[dict]:
    """One row per finding the champion outputs and the dataset scores; ``rows`` aligned with ``scores`` (the
    network's scores, images x outputs). In NIH and PadChest a null label means the record cannot be scored for
    that finding (``data.harmonisation.NULL_IS_UNSCORABLE``), so it is dropped before the model's label policy applies:
    ``targets`` would make it a negative under blank policy zeros, and a null No Finding a negative always."""

    m = champ.model
    can = {slug(x) for x in scored_findings(fmt)}
    indexed = rows.with_row_index("_i")
    out = []
    for j, s in enumerate(m.slugs):
        if s not in can:
            continue
        usable = indexed.filter(pl.col(s).is_not_null()) if fmt in NULL_IS_UNSCORABLE else indexed
        t = targets(usable, s, champ.policy["uncertain"], champ.policy["blank"])  # the model's policy
        idx = t["_i"].to_numpy()
        y, raw, groups = t["target"].to_numpy().astype(int), scores[idx, j], t["subject_id"].to_numpy()
        row = {
            "dataset": fmt,
            "model": champ.kind,
            "registered": f"{champ.name} v{champ.version}",
            "slug": s,
            "pathology": LABEL_BY_SLUG[s],
            "n_patients": int(len(np.unique(groups))),
            **evaluate_at(y, raw, m.thresholds[j], "internal validation threshold", n_boot, seed, groups),
        }
        if row["evaluable"]:
            row.update(calibration_row(y, raw, m.calibration(j), groups, n_boot, seed))
        internal = champ.internal.get(s, {})
        for k in INTERNAL_METRICS:
            v = internal.get(k)
            row[f"internal_{k}"] = v
            row[f"{k}_change"] = row.get(k) - v if row.get(k) is not None and v is not None else None
        out.append(row)
    return out


@dataclass
class ExternalResult:
    """One dataset's external validation: the table, what was read, built and skipped."""

    dataset: str
    table: pl.DataFrame
    skipped: str = ""
    counts: dict = field(default_factory=dict)
    label_rejects: pl.DataFrame | None = None
    image_rejects: pl.DataFrame | None = None


def external_validation(
    paths,
    fmt: str,
    cfg: ExternalSettings,
    champions: list[Champion],
    shards: ShardSettings | None,
    log: Callable[[str], None] | None = None,
) -> ExternalResult:
    """Read ``fmt``'s label file, build its shards at every champion's size (``shards``: the resolved ``image_shards``
    settings, so that they are decoded at MIMIC's level; None only where the set is absent or no champion is
    registered, when nothing is built), score every champion."""

    say = log or (lambda _m: None)
    reason = cfg.absent_reason(fmt, paths.home)
    if reason:
        return ExternalResult(fmt, pl.DataFrame(), skipped=reason)
    if not champions:
        return ExternalResult(fmt, pl.DataFrame(), skipped="no champion classifier is registered yet")
    if shards is None:
        raise ValueError(f"external_validation({fmt}): no image_shards settings to build the set's shards with")
    folder, found, rows = scored_images(cfg, fmt, paths.home)
    say(f"{fmt}: {found.manifest.height} images read ({found.rejects.height} rejected), {rows.height} scored views")
    sizes = sorted({c.model.size for c in champions})
    built = build_external_shards(paths, fmt, folder, rows, sizes, shards)
    image_rejects = next(iter(built.values())).rejects
    parts = []
    for size in sizes:
        lazy, kept = open_images(Shards.open(paths.external_shard_root(fmt, size), size, [EXTERNAL_PARTITION]), rows)
        images = lazy.take(np.arange(len(lazy)))
        for champ in (c for c in champions if c.model.size == size):
            scores = champ.model.probabilities(images)
            parts.extend(score_champion(champ, fmt, kept, scores, cfg.bootstrap, cfg.seed))
    replica = (folder / "REPLICA.json").exists()
    table = pl.DataFrame(parts, infer_schema_length=None).with_columns(pl.lit(replica).alias("replica")) if parts else pl.DataFrame()
    counts = {
        "records": found.records,
        "label_rejects": found.rejects.height,
        "images_selected": rows.height,
        "image_rejects": image_rejects.height,
        "images_scored": int(table["n_test"].max()) if table.height else 0,
        "patients": rows["subject_id"].n_unique(),
        "replica": replica,
    }
    return ExternalResult(fmt, table, "", counts, found.rejects, image_rejects)
