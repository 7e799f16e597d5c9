"""How other hospitals' labels become the 14 CheXpert findings: one table (``HARMONISATION``, a ``Rule`` per
dataset and finding), listed with its reasons in the generated reference, built on PadChest's label tree
(``data.harmonisation_padchest``: ``PADCHEST_TREE``, transcribed from the release's tree file). The readers
(``data.external``) apply it; apart here because the table and its reasons are longer than the readers. No Dagster here.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

from cxr_pipeline.data.harmonisation_padchest import (  # noqa: F401  (re-exported: the table's readers import them from here)
    PADCHEST_EXCLUDE,
    PADCHEST_NO_FINDING_NAMED,
    PADCHEST_TREE,
    PADCHEST_UNMAPPED,
    subtree,
)
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


# CheXpert's label hierarchy (Irvin et al., "CheXpert", AAAI 2019; as Pham et al. 2019, arXiv:1911.06475, train with
# it): Lung Opacity above Edema, Consolidation, Lung Lesion and Atelectasis, Consolidation above Pneumonia. A term that
# is, or may be, a finding below makes the finding above null where it is not one of its own positives (``_above``):
# a pneumonia the report did not call a consolidation may be one, so neither 1 nor 0 is safe.
HIERARCHY = {
    "Consolidation": ("Pneumonia",),
    "Lung Opacity": ("Atelectasis", "Consolidation", "Edema", "Lung Lesion", "Pneumonia"),
}


def _above(rules: dict[str, Rule]) -> dict[str, Rule]:
    """``rules`` with each ``HIERARCHY`` parent's null terms extended by its children's positive and null terms that
    are not its own positives (Consolidation first: its terms reach Lung Opacity through it)."""
    out = dict(rules)
    for parent, children in HIERARCHY.items():
        if parent not in out:
            continue
        rule = out[parent]
        below = (t for c in children if c in out for t in (*out[c].positive, *out[c].unknown))
        extra = tuple(t for t in dict.fromkeys(below) if t not in rule.positive and t not in rule.unknown)
        out[parent] = replace(rule, unknown=(*rule.unknown, *extra))
    return out


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
_PC_FIBROSIS = ("fibrotic band", *subtree("pulmonary fibrosis"))
_NIH_INFILTRATION = (
    "NIH's 14 labels hold no opacity finding: `Infiltration` (19,894) is its label for an infiltrate or opacity of any "
    "cause, which a CheXpert-style labeller splits among Lung Opacity, Consolidation, Edema and Pneumonia, so an "
    "image listing it without `{0}` may hold one or not. (PadChest names pulmonary edema and pneumonia apart, and its `infiltrates` is null "
    "only for Consolidation, below it in its tree.)"
)

# format -> CheXpert finding -> how it is read from the dataset's own labels. A finding a format does not list is
# not scored in that dataset (null, no row in its table; ``NOT_SCORED`` says why). CheXpert's own columns are read
# as they are (1 / 0 / -1 / blank).
HARMONISATION: dict[str, dict[str, Rule]] = {
    "chexpert": {lab: Rule((lab,), why="its own column, read under the model's uncertain and blank policies as MIMIC's") for lab in LABELS},
    "nih": _above(
        {
            "Atelectasis": Rule(("Atelectasis",)),
            "Cardiomegaly": Rule(("Cardiomegaly",)),
            "Consolidation": Rule(
                ("Consolidation",),
                ("Infiltration",),
                "null: `Infiltration`: " + _NIH_INFILTRATION.format("Consolidation") + " And `Pneumonia` (1,431): "
                "CheXpert's hierarchy puts Pneumonia under Consolidation, and a pneumonia the report did not call a "
                "consolidation may be one",
            ),
            "Edema": Rule(("Edema",), ("Infiltration",), "null: `Infiltration`: " + _NIH_INFILTRATION.format("Edema")),
            "Lung Lesion": Rule(("Mass", "Nodule"), why="CheXpert's Lung Lesion is a nodule or a mass"),
            "No Finding": Rule(
                ("No Finding",),
                why="1 for `No Finding`; 0 when a label of another scored finding is listed; null when every label is "
                "outside the mapped ones (Emphysema, Fibrosis, Hernia, Infiltration, Pleural_Thickening: 13,100 images): "
                "CheXpert's No Finding may be 0 for them (an infiltrate is a Lung Opacity, pleural thickening Pleural "
                "Other) or 1 (emphysema, a hernia), so neither is safe",
            ),
            "Pleural Effusion": Rule(("Effusion",)),
            "Pneumonia": Rule(("Pneumonia",), ("Infiltration",), "null: `Infiltration`: " + _NIH_INFILTRATION.format("Pneumonia")),
            "Pneumothorax": Rule(("Pneumothorax",)),
        }
    ),
    "padchest": _above(
        {
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
                "may or may not be one; and the `pneumonia` subtree (8,174 records, 3,304 of them with no term above) "
                "with Pneumonia's null terms: CheXpert's hierarchy puts Pneumonia under Consolidation, and a pneumonia the "
                "report did not call a consolidation may be one",
            ),
            "Edema": Rule(
                ("pulmonary edema",),
                (
                    "heart insufficiency",
                    "hilar congestion",
                    *subtree("vascular redistribution"),
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
                (*subtree("nodule"), "pulmonary mass", "lung metastasis", "lepidic adenocarcinoma"),
                (*(t for t in subtree("mass") if t != "pulmonary mass"), "cavitation"),
                "`nodule` and `multiple nodules`, `pulmonary mass` (the lung's child of PadChest's `mass`), `lung "
                "metastasis` and `lepidic adenocarcinoma` (15, a lung adenocarcinoma: chexpert-labeler's Lung "
                "Lesion phrases, phrases/mention/lung_lesion.txt, hold 'mass', 'carcinoma', 'tumor', 'neoplasm'). Null: `mass` (56, where unsaid) and its "
                "mediastinal (328), soft tissue (141), pleural (3) and breast (1) children: not lung lesions, but their "
                "'mass' is one to that labeller; `cavitation` (618: a cavitating nodule, or an abscess or tuberculosis). "
                "Out: the `pseudonodule` subtree (nipple shadow, end on vessel: PadChest's 'not a nodule') and the "
                "`granuloma` subtree (healed infection)",
            ),
            "Lung Opacity": Rule(
                (
                    *subtree("infiltrates"),
                    "increased density",
                    *subtree("atelectasis"),
                    *subtree("pneumonia"),
                    "pulmonary edema",
                ),
                (*_PC_FIBROSIS, "lymphangitis carcinomatosa"),
                "any opacity of the lung: the `infiltrates` subtree (interstitial, ground glass, reticular, miliary, "
                "`alveolar pattern` 5,738, consolidation, air bronchogram), `increased density`, and atelectasis, "
                "pneumonia and pulmonary edema, which are lung opacities. Null: `fibrotic band` (3,713), the `pulmonary "
                "fibrosis` subtree and `lymphangitis carcinomatosa` (CheXpert-style labellers count scarring and "
                "fibrosis as opacity, PadChest keeps them apart), and every positive or null term of the findings "
                "CheXpert's hierarchy puts under Lung Opacity that is not one of its own: the Lung Lesion terms (a "
                "focal opacity CheXpert reports apart), `volume loss`, the edema signs (`heart insufficiency` ...), "
                "`tuberculosis` and `abscess`",
            ),
            "No Finding": Rule(
                ("normal",),
                subtree("mediastinal enlargement"),
                "1 when every label is `normal` or a device (Support Devices' positive terms), besides `unchanged` and "
                "`suboptimal study`: CheXpert's labeller sets No Finding when nothing but support devices is mentioned "
                "(chexpert-labeler's stages/aggregate.py), and a record of devices only (2,746) is 0 for every finding here, so it is 1 too. "
                "0 when a scored finding other than Support Devices is 1. Null otherwise: a finding null; a term outside "
                "the mapped ones (`COPD signs`, `scoliosis` ..., with or without `normal`: that labeller counts most of "
                "them against No Finding, not all); the `mediastinal enlargement` subtree (Enlarged Cardiomediastinum, "
                "not scored); an operation or foreign body (Support Devices null: a resection's volume loss, a bullet)",
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
                    *_PC_FIBROSIS,
                ),
                "CheXpert's Pleural Other is pleural thickening, plaques, scarring or calcification: PadChest's `pleural "
                "thickening` (apical 3,625, calcified) and `pleural plaques` (calcified) subtrees and `pleural mass`. "
                "Null: `costophrenic angle blunting` (thickening or a small effusion), `fissure thickening` and its "
                "minor and major children (a thickened fissure is pleura, but fluid or edema thickens it too); "
                "`fibrotic band` (3,713) and the `pulmonary fibrosis` subtree (`asbestosis signs`: plaques; `post "
                "radiotherapy changes`): chexpert-labeler's Pleural Other phrases hold 'fibrosis' and "
                "'pleuro-parenchymal scar', PadChest files them in the lung",
            ),
            "Pneumonia": Rule(
                subtree("pneumonia"),
                ("tuberculosis", "abscess"),
                "`pneumonia` and `atypical pneumonia` (244). Null: `tuberculosis` and `abscess` (lung infections "
                "CheXpert-style labellers count as pneumonia, 'infection'; PadChest names them apart). Out: "
                "consolidation, alveolar pattern and infiltrates (what the image shows: the report names pneumonia "
                "where it means one) and `tuberculosis sequelae` (1,070, the child of `tuberculosis`: healed)",
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
        }
    ),
}
# format -> CheXpert finding it cannot score -> why (the finding is null for every record, never a negative)
NOT_SCORED: dict[str, dict[str, str]] = {
    "chexpert": {},
    "nih": {
        "Enlarged Cardiomediastinum": "no NIH label for it",
        "Fracture": "no NIH label for it",
        "Lung Opacity": "NIH has no opacity label but `Infiltration`, which is no Lung Opacity subtree: an image "
        "without it may hold an opacity NIH files elsewhere (Fibrosis, Pleural_Thickening) or not at all, so its "
        "negatives would be wrong. `Infiltration` makes Consolidation, Edema and Pneumonia null instead",
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
NOT_MAPPED = {
    "chexpert": "",
    "nih": "Infiltration, Emphysema, Fibrosis, Pleural_Thickening, Hernia: an image labelled only with those is null "
    "for No Finding and 0 for each scored finding, but Infiltration makes Consolidation, Edema and Pneumonia null",
    "padchest": "every PadChest term not in the table (`PADCHEST_UNMAPPED`: COPD signs, aortic elongation, scoliosis "
    "...): an image labelled with one is null for No Finding, and one labelled only with those 0 for each scored "
    "finding; a record naming no finding (an empty list, or only `unchanged`, `exclude`, `suboptimal study`) or "
    "carrying `exclude` (PadChest's mark of a study to leave out) is rejected",
}
# Labels that name no finding, per format: they neither make No Finding 1 nor stop it.
NO_FINDING_NAMED = {"padchest": frozenset(PADCHEST_NO_FINDING_NAMED)}


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

    No Finding is derived, as CheXpert's labeller derives it (its mentions of anything but support devices stop it):
    0 when a finding other than Support Devices is 1; 1 when every label is a No Finding term or a Support Devices
    positive (besides labels naming no finding, ``NO_FINDING_NAMED``), at least one is, and no other finding is null;
    null otherwise, so a record with a label outside the mapped ones is never a positive, nor a negative when the
    rest are 0: its labeller saw something, and whether CheXpert would call it a finding is unknown."""
    rules = HARMONISATION[fmt]
    out: dict[str, int | None] = {}
    for lab, rule in rules.items():
        if lab != "No Finding":
            out[lab] = 1 if not found.isdisjoint(rule.positive) else None if not found.isdisjoint(rule.unknown) else 0
    nf = rules.get("No Finding")
    if nf is not None:
        others = [v for lab, v in out.items() if lab != "Support Devices"]
        quiet = {*nf.positive, *(rules["Support Devices"].positive if "Support Devices" in rules else ())}
        named = found - NO_FINDING_NAMED.get(fmt, frozenset())
        if 1 in others:
            out["No Finding"] = 0
        elif named and named <= quiet and None not in others and found.isdisjoint(nf.unknown):
            out["No Finding"] = 1
        else:
            out["No Finding"] = None
    return out
