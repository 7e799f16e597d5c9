"""How other hospitals' labels become the 14 CheXpert findings: one table (``HARMONISATION``, a ``Rule`` per
dataset and finding) and the PadChest label tree it is built on (``PADCHEST_TREE``, transcribed from Bustos et al.
2020), listed with their reasons in the generated reference. The readers (``data.external``) apply it; apart here
because the table and its reasons are longer than the readers. No Dagster here.
"""

from __future__ import annotations

from dataclasses import dataclass

from cxr_pipeline.labels import LABELS

FORMATS = ("chexpert", "nih", "padchest")
FORMAT_NAMES = {"chexpert": "CheXpert", "nih": "NIH ChestX-ray14", "padchest": "PadChest"}
# Formats whose labels are lists of the terms present: an absent term is a negative, so a null there means "this
# record cannot be scored for this finding" and scoring drops it whatever the model's blank policy (``targets``
# would count a blank No Finding, or any blank under policy zeros, as a negative). CheXpert's blanks are "not
# mentioned" instead, read under the model's blank policy as MIMIC's.
NULL_IS_UNSCORABLE = frozenset({"nih", "padchest"})


@dataclass(frozen=True)
class Rule:
    """One CheXpert finding read from one dataset's labels. 1 when any ``positive`` term is present; else null (the
    record cannot be scored for it) when any ``unknown`` term is: a borderline term that is neither a safe positive
    nor a safe negative; else 0. ``why`` says why the borderline terms are in, out or unknown, for the table.
    No Finding is derived from the others (``harmonise``)."""

    positive: tuple[str, ...]
    unknown: tuple[str, ...] = ()
    why: str = ""


# PadChest's labels are UMLS-based terms in a hierarchy: Bustos A, Pertusa A, Salinas J-M, de la Iglesia-Vayá M,
# "PadChest: A large chest x-ray image dataset with multi-label annotated reports", Medical Image Analysis 66 (2020)
# 101797, https://doi.org/10.1016/j.media.2020.101797 (its label trees; the release's tree file). The tree cannot be
# downloaded here, nor could the paper be opened where this was written: these branches are transcribed as two
# independent public transcriptions of that tree agree on them. Parent -> every term below it (the tree's levels
# flattened), only the branches the harmonisation uses and only terms that occur in the released label file (the
# tests check each against it). A term may have two parents ('hydropneumothorax', 'loculated fissural effusion').
PADCHEST_TREE: dict[str, tuple[str, ...]] = {
    "atelectasis": (
        "total atelectasis",
        "lobar atelectasis",
        "segmental atelectasis",
        "laminar atelectasis",
        "round atelectasis",
        "atelectasis basal",
    ),
    "pleural effusion": ("loculated pleural effusion", "loculated fissural effusion", "hydropneumothorax", "empyema"),
    "pneumothorax": ("hydropneumothorax",),
    "pneumonia": ("atypical pneumonia",),
    "infiltrates": (
        "interstitial pattern",
        "ground glass pattern",
        "reticular interstitial pattern",
        "reticulonodular interstitial pattern",
        "miliary opacities",
        "alveolar pattern",
        "consolidation",
        "air bronchogram",
    ),
    "consolidation": ("air bronchogram",),
    "nodule": ("multiple nodules",),
    "mass": ("mediastinal mass", "breast mass", "pleural mass", "pulmonary mass", "soft tissue mass"),
    "fracture": ("clavicle fracture", "humeral fracture", "vertebral fracture", "rib fracture", "callus rib fracture"),
    "vertebral degenerative changes": ("vertebral compression", "vertebral anterior compression"),
    "pleural thickening": ("apical pleural thickening", "calcified pleural thickening"),
    "pleural plaques": ("calcified pleural plaques",),
    "fissure thickening": ("minor fissure thickening", "major fissure thickening", "loculated fissural effusion"),
    "mediastinal enlargement": (
        "superior mediastinal enlargement",
        "goiter",
        "supra aortic elongation",
        "descendent aortic elongation",
        "ascendent aortic elongation",
        "aortic aneurysm",
        "mediastinal mass",
        "hiatal hernia",
    ),
    "catheter": (
        "central venous catheter",
        "central venous catheter via jugular vein",
        "central venous catheter via subclavian vein",
        "central venous catheter via umbilical vein",
        "reservoir central venous catheter",
    ),
    "electrical device": ("pacemaker", "dual chamber device", "single chamber device", "dai"),
    "artificial heart valve": ("artificial mitral heart valve", "artificial aortic heart valve"),
    "surgery": (
        "sternotomy",
        "suture material",
        "metal",
        "osteosynthesis material",
        "bone cement",
        "prosthesis",
        "humeral prosthesis",
        "mammary prosthesis",
        "endoprosthesis",
        "aortic endoprosthesis",
        "mastectomy",
        "surgery breast",
        "surgery neck",
        "surgery lung",
        "surgery heart",
        "surgery humeral",
    ),
    "pulmonary fibrosis": ("post radiotherapy changes", "asbestosis signs"),
    "pulmonary hypertension": ("pulmonary artery hypertension", "pulmonary venous hypertension"),
    "vascular redistribution": ("central vascular redistribution",),
}
# PadChest's labels that name no finding: a record with only these (or an empty list) is rejected, never negative.
PADCHEST_NO_FINDING_NAMED = ("unchanged", "exclude", "suboptimal study")


