"""The PACS intake's drift windows (``vision.pacs_windows``): each study kept once, windows of a fixed number of
studies closed oldest first and whole (a killed close is put back), the patient known only by a keyed hash, the
pixels as a shard of the same file holds them."""

from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pydicom
import pytest

from cxr_pipeline.data.dicom import prepare
from cxr_pipeline.vision.pacs_windows import OPEN, QuietStore, WindowStore, load_window, window_names


def frontal_images(replica: Path) -> list[tuple[str, Path, pydicom.Dataset]]:
    """(study name, file, header) of the first frontal image of each replica study."""
    out = []
    for study in sorted(replica.glob("files/p*/p*/s*")):
        for f in sorted(study.glob("*.dcm")):
            h = pydicom.dcmread(f, stop_before_pixels=True)
            if h.ViewPosition in ("PA", "AP"):
                out.append((f"study{len(out):03d}", f, h))
                break
    return out


def test_studies_are_kept_once_and_closed_into_whole_windows_oldest_first(replica, tmp_path):
    studies = frontal_images(replica)[:7]
    store = WindowStore(tmp_path, [32, 48], window=3)
    for name, f, h in studies:
        assert store.keep(name, f.read_bytes(), h)
    assert not store.keep(studies[0][0], studies[0][1].read_bytes(), studies[0][2])  # a retry or a rescore: not again
    assert store.close() == ["pacs-0001", "pacs-0002"] and window_names(tmp_path) == ["pacs-0001", "pacs-0002"]
    assert len(list((tmp_path / OPEN).glob("*.npz"))) == 1
    images, views, rows, reason = load_window(tmp_path, "pacs-0002", 48)
    assert not reason and images.shape == (3, 48, 48) and rows["study_id"].to_list() == [s[0] for s in studies[3:6]]
    for img, (_name, f, h), view in zip(images, studies[3:6], views, strict=True):
        assert np.array_equal(img, prepare(f, 48)) and view == h.ViewPosition  # the shard builder's pixels
    assert rows.select("bits_stored", "source_rows", "source_cols").rows() == [
        (h.BitsStored, h.Rows, h.Columns) for _n, _f, h in studies[3:6]
    ]
    assert "kept at sizes [32, 48], the champion reads 64 px" in load_window(tmp_path, "pacs-0001", 64)[3]
    assert "no such PACS window" in load_window(tmp_path, "pacs-0009", 32)[3]
    # a new store remembers what was kept, in windows and open alike
    again = WindowStore(tmp_path, [32, 48], window=3)
    assert not any(again.keep(n, f.read_bytes(), h) for n, f, h in studies)


def test_a_killed_close_is_put_back_and_the_next_close_makes_the_window(replica, tmp_path):
    studies = frontal_images(replica)[:4]
    store = WindowStore(tmp_path, [32], window=4)
    for name, f, h in studies:
        store.keep(name, f.read_bytes(), h)
    partial = tmp_path / ".pacs-0001.partial"  # what a close killed after moving two studies leaves
    partial.mkdir()
    for k in sorted((tmp_path / OPEN).glob("*.npz"))[:2]:
        os.replace(k, partial / k.name)
    assert window_names(tmp_path) == []
    assert WindowStore(tmp_path, [32], window=4).close() == ["pacs-0001"] and not partial.exists()
    assert len(load_window(tmp_path, "pacs-0001", 32)[0]) == 4


def test_the_patient_is_a_keyed_hash_and_no_header_text_is_kept(replica, tmp_path):
    (name, f, h), (name2, f2, h2) = frontal_images(replica)[:2]
    store = WindowStore(tmp_path, [32], window=2)
    twin = pydicom.dcmread(f2, stop_before_pixels=True)
    twin.PatientID = h.PatientID  # another study of the first patient
    store.keep(name, f.read_bytes(), h)
    store.keep(name2, f2.read_bytes(), twin)
    nameless = pydicom.dcmread(f2, stop_before_pixels=True)
    nameless.PatientID = ""
    store.keep("study-x", f2.read_bytes(), nameless)
    store.close()
    rows = load_window(tmp_path, "pacs-0001", 32)[2]
    assert rows["subject_id"].n_unique() == 1 and str(h.PatientID) not in rows["subject_id"][0]
    plain = hashlib.sha256(str(h.PatientID).encode()).hexdigest()  # what trying every hospital number would find
    assert not plain.startswith(rows["subject_id"][0])
    assert stat.S_IMODE((tmp_path / ".patient-key").stat().st_mode) == 0o600
    with np.load(next((tmp_path / OPEN).glob("*.npz"))) as z:
        assert str(z["patient"]) == "study:study-x"  # no patient ID: a patient of its own
    secrets = {str(x) for hd in (h, h2) for x in (hd.PatientName, hd.PatientID, hd.StudyInstanceUID, hd.StudyDate)}
    kept = b"".join(p.read_bytes() for p in tmp_path.rglob("*.npz"))
    assert not [s for s in secrets if s and s.encode() in kept]
    with pytest.raises(ValueError, match="at least 2 studies"):
        WindowStore(tmp_path, [32], window=1)


