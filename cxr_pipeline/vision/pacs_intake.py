"""Studies taken from a PACS as they arrive, scored, and their results stored back into the same study.

The PACS is Orthanc (``make pacs``, or a hospital's own Orthanc in front of its archive): its changes feed
(``/changes``) says when a study has become stable (``StableStudy``: nothing arrived for its stable age), the one
Orthanc-specific call; finding what is already stored (QIDO-RS) and storing the results (STOW-RS) are DICOMweb,
through ``dicomweb-client``. Each stable study is scored once per set of champion versions: the result objects'
UIDs are derived from the study's UID and the sorted ``name:version`` pairs (``dicom_results.result_uids``), so
before scoring, the SR series those models would write is looked for in the study; a replayed change, a
restarted daemon or a second sensor finds it and sends nothing, and a store that is repeated anyway stores the
same instances (a PACS keeps one).

Every outcome (stored, already stored, no frontal chest image, each unreadable or left-out image) is appended
to a ledger (``$CXR_HOME/pacs/intake.csv``) under a hash of the study's UID: no header text (names, ids, dates)
goes to the ledger, logs, Dagster metadata or MLflow; the objects themselves go only to the PACS.
"""

from __future__ import annotations

import csv
import hashlib
import io
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import unquote, urlsplit, urlunsplit

import numpy as np
import pydicom
import requests
from dicomweb_client.api import DICOMwebClient
from pydicom import Dataset
from pydicom.errors import InvalidDicomError

from cxr_pipeline.data.dicom import DecodeError
from cxr_pipeline.files import atomic_path
from cxr_pipeline.settings import paths
from cxr_pipeline.vision.dicom_results import MANUFACTURER, StudyObjects, pick_frontal, result_uids, study_objects
from cxr_pipeline.vision.predict import Scorer, source_overlay

Keep = Callable[[str, bytes, Dataset], object]  # (study hash, the image scored, its header)

TIMEOUT = 30  # seconds for one HTTP call to the PACS
LEDGER_FIELDS = ("time", "study", "status", "reason", "images", "left_out", "unreadable", "positives", "seconds")


class PacsUnavailable(RuntimeError):
    """The PACS did not answer (down, overloaded, or refused our credentials): the caller retries later and loses
    nothing."""


class StoreRefused(RuntimeError):
    """The PACS answered and refused some of the results: retrying the same objects would be refused again."""


def _transient(code: int) -> bool:
    return code >= 500 or code in (401, 403, 408, 429)


def study_hash(study_uid: str) -> str:
    """What the ledger and metadata call a study: its UID's SHA-256, cut to 16 hex digits (not the UID)."""
    return hashlib.sha256(study_uid.encode()).hexdigest()[:16]


def session_for(url: str) -> tuple[requests.Session, str]:
    """An HTTP session for ``url`` and the URL without credentials: ``http://user:password@host`` becomes basic
    authentication on the session, so the password appears in no message, log or metadata."""
    parts = urlsplit(url)
    session = requests.Session()
    if parts.username:
        session.auth = (unquote(parts.username), unquote(parts.password or ""))
        parts = parts._replace(netloc=(parts.hostname or "") + (f":{parts.port}" if parts.port else ""))
    return session, urlunsplit(parts).rstrip("/")


def web_client(url: str, session: requests.Session) -> DICOMwebClient:
    """dicomweb-client without its own retries: above 1 MB it uploads in chunks from a generator, and a retry sends
    that spent generator again, an empty body a PACS stores as nothing; the intake's next tick is the retry."""
    web = DICOMwebClient(url=url, session=session)
    web.set_http_retry_params(retry=False)
    return web


