"""MIMIC-IV demographics: the real headers, the most-recent-admission rule, the join and the age arithmetic."""

from __future__ import annotations

import gzip
from datetime import datetime

import polars as pl
import pytest

from cxr_pipeline.data.csvs import DatasetError
from cxr_pipeline.data.demographics import missing_reason, per_image, read_demographics

# MIMIC-IV v2.2 / v3.1 hosp/patients.csv.gz and hosp/admissions.csv.gz headers, as released
PATIENTS = "subject_id,gender,anchor_age,anchor_year,anchor_year_group,dod"
ADMISSIONS = (
    "subject_id,hadm_id,admittime,dischtime,deathtime,admission_type,admit_provider_id,admission_location,"
    "discharge_location,insurance,language,marital_status,race,edregtime,edouttime,hospital_expire_flag"
)


def write(root, name: str, header: str, rows: list[str]) -> None:
    (root / "hosp").mkdir(parents=True, exist_ok=True)
    with gzip.open(root / "hosp" / name, "wt") as f:
        f.write("\n".join([header, *rows]) + "\n")


def adm(sid: int, hadm: int, time: str, insurance: str, race: str) -> str:
    return f'{sid},{hadm},{time},{time},,EW EMER.,P1,EMERGENCY ROOM,HOME,{insurance},ENGLISH,MARRIED,"{race}",,,0'


@pytest.fixture
def mimic_iv(tmp_path):
    root = tmp_path / "mimiciv"
    write(root, "patients.csv.gz", PATIENTS, [
        "10000032,F,52,2180,2014 - 2016,2180-09-09",
        "10000048,M,91,2126,2008 - 2010,",
        "10000058,X,33,2168,2020 - 2022,",  # unknown gender: a reject
        "10000068,M,forty,2160,2017 - 2019,",  # not an age: a reject
        "10000084,M,72,2160,2017 - 2019,",  # no admission (an ED chest X-ray without a stay)
    ])  # fmt: skip
    write(root, "admissions.csv.gz", ADMISSIONS, [
        adm(10000032, 22595853, "2180-05-06 22:23:00", "Other", "UNKNOWN"),
        adm(10000032, 22841357, "2180-06-26 18:27:00", "Medicaid", "BLACK/AFRICAN AMERICAN"),  # the most recent stay
        adm(10000032, 29079034, "2180-03-23 11:51:00", "Private", "WHITE"),
        adm(10000048, 26115624, "2126-11-22 07:19:00", "No charge", "HISPANIC/LATINO - PUERTO RICAN"),
        adm(10000048, 99999999, "not a time", "Private", "WHITE"),  # a reject
    ])  # fmt: skip
    return root


def test_reads_the_real_headers_and_takes_race_and_insurance_from_the_most_recent_stay(mimic_iv):
    d = read_demographics(mimic_iv)
    p = {r["subject_id"]: r for r in d.patients.iter_rows(named=True)}
    assert set(p) == {10000032, 10000048, 10000084}
    assert (p[10000032]["sex"], p[10000032]["race"], p[10000032]["insurance"], p[10000032]["admissions"]) == ("F", "Black", "Medicaid", 3)
    assert (p[10000048]["race"], p[10000048]["insurance"]) == ("Hispanic", "Other")  # No charge counts as Other
    assert p[10000084]["race"] is None and p[10000084]["admissions"] == 0
    reasons = dict(zip(d.rejects["line"], d.rejects["reason"], strict=True))
    assert reasons[4] == "gender X is not M or F" and reasons[5] == "anchor_age is not an age"
    assert reasons[6] == "admittime is not a time" and set(d.rejects["source"]) == {"patients.csv.gz", "admissions.csv.gz"}


def test_version_1_calls_race_ethnicity_and_a_file_without_either_is_named(mimic_iv):
    write(
        mimic_iv,
        "admissions.csv.gz",
        ADMISSIONS.replace(",race,", ",ethnicity,"),
        [adm(10000032, 1, "2180-05-06 22:23:00", "Medicare", "ASIAN - CHINESE")],
    )
    assert read_demographics(mimic_iv).patients.filter(pl.col("subject_id") == 10000032)["race"].item() == "Asian"
    write(
        mimic_iv, "admissions.csv.gz", ADMISSIONS.replace(",race,", ",origin,"), [adm(10000032, 1, "2180-05-06 22:23:00", "Medicare", "x")]
    )
    with pytest.raises(DatasetError, match=r"admissions.csv.gz: missing column race \(v1.0: ethnicity\)"):
        read_demographics(mimic_iv)


def test_age_at_each_study_and_patients_without_demographics_are_counted_not_dropped(mimic_iv):
    d = read_demographics(mimic_iv)
    manifest = pl.DataFrame({
        "dicom_id": ["a", "b", "c", "d", "e"],
        "subject_id": [10000032, 10000032, 10000048, 10000084, 19999999],  # the last: not in MIMIC-IV
        "study_datetime": [datetime(2180, 1, 1), datetime(2189, 6, 1), datetime(2130, 1, 1), datetime(2150, 1, 1), datetime(2150, 1, 1)],
    })  # fmt: skip
    people, counts = per_image(manifest, d.patients)
    ages = dict(zip(people["dicom_id"], people["age"], strict=True))
    bands = dict(zip(people["dicom_id"], people["age_band"], strict=True))
    assert ages["a"] == 52 and ages["b"] == 61 and bands["b"] == "60-80"  # anchor_age + (study year - anchor_year)
    assert ages["c"] == 95 and bands["c"] == "80+"  # 91 (over 89) + 4 years: still 80+
    assert ages["d"] == 62  # 72 in 2160, imaged in 2150
    assert people.height == 5 and ages["e"] is None  # kept, with no attributes
    assert counts["patients_without_demographics"] == 1 and counts["images_without_demographics"] == 1
    assert counts["patients_without_admission"] == 1


def test_missing_files_say_why(tmp_path):
    assert "hosp/patients.csv.gz" in missing_reason(tmp_path) and "CXR_MIMIC_IV_DIR" in missing_reason(tmp_path)


def test_the_replica_writes_mimic_iv_for_its_patients_with_a_planted_effect(tmp_path):
    from cxr_pipeline.data.synthetic import SynthConfig, generate

    generate(SynthConfig(patients=60, seed=3, metadata_only=True, effect="Cardiomegaly:sex=F:0.3"), tmp_path)
    d = read_demographics(tmp_path / "mimic-iv")
    record = pl.read_csv(tmp_path / "cxr-record-list.csv.gz")
    assert set(d.patients["subject_id"]) == set(record["subject_id"]) and d.rejects.height == 0
    assert 0 < d.patients.filter(pl.col("admissions") == 0).height < 60  # some patients have no stay
    assert d.patients.filter(pl.col("admissions") > 1).height > 0  # several stays per patient
    assert set(d.patients["race"].drop_nulls()) <= {"White", "Black", "Hispanic", "Asian", "Other/unknown"}
    with pytest.raises(ValueError, match="effect must look like"):
        SynthConfig(effect="Cardiomegaly-F")
