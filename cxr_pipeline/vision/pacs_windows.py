"""Windows of studies received through the PACS intake, for the ``image_drift`` asset.

The intake scores a study from one frontal image in memory and keeps nothing of it; the drift monitor needs the
images a window held. So, as it scores a study, the intake keeps that image here as the shards store images (one
decode, letterboxed at every size the pipeline's shards are built at: ``data.decode_worker``'s own function, so a
window's pixels are the ones a shard of the same file would hold), with its view and a keyed hash of the patient.
Once ``window`` studies are kept, the oldest ``window`` become a window, ``pacs-NNNN`` (a folder, renamed into place
whole: a killed intake leaves a partial one, which the next call puts back); the ``drift_windows`` sensor adds it
as a partition of ``image_drift``.

No header text is kept: the file is named by the study's hash (as the ledger's rows), and the patient by an HMAC
of the patient ID under a key made for this installation (``.patient-key``, 0600): the monitor needs to know
which studies share a patient (its test's unit is the patient: ``vision.drift``), not who the patient is, and a
plain hash of a short hospital number could be reversed by trying them all. A study without a patient ID counts
as a patient of its own. A study kept once is never kept again (a retry, ``pacs-rescore`` after a promotion).
"""

from __future__ import annotations

import hashlib
import hmac
import io
import os
import re
import secrets
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
from pydicom.dataset import Dataset

from cxr_pipeline.data.decode_worker import decode_letterboxed
from cxr_pipeline.data.voi import WindowPrior
from cxr_pipeline.files import atomic_path
from cxr_pipeline.settings import paths

OPEN = "open"
WINDOW = re.compile(r"pacs-(\d{4,})")
KEY_FILE = ".patient-key"


def pacs_windows_root(layout=None) -> Path:
    """``$CXR_HOME/pacs/windows`` (of ``layout``, a ``settings.Paths``, or the current one): the open studies
    (``open/``) and the closed windows (``pacs-NNNN/``)."""
    return (layout or paths()).home / "pacs" / "windows"


