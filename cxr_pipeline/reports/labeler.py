"""A CheXpert-style rule-based report labeler (no model, nothing to download).

Follows the structure of the CheXpert labeler (Irvin et al., 2019): find
mentions of each observation with phrase lists, classify each mention as
uncertain, negative or positive with NegEx-style trigger phrases that act
before or after the mention within the same sentence (stopped at a
termination word such as "but"), then aggregate per report: positive over
uncertain over negative over not mentioned; "No Finding" is positive only when
no pathology other than support devices is positive or uncertain.

The CheXpert labeler itself needs a Java NLP stack and a dependency parser;
NegBio and the CheXbert model need downloads. This is the part of them that
runs offline in microseconds per report, with phrase lists covering how
MIMIC-CXR reports phrase the 14 observations; it also scores generated
reports (clinical efficacy).
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from cxr_pipeline.labels import LABELS, no_finding

# Mention phrases (regular expressions, matched on lower-cased text at word boundaries).
MENTIONS: dict[str, list[str]] = {
    "Atelectasis": [r"atelecta\w*", r"collapse of the \w+ (?:lobe|lung)", r"\w+ lobe collapse", r"volume loss"],
    "Cardiomegaly": [
        r"cardiomegaly",
        r"(?:enlarged|large) (?:heart|cardiac silhouette)",
        r"(?:heart|cardiac silhouette) (?:is |appears )?(?:mildly |moderately |severely )?enlarged",
        r"enlargement of the (?:heart|cardiac silhouette)",
        r"cardiac enlargement",
        r"heart size",
    ],
    "Consolidation": [r"consolidat\w*"],
    "Edema": [r"edema", r"(?:pulmonary |vascular )congestion", r"heart failure", r"\bchf\b", r"vascular engorgement", r"kerley"],
    "Enlarged Cardiomediastinum": [
        r"cardiomediastinal silhouette",
        r"mediastinal (?:widening|contours?|silhouette)",
        r"widen\w* (?:of )?(?:the )?(?:cardio)?mediastinum",
        r"(?:cardio)?mediastinum is widened",
        r"enlarged cardiomediastinum",
        r"mediastinal silhouette",
    ],
    "Fracture": [r"fractures?", r"fx"],
    "Lung Lesion": [
        r"nodules?",
        r"nodular (?:opacity|opacities|density)",
        r"\bmass(?:es)?\b",
        r"lesions?",
        r"tumou?r",
        r"neoplasm",
        r"cavitary",
    ],
    "Lung Opacity": [r"opaci\w*", r"infiltrat\w*", r"haziness", r"hazy", r"ground[- ]glass", r"airspace disease", r"densit(?:y|ies)"],
    "Pleural Effusion": [r"(?:pleural )?effusions?", r"pleural fluid", r"hydrothorax", r"blunting of the (?:\w+ )?costophrenic"],
    "Pleural Other": [r"pleural thickening", r"pleural scar\w*", r"fibrothorax", r"pleural plaques?", r"apical cap"],
    "Pneumonia": [r"pneumonias?", r"infection", r"infectious process", r"bronchopneumonia"],
    "Pneumothorax": [r"pneumothora(?:x|ces)", r"\bptx\b"],
    "Support Devices": [
        r"(?:endotracheal|et|nasogastric|ng|orogastric|og|chest|feeding|dobhoff|tracheostomy) tubes?",
        r"tubes?",
        r"(?<!kerley b )(?:central venous |picc |internal jugular |subclavian |swan[- ]ganz )?(?:line|catheter)s?",
        r"pacemaker",
        r"pacer",
        r"(?:cardiac |monitoring )?devices?",
        r"leads?",
        r"sternotomy wires",
        r"stents?",
        r"(?:prosthetic )?valves?",
        r"clips?",
    ],
}

PRE_NEG = [
    r"\bno\b",
    r"\bnot\b",
    r"\bwithout\b",
    r"\bnegative for\b",
    r"\bfree of\b",
    r"\bno evidence of\b",
    r"\bno findings (?:to suggest|of|suggestive of)\b",
    r"\bno signs? of\b",
    r"\brule(?:s|d)? out\b",
    r"\bresolution of\b",
    r"\bresolved\b",
    r"\bremoved\b",
    r"\bnor\b",
]
POST_NEG = [
    r"\b(?:is|are) not (?:seen|present|identified|visualized|appreciated)\b",
    r"\bnot (?:seen|present|identified)\b",
    r"\b(?:has|have) resolved\b",
    r"\bresolved\b",
    r"\b(?:is|are|remains?) (?:normal|within normal limits|unremarkable|stable and normal)\b",
    r"\bwithin normal limits\b",
    r"\b(?:is|are) absent\b",
    r"\b(?:has|have) been removed\b",
]
PRE_UNC = [
    r"\bpossib(?:le|ly)\b",
    r"\bmay\b",
    r"\bmight\b",
    r"\bcould\b",
    r"\bcannot (?:be )?(?:exclude|excluded|rule out)\b",
    r"\bcan not (?:be )?(?:exclude|excluded|rule out)\b",
    r"\bquestionable\b",
    r"\bsuspicious for\b",
    r"\bconcerning for\b",
    r"\bsuggestive of\b",
    r"\bconcern for\b",
    r"\bprobabl[ey]\b",
    r"\blikely\b",
    r"\bborderline\b",
    r"\bversus\b",
    r"\bvs\.?\b",
    r"\bconsider\b",
    r"\bcannot exclude\b",
    r"\bdifferential\b",
    r"\bequivocal\b",
    r"\bpotential\b",
]
POST_UNC = [
    r"\bcannot be (?:excluded|ruled out)\b",
    r"\bcan not be (?:excluded|ruled out)\b",
    r"\bnot (?:be )?excluded\b",
    r"\bis not excluded\b",
    r"\bmay be present\b",
    r"\bis (?:possible|suspected|questioned)\b",
    r"\bmay (?:represent|reflect|be)\b",
    r"\bversus\b",
]
# Words after which a trigger no longer applies (NegEx termination terms).
TERMINATE = r"\b(?:but|however|although|though|except|aside from|apart from|which|with interval|otherwise|and there is|there is|there are|while|whereas)\b"
# Modifiers that make a "heart size" / "silhouette" mention positive, negative or uncertain.
_SIZE_POS = re.compile(r"\b(?:enlarged|increased|large|widened|prominent)\b")
_SIZE_NEG = re.compile(r"\b(?:normal|within normal limits|unremarkable|stable|unchanged|top[- ]normal)\b")

_MENTION_RE = {lab: re.compile(r"\b(?:" + "|".join(p) + r")\b") for lab, p in MENTIONS.items()}
_PRE_NEG = re.compile("|".join(PRE_NEG))
_POST_NEG = re.compile("|".join(POST_NEG))
_PRE_UNC = re.compile("|".join(PRE_UNC))
_POST_UNC = re.compile("|".join(POST_UNC))
_TERMINATE = re.compile(TERMINATE)
_SENTENCE = re.compile(r"(?<=[.;!?])\s+|\n\s*\n")
NEUTRAL_SIZE_MENTIONS = ("Cardiomegaly", "Enlarged Cardiomediastinum")


@dataclass(frozen=True)
class Mention:
    label: str
    start: int
    end: int
    value: float  # 1.0, 0.0, -1.0


def sentences(text: str) -> list[str]:
    text = " ".join(text.replace("___", " ").split()) if "\n" not in text else text
    parts = [" ".join(s.split()) for s in _SENTENCE.split(text)]
    return [p for p in parts if p]


def _scope_before(sent: str, start: int) -> str:
    """Text before the mention, cut at the last termination word."""
    before = sent[:start]
    cut = None
    for m in _TERMINATE.finditer(before):
        cut = m.end()
    return before[cut:] if cut is not None else before


def _scope_after(sent: str, end: int) -> str:
    after = sent[end:]
    m = _TERMINATE.search(after)
    return after[: m.start()] if m else after


def classify(sent: str, label: str, start: int, end: int) -> float | None:
    """1 / 0 / -1 for one mention; None when a neutral mention carries no judgement."""
    before, after = _scope_before(sent, start), _scope_after(sent, end)
    window_before = before[-60:]
    if _PRE_UNC.search(window_before) or _POST_UNC.search(after):
        return -1.0
    if _PRE_NEG.search(window_before) or _POST_NEG.search(after):
        return 0.0
    text = sent[start:end]
    if label in NEUTRAL_SIZE_MENTIONS and ("size" in text or "silhouette" in text or "contour" in text):
        # "heart size", "cardiomediastinal silhouette": judged by what is said of them
        near = after[:50] + " " + window_before[-30:]
        if _SIZE_POS.search(near):
            return 1.0
        if _SIZE_NEG.search(near):
            return 0.0
        return None
    return 1.0


def mentions(text: str) -> list[Mention]:
    out = []
    for sent in sentences(text.lower()):
        for label, rx in _MENTION_RE.items():
            for m in rx.finditer(sent):
                v = classify(sent, label, m.start(), m.end())
                if v is not None:
                    out.append(Mention(label, m.start(), m.end(), v))
    return out


def label_report(text: str | None) -> dict[str, float | None]:
    """The 14 CheXpert labels of one report (1.0 / 0.0 / -1.0 / None)."""
    result: dict[str, float | None] = dict.fromkeys(LABELS)
    if not text or not text.strip():
        return result
    found: dict[str, set[float]] = {}
    for m in mentions(text):
        found.setdefault(m.label, set()).add(m.value)
    for label, values in found.items():
        result[label] = 1.0 if 1.0 in values else -1.0 if -1.0 in values else 0.0
    result["No Finding"] = no_finding(result)
    return result


def label_reports(texts: Iterable[str | None]) -> tuple[list[dict[str, float | None]], int]:
    """Label many reports; returns the labels and how many were empty or malformed."""
    out, empty = [], 0
    for t in texts:
        if not isinstance(t, str) or not t.strip():
            empty += 1
            out.append(dict.fromkeys(LABELS))
            continue
        out.append(label_report(t))
    return out, empty
