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
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

from cxr_pipeline.data.csvs import REJECT_SCHEMA, DatasetError, as_int, find_csv, first_reason, read_csv, rejects_table, require_csv
from cxr_pipeline.data.mimic_reports import REPORTS_ZIP, parse_reports
from cxr_pipeline.fields import setting
from cxr_pipeline.labels import LABELS, SLUGS, slug

RECORD_LIST = "cxr-record-list"
STUDY_LIST = "cxr-study-list"
METADATA = "mimic-cxr-2.0.0-metadata"
CHEXPERT = "mimic-cxr-2.0.0-chexpert"
NEGBIO = "mimic-cxr-2.0.0-negbio"
SPLIT = "mimic-cxr-2.0.0-split"
TEST_LABELED = "mimic-cxr-2.1.0-test-set-labeled"
CSV_STEMS = (RECORD_LIST, STUDY_LIST, METADATA, CHEXPERT, NEGBIO, SPLIT, TEST_LABELED)

SPLITS = ("train", "validate", "test")
_LABEL_TEXT = {"1.0": 1, "1": 1, "0.0": 0, "0": 0, "-1.0": -1, "-1": -1}


@dataclass(frozen=True)
class ManifestPolicy:
    """Which images the manifest keeps (``pipeline.yaml``'s ``manifest`` section). Defaults are the 2024 seeds' choices."""

    views: tuple[str, ...] = setting(("PA",), "ViewPosition values kept ([] keeps every view; a blank ViewPosition is UNKNOWN)")
    label_source: str = setting("chexpert", "automatic labels: chexpert or negbio")
    one_image_per_subject: bool = setting(True, "keep each patient's earliest image only (study datetime, study id, dicom id)")
    radiologist_test_labels: bool = setting(True, "read mimic-cxr-2.1.0-test-set-labeled.csv as a second test set")
    hash_split_validate: float = setting(0.1, "share of patients in validate, where the release has no split file")
    hash_split_test: float = setting(0.1, "share of patients in test, where the release has no split file")
    check_files: bool = setting(True, "reject rows whose image file is missing")
    parse_reports: bool = setting(True, "read each study's report (FINDINGS / IMPRESSION) into the manifest")

    def __post_init__(self) -> None:
        if self.label_source not in ("chexpert", "negbio"):
            raise ValueError(f"label_source must be 'chexpert' or 'negbio', not {self.label_source!r}")
        object.__setattr__(self, "views", tuple(self.views))


@dataclass
class ManifestResult:
    manifest: pl.DataFrame
    rejects: pl.DataFrame
    stats: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # wall time of the build

    @property
    def prevalence(self) -> pl.DataFrame:
        """Each label's counts of 1 / 0 / -1 / blank among the kept images (``label_prevalence``)."""
        return label_prevalence(self.manifest)

    def reject_reasons(self) -> pl.DataFrame:
        """``reason, len``: how many input rows each reason rejected, most first."""
        if not self.rejects.height:
            return pl.DataFrame({"reason": [], "len": []}, schema={"reason": pl.String, "len": pl.UInt32})
        return self.rejects.group_by("reason").len().sort("len", descending=True)

    def rows_by_split(self) -> dict[str, int]:
        return {s: self.stats.get(f"rows_{s}", 0) for s in SPLITS}

    def prevalence_metrics(self) -> dict[str, float]:
        """``prevalence.<Label>``: the share of kept images positive for each label."""
        if not self.manifest.height:
            return {}
        return {f"prevalence.{lab}": float((self.manifest[col] == 1).mean() or 0.0) for lab, col in zip(LABELS, SLUGS, strict=True)}


# Other names an observation's column has in a released file: the radiologist test-label file
# (MIMIC-CXR-JPG 2.1.0) calls Lung Opacity "Airspace Opacity".
LABEL_ALIASES = {"Lung Opacity": ("Airspace Opacity",)}


def _rename_aliases(df: pl.DataFrame, path: Path) -> pl.DataFrame:
    """Columns named by an alias get the CheXpert name; a file with neither name fails naming both."""
    for label, aliases in LABEL_ALIASES.items():
        if label in df.columns:
            continue
        found = [a for a in aliases if a in df.columns]
        if not found:
            names = " or ".join((label, *aliases))
            raise DatasetError(f"{path}: missing column(s) {names} (has: {', '.join(df.columns)})")
        df = df.rename({found[0]: label})
    return df


