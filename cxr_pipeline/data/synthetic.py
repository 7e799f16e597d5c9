"""A faithful MIMIC-CXR replica: the real layout, CSVs, DICOMs and reports.

Real MIMIC-CXR is credentialed, so the embedded default dataset is generated:
``files/pNN/pSSSSSSSS/sTTTTTTTT/<dicom_id>.dcm`` (or ``.jpg`` for the
MIMIC-CXR-JPG variant), a report ``sTTTTTTTT.txt`` beside each study folder
and inside ``mimic-cxr-reports.zip``, and the release's CSVs (gzipped) with
their exact headers. Label prevalence follows the real training table; every
image carries its study's findings as a visible pattern (``phantom.py``), and
the reports are written from the same findings, so labels, text and pixels
agree (up to a few realistic labeller disagreements).

Same ``seed``, same bytes: gzip and zip timestamps are fixed and every random
draw comes from a per-patient generator seeded from (seed, patient index), so
the output does not depend on the number of worker processes either.
"""

from __future__ import annotations

import csv
import gzip
import io
import textwrap
import zipfile
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np

from cxr_pipeline.data.io import atomic_path
from cxr_pipeline.data.mimic import CHEXPERT, METADATA, NEGBIO, RECORD_LIST, REPORTS_ZIP, SPLIT, STUDY_LIST, TEST_LABELED
from cxr_pipeline.data.phantom import Anatomy, render
from cxr_pipeline.labels import LABELS, PATHOLOGIES, no_finding

# Positive / negative / uncertain counts in MIMIC-CXR's 222,758 training studies
# (mimic-cxr-2.0.0-chexpert), the prevalence the replica draws from.
N_TRAIN_STUDIES = 222_758
PREVALENCE: dict[str, tuple[int, int, int]] = {
    "Atelectasis": (44_012, 921, 9_623),
    "Cardiomegaly": (38_002, 15_563, 5_753),
    "Consolidation": (10_199, 7_791, 2_913),
    "Edema": (25_549, 24_746, 11_426),
    "Enlarged Cardiomediastinum": (6_798, 5_158, 9_015),
    "Fracture": (3_675, 871, 295),
    "Lung Lesion": (5_939, 822, 996),
    "Lung Opacity": (49_512, 2_794, 2_052),
    "Pleural Effusion": (51_680, 26_532, 5_184),
    "Pleural Other": (1_884, 120, 707),
    "Pneumonia": (15_333, 23_771, 17_313),
    "Pneumothorax": (9_159, 41_250, 848),
    "Support Devices": (63_971, 3_014, 95),
}
# With independent draws too few studies would be normal (about 19% against the
# real 33% No Finding); a share of studies drawn as normal first fixes that.
P_NORMAL_STUDY = 0.25

SEX = ("M", "F")


