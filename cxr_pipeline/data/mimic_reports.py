"""MIMIC-CXR's free-text reports: read from the extracted folder or from ``mimic-cxr-reports.zip``, and parsed
into FINDINGS / IMPRESSION / last paragraph (``data.sections``) for the manifest. No Dagster here."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

from cxr_pipeline.data.sections import parse_report, parse_report_files

REPORTS_ZIP = "mimic-cxr-reports.zip"


class ReportReader:
    """Reads ``files/pNN/pSSSSSSSS/sTTTTTTTT.txt`` from the folder or from the zip.

    The zip (``mimic-cxr-reports.zip``, with or without a ``mimic-cxr-reports/``
    prefix inside) is opened only when a report is not found extracted: reading
    its directory of 227k entries costs seconds.
    """

    def __init__(self, root: Path):
        self.root = str(root)
        self._zip: zipfile.ZipFile | None = None
        self._names: set[str] = set()
        self._prefix = ""
        self._zip_tried = False

    def _open_zip(self) -> None:
        self._zip_tried = True
        zpath = os.path.join(self.root, REPORTS_ZIP)
        if os.path.isfile(zpath):
            self._zip = zipfile.ZipFile(zpath)
            names = self._zip.namelist()
            if names and names[0].startswith("mimic-cxr-reports/"):
                self._prefix = "mimic-cxr-reports/"
            self._names = set(names)

    def read(self, relpath: str) -> str | None:
        try:
            with open(os.path.join(self.root, relpath), "rb") as f:
                return f.read().decode("utf-8", errors="replace")
        except FileNotFoundError:
            pass
        if not self._zip_tried:
            self._open_zip()
        if self._zip is not None:
            name = self._prefix + relpath
            if name in self._names:
                return self._zip.read(name).decode("utf-8", errors="replace")
        return None

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()


def report_relpath(subject_id: int, study_id: int) -> str:
    s = str(subject_id)
    return f"files/p{s[:2]}/p{s}/s{study_id}.txt"


def parse_reports(root: Path, subjects: list[int], studies: list[int]) -> dict[str, list]:
    """FINDINGS / IMPRESSION / last paragraph of each study's report.

    Extracted files are read first; reports found only in the zip are read
    afterwards. (A process pool was tried for MIMIC scale: on 2 cores its start-up
    ate the gain, and spawn re-imports the caller's main module.)
    """
    unique = list(dict.fromkeys(studies))
    sub_of = dict(zip(studies, subjects, strict=True))
    rels = [report_relpath(sub_of[s], s) for s in unique]
    parsed = parse_report_files(str(root), rels)
    reader = ReportReader(root)
    by_study: dict[int, tuple] = {}
    try:
        for sid, rel, got in zip(unique, rels, parsed, strict=True):
            if got is None:
                text = reader.read(rel)
                if text is None:
                    by_study[sid] = (None, None, None, False)
                    continue
                r = parse_report(text)
                got = (r.findings, r.impression, r.last_paragraph)
            by_study[sid] = (*got, True)
    finally:
        reader.close()
    rows = [by_study[s] for s in studies]
    return {
        "findings": [r[0] for r in rows],
        "impression": [r[1] for r in rows],
        "last_paragraph": [r[2] for r in rows],
        "has_report": [r[3] for r in rows],
    }