def subtree(term: str) -> tuple[str, ...]:
    """``term`` and every PadChest term below it (``PADCHEST_TREE``): a finding mapped to a term is positive when any
    of its subtree is present, so 'laminar atelectasis' is an atelectasis."""
    return (term, *PADCHEST_TREE.get(term, ()))


_PC_DEVICES = (
    *subtree("catheter"),
    *subtree("electrical device"),
    *subtree("artificial heart valve"),
    "endotracheal tube",
    "tracheostomy tube",
    "NSG tube",
    "chest drain tube",
    "ventriculoperitoneal drain tube",
    "gastrostomy tube",
    "nephrostomy tube",
    "double J stent",
    "endoprosthesis",
    "aortic endoprosthesis",
)
_PC_LESIONS = (*subtree("nodule"), "pulmonary mass", "lung metastasis")
_PC_LESION_UNKNOWN = ("mass", "cavitation", "lepidic adenocarcinoma")
_PC_FIBROSIS = ("fibrotic band", *subtree("pulmonary fibrosis"), "lymphangitis carcinomatosa")

# format -> CheXpert finding -> how it is read from the dataset's own labels. A finding a format does not list is
# not scored in that dataset (null, no row in its table; ``NOT_SCORED`` says why). CheXpert's own columns are read
# as they are (1 / 0 / -1 / blank).
HARMONISATION: dict[str, dict[str, Rule]] = {
    "chexpert": {lab: Rule((lab,), why="its own column, read under the model's uncertain and blank policies as MIMIC's") for lab in LABELS},
    "nih": {
        "Atelectasis": Rule(("Atelectasis",)),
        "Cardiomegaly": Rule(("Cardiomegaly",)),
        "Consolidation": Rule(("Consolidation",)),
        "Edema": Rule(("Edema",)),
        "Lung Lesion": Rule(("Mass", "Nodule"), why="CheXpert's Lung Lesion is a nodule or a mass"),
        "No Finding": Rule(
            ("No Finding",),
            why="1 for `No Finding`; 0 when a label of another scored finding is listed; null when every label is "
            "outside the mapped ones (Emphysema, Fibrosis, Hernia, Infiltration, Pleural_Thickening: 13,100 images): "
            "CheXpert's No Finding may be 0 for them (an infiltrate is a Lung Opacity, pleural thickening Pleural "
            "Other) or 1 (emphysema, a hernia), so neither is safe",
        ),
        "Pleural Effusion": Rule(("Effusion",)),
        "Pneumonia": Rule(("Pneumonia",)),
        "Pneumothorax": Rule(("Pneumothorax",)),
    },
    "padchest": {
        "Atelectasis": Rule(
            subtree("atelectasis"),
            ("volume loss",),
            "the `atelectasis` subtree (laminar 5,190, lobar, segmental, round, total, basal: each a collapse). Null: "
            "`volume loss` (2,757): a collapse shows as volume loss and CheXpert-style labellers count it as "
            "atelectasis, but PadChest keeps it apart (fibrosis and surgery shrink a lung too). Out: `hypoexpansion` "
            "(a shallow inspiration, not a collapse)",
        ),
        "Cardiomegaly": Rule(
            ("cardiomegaly",),
            why="out: `pericardial effusion` (79: fluid around the heart, not a large heart) and `heart insufficiency` "
            "(2,461: a diagnosis, not a size); PadChest labels `cardiomegaly` itself where the report calls the heart large",
        ),
        "Consolidation": Rule(
            subtree("consolidation"),
            ("infiltrates", "alveolar pattern"),
            "in: `air bronchogram` (197), PadChest's child of `consolidation`: air-filled bronchi show only against "
            "airless lung, and CheXpert-style labellers count it as consolidation. Null: `alveolar pattern` (5,738) "
            "and `infiltrates` (7,089, the parent of both): airspace filling the report did not call consolidation "
            "may or may not be one",
        ),
        "Edema": Rule(
            ("pulmonary edema",),
            (
                "heart insufficiency",
                "hilar congestion",
                "vascular redistribution",
                "central vascular redistribution",
                "kerley lines",
                "pulmonary venous hypertension",
                "respiratory distress",
            ),
            "null: `heart insufficiency` (2,461), PadChest's diagnosis of a failing heart, with or without edema on "
            "this film, which CheXpert-style labellers count as edema ('heart failure', 'CHF'); and for the same "
            "reason hilar congestion, vascular redistribution, Kerley lines and venous hypertension, signs those "
            "labellers file under edema and PadChest apart from `pulmonary edema`; `respiratory distress` (52: a "
            "diagnosis, edema of another cause when the film shows it)",
        ),
        "Fracture": Rule(
            subtree("fracture"),
            ("vertebral compression", "vertebral anterior compression"),
            "the `fracture` subtree, healed ones included (`callus rib fracture` 2,967: an old fracture is a fracture "
            "to CheXpert-style labellers). Null: `vertebral compression` and `vertebral anterior compression` "
            "(2,595): often a compression fracture, but PadChest files them under degenerative changes",
        ),
        "Lung Lesion": Rule(
            _PC_LESIONS,
            _PC_LESION_UNKNOWN,
            "`nodule` and `multiple nodules`, `pulmonary mass` (the lung's child of PadChest's `mass`: its "
            "mediastinal, breast, pleural and soft tissue masses are not lung lesions) and `lung metastasis`. Null: "
            "`mass` (56, where unsaid), `cavitation` (618: a cavitating nodule, or an abscess or tuberculosis), "
            "`lepidic adenocarcinoma` (15: a cancer that may show as ground glass). Out: the `pseudonodule` subtree "
            "(nipple shadow, end-on vessel: PadChest's 'not a nodule') and granulomas (healed infection)",
        ),
        "Lung Opacity": Rule(
            (
                *subtree("infiltrates"),
                "increased density",
                *subtree("atelectasis"),
                *subtree("pneumonia"),
                "pulmonary edema",
            ),
            (*_PC_LESIONS, *_PC_LESION_UNKNOWN, *_PC_FIBROSIS, "respiratory distress"),
            "any opacity of the lung: the `infiltrates` subtree (interstitial, ground glass, reticular, miliary, "
            "`alveolar pattern` 5,738, consolidation, air bronchogram), `increased density`, and atelectasis, "
            "pneumonia and pulmonary edema, which are lung opacities. Null: the Lung Lesion terms (a focal opacity "
            "CheXpert reports apart, as Lung Lesion), `fibrotic band` (3,713), the `pulmonary fibrosis` subtree and "
            "`lymphangitis carcinomatosa`: CheXpert-style labellers count scarring and fibrosis as opacity, PadChest "
            "keeps them apart; `respiratory distress` (52, a diagnosis: diffuse opacities or a clear film)",
        ),
        "No Finding": Rule(
            ("normal",),
            subtree("mediastinal enlargement"),
            "1 for `normal` when no scored finding but Support Devices is 1 or null; 0 when one is 1; null otherwise: "
            "a record whose labels are all outside the mapped ones (only `COPD signs`, `aortic elongation`, "
            "`scoliosis` ...) or name the `mediastinal enlargement` subtree (Enlarged Cardiomediastinum, not scored)",
        ),
        "Pleural Effusion": Rule(
            subtree("pleural effusion"),
            ("costophrenic angle blunting",),
            "the `pleural effusion` subtree: loculated pleural (306) and loculated fissural (137) effusions, "
            "`empyema` (infected pleural fluid) and `hydropneumothorax` (48: fluid and air in the pleura, under both "
            "PadChest parents, counted for both findings as CheXpert-style labellers do). Null: `costophrenic angle "
            "blunting` (6,784): a small effusion or pleural thickening blunts the angle; PadChest keeps it apart from "
            "`pleural effusion`, CheXpert-style labellers count it as one. Out: `pericardial effusion` (79: fluid "
            "around the heart, not in the pleura)",
        ),
        "Pleural Other": Rule(
            (*subtree("pleural thickening"), *subtree("pleural plaques"), "pleural mass"),
            (
                "costophrenic angle blunting",
                "fissure thickening",
                "minor fissure thickening",
                "major fissure thickening",
                "asbestosis signs",
            ),
            "CheXpert's Pleural Other is pleural thickening, plaques, scarring or calcification: PadChest's `pleural "
            "thickening` (apical 3,625, calcified) and `pleural plaques` (calcified) subtrees and `pleural mass`. "
            "Null: `costophrenic angle blunting` (thickening or a small effusion), `fissure thickening` and its "
            "minor and major children (a thickened fissure is pleura, but fluid or edema thickens it too), "
            "`asbestosis signs` (plaques, filed by PadChest under pulmonary fibrosis)",
        ),
        "Pneumonia": Rule(
            subtree("pneumonia"),
            ("tuberculosis", "abscess"),
            "`pneumonia` and `atypical pneumonia` (244). Null: `tuberculosis` and `abscess` (lung infections "
            "CheXpert-style labellers count as pneumonia, 'infection'; PadChest names them apart). Out: "
            "consolidation, alveolar pattern and infiltrates (what the image shows: the report names pneumonia "
            "where it means one) and `tuberculosis sequelae` (healed)",
        ),
        "Pneumothorax": Rule(
            subtree("pneumothorax"),
            why="`pneumothorax` and `hydropneumothorax` (air in the pleural space). Out: `pneumomediastinum`, "
            "`pneumoperitoneo`, `subcutaneous emphysema` (air elsewhere) and `bullas`",
        ),
        "Support Devices": Rule(
            _PC_DEVICES,
            (
                *(t for t in subtree("surgery") if t not in _PC_DEVICES and t != "mastectomy"),
                "abnormal foreign body",
                "external foreign body",
            ),
            "the `catheter`, `electrical device` (pacemaker, single and dual chamber, dai) and `artificial heart "
            "valve` subtrees, the tubes, drains and stents (endotracheal, tracheostomy, NSG, chest drain, "
            "ventriculoperitoneal, gastrostomy, nephrostomy, double J) and `endoprosthesis`, `aortic endoprosthesis` "
            "(stents, under PadChest's `surgery`). Null: the rest of the `surgery` subtree, `sternotomy` (2,849) "
            "first: PadChest files the wires, sutures, plates and prostheses an operation leaves as surgery, "
            "CheXpert-style labellers count sternotomy wires and hardware as support devices; and foreign bodies "
            "(external ones are often monitoring leads). Out: `mastectomy` (tissue removed, nothing left in)",
        ),
    },
}
# format -> CheXpert finding it cannot score -> why (the finding is null for every record, never a negative)
NOT_SCORED: dict[str, dict[str, str]] = {
    "chexpert": {},
    "nih": {
        "Enlarged Cardiomediastinum": "no NIH label for it",
        "Fracture": "no NIH label for it",
        "Lung Opacity": "`Infiltration` is not mapped: NIH's text-mined term spans what CheXpert splits among Lung "
        "Opacity, Consolidation and Edema, and its absence would make Lung Opacity's negatives wrong",
        "Pleural Other": "`Pleural_Thickening` is not mapped: one of Pleural Other's kinds, so its absence is no negative",
        "Support Devices": "no NIH label for it",
    },
    "padchest": {
        "Enlarged Cardiomediastinum": "CheXpert's cardiomediastinal silhouette includes the heart, while PadChest splits "
        "it between `cardiomegaly` and a `mediastinal enlargement` subtree that holds causes CheXpert-style labellers "
        "do not call enlargement (`hiatal hernia` 2,363, the aortic elongations, `goiter`): no subtree gives both "
        "right positives and right negatives. Its terms make No Finding null",
    },
}
NIH_VOCABULARY = (
    "Atelectasis",
    "Cardiomegaly",
    "Consolidation",
    "Edema",
    "Effusion",
    "Emphysema",
    "Fibrosis",
    "Hernia",
    "Infiltration",
    "Mass",
    "No Finding",
    "Nodule",
    "Pleural_Thickening",
    "Pneumonia",
    "Pneumothorax",
)
# The released file's other terms (73): none is one of the 14 findings, nor a borderline term of one (the table says
# why for the borderline ones left out). A record with only these is 0 for each scored finding, null for No Finding.
PADCHEST_UNMAPPED = (
    "adenopathy",
    "air fluid level",
    "air trapping",
    "aortic atheromatosis",
    "aortic button enlargement",
    "aortic elongation",
    "axial hyperostosis",
    "azygoesophageal recess shift",
    "azygos lobe",
    "blastic bone lesion",
    "bone metastasis",
    "breast mass",
    "bronchiectasis",
    "bronchovascular markings",
    "bullas",
    "calcified adenopathy",
    "calcified densities",
    "calcified fibroadenoma",
    "calcified granuloma",
    "calcified mediastinal adenopathy",
    "cervical rib",
    "Chilaiditi sign",
    "chronic changes",
    "COPD signs",
    "costochondral junction hypertrophy",
    "cyst",
    "dextrocardia",
    "diaphragmatic eventration",
    "emphysema",
    "end on vessel",
    "esophagic dilatation",
    "flattened diaphragm",
    "granuloma",
    "gynecomastia",
    "heart valve calcified",
    "hemidiaphragm elevation",
    "hilar enlargement",
    "hyperinflated lung",
    "hypoexpansion",
    "hypoexpansion basal",
    "kyphosis",
    "lipomatosis",
    "lung vascular paucity",
    "lytic bone lesion",
    "mastectomy",
    "mediastinal shift",
    "mediastinic lipomatosis",
    "nipple shadow",
    "non axial articular degenerative changes",
    "obesity",
    "osteopenia",
    "osteoporosis",
    "pectum carinatum",
    "pectum excavatum",
    "pericardial effusion",
    "pneumomediastinum",
    "pneumoperitoneo",
    "pseudonodule",
    "pulmonary artery enlargement",
    "pulmonary artery hypertension",
    "pulmonary hypertension",
    "right sided aortic arch",
    "sclerotic bone lesion",
    "scoliosis",
    "soft tissue mass",
    "sternoclavicular junction hypertrophy",
    "subacromial space narrowing",
    "subcutaneous emphysema",
    "thoracic cage deformation",
    "tracheal shift",
    "tuberculosis sequelae",
    "vascular hilar enlargement",
    "vertebral degenerative changes",
)
NOT_MAPPED = {
    "chexpert": "",
    "nih": "Infiltration, Emphysema, Fibrosis, Pleural_Thickening, Hernia: an image labelled only with those is 0 for "
    "each scored finding and null for No Finding",
    "padchest": "every PadChest term not in the table (`PADCHEST_UNMAPPED`: COPD signs, aortic elongation, scoliosis "
    "...): an image labelled only with those is 0 for each scored finding and null for No Finding; a record naming "
    "no finding (an empty list, or only `unchanged`, `exclude`, `suboptimal study`) is rejected",
}