@dataclass(frozen=True)
class SynthConfig:
    patients: int = 200
    seed: int = 0
    image_size: int = 384  # rows of each image; columns are 83-100% of it, as in MIMIC
    fmt: str = "dicom"  # or "jpg": the MIMIC-CXR-JPG variant
    metadata_only: bool = False  # CSVs and reports, no images (scale tests)
    validate_fraction: float = 0.1  # patient-level; MIMIC's own test split is ~0.5% of patients,
    test_fraction: float = 0.1  # too few for a small replica to evaluate on
    # MIMIC-CXR-JPG 2.1.0's radiologist labels cover 687 studies, a subset of the test split
    radiologist_fraction: float = 0.3
    monochrome1_fraction: float = 0.15
    jpeg2000_fraction: float = 0.2
    workers: int = 1
    # exact totals (0: as drawn from MIMIC's per-patient rates, about 3.48 studies a patient and
    # 1.66 images a study); the full-count rehearsal asks for MIMIC's own 227,835 and 377,110
    studies: int = 0
    images: int = 0
    # MIMIC-IV's hosp/patients and hosp/admissions for these patients, under mimic-iv/ in the replica root
    mimic_iv: bool = True
    # a planted subgroup effect, "<finding>:<attribute>=<group>:<scale>" (attribute sex, race or insurance;
    # race as its group, e.g. Black): that finding is drawn at <scale> x its strength in that group's images
    # (fainter, so harder to see), so an audit has a known gap to find; "": none
    effect: str = ""

    def __post_init__(self) -> None:
        if self.effect:
            planted_effect(self.effect)  # fails on a malformed one
        if self.fmt not in ("dicom", "jpg"):
            raise ValueError(f"fmt must be 'dicom' or 'jpg', not {self.fmt!r}")
        if self.patients < 1:
            raise ValueError(f"patients must be at least 1, not {self.patients}")
        if self.image_size < 32:
            raise ValueError(f"image_size must be at least 32, not {self.image_size}")
        if self.workers < 1:
            raise ValueError(f"workers must be at least 1, not {self.workers}")
        if self.jpeg2000_fraction > 0 and self.image_size < 40:
            # OpenJPEG's 6 wavelet resolutions need 32 px on each side; columns are 83-100% of rows
            raise ValueError(f"image_size {self.image_size} is too small for JPEG 2000 (40 at least); set jpeg2000_fraction=0")
        if self.studies and not self.patients <= self.studies:
            raise ValueError(f"studies ({self.studies}) must be 0 or at least the patient count ({self.patients})")
        if self.images and self.studies and not self.studies <= self.images:
            raise ValueError(f"images ({self.images}) must be 0 or at least the study count ({self.studies})")


def planted_effect(spec: str) -> tuple[str, str, str, float]:
    """``"Cardiomegaly:sex=F:0.4"`` -> (finding, attribute, group, scale)."""
    try:
        finding, cond, scale = spec.split(":")
        attribute, group = cond.split("=")
        value = float(scale)
    except ValueError:
        raise ValueError(f"effect must look like Cardiomegaly:sex=F:0.4, not {spec!r}") from None
    if finding not in PATHOLOGIES or attribute not in ("sex", "race", "insurance") or not 0 <= value:
        raise ValueError(f"effect {spec!r}: a finding of {', '.join(PATHOLOGIES)}, attribute sex, race or insurance, scale >= 0")
    return finding, attribute, group, value


RADIOLOGIST_HEADER = tuple("Airspace Opacity" if lab == "Lung Opacity" else lab for lab in LABELS)


def radiologist_labels_study(study_id: int, fraction: float) -> bool:
    """Whether the replica's radiologist labelled this test study (a hash: draws nothing from the RNG)."""
    import hashlib

    u = int.from_bytes(hashlib.blake2b(f"rad{study_id}".encode(), digest_size=8).digest(), "big") / 2**64
    return u < fraction


# ------------------------------------------------------------------ findings


def _draw_states(rng: np.random.Generator) -> dict[str, float | None]:
    """One study's labels: 1 / 0 / -1 / None (not mentioned) for all 14."""
    normal = rng.uniform() < P_NORMAL_STUDY
    states: dict[str, float | None] = {}
    for lab, (pos, neg, unc) in PREVALENCE.items():
        p_pos, p_neg, p_unc = pos / N_TRAIN_STUDIES, neg / N_TRAIN_STUDIES, unc / N_TRAIN_STUDIES
        if lab != "Support Devices":
            if normal:
                p_pos, p_unc = 0.0, 0.0
            else:
                p_pos, p_unc = p_pos / (1 - P_NORMAL_STUDY), p_unc / (1 - P_NORMAL_STUDY)
        u = rng.uniform()
        states[lab] = 1.0 if u < p_pos else -1.0 if u < p_pos + p_unc else 0.0 if u < p_pos + p_unc + p_neg else None
    if states["Pneumonia"] == 1.0 or states["Consolidation"] == 1.0:
        if states["Lung Opacity"] is None and rng.uniform() < 0.6:
            states["Lung Opacity"] = 1.0
    states["No Finding"] = no_finding(states)
    return {lab: states[lab] for lab in LABELS}


