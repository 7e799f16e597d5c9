"""Reading the release's CSV files into polars with a trace of every row that cannot be used.

Shared by the MIMIC-CXR manifest (``data.mimic``) and the MIMIC-IV demographics (``data.demographics``):
every column is read as text with its line number, a row that cannot be used gets a reason from the
first rule it breaks (:func:`first_reason`), and those rows go to one rejects layout
(:func:`rejects_table`, :data:`REJECT_SCHEMA`). No Dagster here.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

import polars as pl

REJECT_SCHEMA = {
    "source": pl.String,
    "line": pl.Int64,
    "dicom_id": pl.String,
    "subject_id": pl.String,
    "study_id": pl.String,
    "reason": pl.String,
}


class DatasetError(ValueError):
    """The dataset cannot be read at all; the message names the file and field."""


def find_csv(root: Path, stem: str) -> Path | None:
    """``stem.csv.gz`` or ``stem.csv`` under ``root``; None when neither exists."""
    for name in (f"{stem}.csv.gz", f"{stem}.csv"):
        p = root / name
        if p.is_file():
            return p
    return None


def require_csv(root: Path, stem: str) -> Path:
    p = find_csv(root, stem)
    if p is None:
        raise DatasetError(f"{root}: required file {stem}.csv.gz (or .csv) not found")
    return p


def read_csv(path: Path, required: Iterable[str]) -> pl.DataFrame:
    """Every column as text plus ``_line`` (the 1-based line in the file).

    Columns are read by name; extra columns are kept and ignored. A missing
    required column raises ``DatasetError`` naming the file and the column.
    """
    try:
        df = pl.read_csv(path, infer_schema=False, quote_char='"')
    except (pl.exceptions.PolarsError, OSError) as e:  # OSError: a truncated or corrupt .gz
        raise DatasetError(f"{path}: cannot be read as CSV: {e}") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")
    df = df.with_columns(pl.col(c).str.strip_chars() for c in df.columns)
    return df.with_row_index("_line", offset=2).with_columns(pl.col("_line").cast(pl.Int64))


def as_int(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.Int64, strict=False)


def first_reason(*rules: tuple[pl.Expr, str | pl.Expr]) -> pl.Expr:
    """The first rule whose condition holds gives the row's reject reason."""
    expr: pl.Expr | None = None
    for cond, reason in reversed(rules):
        value = pl.lit(reason) if isinstance(reason, str) else reason
        expr = pl.when(cond).then(value).otherwise(expr if expr is not None else pl.lit(None, pl.String))
    assert expr is not None
    return expr


def rejects_table(df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Rows with a non-null ``_reason`` in the common rejects layout."""
    out = df.filter(pl.col("_reason").is_not_null())
    cols = {
        "source": pl.lit(source),
        "line": pl.col("_line") if "_line" in out.columns else pl.lit(None, pl.Int64),
        "dicom_id": pl.col("dicom_id").cast(pl.String) if "dicom_id" in out.columns else pl.lit(None, pl.String),
        "subject_id": pl.col("subject_id").cast(pl.String) if "subject_id" in out.columns else pl.lit(None, pl.String),
        "study_id": pl.col("study_id").cast(pl.String) if "study_id" in out.columns else pl.lit(None, pl.String),
        "reason": pl.col("_reason"),
    }
    return out.select(**cols).cast(REJECT_SCHEMA)
