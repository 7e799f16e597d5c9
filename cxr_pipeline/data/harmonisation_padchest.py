"""PadChest's label tree and vocabulary, as ``data.harmonisation`` reads them: the branches its rules use
(``PADCHEST_TREE``, ``subtree``), the labels that name no finding and the released terms outside the 14 CheXpert
findings. Apart from the rules because they are PadChest's own data, not decisions. No Dagster here.
"""

from __future__ import annotations

# PadChest's labels are UMLS-based terms in trees: Bustos A, Pertusa A, Salinas J-M, de la Iglesia-Vayá M, "PadChest:
# A large chest x-ray image dataset with multi-label annotated reports", Medical Image Analysis 66 (2020) 101797,
# https://doi.org/10.1016/j.media.2020.101797. The release ships its trees (radiological findings, differential
# diagnoses, locations) as `tree_term_CUI_counts_160K.csv` (named by the release's README, "Trees and term counts are
# available in tree_term_CUI_counts_160K.csv": https://github.com/auriml/Rx-thorax-automatic-captioning, README.md).
# These branches are transcribed from a public copy of that file:
# https://github.com/jaydurant/ChestX-ray_classification_and_localization/blob/ffcf062c2db32daada262f3b725a3bca416b40c6/tree_term_CUI_counts_160K.csv
# (its parent -> child structure only: its counts are another cut than the 160K label file's). Parent -> every term
# below it (the tree's levels flattened: `rib fracture` -> `callus rib fracture` is under `fracture`), only the
# branches the harmonisation uses or its reasons cite, and only terms that occur in the released label file (the tests
# check each against it; the tree's `hemothorax`, with no record, is left out). A term may have two parents
# (`hydropneumothorax`, `loculated fissural effusion`, `mediastinal mass`, `air bronchogram`).
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
    "tuberculosis": ("tuberculosis sequelae",),
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
    "pseudonodule": ("nipple shadow", "end on vessel"),
    "granuloma": ("calcified granuloma",),
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
# PadChest's mark of a study to leave out: the release's README says its `Labels` field, unlike the per-sentence one,
# means it ("'Exclude' on this field [LabelsLocalizationsBySentence] does not imply that the image ... should be
# Excluded ... use the fields Labels ..."). Every record carrying it is rejected, with findings (28) or without.
PADCHEST_EXCLUDE = "exclude"


def subtree(term: str) -> tuple[str, ...]:
    """``term`` and every PadChest term below it (``PADCHEST_TREE``): a finding mapped to a term is positive when any
    of its subtree is present, so 'laminar atelectasis' is an atelectasis."""
    return (term, *PADCHEST_TREE.get(term, ()))


# The released file's other terms: none is one of the 14 findings, nor a borderline term of one (the table says why
# for the borderline ones left out). A record with only these is 0 for each scored finding, null for No Finding.
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
    "sternoclavicular junction hypertrophy",
    "subacromial space narrowing",
    "subcutaneous emphysema",
    "thoracic cage deformation",
    "tracheal shift",
    "tuberculosis sequelae",
    "vascular hilar enlargement",
    "vertebral degenerative changes",
)