def planted_strengths(rng: np.random.Generator, states: dict[str, float | None]) -> dict[str, float]:
    """What the image shows: positives at full strength, half of the uncertain ones faintly."""
    out = {}
    for lab in PATHOLOGIES:
        s = states[lab]
        if s == 1.0:
            out[lab] = float(rng.uniform(0.75, 1.15))
        elif s == -1.0 and rng.uniform() < 0.5:
            out[lab] = float(rng.uniform(0.3, 0.55))
    return out


# ------------------------------------------------------------------- reports

_POS = {
    "Atelectasis": [
        "Mild bibasilar atelectasis.",
        "Plate-like atelectasis at the {side} lung base.",
        "Streaky opacity at the {side} base likely reflects atelectasis.",
    ],
    "Cardiomegaly": ["The heart is enlarged.", "Moderate cardiomegaly is unchanged.", "Mild cardiomegaly."],
    "Consolidation": ["Dense consolidation in the {side} lower lobe.", "Focal consolidation in the {side} mid lung."],
    "Edema": [
        "Mild pulmonary edema.",
        "Moderate interstitial pulmonary edema with perihilar haziness.",
        "Pulmonary vascular congestion with mild edema.",
    ],
    "Enlarged Cardiomediastinum": ["The cardiomediastinal silhouette is widened.", "Widening of the mediastinum."],
    "Fracture": ["Old healed {side} rib fracture.", "Displaced fracture of a {side} posterior rib."],
    "Lung Lesion": ["A {size} cm nodule in the {side} upper lobe.", "Rounded {size} cm mass in the {side} lung."],
    "Lung Opacity": ["Patchy opacity in the {side} lower lung.", "Hazy opacity projecting over the {side} lung base."],
    "Pleural Effusion": [
        "Small {side} pleural effusion.",
        "Moderate {side} pleural effusion with a meniscus.",
        "Layering {side} pleural effusion.",
    ],
    "Pleural Other": ["{Side} apical pleural thickening.", "Pleural thickening along the {side} lateral chest wall."],
    "Pneumonia": ["Findings concerning for pneumonia in the {side} lower lobe.", "Patchy opacities consistent with pneumonia."],
    "Pneumothorax": ["Small {side} apical pneumothorax.", "Moderate {side} pneumothorax with a visible pleural line."],
    "Support Devices": [
        "Endotracheal tube terminates 4 cm above the carina.",
        "Nasogastric tube courses below the diaphragm.",
        "Left chest wall pacemaker with leads in standard position.",
        "Right internal jugular line ends in the SVC.",
    ],
}
_NEG = {
    "Atelectasis": ["No atelectasis."],
    "Cardiomegaly": ["Heart size is normal.", "No cardiomegaly."],
    "Consolidation": ["No focal consolidation.", "There is no consolidation."],
    "Edema": ["No pulmonary edema.", "No evidence of edema."],
    "Enlarged Cardiomediastinum": ["The cardiomediastinal silhouette is normal.", "Mediastinal contours are within normal limits."],
    "Fracture": ["No acute fracture.", "No displaced rib fractures."],
    "Lung Lesion": ["No suspicious nodules.", "No pulmonary nodule or mass."],
    "Lung Opacity": ["The lungs are clear without focal opacity.", "No focal opacity."],
    "Pleural Effusion": ["No pleural effusion.", "There is no pleural effusion."],
    "Pleural Other": ["No pleural thickening."],
    "Pneumonia": ["No evidence of pneumonia.", "No findings to suggest pneumonia."],
    "Pneumothorax": ["No pneumothorax.", "There is no pneumothorax."],
    "Support Devices": ["No lines or tubes are seen."],
}
_UNC = {
    "Atelectasis": ["Possible subsegmental atelectasis at the {side} base.", "Opacity may reflect atelectasis."],
    "Cardiomegaly": ["The heart may be mildly enlarged.", "Borderline cardiomegaly."],
    "Consolidation": ["Possible early consolidation at the {side} base."],
    "Edema": ["Possible mild pulmonary edema.", "Cannot exclude mild interstitial edema."],
    "Enlarged Cardiomediastinum": ["Possible mild mediastinal widening, likely due to technique."],
    "Fracture": ["Possible nondisplaced {side} rib fracture."],
    "Lung Lesion": ["Possible nodular opacity in the {side} lung, consider CT."],
    "Lung Opacity": ["Possible subtle opacity at the {side} base."],
    "Pleural Effusion": ["Possible trace {side} pleural effusion.", "Cannot exclude a small {side} pleural effusion."],
    "Pleural Other": ["Possible {side} pleural thickening."],
    "Pneumonia": ["Cannot exclude early pneumonia.", "Infection cannot be excluded."],
    "Pneumothorax": ["Possible tiny {side} apical pneumothorax."],
    "Support Devices": ["Possible overlying monitoring device."],
}
_INDICATIONS = (
    "shortness of breath",
    "fever and cough",
    "chest pain",
    "evaluate for pneumonia",
    "status post line placement",
    "hypoxia",
    "pre-operative evaluation",
    "evaluate for effusion",
)


