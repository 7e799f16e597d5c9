"""Read MIMIC-CXR's CSVs and reports and apply the manifest policy.

Plain Python and polars; no Dagster. ``build_manifest`` returns the manifest
(one row per kept image), a rejects table (one row per unusable input row,
with the file, line and reason) and counts for every step, so nothing is
dropped without a trace. Exclusions by policy (view, one image per subject)
are counted, not rejected: the input was fine, the policy did not want it.
"""

from __future__ import annotations

import hashlib
import os
import zipfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from cxr_pipeline.data.sections import parse_report, parse_report_files
from cxr_pipeline.labels import LABELS, slug

RECORD_LIST = "cxr-record-list"
STUDY_LIST = "cxr-study-list"
METADATA = "mimic-cxr-2.0.0-metadata"
CHEXPERT = "mimic-cxr-2.0.0-chexpert"
NEGBIO = "mimic-cxr-2.0.0-negbio"
SPLIT = "mimic-cxr-2.0.0-split"
TEST_LABELED = "mimic-cxr-2.1.0-test-set-labeled"
REPORTS_ZIP = "mimic-cxr-reports.zip"
CSV_STEMS = (RECORD_LIST, STUDY_LIST, METADATA, CHEXPERT, NEGBIO, SPLIT, TEST_LABELED)

SPLITS = ("train", "validate", "test")
LABEL_COLUMNS = tuple(slug(x) for x in LABELS)
_LABEL_TEXT = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1}

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


@dataclass(frozen=True)
class ManifestPolicy:
    """Which images the manifest keeps. Defaults are the 2024 seeds' choices."""

    views: tuple[str, ...] = ("PA",)  # empty: every view; blank ViewPosition is "UNKNOWN"
    label_source: str = "chexpert"  # or "negbio"
    one_image_per_subject: bool = True
    radiologist_test_labels: bool = True
    hash_split_validate: float = 0.1  # only where no split file exists
    hash_split_test: float = 0.1
    check_files: bool = True
    parse_reports: bool = True

    def __post_init__(self) -> None:
        if self.label_source not in ("chexpert", "negbio"):
            raise ValueError(f"label_source must be 'chexpert' or 'negbio', not {self.label_source!r}")


