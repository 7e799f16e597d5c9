"""Photograph an SR as dcmtk's ``dsr2html`` renders it, in Debian's Chromium (driven by Playwright), for the docs.

    .venv/bin/python docs/ui/capture_sr.py SR.dcm [docs/ui/dicom-sr.png]

The SR is any the pipeline wrote (``cxr-pipeline predict --dicom-out``, or one from the PACS). dsr2html prints
the patient module's name, id and birth date and the referring physician in its header: the script blanks them before the
photograph (the replica's names are made up, but a photograph of an SR should not teach anyone to publish one).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path


def main() -> int:
    sr = Path(sys.argv[1])
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else Path(__file__).resolve().parent / "dicom-sr.png"
    html = subprocess.run(["dsr2html", str(sr)], capture_output=True, text=True, check=True).stdout
    for label in ("Patient", "Referring Physician"):
        html = re.sub(rf"(<b>{label}:</b>\s*</td>\s*<td>)(.*?)(</td>)", r"\1(not shown)\3", html, flags=re.S)
    from playwright.sync_api import sync_playwright

    chromium = shutil.which("chromium") or "/usr/bin/chromium"
    with tempfile.TemporaryDirectory() as tmp, sync_playwright() as pw:
        page_file = Path(tmp) / "sr.html"
        page_file.write_text(html)
        browser = pw.chromium.launch(executable_path=chromium, args=["--no-sandbox", "--disable-dev-shm-usage"])
        page = browser.new_page(viewport={"width": 1100, "height": 1400})
        page.goto(page_file.as_uri())
        page.screenshot(path=str(out), full_page=False)
        browser.close()
    print(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