class Orthanc:
    """The PACS as the intake uses it: Orthanc's REST for the changes feed and instance files, DICOMweb for the rest."""

    def __init__(self, url: str) -> None:
        self.session, self.url = session_for(url)
        self.web = web_client(f"{self.url}/dicom-web", self.session)

    def _get(self, path: str, **params) -> requests.Response:
        try:
            r = self.session.get(f"{self.url}{path}", params=params, timeout=TIMEOUT)
        except requests.RequestException as e:
            raise PacsUnavailable(f"PACS at {self.url} did not answer: {type(e).__name__}") from e
        if _transient(r.status_code):
            raise PacsUnavailable(f"PACS at {self.url} answered {r.status_code} to {path.split('/')[1]}")
        r.raise_for_status()  # 404 and the like: this study's problem, not the PACS's (the caller records it)
        return r

    def changes(self, since: int, limit: int = 200) -> tuple[list[dict], int, bool]:
        """Changes after sequence number ``since``: (changes, the last sequence number, whether that was all)."""
        body = self._get("/changes", since=since, limit=limit).json()
        return body["Changes"], int(body["Last"]), bool(body["Done"])

    def study_uid(self, orthanc_id: str) -> str:
        return self._get(f"/studies/{orthanc_id}").json()["MainDicomTags"]["StudyInstanceUID"]

    def study_ids(self) -> list[str]:
        return list(self._get("/studies").json())

    def instance_ids(self, orthanc_id: str) -> list[str]:
        return [i["ID"] for i in self._get(f"/studies/{orthanc_id}/instances").json()]

    def instance_file(self, instance_id: str) -> bytes:
        return self._get(f"/instances/{instance_id}/file").content

    def has_series(self, study_uid: str, series_uid: str) -> bool:
        try:
            found = self.web.search_for_series(study_instance_uid=study_uid, search_filters={"SeriesInstanceUID": series_uid})
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else 0
            if _transient(code):
                raise PacsUnavailable(f"PACS at {self.url} answered {code} to a QIDO-RS search") from None
            raise  # this study's problem (the caller records it), not the PACS's
        except requests.RequestException as e:
            raise PacsUnavailable(f"PACS at {self.url} did not answer a QIDO-RS search: {type(e).__name__}") from None
        return bool(found)

    def store(self, datasets: list[Dataset]) -> None:
        """STOW-RS, checked: every instance must come back as stored (Orthanc answers 400 and still stores the
        others when one is refused, and dicomweb-client only logs a partial failure that came back 2xx)."""
        store(self.web, self.url, datasets)


def store(web: DICOMwebClient, url: str, datasets: list[Dataset]) -> None:
    """STOW-RS ``datasets`` and check the answer: PacsUnavailable when it may work later, StoreRefused when not."""
    if not datasets:  # a study without a positive call has no GSPS or SC: an empty STOW is not sent
        return
    try:
        answer = web.store_instances(datasets=datasets)
    except requests.HTTPError as e:
        code = e.response.status_code if e.response is not None else 0
        if _transient(code):
            raise PacsUnavailable(f"PACS at {url} answered {code} to STOW-RS") from None
        raise StoreRefused(f"PACS at {url} refused the results (STOW-RS {code})") from None
    except requests.RequestException as e:
        raise PacsUnavailable(f"PACS at {url} did not answer STOW-RS: {type(e).__name__}") from None
    stored = {str(x.get("ReferencedSOPInstanceUID", "")) for x in answer.get("ReferencedSOPSequence", [])}
    if not stored and not answer.get("FailedSOPSequence"):  # an answer about nothing: the body did not arrive
        raise PacsUnavailable(f"PACS at {url} answered STOW-RS about no instance")
    missing = [d for d in datasets if str(d.SOPInstanceUID) not in stored]
    if answer.get("FailedSOPSequence") or missing:
        raise StoreRefused(f"PACS at {url} did not store {len(missing)} of {len(datasets)} result objects (STOW-RS)")


@dataclass
class Outcome:
    """One study's intake, as the ledger keeps it (no header text: the study is a hash)."""

    study: str
    status: str  # stored | written | already stored | no frontal chest image | no image | failed
    reason: str = ""
    images: int = 0
    left_out: int = 0
    unreadable: int = 0
    positives: int = 0
    seconds: float = 0.0
    time: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))


def _reasons(reasons: list[tuple[int, str]]) -> str:
    """ "image 2: not a frontal view; image 3: unreadable (...)": images by their order in the study, no header text."""
    return "; ".join(f"image {i + 1}: {r}" for i, r in sorted(reasons))


