"""The replica's patients as MIMIC-IV records them: sex, anchor age and year, race and insurance over 0-5
admissions (``hosp/patients.csv.gz``, ``hosp/admissions.csv.gz`` with their real headers), for the subgroup audit.

Part of the replica generator (``data.synthetic``); each patient's draws come from their own generator.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from cxr_pipeline.data.demographics import race_group
from cxr_pipeline.files import write_csv

# MIMIC-IV's race strings (a selection of the 33) and insurance values, with rough shares of MIMIC-CXR's patients
_RACES = {
    "WHITE": 0.52, "WHITE - OTHER EUROPEAN": 0.03, "BLACK/AFRICAN AMERICAN": 0.16, "BLACK/CAPE VERDEAN": 0.01,
    "HISPANIC/LATINO - PUERTO RICAN": 0.03, "HISPANIC OR LATINO": 0.03, "ASIAN - CHINESE": 0.02, "ASIAN": 0.02,
    "OTHER": 0.04, "UNKNOWN": 0.08, "UNABLE TO OBTAIN": 0.02, "PATIENT DECLINED TO ANSWER": 0.01,
    "PORTUGUESE": 0.01, "SOUTH AMERICAN": 0.02,
}  # fmt: skip
_INSURANCE = {"Medicare": 0.44, "Medicaid": 0.13, "Private": 0.34, "Other": 0.08, "No charge": 0.01}
_YEAR_GROUPS = ("2008 - 2010", "2011 - 2013", "2014 - 2016", "2017 - 2019")
_ADMISSION_TYPES = ("EW EMER.", "URGENT", "ELECTIVE", "OBSERVATION ADMIT", "DIRECT EMER.")


def _choice(rng: np.random.Generator, weights: dict[str, float]) -> str:
    keys = list(weights)
    p = np.array([weights[k] for k in keys])
    return str(keys[int(rng.choice(len(keys), p=p / p.sum()))])


def draw_demographics(seed: int, index: int, sex: str, age: int, studies: list[dict]) -> dict:
    """The patient in MIMIC-IV: anchor age/year from the first study, race and insurance, 0-5 admissions.

    Its own generator (seed, index, 9): the rest of the replica is the same with or without it. Earlier
    admissions sometimes record another race string or insurance, as real records do; the most recent
    one holds the values below."""
    rng = np.random.default_rng([seed, index, 9])
    first = date(int(studies[0]["date"][:4]), int(studies[0]["date"][4:6]), int(studies[0]["date"][6:]))
    race, insurance = _choice(rng, _RACES), _choice(rng, _INSURANCE)
    n_adm = 0 if rng.uniform() < 0.12 else int(min(5, rng.geometric(0.55)))
    admissions = []
    for k in range(n_adm):
        st = studies[int(rng.integers(0, len(studies)))]
        day = date(int(st["date"][:4]), int(st["date"][4:6]), int(st["date"][6:])) - timedelta(days=int(rng.integers(0, 3)))
        last = k == n_adm - 1
        admissions.append(
            {
                "time": f"{day.isoformat()} {int(rng.integers(0, 24)):02d}:{int(rng.integers(0, 60)):02d}:00",
                "race": race if last or rng.uniform() < 0.8 else "UNKNOWN",
                "insurance": insurance if last or rng.uniform() < 0.85 else _choice(rng, _INSURANCE),
                "type": str(rng.choice(_ADMISSION_TYPES)),
            }
        )
    admissions.sort(key=lambda a: a["time"])
    if admissions:  # the most recent stay carries the patient's current values
        admissions[-1].update(race=race, insurance=insurance)
    return {
        "sex": sex,
        "anchor_age": 91 if age > 89 else age,
        "anchor_year": first.year,
        "anchor_year_group": str(rng.choice(_YEAR_GROUPS)),
        "race": race,
        "insurance": insurance,
        "admissions": admissions,
    }


def in_group(demo: dict, attribute: str, group: str) -> bool:
    """Whether the patient is in the planted effect's group, as the audit groups patients (``data.demographics``)."""
    if attribute == "race":
        import polars as pl

        return pl.select(race_group(pl.lit(demo["race"]))).item() == group
    if attribute == "insurance":
        return (demo["insurance"] if demo["insurance"] in ("Medicaid", "Medicare", "Private") else "Other") == group
    return demo[attribute] == group


ADMISSIONS_HEADER = [
    "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "admit_provider_id",
    "admission_location", "discharge_location", "insurance", "language", "marital_status", "race",
    "edregtime", "edouttime", "hospital_expire_flag",
]  # fmt: skip


def write_mimic_iv(root: Path, patients: Iterable) -> None:
    """MIMIC-IV's ``hosp/patients.csv.gz`` and ``hosp/admissions.csv.gz`` (real headers) for the replica's patients
    (each with ``subject_id`` and ``demo``, as ``draw_demographics`` made it)."""
    pats, adms = [], []
    hadm = 20_000_000
    for p in patients:
        d = p.demo
        pats.append([str(p.subject_id), d["sex"], str(d["anchor_age"]), str(d["anchor_year"]), d["anchor_year_group"], ""])
        for a in d["admissions"]:
            hadm += 1
            out_time = a["time"][:11] + "23:00:00"
            adms.append(
                [str(p.subject_id), str(hadm), a["time"], out_time, "", a["type"], "P00000", "EMERGENCY ROOM", "HOME",
                 a["insurance"], "ENGLISH", "", a["race"], "", "", "0"]
            )  # fmt: skip
    (root / "hosp").mkdir(parents=True, exist_ok=True)
    write_csv(root / "hosp" / "patients.csv.gz", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"], pats)
    write_csv(root / "hosp" / "admissions.csv.gz", ADMISSIONS_HEADER, adms)
