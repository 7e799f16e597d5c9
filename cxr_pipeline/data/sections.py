"""MIMIC-CXR report section parser, following the dataset authors' rules.

A port of ``section_parser.py`` from MIT-LCP/mimic-cxr (``txt/``), the code the
authors used to make the sectioned reports: headers are found with the pattern
``\\n ([A-Z ()/,-]+):\\s``, their names lower-cased and normalised (CONCLUSION ->
impression, REASON FOR EXAM -> indication, typo fixes), empty findings /
impression sections are dropped, and a report with neither keeps the text after
its last blank line as ``last_paragraph``. No library ships this parser, which
is why it is written out here.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

_P_SECTION = re.compile(r"\n ([A-Z ()/,-]+):\s", re.DOTALL)

_FREQUENT = {
    "preamble": "preamble",
    "impression": "impression",
    "comparison": "comparison",
    "indication": "indication",
    "findings": "findings",
    "examination": "examination",
    "technique": "technique",
    "history": "history",
    "comparisons": "comparison",
    "clinical history": "history",
    "reason for examination": "indication",
    "notification": "notification",
    "reason for exam": "indication",
    "clinical information": "history",
    "exam": "examination",
    "clinical indication": "indication",
    "conclusion": "impression",
    "chest, two views": "findings",
    "recommendation(s)": "recommendations",
    "type of examination": "examination",
    "reference exam": "comparison",
    "patient history": "history",
    "addendum": "addendum",
    "comparison exam": "comparison",
    "date": "date",
    "comment": "comment",
    "findings and impression": "impression",
    "wet read": "wet read",
    "comparison film": "comparison",
    "recommendations": "recommendations",
    "findings/impression": "impression",
    "pfi": "history",
    "recommendation": "recommendations",
    "wetread": "wet read",
    # The authors map this typo to "impression"; it is a truncated INDICATION.
    "ndication": "indication",
    "impresson": "impression",
    "imprression": "impression",
    "imoression": "impression",
    "impressoin": "impression",
    "imprssion": "impression",
    "impresion": "impression",
    "imperssion": "impression",
    "mpression": "impression",
    "impession": "impression",
    "findings/ impression": "impression",
    "finding": "findings",
    "findins": "findings",
    "findindgs": "findings",
    "findgings": "findings",
    "findngs": "findings",
    "findnings": "findings",
    "finidngs": "findings",
    "idication": "indication",
    "reference findings": "findings",
    "comparision": "comparison",
    "comparsion": "comparison",
    "comparrison": "comparison",
    "comparisions": "comparison",
}

_P_FINDINGS = re.compile(
    "("
    + "|".join(
        [
            "chest",
            "portable",
            "pa and lateral",
            "lateral and pa",
            "ap and lateral",
            "lateral and ap",
            "frontal and",
            "two views",
            "frontal view",
            "pa view",
            "ap view",
            "one view",
            "lateral view",
            "bone window",
            "frontal upright",
            "frontal semi-upright",
            "ribs",
            "pa and lat",
        ]
    )
    + ")"
)
_MAIN = ("impression", "findings", "history", "comparison", "addendum")


def normalize_section_name(name: str) -> str:
    s = name.lower().strip()
    if s in _FREQUENT:
        return _FREQUENT[s]
    for m in _MAIN:
        if m in s:
            return m
    if _P_FINDINGS.search(s):
        return "findings"
    return s


def section_text(text: str) -> tuple[list[str], list[str]]:
    """Split a report into (sections, normalised names), as the authors do."""
    sections: list[str] = []
    names: list[str] = []
    s = _P_SECTION.search(text, 0)
    if s:
        sections.append(text[: s.start(1)])
        names.append("preamble")
        while s:
            current = s.group(1)
            idx_start = s.end()
            # skip past the first newline to avoid some bad parses (authors' rule)
            idx_skip = text[idx_start:].find("\n")
            if idx_skip == -1:
                idx_skip = 0
            s = _P_SECTION.search(text, idx_start + idx_skip)
            idx_end = len(text) if s is None else s.start()
            sections.append(text[idx_start:idx_end])
            names.append(current)
    else:
        sections.append(text)
        names.append("full report")

    names = [normalize_section_name(n) for n in names]

    for i in reversed(range(len(names))):
        if names[i] in ("impression", "findings") and sections[i].strip() == "":
            sections.pop(i)
            names.pop(i)

    if "impression" not in names and "findings" not in names and sections:
        if "\n \n" in sections[-1]:
            parts = sections[-1].split("\n \n")
            sections[-1] = parts[0]
            sections.append("\n \n".join(parts[1:]))
            names.append("last_paragraph")
    return sections, names


def _clean(text: str) -> str:
    return " ".join(text.split())


@dataclass(frozen=True)
class ReportSections:
    findings: str | None
    impression: str | None
    last_paragraph: str | None


def parse_report(text: str) -> ReportSections:
    """FINDINGS, IMPRESSION and (where neither exists) the last paragraph.

    Where a section occurs more than once the last occurrence wins (the authors'
    ``create_section_files.py`` does the same); whitespace is collapsed.
    """
    sections, names = section_text(text)
    found: dict[str, str] = {}
    for sec, name in zip(sections, names, strict=True):
        if name in ("findings", "impression", "last_paragraph"):
            cleaned = _clean(sec)
            if cleaned:
                found[name] = cleaned
    return ReportSections(
        findings=found.get("findings"),
        impression=found.get("impression"),
        last_paragraph=found.get("last_paragraph"),
    )


def parse_report_files(root: str, relpaths: list[str]) -> list[tuple[str | None, str | None, str | None] | None]:
    """Parse extracted report files under ``root``; None where a file is missing.

    Module-level and light on imports so that process pools can run it.
    """
    out: list[tuple[str | None, str | None, str | None] | None] = []
    for rel in relpaths:
        try:
            with open(os.path.join(root, rel), "rb") as f:
                text = f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            out.append(None)
            continue
        r = parse_report(text)
        out.append((r.findings, r.impression, r.last_paragraph))
    return out