def study_results(files: list[bytes], scorer: Scorer, name: str, keep: Keep | None = None) -> tuple[StudyObjects | None, Outcome]:
    """One study's files (bytes, in the study's order) -> its result objects (None when no frontal chest image could
    be scored) and the outcome so far. An unreadable file is left out with its reason and the rest is still scored;
    result objects already in the study (SR, GSPS) and non-images are passed over. ``keep`` (the intake's drift
    windows: ``vision.pacs_windows``) is given the image scored and its header."""
    out = Outcome(name, "")
    kept: list[bytes] = []
    headers: list[Dataset] = []
    order: list[int] = []  # each kept image's place among the study's files (how reasons name it)
    bad: list[tuple[int, str]] = []
    for k, data in enumerate(files):
        try:
            ds = pydicom.dcmread(io.BytesIO(data), stop_before_pixels=True)
        except (InvalidDicomError, ValueError, EOFError, OSError) as e:
            bad.append((k, f"unreadable ({type(e).__name__})"))
            continue
        if "Rows" not in ds or ds.get("Modality") in ("SR", "PR") or ds.get("Manufacturer") == MANUFACTURER:  # not an image, or a result
            continue
        kept.append(data)
        headers.append(ds)
        order.append(k)
    out.images = len(kept)
    result = None
    while True:
        chosen, reasons = pick_frontal(headers)
        if chosen is None:
            break
        try:
            result = scorer.score([kept[chosen]], names=[f"{name} image {order[chosen] + 1}"], cams=True)[0]
            break
        except DecodeError as e:  # header fine, pixels not: leave it out, try the next frontal image
            bad.append((order[chosen], f"unreadable pixels ({type(e).__name__})"))
            out.images -= 1
            del kept[chosen], headers[chosen], order[chosen]
    left = [(order[i], r) for i, r in enumerate(reasons) if r is not None]
    out.unreadable, out.left_out, out.reason = len(bad), len(left), _reasons(bad + left)
    if chosen is None or result is None:
        out.status = "no frontal chest image" if headers else "no image"
        return None, out
    if keep is not None:
        keep(name, kept[chosen], headers[chosen])
    overlays = {s: source_overlay(kept[chosen], cam, name=name) for s, cam in result.cams.items()}
    objects = study_objects(headers[chosen], result, scorer.versions, overlays)
    out.positives = len(objects.presentation_states)
    return objects, out


def score_study(pacs: Orthanc, scorer: Scorer, orthanc_id: str, keep: Keep | None = None) -> Outcome:
    """Score one stable study and store its SR, GSPS and SC back into it, unless these models already did.
    Anything but the PACS being unavailable is recorded as the study's failure, by the error's type only (messages
    may quote header values), rather than stopping every study behind it; the sensor retries it on later ticks."""
    start = time.monotonic()
    name = f"orthanc {hashlib.sha256(orthanc_id.encode()).hexdigest()[:16]}"  # until its UID is known
    try:
        study_uid = pacs.study_uid(orthanc_id)
        name = study_hash(study_uid)
        if pacs.has_series(study_uid, result_uids(study_uid, scorer.versions, "sr-series")):
            return Outcome(name, "already stored")
        objects, out = study_results([pacs.instance_file(i) for i in pacs.instance_ids(orthanc_id)], scorer, name, keep)
        if objects is not None:
            pacs.store(objects.all()[:-1])  # GSPS and SC first, checked; then the SR alone, so an SR means they are there
            pacs.store([objects.sr])
            out.status = "stored"
    except PacsUnavailable:
        raise
    except Exception as e:  # objects that cannot be built, a refused store, a study deleted meanwhile
        out = Outcome(name, "failed", reason=type(e).__name__)
    out.seconds = round(time.monotonic() - start, 3)
    return out


@dataclass
class FolderStudy:
    """A study found among ``predict --dicom-out`` files: its files, outcome and the objects written."""

    files: list[Path]
    outcome: Outcome
    written: list[Path] = field(default_factory=list)


def dicom_files(inputs: list[Path]) -> list[Path]:
    """The files named, and every file under the folders named (sorted), for grouping into studies."""
    out: list[Path] = []
    for p in inputs:
        out += sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
    return out


