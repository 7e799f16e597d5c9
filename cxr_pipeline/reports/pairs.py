"""Image-report pairs for report generation, split by study (never by row)."""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from cxr_pipeline.fields import at_least_one, setting

TEXT_SOURCES = ("findings", "impression", "findings+impression", "findings_only")
R2GEN_SOURCE = "findings_only"  # R2Gen's MIMIC-CXR convention: FINDINGS only, studies without them left out


def evaluation_name(source: str, capped_at: int = 0) -> str:
    """How the report metrics' references were chosen, for the metrics table.

    FINDINGS-only references over every test study is the convention R2Gen and most
    MIMIC-CXR report-generation papers report; other choices are named as they are.
    """
    if source == R2GEN_SOURCE and not capped_at:
        return "R2Gen-comparable (FINDINGS-only references, every test study)"
    return f"{source} references" + (f", first {capped_at} test pairs" if capped_at else ", every test study")


def report_text(findings: str | None, impression: str | None, source: str = "findings") -> str | None:
    """FINDINGS, else IMPRESSION (default); or both joined; or IMPRESSION only; or FINDINGS only (R2Gen)."""
    if source == R2GEN_SOURCE:
        return findings or None
    if source == "findings":
        return findings or impression
    if source == "impression":
        return impression or findings
    if source == "findings+impression":
        parts = [t for t in (findings, impression) if t]
        return " ".join(parts) or None
    raise ValueError(f"text source must be one of {TEXT_SOURCES}, not {source!r}")


@dataclass(frozen=True)
class PairsConfig:
    """Which report text each image is paired with (``pipeline.yaml``'s ``report_pairs`` section)."""

    text_source: str = setting(
        "findings", "findings (else impression), impression, findings+impression, or findings_only (R2Gen's convention)"
    )
    min_words: int = setting(1, "shortest report kept, in words")
    max_words: int | None = setting(None, "longest report kept, in words (the seeds kept 20-65)", null="no limit")

    def __post_init__(self) -> None:
        if self.text_source not in TEXT_SOURCES:
            raise ValueError(f"text_source must be one of {TEXT_SOURCES}, not {self.text_source!r}")
        at_least_one(self, "max_words")


def build_pairs(manifest: pl.DataFrame, cfg: PairsConfig = PairsConfig()) -> pl.DataFrame:
    """One row per manifest image with a usable report: ids, path, split, ``text``.

    The split is the manifest's (MIMIC's patient-level split), so every image of a
    study, and every study of a patient, sits in one split.
    """
    source = cfg.text_source
    texts = [report_text(f, i, source) for f, i in zip(manifest["findings"].to_list(), manifest["impression"].to_list(), strict=True)]
    radiologist = [c for c in manifest.columns if c.startswith("radiologist_")]  # kept for the radiologist test set
    df = manifest.select("dicom_id", "subject_id", "study_id", "path", "view_position", "split", *radiologist).with_columns(
        pl.Series("text", texts, dtype=pl.String), pl.lit(source).alias("text_source")
    )
    df = df.with_columns(pl.col("text").str.split(" ").list.len().fill_null(0).alias("words"))
    keep = pl.col("text").is_not_null() & (pl.col("words") >= cfg.min_words)
    if cfg.max_words is not None:
        keep = keep & (pl.col("words") <= cfg.max_words)
    return df.filter(keep)


def splits_by_study_ok(pairs: pl.DataFrame) -> bool:
    return bool(pairs.group_by("study_id").agg(pl.col("split").n_unique())["split"].max() in (None, 1))