def _read_labels(path: Path, key: tuple[str, ...]) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Label table with Int8 columns named by slug, and its rejects (columns by name; aliases accepted)."""
    df = _rename_aliases(read_csv(path, key), path)
    missing = [c for c in LABELS if c not in df.columns]
    if missing:
        raise DatasetError(f"{path}: missing column(s) {', '.join(missing)} (has: {', '.join(df.columns)})")
    for k in key:
        df = df.with_columns(as_int(k).alias(k))
    unknown = [
        pl.when(pl.col(lab).is_not_null() & ~pl.col(lab).is_in(list(_LABEL_TEXT))).then(
            pl.format("unknown label value '{}' in column '{}'", pl.col(lab), pl.lit(lab))
        )
        for lab in LABELS
    ]
    df = df.with_columns(
        first_reason(
            *[(pl.col(k).is_null(), f"unparseable {k}") for k in key],
            (pl.col("study_id").is_duplicated(), "study_id listed twice"),
        )
        .fill_null(pl.coalesce(unknown))
        .alias("_reason")
    )
    rejects = rejects_table(df, path.name)
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


# ------------------------------------------------------------------ manifest


@dataclass
class _Build:
    """What the manifest steps share: the dataset root, the policy, and the rejects and counts so far."""

    root: Path
    policy: ManifestPolicy
    stats: dict[str, int] = field(default_factory=dict)
    rejects: list[pl.DataFrame] = field(default_factory=list)

    def keep_good(self, df: pl.DataFrame, source: str) -> pl.DataFrame:
        """Send rows with a ``_reason`` to the rejects (named by ``source``); keep the rest."""
        self.rejects.append(rejects_table(df, source))
        return df.filter(pl.col("_reason").is_null()).drop("_reason")


def _records(b: _Build, meta: pl.DataFrame, meta_name: str) -> tuple[pl.DataFrame, str]:
    """Step 1: the record list (or paths derived from the metadata), its bad rows rejected."""
    rec_path = find_csv(b.root, RECORD_LIST)
    if rec_path is not None:
        rec, source = read_csv(rec_path, ["subject_id", "study_id", "dicom_id", "path"]), rec_path.name
    else:
        rec, source = _records_from_metadata(meta), meta_name
    b.stats["records"] = rec.height
    sub_i, stu_i = as_int("subject_id"), as_int("study_id")
    p = pl.col("path")
    rec = rec.with_columns(
        first_reason(
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
            (pl.col("dicom_id").is_duplicated(), f"dicom_id listed twice in {source}"),
        ).alias("_reason")
    )
    return b.keep_good(rec, source).with_columns(sub_i.alias("subject_id"), stu_i.alias("study_id")), source


def _with_metadata(b: _Build, df: pl.DataFrame, meta: pl.DataFrame, meta_name: str, source: str) -> pl.DataFrame:
    """Step 2: view and study datetime from the metadata CSV."""
    meta = meta.with_columns(
        pl.col("StudyDate").str.strptime(pl.Date, "%Y%m%d", strict=False).alias("_date"),
        _study_time_seconds("StudyTime").alias("_secs"),
        pl.col("dicom_id").is_duplicated().alias("_dup"),
        as_int("subject_id").alias("_m_subject"),
        as_int("study_id").alias("_m_study"),
    ).select("dicom_id", "ViewPosition", "_date", "_secs", "_dup", "_m_subject", "_m_study", pl.col("_line").alias("_m_line"))
    df = df.join(meta, on="dicom_id", how="left").with_columns(
        first_reason(
            (pl.col("_m_line").is_null(), f"no row in {meta_name}"),
            (pl.col("_dup"), f"dicom_id listed twice in {meta_name}"),
            (
                (pl.col("_m_subject") != pl.col("subject_id")) | (pl.col("_m_study") != pl.col("study_id")),
                f"subject_id/study_id disagree with {meta_name}",
            ),
            (pl.col("_date").is_null(), f"unparseable StudyDate in {meta_name}"),
            (pl.col("_secs").is_null(), f"unparseable StudyTime in {meta_name}"),
        ).alias("_reason")
    )
    return b.keep_good(df, source).select(
        "_line",
        "dicom_id",
        "subject_id",
        "study_id",
        "path",
        pl.col("ViewPosition").fill_null("UNKNOWN").alias("view_position"),
        (pl.col("_date").cast(pl.Datetime("ms")) + pl.duration(milliseconds=(pl.col("_secs") * 1000).round())).alias("study_datetime"),
    )


def _with_split(b: _Build, df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Step 3: the official patient-level split, or a deterministic patient hash where no split file exists."""
    split_path = find_csv(b.root, SPLIT)
    if split_path is None:
        subjects = df.select(pl.col("subject_id").unique().sort())["subject_id"]
        split = _hash_split(subjects, b.policy.hash_split_validate, b.policy.hash_split_test)
        b.stats["split_from_file"] = 0
        return df.join(pl.DataFrame({"subject_id": subjects, "split": split}), on="subject_id", how="left")
    split = read_csv(split_path, ["dicom_id", "study_id", "subject_id", "split"])
    split = split.with_columns(
        first_reason(
            (~pl.col("split").is_in(list(SPLITS)), pl.format("unknown split '{}'", pl.col("split"))),
            (pl.col("dicom_id").is_duplicated(), "dicom_id listed twice"),
        ).alias("_reason")
    )
    split = b.keep_good(split, split_path.name).select("dicom_id", "split")
    df = df.join(split, on="dicom_id", how="left")
    n_splits = pl.col("split").drop_nulls().n_unique().over("subject_id")
    df = df.with_columns(
        first_reason(
            (pl.col("split").is_null(), f"no usable row in {split_path.name}"),
            (n_splits > 1, f"subject in several splits in {split_path.name} (patient leakage)"),
        ).alias("_reason")
    )
    b.stats["split_from_file"] = 1
    return b.keep_good(df, source)


