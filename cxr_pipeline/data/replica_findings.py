"""What the replica's studies show and say: findings drawn at MIMIC-CXR's prevalence, how strongly each is
planted in the image, the report a radiologist would write, and what an automatic labeller reads from it.

Part of the replica generator (``data.synthetic``); every draw comes from the caller's generator.
"""

from __future__ import annotations

import textwrap

import numpy as np

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


def draw_states(rng: np.random.Generator) -> dict[str, float | None]:
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