def _fill(rng: np.random.Generator, s: str) -> str:
    side = str(rng.choice(["right", "left"]))
    return s.format(side=side, Side=side.capitalize(), size=f"{rng.uniform(0.8, 3.0):.1f}")


def _wrap(text: str) -> list[str]:
    """MIMIC line style: a leading space, at most 79 characters."""
    return [" " + line for line in textwrap.wrap(text, width=78)] or [" "]


def write_report(rng: np.random.Generator, states: dict[str, float | None], sex: str, procedure: str, view_desc: str) -> str:
    findings: list[str] = []
    impression: list[str] = []
    for lab in PATHOLOGIES:
        st = states[lab]
        if st == 1.0:
            sent = _fill(rng, str(rng.choice(_POS[lab])))
            findings.append(sent)
            if lab != "Support Devices" or rng.uniform() < 0.3:
                impression.append(sent)
        elif st == -1.0:
            sent = _fill(rng, str(rng.choice(_UNC[lab])))
            findings.append(sent)
            impression.append(sent)
        elif st == 0.0:
            findings.append(_fill(rng, str(rng.choice(_NEG[lab]))))
    if states["No Finding"] == 1.0:
        impression.append(
            str(rng.choice(["No acute cardiopulmonary process.", "No acute intrathoracic abnormality.", "No evidence of acute disease."]))
        )
        if not findings:
            findings.append("The lungs are clear. The cardiomediastinal silhouette is normal.")
    order = rng.permutation(len(findings))
    findings = [findings[i] for i in order]

    woman = "woman" if sex == "F" else "man"
    lines = [" " * 33 + "FINAL REPORT"]
    if rng.uniform() < 0.03:  # an addendum on top, as some MIMIC reports have
        lines = [" ADDENDUM:  Findings were discussed with the referring clinician ___ at ___.", " ", " " + "_" * 78, " ", *lines]
    lines += [f" EXAMINATION:  {procedure}", " "]
    lines += _wrap(f"INDICATION:  ___ year old {woman} with {rng.choice(_INDICATIONS)}  // ?{rng.choice(_INDICATIONS)}") + [" "]
    lines += [f" TECHNIQUE:  {view_desc}", " ", f" COMPARISON:  {rng.choice(['___', 'None.', 'Chest radiograph ___.'])}", " "]
    u = rng.uniform()
    body = " ".join(findings)
    imp = " ".join(impression) or "No acute cardiopulmonary process."
    if u < 0.83:  # findings and impression (about 83% of MIMIC reports have an impression)
        if rng.uniform() < 0.85:
            lines += [" FINDINGS: ", " ", *_wrap(body), " "]
        lines += [" IMPRESSION: ", " ", *_wrap(imp)]
    elif u < 0.95:  # findings only
        lines += [" FINDINGS: ", " ", *_wrap(body + (" " + imp if impression else ""))]
    else:  # neither: the text sits in a last paragraph
        lines += [" ", *_wrap(body + " " + imp)]
    return "\n".join(lines) + "\n"


