"""Manifest build at full MIMIC-CXR size, against the 2024 seeds' pandas approach.

Makes (once, cached) a ``--metadata-only`` replica with MIMIC-CXR's own
patient count (65,379; the generator draws about 227k studies and 377k images
from MIMIC's per-patient rates), then in fresh subprocesses:

- baseline: what the course project did, written the pandas way it was
  written: read the record list, metadata and chexpert CSVs with pandas,
  merge, keep PA, first image per subject, parse each kept report;
- project: ``build_manifest`` with the default policy, which also validates
  every row into a rejects table, joins the official split and the
  radiologist test labels, and parses the same reports.

Files are not checked (a metadata-only replica has no images): both sides skip
that step. Peak memory is the child's max RSS.

    python benchmarks/bench_manifest.py [--data DIR] [--patients 65379]

The last line is ``manifest: N rows in X s, peak Y GB``.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import resource
import sys
import time
from pathlib import Path

from cxr_pipeline.settings import paths

MIMIC_PATIENTS = 65_379


def ensure_data(root: Path, patients: int) -> dict:
    from cxr_pipeline.data.synthetic import SynthConfig, generate

    marker = root / ".bench.json"
    if marker.exists():
        info = json.loads(marker.read_text())
        if info.get("patients") == patients:
            return info
    print(f"generating a metadata-only replica of {patients} patients in {root} (once) ...", file=sys.stderr)
    t0 = time.perf_counter()
    counts = generate(SynthConfig(patients=patients, seed=0, metadata_only=True), root, progress=lambda m: print(f"  {m}", file=sys.stderr))
    counts["generate_seconds"] = round(time.perf_counter() - t0, 1)
    marker.write_text(json.dumps(counts))
    return counts


def _peak_gb() -> float:
    """This process's own peak resident memory (VmHWM; ru_maxrss survives exec and would
    report the parent's peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024**2
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2


def run_project(root: str, q) -> None:
    from cxr_pipeline.data.mimic import ManifestPolicy, build_manifest

    t0 = time.perf_counter()
    res = build_manifest(Path(root), ManifestPolicy(check_files=False))
    q.put((res.manifest.height, time.perf_counter() - t0, _peak_gb()))


def run_baseline(root: str, q) -> None:
    import pandas as pd

    from cxr_pipeline.data.sections import parse_report

    t0 = time.perf_counter()
    r = Path(root)
    rec = pd.read_csv(r / "cxr-record-list.csv.gz")
    meta = pd.read_csv(r / "mimic-cxr-2.0.0-metadata.csv.gz")
    chex = pd.read_csv(r / "mimic-cxr-2.0.0-chexpert.csv.gz")
    df = rec.merge(meta, on=["dicom_id", "subject_id", "study_id"]).merge(chex, on=["subject_id", "study_id"], how="left")
    df = df[df["ViewPosition"] == "PA"]
    df = df.sort_values(["subject_id", "StudyDate", "StudyTime"]).drop_duplicates("subject_id")
    findings, impressions = [], []
    for sub, stu in zip(df["subject_id"], df["study_id"], strict=True):
        p = r / f"files/p{str(sub)[:2]}/p{sub}/s{stu}.txt"
        sec = parse_report(p.read_text()) if p.exists() else None
        findings.append(sec.findings if sec else None)
        impressions.append(sec.impression if sec else None)
    df["findings"], df["impression"] = findings, impressions
    q.put((len(df), time.perf_counter() - t0, _peak_gb()))


def measure(fn, root: Path) -> tuple[int, float, float]:
    """Run ``fn`` in a fresh interpreter: (rows, seconds, peak GB).

    The peak is the larger of the process's own high-water mark and the summed
    resident memory of it and its worker processes, sampled every 10 ms.
    """
    import threading

    import psutil

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=fn, args=(str(root), q))
    p.start()
    proc = psutil.Process(p.pid)
    tree_peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal tree_peak
        while not done.is_set():
            try:
                procs = [proc, *proc.children(recursive=True)]
                tree_peak = max(tree_peak, sum(x.memory_info().rss for x in procs if x.is_running()))
            except psutil.Error:
                pass
            time.sleep(0.01)

    t = threading.Thread(target=sample, daemon=True)
    t.start()
    rows, seconds, own_peak = q.get()
    done.set()
    p.join()
    return rows, seconds, max(own_peak, tree_peak / 1024**3)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--data", default=str(paths().bench("mimic-metadata")))
    ap.add_argument("--patients", type=int, default=MIMIC_PATIENTS)
    args = ap.parse_args()
    root = Path(args.data)
    info = ensure_data(root, args.patients)
    print(f"dataset: {info['patients']} patients, {info['studies']} studies, {info['images']} images (metadata only)")
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}")
    rows, secs, peak = measure(run_project, root)
    b_rows, b_secs, b_peak = measure(run_baseline, root)
    print(f"baseline (pandas merge, seeds' way): {b_rows} rows in {b_secs:.2f} s, peak {b_peak:.2f} GB")
    print(f"speedup vs baseline: {b_secs / secs:.2f}x")
    print(f"manifest: {rows} rows in {secs:.2f} s, peak {peak:.2f} GB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