def results_for_files(inputs: list[Path], scorer: Scorer, out_dir: Path | None = None, send: str | None = None) -> list[FolderStudy]:
    """Files grouped into studies by StudyInstanceUID, each scored (``study_results``); the objects written under
    ``out_dir/<study hash>/`` (atomically) and/or stored by STOW-RS to the DICOMweb service at ``send``. A file
    that is not DICOM is its own "study" with the reason."""
    groups: dict[str, list[Path]] = {}
    unreadable: list[FolderStudy] = []
    for f in dicom_files(inputs):
        try:
            uid = str(pydicom.dcmread(f, stop_before_pixels=True, specific_tags=["StudyInstanceUID"]).StudyInstanceUID)
        except (InvalidDicomError, AttributeError, ValueError, EOFError, OSError) as e:
            unreadable.append(FolderStudy([f], Outcome("", "no image", reason=f"not a readable DICOM file ({type(e).__name__})")))
            continue
        groups.setdefault(uid, []).append(f)
    web = None
    if send:
        session, send = session_for(send)
        web = web_client(send, session)
    studies = []
    for uid, files in groups.items():
        name = study_hash(uid)
        start = time.monotonic()
        try:
            objects, out = study_results([f.read_bytes() for f in files], scorer, name)
        except Exception as e:  # objects that cannot be built for this study: said (its type only), the others go on
            studies.append(FolderStudy(files, Outcome(name, "failed", reason=type(e).__name__)))
            continue
        study = FolderStudy(files, out)
        if objects is not None:
            for ds in objects.all():
                dest = (out_dir / name / f"{ds.Modality}_{ds.InstanceNumber}.dcm") if out_dir else None
                if dest is not None:
                    dest.parent.mkdir(parents=True, exist_ok=True)
                    with atomic_path(dest) as tmp:
                        ds.save_as(tmp, enforce_file_format=True)
                    study.written.append(dest)
            if web is not None:
                store(web, send, objects.all()[:-1])  # as the intake stores them: the SR last and alone
                store(web, send, [objects.sr])
            out.status = "stored" if web is not None else "written"
        out.seconds = round(time.monotonic() - start, 3)
        studies.append(study)
    return studies + unreadable


def record(ledger: Path, outcome: Outcome) -> None:
    """Append one outcome to the ledger CSV as soon as it is known (one write of one line, flushed to disk: a kill
    loses no finished study's row, and the sensor and ``pacs-rescore`` may append side by side)."""
    ledger.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=LEDGER_FIELDS, lineterminator="\n")
    if not ledger.exists() or ledger.stat().st_size == 0:
        w.writeheader()
    w.writerow({k: v for k, v in asdict(outcome).items() if k in LEDGER_FIELDS})
    with open(ledger, "a") as fh:
        fh.write(buf.getvalue())
        fh.flush()
        os.fsync(fh.fileno())


def ledger_path() -> Path:
    """Where every intake outcome is appended: ``$CXR_HOME/pacs/intake.csv``."""
    return paths().home / "pacs" / "intake.csv"


def rescore(url: str, scorer: Scorer) -> list[Outcome]:
    """Every study in the PACS scored by ``scorer``'s versions where they have not scored it yet (after a promotion:
    the studies the old champions scored get a new SR beside the old one; the old is kept, as a record)."""
    pacs = Orthanc(url)
    outcomes = []
    for sid in pacs.study_ids():
        outcomes.append(score_study(pacs, scorer, sid))
        record(ledger_path(), outcomes[-1])
    return outcomes


def stable_studies(pacs: Orthanc, since: int, limit: int = 200) -> Iterator[tuple[int, str | None]]:
    """(sequence number, Orthanc study id or None) for each change after ``since``: a study id where the change
    is ``StableStudy``, None for the others (they move the cursor on and nothing else)."""
    while True:
        changes, last, done = pacs.changes(since, limit)
        if not changes and last < since:  # a PACS younger than the cursor (its storage was reset): from its start
            since = 0
            changes, last, done = pacs.changes(since, limit)
        for c in changes:
            yield int(c["Seq"]), (c["ID"] if c["ChangeType"] == "StableStudy" else None)
        if done or not changes:
            return
        since = last


def summary(outcomes: list[Outcome]) -> dict[str, int | float]:
    """Counts for Dagster metadata and logs (no study is named)."""
    seconds = [o.seconds for o in outcomes if o.status == "stored"]
    return {
        "studies": len(outcomes),
        "stored": sum(o.status == "stored" for o in outcomes),
        "already_stored": sum(o.status == "already stored" for o in outcomes),
        "no_frontal_chest_image": sum(o.status in ("no frontal chest image", "no image") for o in outcomes),
        "failed": sum(o.status == "failed" for o in outcomes),
        "unreadable_images": sum(o.unreadable for o in outcomes),
        "positive_calls": sum(o.positives for o in outcomes),
        "median_seconds": float(np.median(seconds)) if seconds else 0.0,
    }