def labeller_view(rng: np.random.Generator, states: dict[str, float | None], flip: float) -> dict[str, float | None]:
    """What an automatic labeller reads from the report: mostly the truth, a few slips."""
    out = dict(states)
    for lab in PATHOLOGIES:
        if out[lab] is not None and rng.uniform() < flip:
            out[lab] = {1.0: -1.0, -1.0: 1.0, 0.0: None}[out[lab]]
    out["No Finding"] = no_finding(out)
    return out


# ---------------------------------------------------------------- the dataset

_PROCEDURES = {
    "pa_lat": ("CHEST (PA AND LAT)", "Chest PA and lateral"),
    "portable": ("CHEST (PORTABLE AP)", "Portable AP chest radiograph"),
    "other": ("CHEST (SINGLE VIEW)", "Single view of the chest"),
}
_VIEW_CODE = {"PA": "postero-anterior", "AP": "antero-posterior", "LATERAL": "lateral", "LL": "left lateral", "": ""}
_OTHER_VIEWS = ("", "", "", "", "LPO", "AP AXIAL", "XTABLE LATERAL", "AP LLD", "PA LLD", "RAO", "SWIMMERS")


def _dicom_id(rng: np.random.Generator) -> str:
    return "-".join(f"{int(v):08x}" for v in rng.integers(0, 2**32, 5, dtype=np.uint64))


def _fmt_label(v: float | None) -> str:
    return "" if v is None else f"{v:.1f}"


def _fmt_time(secs: float) -> str:
    hh, rem = divmod(secs, 3600)
    mm, ss = divmod(rem, 60)
    return str(round(int(hh) * 10000 + int(mm) * 100 + ss, 3))


@dataclass
class _Patient:
    subject_id: int
    split: str
    studies: list[dict]
    demo: dict  # what MIMIC-IV says about the patient (``_draw_demographics``)


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


def _draw_demographics(cfg: SynthConfig, index: int, sex: str, age: int, studies: list[dict]) -> dict:
    """The patient in MIMIC-IV: anchor age/year from the first study, race and insurance, 0-5 admissions.

    Its own generator (seed, index, 9): the rest of the replica is the same with or without it. Earlier
    admissions sometimes record another race string or insurance, as real records do; the most recent
    one holds the values below."""
    rng = np.random.default_rng([cfg.seed, index, 9])
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


def _in_group(demo: dict, attribute: str, group: str) -> bool:
    """Whether the patient is in the planted effect's group, as the audit groups patients (``data.demographics``)."""
    if attribute == "race":
        import polars as pl

        from cxr_pipeline.data.demographics import race_group

        return pl.select(race_group(pl.lit(demo["race"]))).item() == group
    if attribute == "insurance":
        return (demo["insurance"] if demo["insurance"] in ("Medicaid", "Medicare", "Private") else "Other") == group
    return demo[attribute] == group


