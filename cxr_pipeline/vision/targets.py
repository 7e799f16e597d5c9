"""Per-pathology targets under a label policy."""

from __future__ import annotations

import polars as pl

from cxr_pipeline.labels import LABEL_BY_SLUG, slug

UNCERTAIN_POLICIES = ("ignore", "zeros", "ones")
BLANK_POLICIES = ("ignore", "zeros")


def targets(manifest: pl.DataFrame, label: str, uncertain: str = "ignore", blank: str = "ignore") -> pl.DataFrame:
    """Rows of ``manifest`` usable for ``label`` with a 0/1 ``target`` column.

    uncertain (-1): ``ignore`` drops the row (the seeds' choice), ``zeros`` / ``ones``
    map it (CheXpert's U-Zeros / U-Ones). blank (not mentioned): ``ignore`` drops it,
    ``zeros`` counts it negative. "No Finding" is only ever 1 or blank in MIMIC, so
    its blanks are always negatives (otherwise it would have no negatives at all).
    """
    if uncertain not in UNCERTAIN_POLICIES:
        raise ValueError(f"uncertain policy must be one of {UNCERTAIN_POLICIES}, not {uncertain!r}")
    if blank not in BLANK_POLICIES:
        raise ValueError(f"blank policy must be one of {BLANK_POLICIES}, not {blank!r}")
    col = slug(label) if label not in manifest.columns else label
    if col not in manifest.columns:
        raise ValueError(f"no label column {col!r} for {label!r}")
    v = pl.col(col)
    blank_is_zero = blank == "zeros" or LABEL_BY_SLUG.get(col) == "No Finding"
    t = (
        pl.when(v == 1)
        .then(1)
        .when(v == 0)
        .then(0)
        .when(v == -1)
        .then({"ignore": None, "zeros": 0, "ones": 1}[uncertain])
        .when(v.is_null())
        .then(0 if blank_is_zero else None)
    )
    return manifest.with_columns(t.cast(pl.Int8).alias("target")).filter(pl.col("target").is_not_null())
