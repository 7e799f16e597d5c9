"""The report labeler, sentence by sentence: MIMIC-style phrasing with the 14-label row each should give.

Each case is a sentence (or two) and the labels it states; every label not named must be
blank, and "No Finding" follows CheXpert's rule (written out here, not imported). Codes:
ATE Atelectasis, CM Cardiomegaly, CON Consolidation, ED Edema, ECM Enlarged Cardiomediastinum,
FX Fracture, LL Lung Lesion, LO Lung Opacity, EFF Pleural Effusion, PO Pleural Other,
PNA Pneumonia, PTX Pneumothorax, SD Support Devices; values 1 (present), 0 (absent),
u (uncertain). The groups are the failures a review found on real reports (issue #14):
negation over lists and across clauses, follow-up language, hedges, bare "lines", normal
statements; then everyday MIMIC sentences.
"""

from __future__ import annotations

import pytest

from cxr_pipeline.labels import LABELS
from cxr_pipeline.reports.labeler import label_report, label_reports

CODES = {
    "ATE": "Atelectasis",
    "CM": "Cardiomegaly",
    "CON": "Consolidation",
    "ED": "Edema",
    "ECM": "Enlarged Cardiomediastinum",
    "FX": "Fracture",
    "LL": "Lung Lesion",
    "LO": "Lung Opacity",
    "EFF": "Pleural Effusion",
    "PO": "Pleural Other",
    "PNA": "Pneumonia",
    "PTX": "Pneumothorax",
    "SD": "Support Devices",
}
VALUES = {"1": 1.0, "0": 0.0, "u": -1.0}