def _plan_patient(cfg: SynthConfig, index: int, subject_id: int, study_ids: list[int]) -> _Patient:
    rng = np.random.default_rng([cfg.seed, index, 1])
    u = rng.uniform()
    split = "test" if u < cfg.test_fraction else "validate" if u < cfg.test_fraction + cfg.validate_fraction else "train"
    sex = str(rng.choice(SEX))
    age = int(rng.integers(20, 90))
    day = date(2110, 1, 1) + timedelta(days=int(rng.integers(0, 365 * 80)))
    studies = []
    for study_id in study_ids:
        day += timedelta(days=int(rng.integers(0, 400)))
        states = _draw_states(rng)
        devices = states["Support Devices"] == 1.0
        u = rng.uniform()
        kind = "portable" if u < (0.85 if devices else 0.38) else "pa_lat" if u < 0.96 else "other"
        if kind == "pa_lat":
            views = ["PA", "LATERAL" if rng.uniform() < 0.7 else "LL"]
            if rng.uniform() < 0.08:
                views.append("PA")
        elif kind == "portable":
            views = ["AP"] + (["AP"] if rng.uniform() < 0.3 else [])
        else:
            views = [str(rng.choice(_OTHER_VIEWS))]
        secs = float(rng.integers(0, 86400)) + round(float(rng.uniform(0, 1)), 3)
        images = []
        for v in views:
            rows = cfg.image_size
            cols = int(round(rows * rng.uniform(0.83, 1.0)))
            images.append({"dicom_id": _dicom_id(rng), "view": v, "rows": rows, "cols": cols, "image_seed": int(rng.integers(0, 2**63))})
        chex = labeller_view(rng, states, flip=0.02)
        negbio = labeller_view(rng, chex, flip=0.03)
        report = write_report(rng, states, sex, *_PROCEDURES[kind])
        studies.append(
            {
                "study_id": study_id,
                "date": day.strftime("%Y%m%d"),
                "time": _fmt_time(secs),
                "kind": kind,
                "states": states,
                "chexpert": chex,
                "negbio": negbio,
                "images": images,
                "report": report,
                "sex": sex,
                "age": age,
                "anatomy_seed": int(rng.integers(0, 2**63)),
            }
        )
    return _Patient(subject_id=subject_id, split=split, studies=studies, demo=_draw_demographics(cfg, index, sex, age, studies))


def _exact_studies(rng: np.random.Generator, n_studies: np.ndarray, target: int) -> np.ndarray:
    """Per-patient study counts moved one study at a time until they sum to ``target``."""
    n = n_studies.copy()
    while (diff := target - int(n.sum())) != 0:
        pool = np.arange(n.size) if diff > 0 else np.flatnonzero(n > 1)
        pick = rng.choice(pool, size=min(abs(diff), pool.size), replace=False)
        n[pick] += 1 if diff > 0 else -1
    return n


def _exact_images(rng: np.random.Generator, patients: list[_Patient], target: int) -> None:
    """Add or drop repeat images (a second exposure of a study's first view) until the replica has
    ``target`` images; studies keep at least one image."""
    studies = [st for p in patients for st in p.studies]
    diff = target - sum(len(st["images"]) for st in studies)
    if diff < 0:
        pool = [st for st in studies if len(st["images"]) > 1]
        for i in rng.choice(len(pool), size=min(-diff, len(pool)), replace=False):
            pool[i]["images"].pop()
    for i in rng.choice(len(studies), size=max(diff, 0), replace=True):
        first = studies[i]["images"][0]
        extra = {"dicom_id": _dicom_id(rng), "view": first["view"], "rows": first["rows"], "cols": first["cols"]}
        studies[i]["images"].append({**extra, "image_seed": int(rng.integers(0, 2**63))})
    if (got := sum(len(st["images"]) for st in studies)) != target:
        raise ValueError(f"cannot reach {target} images from {len(studies)} studies (got {got})")


def patient_relpath(subject_id: int) -> str:
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}"


def _write_images(cfg: SynthConfig, out: Path, patient: _Patient) -> int:
    """Render and write one patient's images; returns bytes written."""
    from cxr_pipeline.data.dicom_writer import write_dicom, write_jpg

    total = 0
    anatomy = None
    effect = planted_effect(cfg.effect) if cfg.effect else None
    fainter = effect is not None and _in_group(patient.demo, effect[1], effect[2])
    for st in patient.studies:
        if anatomy is None:
            anatomy = Anatomy.draw(np.random.default_rng(st["anatomy_seed"]))
        folder = out / patient_relpath(patient.subject_id) / f"s{st['study_id']}"
        folder.mkdir(parents=True, exist_ok=True)
        for im in st["images"]:
            rng = np.random.default_rng(im["image_seed"])
            strengths = planted_strengths(rng, st["states"])
            if fainter and effect[0] in strengths:
                strengths[effect[0]] *= effect[3]
            pixels = render(rng, im["rows"], im["cols"], im["view"] or "PA", strengths, anatomy)
            if cfg.fmt == "jpg":
                path = folder / f"{im['dicom_id']}.jpg"
                write_jpg(path, pixels)
            else:
                path = folder / f"{im['dicom_id']}.dcm"
                write_dicom(path, pixels, rng, cfg, st, im)
            total += path.stat().st_size
    return total


