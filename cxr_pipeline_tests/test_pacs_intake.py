"""The PACS in the graph: the ``pacs_intake`` sensor, called directly against a real Orthanc, scores each stable
study holding a frontal chest image once, stores its SR, GSPS and SC back into the study, and sends nothing for a
replayed change, a lateral-only study or a second look; an unreadable image is recorded and the study still
scored; a PACS that is down leaves the cursor where it was. No header text reaches the ledger or the metadata."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import dagster as dg
import numpy as np
import pydicom
import pytest
from pydicom.uid import generate_uid

from cxr_pipeline.cli import main
from cxr_pipeline.config import resolve
from cxr_pipeline.data.dicom import prepare
from cxr_pipeline.defs.pacs import PACS_RESULTS, pacs_intake_sensor
from cxr_pipeline.local_ray import free_port
from cxr_pipeline.pacs import SCU_AET, PacsSettings, running
from cxr_pipeline.settings import paths
from cxr_pipeline.tracking import tracked_run
from cxr_pipeline.vision import pacs_intake
from cxr_pipeline.vision.checkpoint import register
from cxr_pipeline.vision.pacs_intake import ledger_path, study_hash
from cxr_pipeline.vision.pacs_windows import pacs_windows_root
from cxr_pipeline.vision.serving import log_model
from cxr_pipeline_tests.test_pacs import HAVE, get
from cxr_pipeline_tests.vision.test_dicom_results import frontal_study

pytestmark = pytest.mark.skipif(not HAVE and not __import__("os").environ.get("CI"), reason="no Orthanc here; CI installs it")


def store(port: int, files: list[Path]) -> None:
    done = subprocess.run(
        ["storescu", "-xv", "-aet", SCU_AET, "-aec", "CXR_PACS", "127.0.0.1", str(port), *map(str, files)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr


def wait_stable(url: str, n: int, seconds: float = 60) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if sum(c["ChangeType"] == "StableStudy" for c in get(f"{url}/changes?limit=1000")["Changes"]) >= n:
            return
        time.sleep(0.3)
    raise AssertionError(f"fewer than {n} studies became stable in {seconds} s")


def series_counts(url: str, study_uid: str) -> dict[str, int]:
    """Modality -> instances in the study (QIDO-RS)."""
    out: dict[str, int] = {}
    for inst in get(f"{url}/dicom-web/studies/{study_uid}/instances") or []:
        m = inst["00080060"]["Value"][0]
        out[m] = out.get(m, 0) + 1
    return out


def tick(cursor: str | None):
    with dg.instance_for_test() as instance:
        return pacs_intake_sensor()(dg.build_sensor_context(instance=instance, cursor=cursor))


def test_the_sensor_stores_results_once_per_study_and_champion_versions(replica, registry, tmp_path, monkeypatch):
    studies = sorted(replica.glob("files/p*/p*/s*"))
    scored = frontal_study(replica)  # a frontal and a lateral image
    lateral_only = next(
        [f]
        for s in studies
        for f in sorted(s.glob("*.dcm"))
        if s != scored[0].parent and str(pydicom.dcmread(f, stop_before_pixels=True).ViewPosition) == "LATERAL"
    )
    # a study whose first frontal image has broken pixels (header intact): it is recorded, the good one scored
    third = next(s for s in studies if s not in (scored[0].parent, lateral_only[0].parent) and len(list(s.glob("*.dcm"))) >= 2)
    good = sorted(third.glob("*.dcm"))
    frontal = next(f for f in good if str(pydicom.dcmread(f, stop_before_pixels=True).ViewPosition) in ("PA", "AP"))
    broken = pydicom.dcmread(frontal)
    broken.SOPInstanceUID = generate_uid()
    broken.file_meta.MediaStorageSOPInstanceUID = broken.SOPInstanceUID
    broken.InstanceNumber, broken.ViewPosition = 0, "PA"
    broken.PixelData = broken.PixelData[: len(broken.PixelData) // 3]
    broken.save_as(tmp_path / "broken.dcm")
    headers = {f: pydicom.dcmread(f, stop_before_pixels=True) for f in [*scored, *lateral_only, *good]}
    secrets = {
        str(h.get(k)) for h in headers.values() for k in ("PatientName", "PatientID", "StudyInstanceUID", "AccessionNumber", "StudyDate")
    }

    s = PacsSettings(http_port=free_port(), dicom_port=free_port(), stable_age=1)
    with running(tmp_path / "pacs", s) as url:
        monkeypatch.setenv("CXR_PACS_URL", url)
        store(s.dicom_port, [*scored, *lateral_only, *good, tmp_path / "broken.dcm"])
        wait_stable(url, 3)
        uid = {f: str(h.StudyInstanceUID) for f, h in headers.items()}
        real_objects = pacs_intake.study_objects

        def fails_once_for_the_third(source, *args):  # a study whose objects cannot be built, the error quoting its name
            if source.StudyInstanceUID == uid[good[0]] and not failed:
                failed.append(1)
                raise ValueError(f"cannot build for {source.PatientName}")
            return real_objects(source, *args)

        failed: list[int] = []
        monkeypatch.setattr(pacs_intake, "study_objects", fails_once_for_the_third)
        first = tick(None)
        assert isinstance(first, dg.SensorResult), first
        meta = {k: v.value for k, v in first.asset_events[0].metadata.items()}
        assert first.asset_events[0].asset_key == dg.AssetKey(PACS_RESULTS)
        assert (meta["stored"], meta["failed"], meta["no_frontal_chest_image"]) == (1, 1, 1)  # the failure stopped nothing
        assert series_counts(url, uid[scored[0]]).get("SR") == 1  # one SR (cardiomegaly is always positive: a GSPS and an SC)
        assert series_counts(url, uid[scored[0]]).get("PR") == 1 and series_counts(url, uid[scored[0]]).get("OT") == 1
        assert "SR" not in series_counts(url, uid[lateral_only[0]]) and "SR" not in series_counts(url, uid[good[0]])
        ledger = ledger_path().read_text()
        assert "not a frontal view" in ledger and "failed,ValueError" in ledger
        text = ledger + repr(meta)
        assert not [x for x in secrets if x and x != "None" and x in text]  # no names, ids, UIDs or dates

        # the next tick tries the failed study again (the cursor keeps it): scored now, the broken image left out
        second = tick(first.cursor)
        meta = {k: v.value for k, v in second.asset_events[0].metadata.items()}
        assert (meta["stored"], meta["failed"], meta["unreadable_images"], meta["retrying"]) == (1, 0, 1, 0)
        assert series_counts(url, uid[good[0]]).get("SR") == 1 and "unreadable pixels" in ledger_path().read_text()

        # every change replayed, from a cursor ahead of this PACS (a daemon restarted from an old cursor, a PACS whose
        # storage was reset): nothing is sent again (a study whose results arrived since may show up twice as done)
        replay = tick("99999")
        meta = {k: v.value for k, v in replay.asset_events[0].metadata.items()}
        assert meta["stored"] == 0 and meta["failed"] == 0 and meta["already_stored"] >= 2 and meta["no_frontal_chest_image"] == 1
        for f in (scored[0], good[0]):
            assert series_counts(url, uid[f]).get("SR") == 1  # nothing sent twice
        later = tick(replay.cursor)  # only the results' own arrival since (their studies become stable again)
        assert isinstance(later, dg.SensorResult) and all(e.metadata["stored"].value == 0 for e in later.asset_events)
        assert json.loads(later.cursor)["seq"] >= json.loads(replay.cursor)["seq"]

        # the drift monitor's windows: each scored study's image kept once (the replays kept nothing more), as a shard of
        # the same file holds it at every shard size, without header text
        kept = sorted((pacs_windows_root() / "open").glob("*.npz"))
        assert sorted(k.stem.split("-", 1)[1] for k in kept) == sorted(study_hash(uid[f]) for f in (scored[0], good[0]))
        (third_kept,) = [k for k in kept if study_hash(uid[good[0]]) in k.name]
        options = [f for f in good if str(headers[f].ViewPosition) in ("PA", "AP")]
        with np.load(third_kept) as z:
            for n in resolve(paths(), "image_shards", {}).sizes:
                assert any(np.array_equal(z[f"s{n}"], prepare(f, n)) for f in options), n
        assert not [x for x in secrets if x and x != "None" and any(x.encode() in k.read_bytes() for k in kept)]

        # a promoted champion: new studies get its SR; the CLI re-scores the old ones on request
        with tracked_run("test[promote]") as run:
            log_model(run, registry["edema"])
            assert register(run, "cxr-edema", score=0.9, description="test", tags={})["champion"]
        assert main(["pacs-rescore", "--url", url]) == 0
        assert series_counts(url, uid[scored[0]]).get("SR") == 2  # the old champions' SR kept, the new one's beside it
        assert main(["pacs-rescore", "--url", url]) == 0
        assert series_counts(url, uid[scored[0]]).get("SR") == 2

    down = tick(first.cursor)  # Orthanc stopped: the tick is skipped, the cursor stays
    assert isinstance(down, dg.SkipReason) or (down.cursor == first.cursor and not down.asset_events)


def test_predict_writes_the_objects_for_a_folder_and_sends_them_by_stow_rs(replica, registry, tmp_path, capsys):
    """``cxr-pipeline predict study/ --dicom-out out/`` and ``--send URL``, as a user runs them."""
    from cxr_pipeline_tests.vision.test_dicom_results import DATA, dciodvfy_errors

    files = frontal_study(replica)
    study = tmp_path / "study"
    study.mkdir()
    for f in files:
        (study / f.name).write_bytes(f.read_bytes())
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    out = tmp_path / "out"
    assert main(["predict", str(study), "--dicom-out", str(out)]) == 0
    said = capsys.readouterr().out
    assert "written: 1 SR, 1 GSPS, 1 SC" in said and "not a frontal view" in said
    assert str(header.PatientName) not in said and header.StudyInstanceUID not in said
    written = sorted(p.name for p in out.rglob("*.dcm"))
    assert written == ["OT_1.dcm", "PR_1.dcm", "SR_1.dcm"]
    assert all(dciodvfy_errors(p) == [] for p in out.rglob("*.dcm"))
    assert main(["predict", str(DATA / "RG3_UNCR.dcm"), "--dicom-out", str(tmp_path / "none")]) == 1  # an extremity
    assert "body part examined is not the chest" in capsys.readouterr().out and not (tmp_path / "none").exists()

    s = PacsSettings(http_port=free_port(), dicom_port=free_port(), stable_age=1)
    with running(tmp_path / "pacs", s) as url:
        assert main(["predict", str(study), "--send", f"{url}/dicom-web"]) == 0
        assert series_counts(url, header.StudyInstanceUID) == {"SR": 1, "PR": 1, "OT": 1}
        assert main(["predict", str(study), "--send", f"{url}/no-dicom-web-here"]) == 2  # a refusal (404), not retried
        assert "refused the results (STOW-RS 404)" in capsys.readouterr().err