CASES = [
    # negation over a list
    ("The lungs are normally inflated without evidence of focal airspace disease, pleural effusion, or pneumothorax.", "LO:0 EFF:0 PTX:0"),
    ("No focal consolidation, suspicious pulmonary opacity, pleural effusion, or pneumothorax.", "CON:0 LO:0 EFF:0 PTX:0"),
    ("No focal consolidation, large pleural effusion, or pneumothorax is identified.", "CON:0 EFF:0 PTX:0"),
    ("There is no focal consolidation, pleural effusion or pneumothorax.", "CON:0 EFF:0 PTX:0"),
    ("No pleural effusion, pneumothorax, or focal consolidation.", "EFF:0 PTX:0 CON:0"),
    ("No evidence of pneumonia, edema, effusion or pneumothorax.", "PNA:0 ED:0 EFF:0 PTX:0"),
    ("Negative for pneumothorax or pleural effusion.", "PTX:0 EFF:0"),
    ("Without evidence of consolidation, effusion, or pneumothorax.", "CON:0 EFF:0 PTX:0"),
    ("Lungs are clear without focal consolidation, large pleural effusion, or pneumothorax.", "LO:0 CON:0 EFF:0 PTX:0"),
    ("No pulmonary edema, pneumothorax or pleural effusion is seen.", "ED:0 PTX:0 EFF:0"),
    ("There is no pneumothorax, pleural effusion, or pulmonary edema.", "PTX:0 EFF:0 ED:0"),
    ("No acute osseous abnormality or fracture.", "FX:0"),
    ("No definite consolidation, effusion, or pneumothorax.", "CON:0 EFF:0 PTX:0"),
    ("No pleural effusions or pneumothoraces.", "EFF:0 PTX:0"),
    ("No focal airspace consolidation, pneumothorax, or large pleural effusion.", "CON:0 PTX:0 EFF:0"),
    ("There are no pulmonary nodules or masses.", "LL:0"),
    ("No displaced rib fractures are identified.", "FX:0"),
    ("No signs of pneumonia or pulmonary edema.", "PNA:0 ED:0"),
    ("The lungs are free of consolidation or effusion.", "CON:0 EFF:0"),
    ("Pneumothorax, pleural effusion and consolidation are not seen.", "PTX:0 EFF:0 CON:0"),
    # negation crossing a clause
    ("No pneumothorax, large right effusion.", "PTX:0 EFF:1"),
    ("No pleural effusion or pneumothorax, and the heart is enlarged.", "EFF:0 PTX:0 CM:1"),
    ("No pneumothorax, but there is a small left pleural effusion.", "PTX:0 EFF:1"),
    ("No pneumothorax; moderate right pleural effusion.", "PTX:0 EFF:1"),
    ("No consolidation, moderate cardiomegaly.", "CON:0 CM:1"),
    ("No edema, however there is a new right lower lobe consolidation.", "ED:0 CON:1"),
    ("No effusion, small left apical pneumothorax.", "EFF:0 PTX:1"),
    ("No pneumothorax, new left basilar atelectasis.", "PTX:0 ATE:1"),
    ("No pulmonary edema, although there is mild cardiomegaly.", "ED:0 CM:1"),
    ("No focal consolidation, while a small right effusion persists.", "CON:0 EFF:1"),
    ("There is no pneumothorax. There is a large left pleural effusion.", "PTX:0 EFF:1"),
    ("No pneumothorax. Large right pleural effusion.", "PTX:0 EFF:1"),
    ("No new consolidation, the heart is enlarged.", "CON:0 CM:1"),
    ("There is no effusion, except for a trace right pleural effusion.", "EFF:1"),
    # follow-up language
    ("No change in the moderate right pleural effusion.", "EFF:1"),
    ("No significant change in the bilateral pleural effusions.", "EFF:1"),
    ("No interval change in the left lower lobe consolidation.", "CON:1"),
    ("Interval removal of the endotracheal tube.", "SD:0"),
    ("The nasogastric tube has been removed.", "SD:0"),
    ("Interval resolution of the right pleural effusion.", "EFF:0"),
    ("The left pneumothorax has resolved.", "PTX:0"),
    ("Previously seen pulmonary edema has resolved.", "ED:0"),
    ("The pneumothorax is no longer seen.", "PTX:0"),
    ("Unchanged moderate cardiomegaly.", "CM:1"),
    ("Stable small left pleural effusion.", "EFF:1"),
    ("Persistent right lower lobe opacity.", "LO:1"),
    ("Slight interval improvement in pulmonary edema.", "ED:1"),
    ("Interval increase in the right pleural effusion.", "EFF:1"),
    ("Right chest tube remains in place.", "SD:1"),
    ("The endotracheal tube and nasogastric tube have been removed.", "SD:0"),
    ("Decreased size of the right apical pneumothorax.", "PTX:1"),
    ("Without significant change in the appearance of the left lower lobe atelectasis.", "ATE:1"),
    # hedges
    ("Opacity at the right base may represent atelectasis.", "LO:1 ATE:u"),
    ("Pneumonia cannot be excluded.", "PNA:u"),
    ("Cannot exclude a small right pleural effusion.", "EFF:u"),
    ("Infection cannot be excluded.", "PNA:u"),
    ("Possible early pneumonia.", "PNA:u"),
    ("Findings concerning for pneumonia.", "PNA:u"),
    ("Right lower lobe opacity, likely atelectasis.", "LO:1 ATE:u"),
    ("Left basilar opacity likely reflects atelectasis, though pneumonia is not excluded.", "LO:1 ATE:u PNA:u"),
    ("Possible small left pleural effusion.", "EFF:u"),
    ("Probable trace right pleural effusion.", "EFF:u"),
    ("Questionable tiny right apical pneumothorax.", "PTX:u"),
    ("Streaky opacity may reflect atelectasis or pneumonia.", "LO:1 ATE:u PNA:u"),
    ("Suspicious for pneumonia in the right lower lobe.", "PNA:u"),
    ("Early pneumonia is possible.", "PNA:u"),
    ("A small effusion may be present.", "EFF:u"),
    ("Mild interstitial edema is suspected.", "ED:u"),
    ("Rounded opacity, possibly a nipple shadow; a pulmonary nodule is not excluded.", "LO:1 LL:u"),
    ("Opacities suggestive of pulmonary edema.", "LO:1 ED:u"),
    ("Atelectasis versus consolidation at the left base.", "ATE:u CON:u"),
    ("Superimposed infection cannot be ruled out.", "PNA:u"),
    ("Possible small pneumothorax on the right.", "PTX:u"),
    ("Equivocal left lower lobe consolidation.", "CON:u"),
    ("Question of a small left pleural effusion.", "EFF:u"),
    ("Patchy opacities consistent with pneumonia.", "LO:1 PNA:1"),
    # devices, and "lines" that are not devices
    ("Endotracheal tube terminates 4 cm above the carina.", "SD:1"),
    ("Septal lines are seen at the lung bases.", "ED:1"),
    ("Kerley B lines indicate interstitial edema.", "ED:1"),
    ("No lines or tubes are seen.", "SD:0"),
    ("Lines and tubes are in standard position.", "SD:1"),
    ("Right internal jugular central venous catheter ends in the mid SVC.", "SD:1"),
    ("Left PICC line tip in the lower SVC.", "SD:1"),
    ("Nasogastric tube courses below the diaphragm.", "SD:1"),
    ("Enteric tube tip is in the stomach.", "SD:1"),
    ("Dual-chamber pacemaker leads terminate in the right atrium and ventricle.", "SD:1"),
    ("Median sternotomy wires are intact.", "SD:1"),
    ("Prosthetic aortic valve.", "SD:1"),
    ("Tracheostomy tube is in place.", "SD:1"),
    ("Right-sided chest tube is unchanged.", "SD:1"),
    ("Linear atelectasis at the left base.", "ATE:1"),
    ("Fluid in the minor fissure.", "EFF:1"),
    # normal statements
    ("Heart size is normal.", "CM:0"),
    ("The heart is normal in size.", "CM:0"),
    ("Normal heart size.", "CM:0"),
    ("Heart size is within normal limits.", "CM:0"),
    ("The cardiac silhouette is within normal limits.", "CM:0"),
    ("Heart size and mediastinal contours are normal.", "CM:0"),
    ("The cardiomediastinal silhouette is normal.", "ECM:0"),
    ("Normal cardiomediastinal silhouette.", "ECM:0"),
    ("Mediastinal contours are within normal limits.", "ECM:0"),
    ("The lungs are clear.", "LO:0"),
    ("Lungs are clear bilaterally.", "LO:0"),
    ("Clear lungs.", "LO:0"),
    ("The costophrenic angles are sharp.", "EFF:0"),
    ("Pulmonary vasculature is normal.", "ED:0"),
    ("No acute cardiopulmonary process.", ""),
    ("No acute intrathoracic abnormality.", ""),
    ("Heart is not enlarged.", "CM:0"),
    ("The heart is top normal in size.", "CM:0"),
    ("The heart size is normal. The lungs are clear.", "CM:0 LO:0"),
    ("Cardiomediastinal silhouette is within normal limits.", "ECM:0"),
    # positives, the everyday sentences
    ("Small left pleural effusion.", "EFF:1"),
    ("Moderate bilateral pleural effusions with adjacent atelectasis.", "EFF:1 ATE:1"),
    ("Large right pleural effusion with a meniscus.", "EFF:1"),
    ("Blunting of the left costophrenic angle.", "EFF:1"),
    ("Moderate cardiomegaly.", "CM:1"),
    ("The heart is mildly enlarged.", "CM:1"),
    ("Moderate cardiomegaly is unchanged.", "CM:1"),
    ("Borderline cardiomegaly.", "CM:1"),
    ("Cardiac silhouette is moderately enlarged.", "CM:1"),
    ("Enlarged cardiac silhouette.", "CM:1"),
    ("Mild pulmonary edema.", "ED:1"),
    ("Moderate interstitial pulmonary edema with perihilar haziness.", "ED:1 LO:1"),
    ("Pulmonary vascular congestion.", "ED:1"),
    ("Mild pulmonary vascular congestion without frank edema.", "ED:1"),
    ("Right lower lobe consolidation.", "CON:1"),
    ("Dense consolidation in the left lower lobe with air bronchograms.", "CON:1"),
    ("Right middle lobe pneumonia.", "PNA:1"),
    ("Multifocal pneumonia.", "PNA:1"),
    ("Small right apical pneumothorax.", "PTX:1"),
    ("Large left tension pneumothorax.", "PTX:1"),
    ("Small left hydropneumothorax.", "EFF:1 PTX:1"),
    ("Bibasilar atelectasis.", "ATE:1"),
    ("Plate-like atelectasis at the right base.", "ATE:1"),
    ("Left lower lobe collapse.", "ATE:1"),
    ("Subsegmental atelectasis in the lingula.", "ATE:1"),
    ("Hazy opacity projecting over the left lung base.", "LO:1"),
    ("Patchy bibasilar opacities.", "LO:1"),
    ("Ill-defined opacity in the right upper lobe.", "LO:1"),
    ("Diffuse interstitial opacities.", "LO:1"),
    ("A 1.5 cm nodule in the left upper lobe.", "LL:1"),
    ("Right hilar mass.", "LL:1"),
    ("Multiple pulmonary nodules consistent with metastases.", "LL:1"),
    ("Cavitary lesion in the right upper lobe.", "LL:1"),
    ("Nodular opacity in the right lower lobe.", "LL:1 LO:1"),  # both, as in CheXpert's mention lists
    ("Nodular opacity, possibly a nipple shadow.", "LL:1 LO:1"),
    ("Acute displaced fracture of the left seventh rib.", "FX:1"),
    ("Healed right rib fractures.", "FX:1"),
    ("Old left clavicle fracture.", "FX:1"),
    ("Compression fracture of a lower thoracic vertebral body.", "FX:1"),
    ("The mediastinum is widened.", "ECM:1"),
    ("Mediastinal widening.", "ECM:1"),
    ("Enlarged cardiomediastinal silhouette.", "ECM:1"),
    ("Right apical pleural thickening.", "PO:1"),
    ("Calcified pleural plaques.", "PO:1"),
    ("Blunting of the right costophrenic angle likely due to pleural thickening.", "EFF:1 PO:u"),
    ("Right lower lobe opacity concerning for pneumonia.", "LO:1 PNA:u"),
    ("Granulomatous infection with calcified granulomas.", ""),
    ("Expansile lesion of the right posterior rib.", ""),
    ("Pacemaker lead fracture.", "SD:1"),
    ("Calcified granuloma in the right upper lobe.", ""),
    ("Severe emphysema.", ""),
    ("Degenerative changes of the thoracic spine.", ""),
    ("Tortuous aorta.", ""),
    ("Hiatal hernia.", ""),
    ("Low lung volumes.", ""),
]


def expected_row(spec: str) -> dict[str, float | None]:
    row: dict[str, float | None] = dict.fromkeys(LABELS)
    for item in spec.split():
        code, value = item.split(":")
        row[CODES[code]] = VALUES[value]
    pathologies = [lab for lab in LABELS if lab not in ("No Finding", "Support Devices")]
    row["No Finding"] = None if any(row[p] in (1.0, -1.0) for p in pathologies) else 1.0
    return row


def test_the_table_is_large_and_has_no_repeats():
    sentences = [s for s, _ in CASES]
    assert len(sentences) >= 150 and len(set(sentences)) == len(sentences)


@pytest.mark.parametrize(("sentence", "spec"), CASES, ids=[s[:60] for s, _ in CASES])
def test_sentence(sentence, spec):
    assert label_report(sentence) == expected_row(spec)


def test_batch_labels_equal_one_by_one():
    """``label_reports`` (spaCy's pipe, what the metrics call) gives each sentence its own row."""
    labels, bad = label_reports([s for s, _ in CASES])
    assert bad == 0
    assert labels == [label_report(s) for s, _ in CASES]