def harmonisation_table() -> list[tuple[str, str, str, str, str]]:
    """(dataset, CheXpert finding, its positive terms or 'not scored', the terms that make it null, why) for every
    dataset and finding: the generated reference's table, so the rules a reader applies are the ones it lists."""
    rows = []
    for fmt in FORMATS:
        for lab in LABELS:
            rule = HARMONISATION[fmt].get(lab)
            if rule is None:
                rows.append((FORMAT_NAMES[fmt], lab, "not scored", "", NOT_SCORED[fmt].get(lab, "")))
                continue
            terms = ", ".join(f"`{t}`" for t in rule.positive)
            rows.append((FORMAT_NAMES[fmt], lab, terms, ", ".join(f"`{t}`" for t in rule.unknown), rule.why))
    return rows


def scored_findings(fmt: str) -> tuple[str, ...]:
    """The CheXpert findings ``fmt`` can score, in ``LABELS`` order."""
    return tuple(lab for lab in LABELS if lab in HARMONISATION[fmt])


def harmonise(fmt: str, found: set[str]) -> dict[str, int | None]:
    """One record's labels (the set of its terms) -> each finding ``fmt`` scores as 1 / 0 / null (``Rule``).

    No Finding is derived, as CheXpert derives it from the other findings: 0 when a finding other than Support
    Devices is 1; 1 when a No Finding term is present and no other finding is 1 or null and no term of an unscored
    finding is present; null otherwise, so an image whose labels all lie outside the 14 is never a negative (nor a
    positive) for No Finding: its labeller saw something, and whether CheXpert would call it a finding is unknown."""
    rules = HARMONISATION[fmt]
    out: dict[str, int | None] = {}
    for lab, rule in rules.items():
        if lab != "No Finding":
            out[lab] = 1 if not found.isdisjoint(rule.positive) else None if not found.isdisjoint(rule.unknown) else 0
    nf = rules.get("No Finding")
    if nf is not None:
        others = [v for lab, v in out.items() if lab != "Support Devices"]
        if 1 in others:
            out["No Finding"] = 0
        elif not found.isdisjoint(nf.positive) and None not in others and found.isdisjoint(nf.unknown):
            out["No Finding"] = 1
        else:
            out["No Finding"] = None
    return out
