"""Studies in, results out, through a real PACS and the real daemon: the round trip of #50.

A local Orthanc (``cxr_pipeline.pacs``, stable age ``--stable-age`` s) receives ``--studies`` replica studies by
``storescu``, one every ``--pace`` s: PA and AP studies as the replica has them (a frontal and often a lateral
image) and, for about one study in five, its lateral image alone (a lateral-only study: no SR expected). The Dagster
daemon (``dagster-daemon run``) runs the ``pacs_intake`` sensor, which scores each stable study with the
registered champions and stores its SR, GSPS and SC back into it. Halfway through the sending the daemon (and its
code server) is killed with SIGKILL and started again. A monitor polls Orthanc's changes feed every 0.5 s and
stamps when each study first became stable and when its SR series appeared. Duplicates are counted twice over:
SR instances per study in Orthanc beyond one, and sends per study beyond one (the intake's ledger has a row each
time a study's results were stored: since the objects' UIDs are derived from the study and the champions, a second
send would still show as one SR in Orthanc); each scored study's GSPS and SC must number its positive calls. Last
line:

    pacs: 100 studies received, <n> SRs stored (<f> frontal studies), 0 duplicates, p50 <s> s, p95 <s> s from stable to stored

Goal (#50): every frontal study has exactly one SR, 0 duplicates, p95 at most 30 s on an idle 2-core machine.

The models: with ``--home`` the champions registered there (a trained pipeline's CXR_HOME); by default fourteen
per-finding ResNet-18s at 64 px (the demo's architecture and size), random weights, registered as champions in a
fresh store: the round trip's cost does not depend on what the weights learnt. The daemon reaches a persistent
code server (``dagster code-server start``, as the Compose stack runs one) serving a workspace of the
intake alone (``pacs_results`` and the sensor): the full definitions' automation sensor would start the whole
pipeline on an empty home. The champions stay loaded in the code server between ticks (warm), so a study costs
its scoring; the kill (daemon and code server, as a host crash) costs one reload.

    python benchmarks/pacs_roundtrip.py [--studies 100] [--pace 5] [--stable-age 5] [--out /tmp/pacs_bench]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORKSPACE = """import dagster as dg
from cxr_pipeline.defs.pacs import pacs_intake_sensor, pacs_results

defs = dg.Definitions(assets=[pacs_results], sensors=[pacs_intake_sensor()])
"""


def get(url: str):
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read() or b"null")


def random_champions(size: int = 64) -> None:
    """Fourteen per-finding ResNet-18s, random weights, registered as champions in $CXR_HOME's store."""
    import torch

    from cxr_pipeline.labels import LABELS, slug
    from cxr_pipeline.tracking import tracked_run
    from cxr_pipeline.vision.checkpoint import CheckpointConfig, ClassifierFiles, register, write_checkpoint
    from cxr_pipeline.vision.models import build_model
    from cxr_pipeline.vision.registry import registered_name
    from cxr_pipeline.vision.serving import log_model

    for k, label in enumerate(LABELS):
        torch.manual_seed(k)
        files = ClassifierFiles(Path(os.environ["CXR_HOME"]) / "bench-models" / slug(label))
        recipe = {"arch": "resnet18", "uncertain": "ones", "blank": "zeros"}
        config = CheckpointConfig("resnet18", size, (label,), {slug(label): 0.5}, {slug(label): None}, 0.2, training_config=recipe)
        write_checkpoint(build_model("resnet18", 0.2, outputs=1), files, config)
        with tracked_run(f"bench[{label}]") as run:
            log_model(run, files.checkpoint)
            register(run, registered_name(slug(label)), score=0.5, description="pacs_roundtrip: random weights", tags={})


def plan(raw: Path, n: int) -> list[tuple[list[Path], bool]]:
    """(files to send, whether the study has a frontal image): replica studies in order, about one in five with a
    lateral sent alone."""
    import pydicom

    out = []
    for k, study in enumerate(sorted(raw.glob("files/p*/p*/s*"))):
        files = sorted(study.glob("*.dcm"))
        views = {f: str(pydicom.dcmread(f, stop_before_pixels=True).ViewPosition) for f in files}
        lateral = [f for f, v in views.items() if v in ("LATERAL", "LL")]
        frontal = [f for f, v in views.items() if v in ("PA", "AP")]
        if lateral and k % 5 == 2:
            out.append(([lateral[0]], False))
        elif frontal:
            out.append((files, True))
        if len(out) == n:
            return out
    raise SystemExit(f"the replica has only {len(out)} usable studies; raise --patients")