def test_old_windows_are_deleted_beyond_those_kept_and_a_failing_store_never_fails_the_intake(replica, tmp_path):
    studies = frontal_images(replica)[:8]
    store = WindowStore(tmp_path / "w", [32], window=2, kept=2)
    for name, f, h in studies:
        store.keep(name, f.read_bytes(), h)
    assert store.close() == ["pacs-0001", "pacs-0002", "pacs-0003", "pacs-0004"]
    assert window_names(tmp_path / "w") == ["pacs-0003", "pacs-0004"]  # the images of older windows are gone
    assert stat.S_IMODE((tmp_path / "w").stat().st_mode) == 0o700
    # a damaged key is refused (an empty key would make the HMAC a plain, reversible hash)
    (tmp_path / "w" / ".patient-key").write_bytes(b"")
    name, f, h = frontal_images(replica)[9]
    with pytest.raises(ValueError, match="not a 32-byte key"):
        store.keep(name, f.read_bytes(), h)
    # the intake's wrapper: the failure is counted by its type and the study goes on
    quiet = QuietStore(lambda: store)
    quiet.keep(name, f.read_bytes(), h)
    assert quiet.errors == ["ValueError"] and quiet.close() == []

    def full_disk() -> list[str]:
        raise OSError("no space left")

    store.close = full_disk  # a close that fails: counted, the tick goes on
    assert quiet.close() == [] and quiet.errors == ["ValueError", "OSError"]
    broken = QuietStore(lambda: WindowStore(tmp_path / "x", [32], window=1))
    broken.keep(name, f.read_bytes(), h)
    assert broken.errors == ["ValueError"] and broken.close() == []


def test_a_study_without_a_window_is_kept_as_the_training_windows_read_it(replica, tmp_path):
    """A PACS that drops the window: the kept image is read through the training images' windows (the store's
    prior), as an external set's windowless files are, so the drift monitor does not alarm for the dropped window
    alone; without a prior it would be the percentile window's reading."""
    from cxr_pipeline.data.dicom import without_window
    from cxr_pipeline.data.voi import WindowPrior

    (name, f, h), prior = (
        frontal_images(replica)[0],
        WindowPrior(((0.35, 0.4, "LINEAR"), (0.6, 0.9, "LINEAR_EXACT"), (0.5, 0.3, "SIGMOID"))),
    )
    data = without_window(f)
    for folder, store_prior in (("with", prior), ("without", None)):
        store = WindowStore(tmp_path / folder, [32], window=2, prior=store_prior)
        assert store.keep(name, data, h) and store.keep("other", f.read_bytes(), h)
        assert store.close() == ["pacs-0001"]
    kept = {folder: load_window(tmp_path / folder, "pacs-0001", 32)[0][0] for folder in ("with", "without")}
    assert np.array_equal(kept["with"], prepare(data, 32, prior=prior)) and np.array_equal(kept["without"], prepare(data, 32))
    assert np.abs(kept["with"].astype(int) - kept["without"]).mean() > 5


def test_each_kept_image_records_how_it_was_read_and_the_drift_window_counts_them(replica, tmp_path):
    """Which reading a kept image went through is kept beside it (its own window, the training windows, the
    percentile window) and reaches the drift asset as counts: a window of studies read through the percentile
    window, where no prior was fitted, is seen as such, not only as drift."""
    from cxr_pipeline.data.dicom import decode, without_window
    from cxr_pipeline.data.voi import WindowPrior
    from cxr_pipeline.defs.drift import pacs_window, window_readings
    from cxr_pipeline.settings import Paths

    images = list({h.PatientID: (name, f, h) for name, f, h in reversed(frontal_images(replica))}.values())[-3:]  # 3 patients
    own = decode(images[2][1].read_bytes()).window
    assert own not in ("percentile", "training window")
    prior = WindowPrior(((0.35, 0.4, "LINEAR"),))
    for folder, store_prior, windowless in (("with", prior, "training window"), ("without", None, "percentile")):
        root = tmp_path / folder / "pacs" / "windows"
        store = WindowStore(root, [32], window=3, prior=store_prior)
        for name, f, h in images[:2]:
            assert store.keep(name, without_window(f), h)
        assert store.keep(images[2][0], images[2][1].read_bytes(), images[2][2])
        assert store.close() == ["pacs-0001"]
        assert load_window(root, "pacs-0001", 32)[2]["reading"].to_list() == [windowless, windowless, own]
        sample, reason = pacs_window(Paths(home=tmp_path / folder, raw=replica), "pacs-0001", 32, seed=0)
        assert not reason and window_readings(sample, SimpleNamespace(max_window=500, seed=0)) == {windowless: 2, own: 1}
        drawn = window_readings(sample, SimpleNamespace(max_window=2, seed=0))  # counted on the images compared
        assert sum(drawn.values()) == 2 and set(drawn) <= {windowless, own}
