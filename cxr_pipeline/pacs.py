"""The local PACS: Orthanc with its DICOMweb plugin (Debian's ``orthanc`` and ``orthanc-dicomweb``), on loopback.

``make pacs`` (``cxr-pipeline pacs``) runs it in the foreground for a person; the tests start one of their own on
free ports (:func:`running`). Its state lives under ``$CXR_HOME/pacs``: a written configuration and Orthanc's own
storage and index. Orthanc is the PACS the project's DICOM results go to (#50): studies arrive by DICOM C-STORE
(``storescu``) or STOW-RS, and become *stable* once no instance has arrived for ``stable_age`` seconds (Orthanc's
``StableStudy`` change), the signal a study is whole.

Both ports listen on every interface (Orthanc 1.10 has no bind address), so what it answers is limited instead:
HTTP and DICOMweb answer loopback only (``RemoteAccessAllowed`` false: another host gets 401); C-STORE is accepted
only from the one modality the configuration names, the calling AE title ``CXR_SCU`` *from 127.0.0.1*
(``DicomCheckModalityHost`` true: without it Orthanc checks the title alone), and that modality may store and
nothing else (no C-FIND, C-GET, C-MOVE or storage commitment: a find would return patient names). C-ECHO answers
anyone. No authentication is configured, so it is for a workstation or a test, never for a network a hospital
shares; a hospital points the project at its own PACS instead.
"""

from __future__ import annotations

import base64
import json
import shutil
import signal
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from cxr_pipeline.files import atomic_path

PLUGIN_DIRS = (Path("/usr/share/orthanc/plugins"), Path("/usr/lib/orthanc/plugins"))  # where Debian puts its plugins
DICOMWEB_PLUGIN = "libOrthancDicomWeb.so"
SCU_AET = "CXR_SCU"  # the calling AE title the project's storescu uses (the one modality allowed to store)
USER = "cxr"  # the HTTP user of a --network PACS


@dataclass(frozen=True)
class PacsSettings:
    """Where the local Orthanc listens and how soon a study counts as whole."""

    http_port: int = 8042
    dicom_port: int = 4242
    aet: str = "CXR_PACS"
    stable_age: int = 60  # Orthanc's default; the tests and the benchmark set it lower
    # ``--network`` (the Compose service): HTTP and DICOMweb answer other hosts too, with HTTP basic authentication
    # (user ``cxr``, this password), and C-STORE is accepted from CXR_SCU on any host (the senders' addresses are
    # not known in advance behind Docker's NAT). Empty: this machine only, no password.
    password: str = ""


class PacsError(RuntimeError):
    """Orthanc or its DICOMweb plugin is missing, or it did not start."""


def orthanc_executable() -> str:
    """Debian installs it as /usr/sbin/Orthanc, which a non-root PATH leaves out."""
    exe = shutil.which("Orthanc") or shutil.which("Orthanc", path="/usr/sbin:/usr/local/sbin")
    if exe is None:
        raise PacsError("Orthanc is not installed: apt-get install orthanc orthanc-dicomweb (Debian)")
    return exe


def dicomweb_plugin() -> Path:
    for folder in PLUGIN_DIRS:
        if (folder / DICOMWEB_PLUGIN).is_file():
            return folder / DICOMWEB_PLUGIN
    raise PacsError(
        f"Orthanc's DICOMweb plugin ({DICOMWEB_PLUGIN}) is not in {', '.join(map(str, PLUGIN_DIRS))}: apt-get install orthanc-dicomweb"
    )


def orthanc_config(folder: Path, s: PacsSettings) -> dict:
    """Orthanc's JSON configuration for a PACS in ``folder`` (its storage and index inside)."""
    return {
        "Name": "cxr_pipeline local PACS",
        "StorageDirectory": str(folder / "storage"),
        "IndexDirectory": str(folder / "index"),
        "HttpPort": s.http_port,
        "DicomPort": s.dicom_port,
        "DicomAet": s.aet,
        "RemoteAccessAllowed": bool(s.password),
        "AuthenticationEnabled": bool(s.password),
        "RegisteredUsers": {USER: s.password} if s.password else {},
        "DicomAlwaysAllowStore": False,
        "DicomAlwaysAllowEcho": True,
        "DicomCheckCalledAet": True,
        "DicomCheckModalityHost": not s.password,
        "DicomModalities": {
            "cxr": {  # the port is for Orthanc calling it back, which it never does here
                "AET": SCU_AET,
                "Host": "127.0.0.1",  # checked only without --network
                "Port": 104,
                "AllowEcho": True,
                "AllowStore": True,
                "AllowFind": False,
                "AllowGet": False,
                "AllowMove": False,
                "AllowStorageCommitment": False,
            }
        },
        "StableAge": s.stable_age,
        "Plugins": [str(dicomweb_plugin())],
        "DicomWeb": {"Enable": True, "Root": "/dicom-web/", "EnableWado": True, "Ssl": False},
    }


def write_config(folder: Path, s: PacsSettings) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "orthanc.json"
    with atomic_path(path) as tmp:
        tmp.touch()
        tmp.chmod(0o600)  # it may hold the --network password: its owner's only (before the password is written)
        tmp.write_text(json.dumps(orthanc_config(folder, s), indent=1))
    return path


def wait_ready(url: str, seconds: float, proc: subprocess.Popen | None = None, password: str = "") -> None:
    """Until ``url``/system answers (Orthanc is up, its plugins loaded), or fail naming why."""
    deadline = time.monotonic() + seconds
    request = urllib.request.Request(f"{url}/system")
    if password:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{USER}:{password}".encode()).decode())
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise PacsError(f"Orthanc exited with {proc.returncode} while starting")
        try:
            with urllib.request.urlopen(request, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.2)
    raise PacsError(f"Orthanc did not answer at {url} within {seconds:.0f} s")


@contextmanager
def running(folder: Path, s: PacsSettings, log: Path | None = None) -> Iterator[str]:
    """A local Orthanc for the length of the block: yields its base URL (DICOMweb under ``/dicom-web``)."""
    config, exe = write_config(folder, s), orthanc_executable()
    out = open(log or folder / "orthanc.log", "w")  # noqa: SIM115  (closed below, after the process)
    # in this process group: a signal to the group (a cancelled job, a closed terminal) reaches Orthanc too
    proc = subprocess.Popen([exe, str(config)], stdout=out, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{s.http_port}"
    try:
        wait_ready(url, 60, proc, s.password)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        out.close()


def serve(folder: Path, s: PacsSettings) -> int:
    """``make pacs``: Orthanc in the foreground until interrupted; returns its exit code."""
    config = write_config(folder, s)
    where = f"every interface, HTTP user {USER} (password from CXR_PACS_PASSWORD)" if s.password else "127.0.0.1"
    print(f"pacs: Orthanc on port {s.http_port} (DICOMweb /dicom-web/), DICOM {s.aet} on port {s.dicom_port}: {where}", flush=True)
    print(f"pacs: storescu -xv -aet {SCU_AET} -aec {s.aet} 127.0.0.1 {s.dicom_port} FILE.dcm; state in {folder}", flush=True)
    proc = subprocess.Popen([orthanc_executable(), str(config)])
    for sig in (signal.SIGTERM, signal.SIGHUP):  # stopping the command (or closing its terminal) stops Orthanc too
        signal.signal(sig, lambda *_: proc.terminate())
    try:
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        proc.wait()
        return 0