class Monitor(threading.Thread):
    """Stamps, from Orthanc's changes feed, when each study first became stable and when its SR series appeared."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url, self.since, self.stop = url, 0, threading.Event()
        self.stable: dict[str, float] = {}
        self.sr: dict[str, float] = {}

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                body = get(f"{self.url}/changes?since={self.since}&limit=1000")
            except OSError:
                time.sleep(0.5)
                continue
            now = time.monotonic()
            for c in body["Changes"]:
                if c["ChangeType"] == "StableStudy":
                    self.stable.setdefault(c["ID"], now)
                elif c["ChangeType"] == "NewSeries":
                    series = get(f"{self.url}/series/{c['ID']}")
                    if series["MainDicomTags"].get("Modality") == "SR":
                        self.sr.setdefault(series["ParentStudy"], now)
            self.since = int(body["Last"])
            if body["Done"]:
                time.sleep(0.5)


def spawn(cmd: list[str], home: Path, env: dict, log: Path) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=home, env=env, stdout=open(log, "a"), stderr=subprocess.STDOUT, start_new_session=True)


def services(home: Path, env: dict, port: int) -> list[subprocess.Popen]:
    """A persistent code server (as the Compose stack runs one: the champions stay loaded in it) and the daemon,
    which reaches it through a grpc_server workspace entry."""
    (home / "workspace.yaml").write_text(f"load_from:\n  - grpc_server: {{host: 127.0.0.1, port: {port}, location_name: pacs}}\n")
    log = home / "code-server.log"
    seen = log.read_text().count("Started Dagster code server") if log.exists() else 0
    server = spawn(
        [str(BIN / "dagster"), "code-server", "start", "-h", "127.0.0.1", "-p", str(port), "-f", str(home / "workspace.py")], home, env, log
    )
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and log.read_text().count("Started Dagster code server") <= seen:
        time.sleep(0.5)
    return [server, spawn([str(BIN / "dagster-daemon"), "run", "-w", str(home / "workspace.yaml")], home, env, home / "daemon.log")]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--studies", type=int, default=100)
    ap.add_argument("--pace", type=float, default=5.0, help="seconds between studies sent")
    ap.add_argument("--stable-age", type=int, default=5, help="Orthanc's StableAge: seconds without a new instance")
    ap.add_argument("--patients", type=int, default=60, help="replica patients (enough for --studies studies)")
    ap.add_argument("--home", type=Path, help="a CXR_HOME with registered champions (default: random-weight champions)")
    ap.add_argument("--out", type=Path, default=Path("/tmp/pacs_bench"))
    a = ap.parse_args()

    from cxr_pipeline.data.synthetic import SynthConfig, generate
    from cxr_pipeline.local_ray import free_port
    from cxr_pipeline.pacs import SCU_AET, PacsSettings, running

    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    home = a.home or a.out / "home"
    os.environ["CXR_HOME"] = str(home)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    generate(SynthConfig(patients=a.patients, seed=11, workers=2), a.out / "raw")
    if a.home is None:
        random_champions()
    sends = plan(a.out / "raw", a.studies)
    (a.out / "workspace.py").write_text(WORKSPACE)
    s = PacsSettings(http_port=free_port(), dicom_port=free_port(), stable_age=a.stable_age)
    t0 = time.monotonic()
    started_at = datetime.now(UTC).isoformat(timespec="seconds")
    with running(a.out / "pacs", s) as url:
        env = {**os.environ, "CXR_PACS_URL": url, "DAGSTER_HOME": str(a.out / "dagster"), "PYTHONPATH": str(ROOT)}
        (a.out / "dagster").mkdir()
        grpc_port = free_port()
        procs = services(a.out, env, grpc_port)
        monitor = Monitor(url)
        monitor.start()
        killed_at = None
        for k, (files, _frontal) in enumerate(sends):
            started = time.monotonic()
            cmd = ["storescu", "-xv", "-aet", SCU_AET, "-aec", s.aet, "127.0.0.1", str(s.dicom_port), *map(str, files)]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
            if done.returncode != 0:
                raise SystemExit(f"storescu failed on study {k + 1}: {done.stderr[-400:]}")
            if k + 1 == len(sends) // 2:  # halfway: kill the daemon and its code server outright, start it again
                for proc in procs:  # as a crash of the host's services: daemon and code server, no warning
                    os.killpg(proc.pid, signal.SIGKILL)
                    proc.wait()
                killed_at = time.monotonic() - t0
                procs = services(a.out, env, grpc_port)
            time.sleep(max(0.0, a.pace - (time.monotonic() - started)))
        ids = get(f"{url}/studies")
        frontal_ids = set()
        for sid in ids:
            for inst in get(f"{url}/studies/{sid}/instances"):
                tags = get(f"{url}/instances/{inst['ID']}/simplified-tags")
                if tags.get("Modality") == "DX" and tags.get("ViewPosition") in ("PA", "AP"):
                    frontal_ids.add(sid)
        deadline = time.monotonic() + a.stable_age + 180
        while time.monotonic() < deadline and not frontal_ids <= set(monitor.sr):
            time.sleep(1.0)
        time.sleep(a.stable_age + 10)  # room for a late duplicate to show
        monitor.stop.set()
        srs = {}
        for sid in ids:
            n = 0
            for x in get(f"{url}/studies/{sid}")["Series"]:
                series = get(f"{url}/series/{x}")
                if series["MainDicomTags"].get("Modality") == "SR":
                    n += len(series["Instances"])
            srs[sid] = n
        uids = {sid: get(f"{url}/studies/{sid}")["MainDicomTags"]["StudyInstanceUID"] for sid in ids}
        objects = {sid: {} for sid in ids}
        for sid in ids:
            for x in get(f"{url}/studies/{sid}")["Series"]:
                series = get(f"{url}/series/{x}")
                m = series["MainDicomTags"].get("Modality")
                objects[sid][m] = objects[sid].get(m, 0) + len(series["Instances"])
        for proc in procs:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=60)
    lat = sorted(monitor.sr[sid] - monitor.stable[sid] for sid in frontal_ids if sid in monitor.sr and sid in monitor.stable)
    import numpy as np

    p50, p95 = (float(np.percentile(lat, q)) if lat else float("nan") for q in (50, 95))
    missing = sorted(frontal_ids - {sid for sid, n in srs.items() if n})
    lateral_with_sr = sum(1 for sid, n in srs.items() if n and sid not in frontal_ids)
    # sends, not instances: the UIDs are derived from the study and the champions' versions, so a second send of the
    # same results would still show as one SR in Orthanc; the ledger has a row per study each time it was stored
    import polars as pl

    from cxr_pipeline.vision.pacs_intake import study_hash

    ledger = pl.read_csv(home / "pacs" / "intake.csv").filter(pl.col("time") >= started_at)  # this run's rows (--home may hold older)
    stored = ledger.filter(pl.col("status") == "stored")
    sends = dict(stored.group_by("study").len().iter_rows())
    positives = dict(stored.select("study", "positives").iter_rows())
    dups = sum(max(0, n - 1) for n in sends.values()) + sum(max(0, n - 1) for n in srs.values())
    wrong = [sid for sid in ids if srs[sid] and objects[sid].get("PR", 0) != positives.get(study_hash(uids[sid]), -1)]
    wrong += [sid for sid in ids if srs[sid] and objects[sid].get("OT", 0) != objects[sid].get("PR", 0)]
    print(
        f"machine: {platform.machine()} {os.cpu_count()} cores, python {platform.python_version()}; stable age {a.stable_age} s, "
        f"pace {a.pace} s, sensor interval {os.environ.get('CXR_PACS_INTERVAL', '5')} s; daemon and code server killed (SIGKILL) at {killed_at:.0f} s; "
        f"{'registered champions in ' + str(a.home) if a.home else 'fourteen random-weight ResNet-18 champions at 64 px'}"
    )
    print(
        f"frontal studies without an SR: {len(missing)}; lateral-only studies with an SR: {lateral_with_sr}; studies whose GSPS or SC "
        f"count differs from their positive calls: {len(wrong)}; sends per study (ledger) at most {max(sends.values(), default=0)}; "
        f"failed: {ledger.filter(pl.col('status') == 'failed').height}; max latency {max(lat, default=float('nan')):.1f} s"
    )
    print(
        f"pacs: {len(ids)} studies received, {sum(srs.values())} SRs stored ({len(frontal_ids)} frontal studies), {dups} duplicates, "
        f"p50 {p50:.1f} s, p95 {p95:.1f} s from stable to stored"
    )
    return 0 if not missing and not dups and not wrong and p95 <= 30 else 1


if __name__ == "__main__":
    sys.exit(main())