def _installation_key(root: Path) -> bytes:
    """This installation's 32-byte key, made on first use: written to a temporary file, flushed, then linked into
    place (a link fails if another process made it first), so no reader ever sees a partial key."""
    key_path = root / KEY_FILE
    if not key_path.exists():
        tmp = root / f".patient-key.{os.getpid()}.{secrets.token_hex(4)}"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(secrets.token_bytes(32))
            fh.flush()
            os.fsync(fh.fileno())
        try:
            os.link(tmp, key_path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    key = key_path.read_bytes()
    if len(key) != 32:
        raise ValueError(f"{key_path}: not a 32-byte key ({len(key)} bytes); move it aside to make a new one")
    return key


def patient_key(root: Path, patient_id: str, study: str) -> str:
    """An HMAC-SHA256 of the patient ID under this installation's key; the study's own hash when the header has no
    patient ID."""
    if not patient_id.strip():
        return f"study:{study}"
    return hmac.new(_installation_key(root), patient_id.strip().encode(), hashlib.sha256).hexdigest()[:32]


def window_names(root: Path) -> list[str]:
    """The closed windows, oldest first."""
    if not root.is_dir():
        return []
    return sorted((p.name for p in root.iterdir() if p.is_dir() and WINDOW.fullmatch(p.name)), key=lambda n: int(n[5:]))


class WindowStore:
    """Keeps each scored study's image (``keep``) and closes windows of ``window`` studies (``close``), deleting the
    oldest windows beyond ``kept`` (0: none deleted); the images are this user's alone (the folder is 0700). A
    file without a window is read through ``prior``'s (the training images' windows at the largest size, as an
    external set's windowless files are read), so a PACS that drops the window does not alarm for that alone."""

    def __init__(self, root: Path, sizes: list[int], window: int, kept: int = 0, prior: WindowPrior | None = None) -> None:
        if window < 2:
            raise ValueError(f"a PACS drift window needs at least 2 studies, not {window}")
        self.root, self.sizes, self.window, self.kept = Path(root), sorted(set(sizes)), window, kept
        self.prior = prior
        self.root.mkdir(parents=True, exist_ok=True)
        self.root.chmod(0o700)  # patients' images: this user's alone
        self._recover()
        self.seen = {f.stem.split("-", 1)[1] for f in self.root.glob("*/*.npz")}

    def _recover(self) -> None:
        """A window a killed call left half moved: its studies go back to the open ones."""
        (self.root / OPEN).mkdir(parents=True, exist_ok=True)
        for partial in self.root.glob(".pacs-*.partial"):
            for f in partial.glob("*.npz"):
                os.replace(f, self.root / OPEN / f.name)
            partial.rmdir()

    def keep(self, study: str, data: bytes, header: Dataset) -> bool:
        """Keep the image a study was scored from (False when it was kept before or its pixels do not decode)."""
        if study in self.seen:
            return False
        try:
            pixels, dec = decode_letterboxed(study, memoryview(data), self.sizes, self.prior)
        except Exception:  # pixels that do not decode are not kept: the study was scored (or failed) on its own
            return False
        buf = io.BytesIO()
        arrays = {f"s{s}": np.frombuffer(pixels[s], np.uint8).reshape(s, s) for s in self.sizes}
        view = str(header.get("ViewPosition", "") or "").upper()
        bits = int(header.get("BitsStored", 0) or 0)
        geometry = np.array([bits, int(header.get("Rows", 0) or 0), int(header.get("Columns", 0) or 0)], np.int64)
        key = patient_key(self.root, str(header.get("PatientID", "") or ""), study)
        np.savez(buf, **arrays, view=np.array(view), patient=np.array(key), geometry=geometry, reading=np.array(dec.window))
        with atomic_path(self.root / OPEN / f"{time.time_ns():020d}-{study}.npz") as tmp:
            tmp.write_bytes(buf.getvalue())
        self.seen.add(study)
        return True

    def close(self) -> list[str]:
        """Every full window of the oldest open studies becomes ``pacs-NNNN``; returns the new windows' names."""
        kept = sorted((self.root / OPEN).glob("*.npz"))
        made = []
        while len(kept) >= self.window:
            names = window_names(self.root)
            name = f"pacs-{(int(names[-1][5:]) if names else 0) + 1:04d}"
            partial = self.root / f".{name}.partial"
            partial.mkdir()
            for f in kept[: self.window]:
                os.replace(f, partial / f.name)
            os.replace(partial, self.root / name)
            made.append(name)
            kept = kept[self.window :]
        names = window_names(self.root)
        for old in names[: max(0, len(names) - self.kept)] if self.kept else []:  # the oldest beyond those kept
            shutil.rmtree(self.root / old)
        return made


def load_window(root: Path, name: str, size: int) -> tuple[np.ndarray, list[str], pl.DataFrame, str]:
    """A closed window's images at ``size``, views and rows (``subject_id``: the patient key, ``study_id``: the
    study's hash; the source's ``bits_stored``, ``source_rows``, ``source_cols`` from its header; ``reading``: how its
    file was windowed, ``data.dicom.Decoded.window``, "not recorded" for a study kept before 2026-12-07), in the
    order received; a reason instead when the window is missing or was kept at other sizes."""
    files = sorted((root / name).glob("*.npz")) if WINDOW.fullmatch(name) else []
    empty = (np.zeros((0, size, size), np.uint8), [], pl.DataFrame(), "")
    if not files:
        return (*empty[:3], f"{name}: no such PACS window under {root}")
    images, views, patients, shapes, readings = [], [], [], [], []
    for f in files:
        with np.load(f) as z:
            if f"s{size}" not in z:
                have = sorted(int(k[1:]) for k in z.files if k.startswith("s") and k[1:].isdigit())
                return (*empty[:3], f"{name}: kept at sizes {have}, the champion reads {size} px")
            images.append(z[f"s{size}"])
            views.append(str(z["view"]))
            patients.append(str(z["patient"]))
            shapes.append(z["geometry"] if "geometry" in z.files else np.zeros(3, np.int64))
            readings.append(str(z["reading"]) if "reading" in z.files else "not recorded")
    g = np.stack(shapes)
    studies = [f.stem.split("-", 1)[1] for f in files]
    rows = pl.DataFrame(
        {
            "subject_id": patients,
            "study_id": studies,
            "bits_stored": g[:, 0],
            "source_rows": g[:, 1],
            "source_cols": g[:, 2],
            "reading": readings,
        }
    )
    return np.stack(images), views, rows, ""


class QuietStore:
    """The intake's use of a store: the drift monitor must never cost a study its results, so a store that cannot
    be opened, an image that cannot be kept, a window that cannot be closed are counted (by error type only: a
    message may quote header values) and the study is scored and stored as if there were no monitor."""

    def __init__(self, make: Callable[[], WindowStore]) -> None:
        self.errors: list[str] = []
        try:
            self.store: WindowStore | None = make()
        except Exception as e:
            self.store = None
            self.errors.append(type(e).__name__)

    def keep(self, study: str, data: bytes, header: Dataset) -> None:
        if self.store is None:
            return
        try:
            self.store.keep(study, data, header)
        except Exception as e:
            self.errors.append(type(e).__name__)

    def close(self) -> list[str]:
        if self.store is None:
            return []
        try:
            return self.store.close()
        except Exception as e:
            self.errors.append(type(e).__name__)
            return []