def _images_job(args: tuple[SynthConfig, str, list[_Patient]]) -> int:
    cfg, out, patients = args
    return sum(_write_images(cfg, Path(out), p) for p in patients)


def _gz_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    data = buf.getvalue().encode()
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        if path.suffix == ".gz":
            with gzip.GzipFile(filename="", mode="wb", fileobj=f, mtime=0) as gz:
                gz.write(data)
        else:
            f.write(data)


ADMISSIONS_HEADER = [
    "subject_id", "hadm_id", "admittime", "dischtime", "deathtime", "admission_type", "admit_provider_id",
    "admission_location", "discharge_location", "insurance", "language", "marital_status", "race",
    "edregtime", "edouttime", "hospital_expire_flag",
]  # fmt: skip


def write_mimic_iv(root: Path, patients: list[_Patient]) -> None:
    """MIMIC-IV's ``hosp/patients.csv.gz`` and ``hosp/admissions.csv.gz`` (real headers) for the replica's patients."""
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
    _gz_csv(root / "hosp" / "patients.csv.gz", ["subject_id", "gender", "anchor_age", "anchor_year", "anchor_year_group", "dod"], pats)
    _gz_csv(root / "hosp" / "admissions.csv.gz", ADMISSIONS_HEADER, adms)


def generate(cfg: SynthConfig, out: Path, progress: Callable[[str], None] | None = None) -> dict[str, int]:
    """Write a replica to ``out``; returns counts (patients, studies, images, bytes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    say = progress or (lambda _m: None)
    rng = np.random.default_rng([cfg.seed, 0])
    subjects = np.sort(rng.choice(10_000_000, size=cfg.patients, replace=False) + 10_000_000)
    n_studies = np.minimum(rng.geometric(1 / 3.48, size=cfg.patients), 40)
    if cfg.studies:
        n_studies = _exact_studies(np.random.default_rng([cfg.seed, 2]), n_studies, cfg.studies)
    study_pool = rng.choice(10_000_000, size=int(n_studies.sum()), replace=False) + 50_000_000
    offsets = np.concatenate([[0], np.cumsum(n_studies)])

    say(f"planning {cfg.patients} patients")
    patients = [
        _plan_patient(cfg, i, int(subjects[i]), [int(s) for s in study_pool[offsets[i] : offsets[i + 1]]]) for i in range(cfg.patients)
    ]
    if cfg.images:
        _exact_images(np.random.default_rng([cfg.seed, 3]), patients, cfg.images)

    records, metadata, study_list, split_rows, chex_rows, negbio_rows, test_rows = [], [], [], [], [], [], []
    reports: list[tuple[str, str]] = []
    ext = "jpg" if cfg.fmt == "jpg" else "dcm"
    for p in patients:
        pdir = patient_relpath(p.subject_id)
        for st in p.studies:
            sid = st["study_id"]
            rel_report = f"{pdir}/s{sid}.txt"
            study_list.append([str(p.subject_id), str(sid), rel_report])
            reports.append((rel_report, st["report"]))
            proc = _PROCEDURES[st["kind"]][0]
            for im in st["images"]:
                rel = f"{pdir}/s{sid}/{im['dicom_id']}.dcm"
                records.append([str(p.subject_id), str(sid), im["dicom_id"], rel])
                orient = {"AP": "Recumbent" if rng.uniform() < 0.5 else "", "": ""}.get(im["view"], "Erect")
                metadata.append(
                    [
                        im["dicom_id"],
                        str(p.subject_id),
                        str(sid),
                        proc,
                        im["view"],
                        str(im["rows"]),
                        str(im["cols"]),
                        st["date"],
                        st["time"],
                        proc,
                        _VIEW_CODE.get(im["view"], im["view"].lower()),
                        orient,
                    ]
                )
                split_rows.append([im["dicom_id"], str(sid), str(p.subject_id), p.split])
            chex_rows.append([str(p.subject_id), str(sid), *[_fmt_label(st["chexpert"][lab]) for lab in LABELS]])
            negbio_rows.append([str(p.subject_id), str(sid), *[_fmt_label(st["negbio"][lab]) for lab in LABELS]])
            if p.split == "test" and radiologist_labels_study(sid, cfg.radiologist_fraction):
                test_rows.append([str(sid), *[_fmt_label(st["states"][lab]) for lab in LABELS]])

    say("writing CSVs")
    label_header = ["subject_id", "study_id", *LABELS]
    if cfg.fmt == "dicom":  # MIMIC-CXR-JPG ships no record or study list, but IMAGE_FILENAMES
        _gz_csv(out / f"{RECORD_LIST}.csv.gz", ["subject_id", "study_id", "dicom_id", "path"], records)
        _gz_csv(out / f"{STUDY_LIST}.csv.gz", ["subject_id", "study_id", "path"], study_list)
    else:
        (out / "IMAGE_FILENAMES").write_text("".join(r[3][:-3] + ext + "\n" for r in records))
    _gz_csv(
        out / f"{METADATA}.csv.gz",
        [
            "dicom_id",
            "subject_id",
            "study_id",
            "PerformedProcedureStepDescription",
            "ViewPosition",
            "Rows",
            "Columns",
            "StudyDate",
            "StudyTime",
            "ProcedureCodeSequence_CodeMeaning",
            "ViewCodeSequence_CodeMeaning",
            "PatientOrientationCodeSequence_CodeMeaning",
        ],
        metadata,
    )
    _gz_csv(out / f"{CHEXPERT}.csv.gz", label_header, chex_rows)
    _gz_csv(out / f"{NEGBIO}.csv.gz", label_header, negbio_rows)
    _gz_csv(out / f"{SPLIT}.csv.gz", ["dicom_id", "study_id", "subject_id", "split"], split_rows)
    # as released: study_id only, and "Airspace Opacity" where the other label files say "Lung Opacity"
    _gz_csv(out / f"{TEST_LABELED}.csv", ["study_id", *RADIOLOGIST_HEADER], test_rows)

    say(f"writing {len(reports)} reports")
    with atomic_path(out / REPORTS_ZIP) as tmpzip, zipfile.ZipFile(tmpzip, "w", compression=zipfile.ZIP_DEFLATED) as z:
        for rel, text in reports:
            info = zipfile.ZipInfo(rel, date_time=(2019, 9, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            z.writestr(info, text)
    made_dirs: set[str] = set()
    for rel, text in reports:
        d = rel.rsplit("/", 1)[0]
        if d not in made_dirs:
            (out / d).mkdir(parents=True, exist_ok=True)
            made_dirs.add(d)
        (out / rel).write_text(text)

    if cfg.mimic_iv:
        say("writing MIMIC-IV demographics")
        write_mimic_iv(out / "mimic-iv", patients)

    n_bytes = 0
    if not cfg.metadata_only:
        say(f"rendering {len(records)} images")
        chunks = [patients[i :: max(1, cfg.workers * 4)] for i in range(max(1, cfg.workers * 4))]
        jobs = [(cfg, str(out), c) for c in chunks if c]
        if cfg.workers > 1:
            with ProcessPoolExecutor(cfg.workers) as ex:
                n_bytes = sum(ex.map(_images_job, jobs))
        else:
            n_bytes = sum(map(_images_job, jobs))
    return {"patients": len(patients), "studies": len(study_list), "images": len(records), "image_bytes": n_bytes}