def _with_labels(b: _Build, df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Step 4: labels per study; the radiologist's labels for test studies where given."""
    label_path = require_csv(b.root, CHEXPERT if b.policy.label_source == "chexpert" else NEGBIO)
    labels, label_rejects = _read_labels(label_path, ("subject_id", "study_id"))
    b.rejects.append(label_rejects)
    bad_studies = label_rejects.select(
        pl.col("study_id").cast(pl.Int64, strict=False),
        pl.format("labels rejected ({} line {}): {}", pl.lit(label_path.name), "line", "reason").alias("_reason"),
    ).unique("study_id")
    df = b.keep_good(df.join(bad_studies, on="study_id", how="left"), source)
    df = df.join(labels, on="study_id", how="left").with_columns(pl.lit(b.policy.label_source).alias("label_source"))
    b.stats["studies_without_labels"] = df.filter(pl.all_horizontal(pl.col(c).is_null() for c in SLUGS))["study_id"].n_unique()

    return _with_radiologist_labels(b, df)


RADIOLOGIST_COLUMNS = tuple(f"radiologist_{c}" for c in SLUGS)


def _with_radiologist_labels(b: _Build, df: pl.DataFrame) -> pl.DataFrame:
    """The radiologist's labels (MIMIC-CXR-JPG 2.1.0's test-set file) in their own columns, for test studies.

    They never replace the automatic labels: the 14 label columns keep the CheXpert (or
    NegBio) labels for every row, ``radiologist_<slug>`` hold the radiologist's (null
    where the study was not labelled by one), and ``radiologist_labelled`` says which
    rows were. A labelled study outside the test split is counted, never used.
    """
    rad_path = find_csv(b.root, TEST_LABELED)
    empty = [pl.lit(None, pl.Int8).alias(c) for c in RADIOLOGIST_COLUMNS]
    if not b.policy.radiologist_test_labels or rad_path is None:
        return df.with_columns(*empty, pl.lit(False).alias("radiologist_labelled"))
    rad, rad_rejects = _read_labels(rad_path, ("study_id",))
    b.rejects.append(rad_rejects)
    split_of = df.select("study_id", "split").unique("study_id")
    placed = rad.join(split_of, on="study_id", how="left")
    b.stats["radiologist_studies"] = rad.height
    b.stats["radiologist_studies_outside_test"] = placed.filter(pl.col("split").is_not_null() & (pl.col("split") != "test")).height
    b.stats["radiologist_studies_not_in_records"] = placed.filter(pl.col("split").is_null()).height
    rad = rad.rename(dict(zip(SLUGS, RADIOLOGIST_COLUMNS, strict=True))).with_columns(pl.lit(True).alias("_rad"))
    df = df.join(rad, on="study_id", how="left")
    use = (pl.col("split") == "test") & pl.col("_rad").fill_null(False)
    df = df.with_columns(
        *[pl.when(use).then(pl.col(c)).otherwise(None).cast(pl.Int8).alias(c) for c in RADIOLOGIST_COLUMNS],
        use.alias("radiologist_labelled"),
    ).drop("_rad")
    b.stats["test_images_radiologist_labels"] = int(df["radiologist_labelled"].sum())
    return df


def _existing_files(b: _Build, df: pl.DataFrame, source: str) -> pl.DataFrame:
    """Step 6: the image file must exist (MIMIC-CXR-JPG: the same path with ``.jpg``)."""
    resolved: list[str | None] = []
    for rel in df["path"].to_list():
        if os.path.exists(b.root / rel):
            resolved.append(rel)
        else:
            alt = rel[: rel.rfind(".")] + ".jpg" if "." in rel else rel
            resolved.append(alt if alt != rel and os.path.exists(b.root / alt) else None)
    df = df.with_columns(pl.Series("_resolved", resolved, dtype=pl.String))
    df = df.with_columns(pl.when(pl.col("_resolved").is_null()).then(pl.lit("image file missing")).alias("_reason"))
    return b.keep_good(df, source).with_columns(pl.col("_resolved").alias("path")).drop("_resolved")


def _with_reports(b: _Build, df: pl.DataFrame) -> pl.DataFrame:
    """Step 8: FINDINGS / IMPRESSION / last paragraph of each image's study report."""
    if not b.policy.parse_reports:
        return df.with_columns(
            *[pl.lit(None, pl.String).alias(c) for c in ("findings", "impression", "last_paragraph")], pl.lit(False).alias("has_report")
        )
    cols = parse_reports(b.root, df["subject_id"].to_list(), df["study_id"].to_list())
    df = df.with_columns(
        *[pl.Series(c, cols[c], dtype=pl.String) for c in ("findings", "impression", "last_paragraph")],
        pl.Series("has_report", cols["has_report"], dtype=pl.Boolean),
    )
    b.stats["images_without_report"] = int((~df["has_report"]).sum())
    return df


MANIFEST_COLUMNS = (
    "dicom_id",
    "subject_id",
    "study_id",
    "path",
    "view_position",
    "study_datetime",
    "split",
    "label_source",
    *SLUGS,
    "radiologist_labelled",
    *RADIOLOGIST_COLUMNS,
    "findings",
    "impression",
    "last_paragraph",
    "has_report",
)


def build_manifest(root: Path, policy: ManifestPolicy | None = None) -> ManifestResult:
    """Apply ``policy`` to the MIMIC-CXR dataset at ``root``, step by step (each step's rejects kept)."""
    started = time.perf_counter()
    b = _Build(Path(root), policy or ManifestPolicy())
    if not b.root.is_dir():
        raise DatasetError(f"{b.root}: dataset root does not exist (set CXR_RAW_DIR)")
    meta_path = require_csv(b.root, METADATA)
    meta = read_csv(meta_path, ["dicom_id", "subject_id", "study_id", "ViewPosition", "StudyDate", "StudyTime"])
    df, source = _records(b, meta, meta_path.name)
    df = _with_metadata(b, df, meta, meta_path.name, source)
    df = _with_split(b, df, source)
    df = _with_labels(b, df, source)
    b.stats["valid_images"] = df.height
    if b.policy.views:  # step 5: policy, views (excluded by policy: counted, not rejected)
        before = df.height
        df = df.filter(pl.col("view_position").is_in(list(b.policy.views)))
        b.stats["excluded_by_view"] = before - df.height
    if b.policy.check_files:
        df = _existing_files(b, df, source)
    df = df.sort("subject_id", "study_datetime", "study_id", "dicom_id")
    if b.policy.one_image_per_subject:  # step 7: policy, deterministically the earliest image
        before = df.height
        df = df.unique("subject_id", keep="first", maintain_order=True)
        b.stats["excluded_one_per_subject"] = before - df.height
    manifest = _with_reports(b, df).select(MANIFEST_COLUMNS)
    found = [r for r in b.rejects if r.height]
    rejects = pl.concat(found, how="vertical") if found else pl.DataFrame(schema=REJECT_SCHEMA)
    b.stats["rejects"] = rejects.height
    b.stats["rows"] = manifest.height
    for s in SPLITS:
        b.stats[f"rows_{s}"] = manifest.filter(pl.col("split") == s).height
    return ManifestResult(manifest=manifest, rejects=rejects, stats=b.stats, seconds=round(time.perf_counter() - started, 3))


def label_prevalence(manifest: pl.DataFrame) -> pl.DataFrame:
    """Per label: positive / negative / uncertain / blank counts."""
    rows = []
    for lab, col in zip(LABELS, SLUGS, strict=True):
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