@dataclass
class ManifestResult:
    manifest: pl.DataFrame
    rejects: pl.DataFrame
    stats: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- reading CSVs


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
    except pl.exceptions.PolarsError as e:
        raise DatasetError(f"{path}: cannot be read as CSV: {e}") from e
    missing = [c for c in required if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")
    df = df.with_columns(pl.col(c).str.strip_chars() for c in df.columns)
    return df.with_row_index("_line", offset=2).with_columns(pl.col("_line").cast(pl.Int64))


def _int(col: str) -> pl.Expr:
    return pl.col(col).cast(pl.Int64, strict=False)


def _first_reason(*rules: tuple[pl.Expr, str | pl.Expr]) -> pl.Expr:
    """The first rule whose condition holds gives the row's reject reason."""
    expr: pl.Expr | None = None
    for cond, reason in reversed(rules):
        value = pl.lit(reason) if isinstance(reason, str) else reason
        expr = pl.when(cond).then(value).otherwise(expr if expr is not None else pl.lit(None, pl.String))
    assert expr is not None
    return expr


def _rejects(df: pl.DataFrame, source: str) -> pl.DataFrame:
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


def _read_labels(path: Path, key: tuple[str, ...]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Label table with Int8 columns named by slug, and its rejects."""
    df = read_csv(path, [*key, *LABELS])
    for k in key:
        df = df.with_columns(_int(k).alias(k))
    unknown = [
        pl.when(pl.col(lab).is_not_null() & ~pl.col(lab).is_in(list(_LABEL_TEXT))).then(
            pl.format("unknown label value '{}' in column '{}'", pl.col(lab), pl.lit(lab))
        )
        for lab in LABELS
    ]
    df = df.with_columns(
        _first_reason(
            *[(pl.col(k).is_null(), f"unparseable {k}") for k in key],
            (pl.col("study_id").is_duplicated(), "study_id listed twice"),
        )
        .fill_null(pl.coalesce(unknown))
        .alias("_reason")
    )
    rejects = _rejects(df, path.name)
    good = df.filter(pl.col("_reason").is_null()).select(
        "study_id",
        *[pl.col(lab).replace_strict(_LABEL_TEXT, default=None, return_dtype=pl.Int8).alias(slug(lab)) for lab in LABELS],
    )
    return good, rejects


def _study_time_seconds(col: str) -> pl.Expr:
    """StudyTime ``HHMMSS.fff`` that lost its leading zero -> seconds of the day."""
    t = pl.col(col).cast(pl.Float64, strict=False)
    hh = (t / 10000).floor()
    mm = (t / 100).floor() % 100
    ss = t % 100
    ok = (t >= 0) & (hh < 24) & (mm < 60) & (ss < 60)
    return pl.when(ok).then(hh * 3600 + mm * 60 + ss)


def _records_from_metadata(meta: pl.DataFrame) -> pl.DataFrame:
    """MIMIC-CXR-JPG ships no record list: derive the paths from the ids."""
    return meta.select(
        "_line",
        "subject_id",
        "study_id",
        "dicom_id",
        pl.format(
            "files/p{}/p{}/s{}/{}.jpg",
            pl.col("subject_id").str.slice(0, 2),
            pl.col("subject_id"),
            pl.col("study_id"),
            pl.col("dicom_id"),
        ).alias("path"),
    )


def _hash_split(subjects: pl.Series, validate: float, test: float) -> pl.Series:
    """Deterministic patient-level split from a hash of the subject id (stable across versions)."""
    out = []
    for s in subjects.to_list():
        u = int.from_bytes(hashlib.blake2b(str(s).encode(), digest_size=8).digest(), "big") / 2**64
        out.append("test" if u < test else "validate" if u < test + validate else "train")
    return pl.Series("split", out, dtype=pl.String)


# ------------------------------------------------------------------- reports


class ReportReader:
    """Reads ``files/pNN/pSSSSSSSS/sTTTTTTTT.txt`` from the folder or from the zip.

    The zip (``mimic-cxr-reports.zip``, with or without a ``mimic-cxr-reports/``
    prefix inside) is opened only when a report is not found extracted: reading
    its directory of 227k entries costs seconds.
    """

    def __init__(self, root: Path):
        self.root = str(root)
        self._zip: zipfile.ZipFile | None = None
        self._names: set[str] = set()
        self._prefix = ""
        self._zip_tried = False

    def _open_zip(self) -> None:
        self._zip_tried = True
        zpath = os.path.join(self.root, REPORTS_ZIP)
        if os.path.isfile(zpath):
            self._zip = zipfile.ZipFile(zpath)
            names = self._zip.namelist()
            if names and names[0].startswith("mimic-cxr-reports/"):
                self._prefix = "mimic-cxr-reports/"
            self._names = set(names)

    def read(self, relpath: str) -> str | None:
        try:
            with open(os.path.join(self.root, relpath), "rb") as f:
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            pass
        if not self._zip_tried:
            self._open_zip()
        if self._zip is not None:
            name = self._prefix + relpath
            if name in self._names:
                return self._zip.read(name).decode("utf-8", errors="replace")
        return None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def report_relpath(subject_id: int, study_id: int) -> str:
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}.txt"


def _parse_reports(root: Path, subjects: list[int], studies: list[int]) -> dict[str, list]:
    """FINDINGS / IMPRESSION / last paragraph of each study's report.

    Extracted files are read first; reports found only in the zip are read
    afterwards. (A process pool was tried for MIMIC scale: on 2 cores its start-up
    ate the gain, and spawn re-imports the caller's main module.)
    """
    unique = list(dict.fromkeys(studies))
    sub_of = dict(zip(studies, subjects, strict=True))
    rels = [report_relpath(sub_of[s], s) for s in unique]
    parsed = parse_report_files(str(root), rels)
    reader = ReportReader(root)
    by_study: dict[int, tuple] = {}
    try:
        for sid, rel, got in zip(unique, rels, parsed, strict=True):
            if got is None:
                text = reader.read(rel)
                if text is None:
                    by_study[sid] = (None, None, None, False)
                    continue
                r = parse_report(text)
                got = (r.findings, r.impression, r.last_paragraph)
            by_study[sid] = (*got, True)
    finally:
        reader.close()
    rows = [by_study[s] for s in studies]
    return {
        "findings": [r[0] for r in rows],
        "impression": [r[1] for r in rows],
        "last_paragraph": [r[2] for r in rows],
        "has_report": [r[3] for r in rows],
    }


# ------------------------------------------------------------------ manifest


def build_manifest(root: Path, policy: ManifestPolicy | None = None) -> ManifestResult:
    """Apply ``policy`` to the MIMIC-CXR dataset at ``root``."""
    policy = policy or ManifestPolicy()
    root = Path(root)
    if not root.is_dir():
        raise DatasetError(f"{root}: dataset root does not exist (set CXR_RAW_DIR)")
    stats: dict[str, int] = {}
    rejects: list[pl.DataFrame] = []

    meta_path = require_csv(root, METADATA)
    meta = read_csv(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"])
    rec_path = find_csv(root, RECORD_LIST)
    if rec_path is not None:
        rec = read_csv(rec_path, ["subject_id", "study_id", "dicom_id", "path"])
        rec_source = rec_path.name
    else:
        rec = _records_from_metadata(meta)
        rec_source = meta_path.name
    stats["records"] = rec.height

    # 1. the record list itself
    sub_i, stu_i = _int("subject_id"), _int("study_id")
    p = pl.col("path")
    rec = rec.with_columns(
        _first_reason(
            (pl.col("dicom_id").is_null(), "missing dicom_id"),
            (sub_i.is_null(), "unparseable subject_id"),
            (stu_i.is_null(), "unparseable study_id"),
            (p.is_null(), "missing path"),
            (
                p.str.starts_with("/")
                | p.str.contains(r"(^|[/\\])\.\.([/\\]|$)")
                | p.str.contains(r"^[A-Za-z]:")
                | ~p.str.starts_with("files/"),
                "path outside the dataset root",
            ),
            (
                ~p.str.contains(pl.format("/p{}/s{}/{}.", pl.col("subject_id"), pl.col("study_id"), pl.col("dicom_id")), literal=True),
                "path does not match subject_id/study_id/dicom_id",
            ),
            (pl.col("dicom_id").is_duplicated(), f"dicom_id listed twice in {rec_source}"),
        ).alias("_reason")
    )
    rejects.append(_rejects(rec, rec_source))
    rec = rec.filter(pl.col("_reason").is_null()).drop("_reason")
    rec = rec.with_columns(sub_i.alias("subject_id"), stu_i.alias("study_id"))

    # 2. metadata: view and study datetime
    meta = meta.with_columns(
        pl.col("StudyDate").str.strptime(pl.Date, "%Y%m%d", strict=False).alias("_date"),
        _study_time_seconds("StudyTime").alias("_secs"),
        pl.col("dicom_id").is_duplicated().alias("_dup"),
        _int("subject_id").alias("_m_subject"),
        _int("study_id").alias("_m_study"),
    ).select("dicom_id", "ViewPosition", "_date", "_secs", "_dup", "_m_subject", "_m_study", pl.col("_line").alias("_m_line"))
    df = rec.join(meta, on="dicom_id", how="left")
    df = df.with_columns(
        _first_reason(
            (pl.col("_m_line").is_null(), f"no row in {meta_path.name}"),
            (pl.col("_dup"), f"dicom_id listed twice in {meta_path.name}"),
            (
                (pl.col("_m_subject") != pl.col("subject_id")) | (pl.col("_m_study") != pl.col("study_id")),
                f"subject_id/study_id disagree with {meta_path.name}",
            ),
            (pl.col("_date").is_null(), f"unparseable StudyDate in {meta_path.name}"),
            (pl.col("_secs").is_null(), f"unparseable StudyTime in {meta_path.name}"),
        ).alias("_reason")
    )
    rejects.append(_rejects(df, rec_source))
    df = df.filter(pl.col("_reason").is_null()).select(
        "_line",
        "dicom_id",
        "subject_id",
        "study_id",
        "path",
        pl.col("ViewPosition").fill_null("UNKNOWN").alias("view_position"),
        (pl.col("_date").cast(pl.Datetime("ms")) + pl.duration(milliseconds=(pl.col("_secs") * 1000).round())).alias("study_datetime"),
    )

    # 3. official split (patient-level), or a deterministic patient hash
    split_path = find_csv(root, SPLIT)
    if split_path is not None:
        split = read_csv(split_path, ["dicom_id", "study_id", "subject_id", "split"])
        split = split.with_columns(
            _first_reason(
                (~pl.col("split").is_in(list(SPLITS)), pl.format("unknown split '{}'", pl.col("split"))),
                (pl.col("dicom_id").is_duplicated(), "dicom_id listed twice"),
            ).alias("_reason")
        )
        rejects.append(_rejects(split, split_path.name))
        split = split.filter(pl.col("_reason").is_null()).select("dicom_id", "split")
        df = df.join(split, on="dicom_id", how="left")
        n_splits = pl.col("split").drop_nulls().n_unique().over("subject_id")
        df = df.with_columns(
            _first_reason(
                (pl.col("split").is_null(), f"no usable row in {split_path.name}"),
                (n_splits > 1, f"subject in several splits in {split_path.name} (patient leakage)"),
            ).alias("_reason")
        )
        rejects.append(_rejects(df, rec_source))
        df = df.filter(pl.col("_reason").is_null()).drop("_reason")
        stats["split_from_file"] = 1
    else:
        subjects = df.select(pl.col("subject_id").unique().sort())["subject_id"]
        smap = pl.DataFrame({"subject_id": subjects, "split": _hash_split(subjects, policy.hash_split_validate, policy.hash_split_test)})
        df = df.join(smap, on="subject_id", how="left")
        stats["split_from_file"] = 0

    # 4. labels, per study; radiologist labels for test studies where given
    label_stem = CHEXPERT if policy.label_source == "chexpert" else NEGBIO
    label_path = require_csv(root, label_stem)
    labels, label_rejects = _read_labels(label_path, ("subject_id", "study_id"))
    rejects.append(label_rejects)
    bad_studies = label_rejects.select(
        pl.col("study_id").cast(pl.Int64, strict=False),
        pl.format("labels rejected ({} line {}): {}", pl.lit(label_path.name), "line", "reason").alias("_reason"),
    ).unique("study_id")
    df = df.join(bad_studies, on="study_id", how="left")
    rejects.append(_rejects(df, rec_source))
    df = df.filter(pl.col("_reason").is_null()).drop("_reason")
    df = df.join(labels, on="study_id", how="left").with_columns(pl.lit(policy.label_source).alias("label_source"))
    stats["studies_without_labels"] = df.filter(pl.all_horizontal(pl.col(c).is_null() for c in LABEL_COLUMNS))["study_id"].n_unique()

    rad_path = find_csv(root, TEST_LABELED)
    if policy.radiologist_test_labels and rad_path is not None:
        rad, rad_rejects = _read_labels(rad_path, ("study_id",))
        rejects.append(rad_rejects)
        rad = rad.rename({c: f"_rad_{c}" for c in LABEL_COLUMNS}).with_columns(pl.lit(True).alias("_rad"))
        df = df.join(rad, on="study_id", how="left")
        use = (pl.col("split") == "test") & pl.col("_rad").fill_null(False)
        df = df.with_columns(
            *[pl.when(use).then(pl.col(f"_rad_{c}")).otherwise(pl.col(c)).alias(c) for c in LABEL_COLUMNS],
            pl.when(use).then(pl.lit("radiologist")).otherwise(pl.col("label_source")).alias("label_source"),
        ).drop([f"_rad_{c}" for c in LABEL_COLUMNS] + ["_rad"])
        stats["test_images_radiologist_labels"] = df.filter(pl.col("label_source") == "radiologist").height

    # 5. policy: views
    stats["valid_images"] = df.height
    if policy.views:
        before = df.height
        df = df.filter(pl.col("view_position").is_in(list(policy.views)))
        stats["excluded_by_view"] = before - df.height

    # 6. the file must exist (MIMIC-CXR-JPG: same path with .jpg)
    if policy.check_files:
        paths = df["path"].to_list()
        resolved: list[str | None] = []
        for rel in paths:
            if os.path.exists(root / rel):
                resolved.append(rel)
            else:
                alt = rel[: rel.rfind(".")] + ".jpg" if "." in rel else rel
                resolved.append(alt if alt != rel and os.path.exists(root / alt) else None)
        df = df.with_columns(pl.Series("_resolved", resolved, dtype=pl.String))
        df = df.with_columns(pl.when(pl.col("_resolved").is_null()).then(pl.lit("image file missing")).alias("_reason"))
        rejects.append(_rejects(df, rec_source))
        df = df.filter(pl.col("_reason").is_null()).with_columns(pl.col("_resolved").alias("path")).drop("_reason", "_resolved")

    # 7. policy: one image per subject, deterministically the earliest
    df = df.sort("subject_id", "study_datetime", "study_id", "dicom_id")
    if policy.one_image_per_subject:
        before = df.height
        df = df.unique("subject_id", keep="first", maintain_order=True)
        stats["excluded_one_per_subject"] = before - df.height

    # 8. report sections
    if policy.parse_reports:
        cols = _parse_reports(root, df["subject_id"].to_list(), df["study_id"].to_list())
        df = df.with_columns(
            pl.Series("findings", cols["findings"], dtype=pl.String),
            pl.Series("impression", cols["impression"], dtype=pl.String),
            pl.Series("last_paragraph", cols["last_paragraph"], dtype=pl.String),
            pl.Series("has_report", cols["has_report"], dtype=pl.Boolean),
        )
        stats["images_without_report"] = int((~df["has_report"]).sum())
    else:
        df = df.with_columns(
            pl.lit(None, pl.String).alias("findings"),
            pl.lit(None, pl.String).alias("impression"),
            pl.lit(None, pl.String).alias("last_paragraph"),
            pl.lit(False).alias("has_report"),
        )

    manifest = df.select(
        "dicom_id",
        "subject_id",
        "study_id",
        "path",
        "view_position",
        "study_datetime",
        "split",
        "label_source",
        *LABEL_COLUMNS,
        "findings",
        "impression",
        "last_paragraph",
        "has_report",
    )
    all_rejects = (
        pl.concat([r for r in rejects if r.height], how="vertical")
        if any(r.height for r in rejects)
        else pl.DataFrame(schema=REJECT_SCHEMA)
    )
    stats["rejects"] = all_rejects.height
    stats["rows"] = manifest.height
    for s in SPLITS:
        stats[f"rows_{s}"] = manifest.filter(pl.col("split") == s).height
    return ManifestResult(manifest=manifest, rejects=all_rejects, stats=stats)


def label_prevalence(manifest: pl.DataFrame) -> pl.DataFrame:
    """Per label: positive / negative / uncertain / blank counts."""
    rows = []
    for lab, col in zip(LABELS, LABEL_COLUMNS, strict=True):
        s = manifest[col]
        rows.append(
            {
                "label": lab,
                "positive": int((s == 1).sum()),
                "negative": int((s == 0).sum()),
                "uncertain": int((s == -1).sum()),
                "blank": int(s.is_null().sum()),
            }
        )
    return pl.DataFrame(rows)


# --------------------------------------------------------------- fingerprint


def fingerprint(root: Path, *, include_listing: bool = True) -> str:
    """Content fingerprint of a dataset: its CSV bytes and its file listing.

    The data version of the raw source asset. CSVs are hashed by content; image
    and report files by relative path and size (re-hashing 4.7 TB of DICOMs every
    hour is not an option; a changed image with the same size is caught by the
    shard builder's content hash).
    """
    root = Path(root)
    h = hashlib.sha256()
    for stem in CSV_STEMS:
        p = find_csv(root, stem)
        if p is None:
            continue
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    z = root / REPORTS_ZIP
    if z.is_file():
        h.update(f"{REPORTS_ZIP}:{z.stat().st_size}".encode())
    if include_listing:
        for rel, size in sorted(_listing(root / "files", root)):
            h.update(f"{rel}:{size}\n".encode())
    return h.hexdigest()[:32]


def _listing(top: Path, root: Path) -> Iterable[tuple[str, int]]:
    stack = [top]
    while stack:
        d = stack.pop()
        try:
            it = os.scandir(d)
        except FileNotFoundError:
            continue
        with it:
            for e in it:
                if e.is_dir():  # follows links: datasets are often linked in from storage
                    stack.append(Path(e.path))
                elif e.is_file():
                    yield os.path.relpath(e.path, root), e.stat().st_size
