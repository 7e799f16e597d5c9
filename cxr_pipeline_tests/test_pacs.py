"""The local PACS (``cxr_pipeline.pacs``): a real Orthanc with its DICOMweb plugin, on loopback, as ``make pacs``
starts it. Studies arrive by C-STORE (dcmtk's ``storescu``) and STOW-RS, are found by QIDO-RS, become stable, and
only the configured caller may store."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pydicom
import pytest

from cxr_pipeline.local_ray import free_port
from cxr_pipeline.pacs import SCU_AET, PacsSettings, running

HAVE = (
    (shutil.which("Orthanc") or Path("/usr/sbin/Orthanc").is_file())
    and shutil.which("storescu")
    and any((d / "libOrthancDicomWeb.so").is_file() for d in (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins")))
)
pytestmark = pytest.mark.skipif(
    not HAVE and not os.environ.get("CI"), reason="no Orthanc here (apt-get install orthanc orthanc-dicomweb dcmtk); CI installs it"
)


def get(url: str):
    with urllib.request.urlopen(url, timeout=10) as r:
        return json.loads(r.read() or b"null")


def stow(url: str, path: Path) -> dict:
    """STOW-RS one file: a multipart/related body of one application/dicom part (PS3.18 10.5)."""
    boundary = uuid.uuid4().hex
    body = f"--{boundary}\r\nContent-Type: application/dicom\r\n\r\n".encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    req = urllib.request.Request(
        f"{url}/dicom-web/studies",
        data=body,
        method="POST",
        headers={"Content-Type": f'multipart/related; type="application/dicom"; boundary={boundary}', "Accept": "application/dicom+json"},
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def storescu(path: Path, port: int, aet: str = SCU_AET) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["storescu", "-aet", aet, "-aec", "CXR_PACS", "127.0.0.1", str(port), str(path)], capture_output=True, text=True, timeout=60
    )


def test_studies_arrive_by_c_store_and_stow_rs_and_become_stable(replica, tmp_path):
    first, second = sorted(replica.rglob("*.dcm"))[:2]
    uids = {pydicom.dcmread(f, stop_before_pixels=True).StudyInstanceUID for f in (first, second)}
    s = PacsSettings(http_port=free_port(), dicom_port=free_port(), stable_age=1)
    with running(tmp_path / "pacs", s) as url:
        assert get(f"{url}/studies") == []
        done = storescu(first, s.dicom_port)
        assert done.returncode == 0, done.stderr
        refused = storescu(second, s.dicom_port, aet="STRANGER")  # an AE title the configuration does not name
        assert refused.returncode != 0 or "Refused" in refused.stderr or "rejected" in refused.stderr.lower()
        assert len(get(f"{url}/instances")) == 1
        answer = stow(url, second)
        assert "00081199" in answer and not answer.get("00081198", {}).get("Value"), sorted(answer)  # stored, none failed
        found = {s["0020000D"]["Value"][0] for s in get(f"{url}/dicom-web/studies")}  # QIDO-RS
        assert found == uids
        deadline, stable = time.monotonic() + 30, set()
        while time.monotonic() < deadline and len(stable) < len(uids):
            changes = get(f"{url}/changes?limit=100")["Changes"]
            stable = {
                get(f"{url}/studies/{c['ID']}")["MainDicomTags"]["StudyInstanceUID"] for c in changes if c["ChangeType"] == "StableStudy"
            }
            time.sleep(0.5)
        assert stable == uids  # each study reported whole once nothing arrived for stable_age seconds


def test_a_network_pacs_asks_every_caller_for_the_password_and_no_message_shows_it(tmp_path):
    """``cxr-pipeline pacs --network`` (the Compose service): other hosts may call, so every HTTP call needs the
    password; the intake takes it from its URL and keeps it out of what it says."""
    from cxr_pipeline.vision.pacs_intake import Orthanc, PacsUnavailable

    s = PacsSettings(http_port=free_port(), dicom_port=free_port(), stable_age=1, password="s3cret-pw")
    with running(tmp_path / "pacs", s) as url:
        with pytest.raises(urllib.error.HTTPError) as refused:
            get(f"{url}/studies")
        assert refused.value.code == 401
        pacs = Orthanc(url.replace("http://", "http://cxr:s3cret-pw@"))
        assert pacs.study_ids() == [] and "s3cret" not in pacs.url
        with pytest.raises(PacsUnavailable) as wrong:
            Orthanc(url.replace("http://", "http://cxr:wrong-pw@")).study_ids()
        assert "401" in str(wrong.value) and "wrong-pw" not in str(wrong.value)
