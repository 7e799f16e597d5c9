"""Who the patients are: MIMIC-IV's ``hosp/patients`` and ``hosp/admissions`` joined to MIMIC-CXR studies.

MIMIC-CXR carries no demographics; subgroup audits (CheXclusion, PSB 2021; the underdiagnosis study,
Nature Medicine 2021) take them from MIMIC-IV, joined on ``subject_id``. The format is in
``shared/MIMIC_FORMAT.md`` (Demographics):

- ``hosp/patients.csv.gz``: ``subject_id, gender, anchor_age, anchor_year, anchor_year_group, dod``;
- ``hosp/admissions.csv.gz``: one row per hospital stay (``subject_id, hadm_id, admittime, ...,
  insurance, language, marital_status, race, ...``); MIMIC-IV v1.0 calls ``race`` ``ethnicity``.

Rules (said here because an audit's result depends on them):

- **age at a study** = ``anchor_age + (study year - anchor_year)``: MIMIC shifts every date of a patient
  by the same offset, so the shifted study year and the shifted anchor year subtract exactly; ages
  over 89 are released as 91 and stay in the 80+ band;
- **race and insurance** come from the patient's **most recent** admission (latest ``admittime``;
  ties broken by ``hadm_id``), as a patient's record stands at the end of the release;
- **race groups** as CheXclusion grouped them: White, Black, Hispanic, Asian, Other/unknown
  (``UNKNOWN``, ``UNABLE TO OBTAIN``, ``PATIENT DECLINED TO ANSWER`` and every other string);
- **insurance** as released: Medicaid, Medicare, Private, Other (``No charge`` counted as Other);
- patients with no admission (emergency-department chest X-rays without a stay) keep their sex and
  age but have no race or insurance: counted, left out of those subgroups, never dropped elsewhere.

Rows that cannot be used (a non-numeric id, an unknown gender, an age that is not a number) go to the
rejects with the file, line and reason, as the manifest's do.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from cxr_pipeline.data.csvs import REJECT_SCHEMA, DatasetError, first_reason, read_csv, rejects_table

PATIENTS = "hosp/patients.csv.gz"
ADMISSIONS = "hosp/admissions.csv.gz"
PATIENT_COLUMNS = ("subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod")
ADMISSION_COLUMNS = ("subject_id", "hadm_id", "admittime", "insurance")
AGE_BANDS = ((0, 20, "0-20"), (20, 40, "20-40"), (40, 60, "40-60"), (60, 80, "60-80"), (80, 200, "80+"))
RACE_GROUPS = ("White", "Black", "Hispanic", "Asian", "Other/unknown")
INSURANCE = ("Medicaid", "Medicare", "Private", "Other")
ATTRIBUTES = ("sex", "age_band", "race", "insurance")
SCHEMA = {"subject_id": pl.Int64, "sex": pl.String, "anchor_age": pl.Int64, "anchor_year": pl.Int64, "race": pl.String}
SCHEMA |= {"insurance": pl.String, "admissions": pl.UInt32}


@dataclass
class Demographics:
    patients: pl.DataFrame  # one row per patient: SCHEMA
    rejects: pl.DataFrame  # csvs.REJECT_SCHEMA
    root: Path


def files(root: Path) -> list[Path]:
    """The two files an audit reads, under a MIMIC-IV root (they need not exist)."""
    return [Path(root) / PATIENTS, Path(root) / ADMISSIONS]


def missing_reason(root: Path | None) -> str | None:
    """Why there are no demographics (None: both files are there)."""
    if root is None:
        return "no MIMIC-IV root configured (CXR_MIMIC_IV_DIR)"
    absent = [str(f) for f in files(root) if not f.is_file()]
    return f"MIMIC-IV demographics not found: {', '.join(absent)} (set CXR_MIMIC_IV_DIR to a MIMIC-IV root)" if absent else None


def race_group(race: pl.Expr) -> pl.Expr:
    """MIMIC-IV's race strings in CheXclusion's five groups."""
    r = race.str.to_uppercase()
    return (
        pl.when(r.str.starts_with("WHITE") | r.is_in(["PORTUGUESE"]))
        .then(pl.lit("White"))
        .when(r.str.starts_with("BLACK"))
        .then(pl.lit("Black"))
        .when(r.str.starts_with("HISPANIC") | (r == "SOUTH AMERICAN"))
        .then(pl.lit("Hispanic"))
        .when(r.str.starts_with("ASIAN"))
        .then(pl.lit("Asian"))
        .otherwise(pl.lit("Other/unknown"))
    )


def _read_patients(path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    df = read_csv(path, PATIENT_COLUMNS)
    df = df.with_columns(
        pl.col("subject_id").cast(pl.Int64, strict=False).alias("_sid"),
        pl.col("anchor_age").cast(pl.Int64, strict=False).alias("_age"),
        pl.col("anchor_year").cast(pl.Int64, strict=False).alias("_year"),
    )
    df = df.with_columns(
        first_reason(
            (pl.col("_sid").is_null(), "subject_id is not a number"),
            (~pl.col("gender").is_in(["M", "F"]), pl.format("gender {} is not M or F", pl.col("gender").fill_null(""))),
            (pl.col("_age").is_null() | (pl.col("_age") < 0), "anchor_age is not an age"),
            (pl.col("_year").is_null(), "anchor_year is not a year"),
            (pl.col("_sid").is_duplicated(), "subject_id listed twice"),
        ).alias("_reason")
    )
    ok = df.filter(pl.col("_reason").is_null()).select(
        pl.col("_sid").alias("subject_id"),
        pl.col("gender").alias("sex"),
        pl.col("_age").alias("anchor_age"),
        pl.col("_year").alias("anchor_year"),
    )
    return ok, rejects_table(df, path.name)


def _read_admissions(path: Path) -> tuple[pl.DataFrame, pl.DataFrame]:
    df = read_csv(path, ADMISSION_COLUMNS)
    race_col = "race" if "race" in df.columns else "ethnicity" if "ethnicity" in df.columns else None
    if race_col is None:
        raise DatasetError(f"{path}: missing column race (v1.0: ethnicity) (has: {', '.join(df.columns)})")
    df = df.with_columns(
        pl.col("subject_id").cast(pl.Int64, strict=False).alias("_sid"),
        pl.col("admittime").str.strptime(pl.Datetime, "%Y-%m-%d %H:%M:%S", strict=False).alias("_time"),
        pl.col(race_col).alias("_race"),
    )
    df = df.with_columns(
        first_reason(
            (pl.col("_sid").is_null(), "subject_id is not a number"),
            (pl.col("_time").is_null(), "admittime is not a time"),
        ).alias("_reason")
    )
    ok = df.filter(pl.col("_reason").is_null())
    latest = (
        ok.sort("_sid", "_time", "hadm_id")
        .group_by("_sid", maintain_order=True)
        .agg(pl.col("_race").last().alias("race_text"), pl.col("insurance").last(), pl.len().alias("admissions"))
    )
    latest = latest.select(
        pl.col("_sid").alias("subject_id"),
        race_group(pl.col("race_text").fill_null("")).alias("race"),
        pl.when(pl.col("insurance").is_in(["Medicaid", "Medicare", "Private"]))
        .then("insurance")
        .otherwise(pl.lit("Other"))
        .alias("insurance"),
        pl.col("admissions").cast(pl.UInt32),
    )
    return latest, rejects_table(df, path.name)


def read_demographics(root: Path) -> Demographics:
    """One row per MIMIC-IV patient with sex, anchor age/year, and (from the most recent admission) race
    group and insurance; null race/insurance for patients without an admission."""
    root = Path(root)
    pats, rej_p = _read_patients(root / PATIENTS)
    adm, rej_a = _read_admissions(root / ADMISSIONS)
    df = pats.join(adm, on="subject_id", how="left").with_columns(pl.col("admissions").fill_null(0))
    return Demographics(df.select(list(SCHEMA)).cast(SCHEMA), pl.concat([rej_p, rej_a]).cast(REJECT_SCHEMA), root)


def age_band(age: pl.Expr) -> pl.Expr:
    expr = pl.when(age.is_null()).then(pl.lit(None, pl.String))
    for lo, hi, name in AGE_BANDS:
        expr = expr.when((age >= lo) & (age < hi)).then(pl.lit(name))
    return expr.otherwise(pl.lit(None, pl.String))


def per_image(manifest: pl.DataFrame, demo: pl.DataFrame) -> tuple[pl.DataFrame, dict[str, int]]:
    """Each manifest image with its patient's sex, age at the study (and its band), race group and insurance.

    Returns (``dicom_id, subject_id, sex, age, age_band, race, insurance``) and counts: images and
    patients without MIMIC-IV demographics at all, and patients without an admission (no race/insurance)."""
    m = manifest.select("dicom_id", pl.col("subject_id").cast(pl.Int64), "study_datetime")
    j = m.join(demo, on="subject_id", how="left")
    j = j.with_columns((pl.col("anchor_age") + (pl.col("study_datetime").dt.year() - pl.col("anchor_year"))).alias("age"))
    j = j.with_columns(age_band(pl.col("age")).alias("age_band"))
    known = j.filter(pl.col("sex").is_not_null())
    counts = {
        "images": m.height,
        "patients": m["subject_id"].n_unique(),
        "patients_without_demographics": j.filter(pl.col("sex").is_null())["subject_id"].n_unique(),
        "images_without_demographics": j.filter(pl.col("sex").is_null()).height,
        "patients_without_admission": known.filter(pl.col("race").is_null())["subject_id"].n_unique(),
    }
    return j.select("dicom_id", "subject_id", "sex", "age", "age_band", "race", "insurance"), counts
