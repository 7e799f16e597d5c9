"""Full-count rehearsal: the whole graph, through Dagster, on a replica with MIMIC-CXR's own counts.

The replica (once, cached under ``--root``) has MIMIC-CXR's 65,379 subjects,
227,835 studies and 377,110 images, every CSV and report, the official split's
proportions (500 validate and 293 test patients; radiologist labels on 687 of
the 3,269 test studies) and tiny uncompressed images (32 px by default, as the
DICOM release is uncompressed). Each configuration then runs every asset with
the default policies, one Dagster run per step, each in a fresh process:

    observe -> manifest -> image_shards (10 partitions) -> classifier (14, a few
    steps each) -> multilabel_classifier (with its 5 out-of-fold models) ->
    classifier_metrics -> classifier_predictions -> subgroup_metrics (MIMIC-IV
    demographics from the replica) -> report_pairs -> report_adapter (tiny base)
    -> generated_reports (the whole test split) -> report_metrics (the labeler
    over every reference and generated report)

Configurations: ``default`` (PA, one image per subject: the seeds' policy) and
``frontal`` (PA and AP, every image: about 243k images). The classifiers run
at ``--size`` (32) so that the counts, not the pixels, are what is rehearsed;
the report model reads shards at its base's tile (56 px for the tiny base), as
by default, so ``image_shards`` builds both sizes. What is shortened (``SHORT``)
is printed first: optimizer steps, epochs, the generation cap. Everything else
runs in full: every training image is loaded (resident, as this host chooses) or
indexed (the adapter's pairs, read a batch at a time), every validate and test
image is evaluated, every manifest image predicted. The memory of the
classifiers' data path at 224 px comes from ``bench_training.py --streaming``,
not from here (a 224-px rehearsal would take hours on 2 cores).

Per step it prints wall time, the peak resident memory of the step's process
tree (sampled every 20 ms), the images it read from the shards (or decoded from
the DICOMs) and the rows the step wrote; at the end of each
configuration the Dagster storage size, the MLflow database size and the shard
folder size, and a line ``rehearsal[<config>]: ...``. The last line is
``rehearsal: <images> images, <reports> reports, <secs> s, peak <GB> GB, dagster db <MB> MB``
over both configurations (images and reports of the larger, time summed, peaks
and sizes the larger). A killed rehearsal resumes: finished steps are recorded
in ``<root>/<config>/rehearsal.json`` (``--fresh`` starts over).

    python benchmarks/rehearsal.py [--root DIR] [--config default|frontal|both] [--size 32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

MIMIC_COUNTS = {"patients": 65_379, "studies": 227_835, "images": 377_110}
# MIMIC-CXR's official split: 500 validate and 293 test patients; the radiologist labelled 687 of 3,269 test studies
MIMIC_SPLIT = {"validate_fraction": 500 / 65_379, "test_fraction": 293 / 65_379, "radiologist_fraction": 687 / 3_269}
CONFIGS = {
    "default": {},
    "frontal": {"manifest": {"views": ["PA", "AP"], "one_image_per_subject": False}},
}
# what the rehearsal shortens: a few optimizer steps per model (every image is still loaded, evaluated, predicted)
SHORT = {
    "classifier": {"epochs": 1, "steps_per_epoch": 3},
    "report_adapter": {"max_steps": 3, "batch_size": 4, "accumulation": 1},
    "generated_reports": {"max_new_tokens": 32, "batch_size": 32},
}
GB = 1024**3


def _steps() -> list[tuple[str, str, str | None, str | None]]:
    """(name, job, asset, partition) in dependency order."""
    from cxr_pipeline.data.shard_reader import PARTITIONS
    from cxr_pipeline.labels import SLUGS

    steps = [("observe", "observe_raw", None, None), ("manifest", "manifest_job", None, None)]
    steps += [(f"image_shards[{p}]", "shards_job", None, p) for p in PARTITIONS]
    steps += [(f"classifier[{s}]", "classifier_job", None, s) for s in SLUGS]
    summary = ("multilabel_classifier", "classifier_metrics", "classifier_predictions", "report_hints", "subgroup_metrics")
    steps += [(a, "classifier_summary_job", a, None) for a in summary]
    steps += [(a, "report_job", a, None) for a in ("report_pairs", "report_adapter", "generated_reports", "report_metrics")]
    return steps


def ensure_replica(root: Path, source_rows: int, scale: float = 1.0) -> dict:
    from cxr_pipeline.data.synthetic import SynthConfig, generate

    raw = root / "raw"
    marker = raw / ".rehearsal.json"
    counts = {k: round(v * scale) for k, v in MIMIC_COUNTS.items()}
    want = {**counts, **MIMIC_SPLIT, "source_rows": source_rows}
    if marker.exists() and json.loads(marker.read_text()).get("config") == want:
        return json.loads(marker.read_text())["counts"]
    shutil.rmtree(raw, ignore_errors=True)
    print(f"generating the full-count replica in {raw} (once; about 25 min on 2 cores) ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    cfg = SynthConfig(source_rows=source_rows, jpeg2000_fraction=0.0, workers=os.cpu_count() or 1, **counts, **MIMIC_SPLIT)
    counts = generate(cfg, raw, progress=lambda m: print(f"  synth: {m}", file=sys.stderr, flush=True))
    counts["seconds"] = round(time.perf_counter() - t0)
    marker.write_text(json.dumps({"config": want, "counts": counts}))
    return counts


def _tree_rss(proc) -> int:
    import psutil

    try:
        procs = [proc, *proc.children(recursive=True)]
    except psutil.Error:  # the step has just ended
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run_step(env: dict, job: str, asset: str | None, partition: str | None, log) -> dict:
    """One Dagster run in a fresh interpreter; wall time, peak RSS of its process tree, what it wrote."""
    import psutil

    cmd = [sys.executable, __file__, "--step", json.dumps([job, asset, partition])]
    t0 = time.perf_counter()
    child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    proc, peak, done = psutil.Process(child.pid), 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, _tree_rss(proc))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = child.communicate()
    done.set()
    sampler.join()
    result = json.loads(out.strip().splitlines()[-1]) if out.strip() else {"success": False, "rows": {}}
    return {**result, "seconds": round(time.perf_counter() - t0, 1), "peak_gb": round(peak / GB, 2), "rc": child.returncode}


def _child(spec: str) -> None:
    """``--step``: execute one job (or one asset of it) in this process against DAGSTER_HOME."""
    import dagster as dg

    from cxr_pipeline.definitions import build_defs

    job, asset, partition = json.loads(spec)
    read = _count_shard_reads()
    defs = build_defs()
    result = defs.resolve_job_def(job).execute_in_process(
        instance=dg.DagsterInstance.get(),
        partition_key=partition,
        asset_selection=[dg.AssetKey(asset)] if asset else None,
        raise_on_error=False,
    )
    rows = {}
    for ev in result.get_asset_materialization_events():
        mat = ev.step_materialization_data.materialization
        key = mat.asset_key.to_user_string()
        for name in ("dagster/row_count", "n_train", "train_pairs", "images"):  # tables; training images; adapter pairs; data mode
            if name in mat.metadata:
                rows[key if name == "dagster/row_count" else f"{key}.{name}"] = mat.metadata[name].value
        if "files_decoded" in mat.metadata:
            read["decoded"] += mat.metadata["files_decoded"].value
    from cxr_pipeline.settings import usable_cpus

    print(json.dumps({"success": result.success, "rows": rows, "read": read, "cores": usable_cpus()}))


def _count_shard_reads() -> dict:
    """Count the images this process reads from the shards (every read goes through ``StreamedImages``: a
    resident split is one ``take`` of all its images, a streamed batch one ``take``, an adapter pair one
    ``__getitem__``), so the table can say what a shortened step still read. The benchmark wraps the class
    in its own process; the product carries no counter."""
    from cxr_pipeline.data.shard_reader import StreamedImages

    read = {"shards": 0, "decoded": 0}
    take, getitem = StreamedImages.take, StreamedImages.__getitem__

    def counted_take(self, idx):
        read["shards"] += len(idx)
        return take(self, idx)

    def counted_getitem(self, i):
        if not np.ndim(i):  # a list or array goes through take
            read["shards"] += 1
        return getitem(self, i)

    StreamedImages.take, StreamedImages.__getitem__ = counted_take, counted_getitem
    return read


def _du(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.exists() else 0


def rehearse(root: Path, name: str, size: int, fresh: bool) -> dict:
    from cxr_pipeline.settings import Paths, write_pipeline_config

    home = root / name
    if fresh:
        shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "CXR_HOME": str(home), "DAGSTER_HOME": str(home / "dagster"), "CXR_RAW_DIR": str(root / "raw")}
    env.update({"CXR_EXECUTOR": "in_process", "MLFLOW_DISABLE_TELEMETRY": "true", "HF_HUB_OFFLINE": "1"})
    env.pop("MLFLOW_TRACKING_URI", None)
    (home / "dagster").mkdir(exist_ok=True)
    shutil.copy(Path(__file__).resolve().parent.parent / "dagster.yaml", home / "dagster" / "dagster.yaml")
    os.environ.update({k: env[k] for k in ("CXR_HOME", "CXR_RAW_DIR")})
    p = Paths(home=home, raw=root / "raw")
    config = {**CONFIGS[name], **SHORT}
    config["classifier"] = {**config["classifier"], "size": size}
    write_pipeline_config(p, config, f"benchmarks/rehearsal.py, configuration {name!r}")
    state_file = home / "rehearsal.json"
    done = json.loads(state_file.read_text()) if state_file.exists() else {}
    print(f"\n[{name}] {json.dumps(CONFIGS[name] or 'default policies')}; state in {home}", flush=True)
    print(f"shortened: {json.dumps(SHORT)}; everything else as it ships", flush=True)
    print(f"{'step':34} {'wall s':>8} {'peak GB':>8} {'images read':>12}  rows written", flush=True)
    with open(home / "rehearsal.log", "a") as log:
        for step, job, asset, partition in _steps():
            if done.get(step, {}).get("success"):
                r = done[step]
            else:
                r = run_step(env, job, asset, partition, log)
                done[step] = r
                state_file.write_text(json.dumps(done, indent=1))
            rows = ", ".join(f"{k} {v}" for k, v in r["rows"].items() if v is not None)
            read = r.get("read") or {}
            n_read = f"{read['decoded']} dcm" if read.get("decoded") else str(read.get("shards", ""))
            print(
                f"{step:34} {r['seconds']:8.1f} {r['peak_gb']:8.2f} {n_read:>12}  {rows}{'' if r['success'] else '  FAILED (see rehearsal.log)'}",
                flush=True,
            )
            if not r["success"]:
                raise SystemExit(f"rehearsal[{name}]: {step} failed; the log is {home / 'rehearsal.log'}")
    return _summary(name, home, p, done)


def _summary(name: str, home: Path, p, done: dict) -> dict:
    import polars as pl

    images = pl.scan_parquet(p.manifest).select(pl.len()).collect().item()
    reports = pl.scan_parquet(p.report_pairs).select(pl.len()).collect().item()
    secs = sum(r["seconds"] for r in done.values())
    peak = max(r["peak_gb"] for r in done.values())
    sizes = {"dagster": _du(home / "dagster"), "mlflow": p.mlflow_db.stat().st_size, "shards": _du(p.shards)}
    print(
        f"storage: dagster {sizes['dagster'] / 1e6:.1f} MB, mlflow db {sizes['mlflow'] / 1e6:.1f} MB, "
        f"shards {sizes['shards'] / 1e6:.1f} MB ({images} images, every size)"
    )
    per10k = {k: round(r["seconds"] / images * 1e4, 1) for k, r in done.items()}
    slowest = sorted(per10k.items(), key=lambda kv: -kv[1])[:5]
    print("seconds per 10k manifest images, slowest steps: " + ", ".join(f"{k} {v}" for k, v in slowest))
    print(
        f"rehearsal[{name}]: {images} images, {reports} reports, {secs:.0f} s, peak {peak:.2f} GB, dagster db {sizes['dagster'] / 1e6:.1f} MB",
        flush=True,
    )
    return {"images": images, "reports": reports, "seconds": secs, "peak": peak, "dagster_mb": sizes["dagster"] / 1e6}


def table(root: Path, names: list[str]) -> str:
    """The Deployment page's table, from the finished runs' ``rehearsal.json`` (not copied by hand): per step
    (partitioned steps summed over their runs) wall seconds, peak GB and images read, for each configuration."""
    groups: dict[str, dict[str, dict]] = {}
    images = {}
    for name in names:
        done = json.loads((root / name / "rehearsal.json").read_text())
        images[name] = next((r["rows"]["manifest"] for r in done.values() if "manifest" in r.get("rows", {})), None)
        for step, r in done.items():
            base, runs = step.split("[")[0], step.count("[")
            g = groups.setdefault(base, {}).setdefault(name, {"seconds": 0.0, "peak": 0.0, "read": 0, "dcm": 0, "runs": 0, "cores": set()})
            g["cores"].add(r.get("cores"))
            g["seconds"] += r["seconds"]
            g["peak"] = max(g["peak"], r["peak_gb"])
            g["read"] += (r.get("read") or {}).get("shards", 0)
            g["dcm"] += (r.get("read") or {}).get("decoded", 0)
            g["runs"] += runs
    head = "| step | " + " | ".join(f"{n}: wall s | peak GB | images read" for n in names) + " |"
    out = [head, "|---|" + "---|---|---|" * len(names)]
    for base, by in groups.items():
        runs = max(g["runs"] for g in by.values())
        cells = []
        for n in names:
            g = by.get(n)
            read = "" if g is None else (f"{g['dcm']:,} decoded" if g["dcm"] else f"{g['read']:,}" if g["read"] else "0")
            cores = sorted(c for c in g["cores"] if c) if g else []
            on = f" ({'-'.join(map(str, cores))} cores)" if cores and cores != [1] else ""  # said when not one core
            cells.append("| | " if g is None else f"{g['seconds']:.0f}{on} | {g['peak']:.2f} | {read}")
        out.append(f"| {base}{f' ({runs} runs)' if runs > 1 else ''} | " + " | ".join(cells) + " |")
    totals = []
    for n in names:
        secs = sum(by[n]["seconds"] for by in groups.values() if n in by)
        peak = max(by[n]["peak"] for by in groups.values() if n in by)
        totals.append(f"**{secs:.0f}** | **{peak:.2f}** | {images[n]:,} manifest images")
    out.append("| **total** | " + " | ".join(totals) + " |")
    return "\n".join(out)


def main() -> int:
    from cxr_pipeline.settings import paths

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", default=str(paths().bench("rehearsal")))
    ap.add_argument("--config", choices=[*CONFIGS, "both"], default="both")
    ap.add_argument("--size", type=int, default=32, help="replica image rows and shard size (px)")
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of MIMIC's counts (a quick trial of the script)")
    ap.add_argument("--fresh", action="store_true", help="forget finished steps (the replica is kept)")
    ap.add_argument("--table", action="store_true", help="print the markdown table of the finished configurations and stop")
    ap.add_argument("--step", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.step:
        _child(args.step)
        return 0
    root = Path(args.root).resolve()
    if args.table:
        names = [n for n in (list(CONFIGS) if args.config == "both" else [args.config]) if (root / n / "rehearsal.json").exists()]
        print(table(root, names))
        return 0
    from cxr_pipeline.settings import usable_cpus

    print(
        f"machine: {platform.machine()}, {os.cpu_count()} cores ({usable_cpus()} usable by this run), Python {platform.python_version()}",
        flush=True,
    )
    counts = ensure_replica(root, args.size, args.scale)
    print(f"replica: {counts['patients']} subjects, {counts['studies']} studies, {counts['images']} images in {root / 'raw'}", flush=True)
    names = list(CONFIGS) if args.config == "both" else [args.config]
    results = [rehearse(root, n, args.size, args.fresh) for n in names]
    big = max(results, key=lambda r: r["images"])
    print(
        f"rehearsal: {big['images']} images, {big['reports']} reports, {sum(r['seconds'] for r in results):.0f} s, "
        f"peak {max(r['peak'] for r in results):.2f} GB, dagster db {max(r['dagster_mb'] for r in results):.1f} MB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
