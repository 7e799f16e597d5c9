"""``cxr-pipeline`` subcommands."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path

from cxr_pipeline.settings import paths

DEMO_PATIENTS = 300
# A larger test split than MIMIC's (0.5% of patients) so rare findings have test positives.
DEMO_SPLIT = {"validate_fraction": 0.15, "test_fraction": 0.2}
DEMO_IMAGE_SIZE = 256
# The demo's run config: frontal views, every image (not one per subject), small
# shards and few epochs so that all 14 classifiers train on a 2-core CPU in minutes.
DEMO_SHARD_SIZE = 64
DEMO_RUN_CONFIG = {
    "manifest": {"views": ["PA", "AP"], "one_image_per_subject": False},
    "image_shards": {"size": DEMO_SHARD_SIZE},
    "classifier": {"size": DEMO_SHARD_SIZE, "epochs": 4, "blank": "zeros", "bootstrap": 300},
    # the tiny offline Mllama: a short QLoRA run, greedy decoding of short reports
    "report_adapter": {"size": DEMO_SHARD_SIZE, "max_steps": 80, "batch_size": 4, "accumulation": 1, "lr": 5e-3, "warmup_steps": 5},
    "generated_reports": {"max_new_tokens": 48, "batch_size": 16},
}


def _synth(args: argparse.Namespace) -> int:
    from cxr_pipeline.data.synthetic import SynthConfig, generate

    cfg = SynthConfig(
        patients=args.patients,
        seed=args.seed,
        image_size=args.image_size,
        fmt=args.format,
        metadata_only=args.metadata_only,
        workers=args.workers,
    )
    t0 = time.perf_counter()
    counts = generate(cfg, Path(args.out_dir), progress=lambda m: print(f"synth: {m}", file=sys.stderr))
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(counts))
    return 0


def _ensure_dagster_home() -> Path:
    home = Path(os.environ.get("DAGSTER_HOME") or paths().dagster_home)
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    target = home / "dagster.yaml"
    if not target.exists():
        src = Path(__file__).resolve().parent.parent / "dagster.yaml"
        if src.exists():
            shutil.copy(src, target)
    return home


def ensure_demo_replica(patients: int = DEMO_PATIENTS, image_size: int = DEMO_IMAGE_SIZE, workers: int | None = None) -> Path:
    """Generate the demo replica under CXR_HOME/raw once (a marker records it finished)."""
    from cxr_pipeline.data.synthetic import SynthConfig, generate

    p = paths()
    marker = p.raw / ".replica.json"
    cfg = SynthConfig(patients=patients, image_size=image_size, workers=workers or max(1, os.cpu_count() or 1), **DEMO_SPLIT)
    want = {"patients": cfg.patients, "seed": cfg.seed, "image_size": cfg.image_size, "fmt": cfg.fmt, **DEMO_SPLIT}
    if marker.exists() and json.loads(marker.read_text()).get("config") == want:
        return p.raw
    print(f"demo: generating a {patients}-patient MIMIC-CXR replica in {p.raw} ...", file=sys.stderr)
    counts = generate(cfg, p.raw, progress=lambda m: print(f"synth: {m}", file=sys.stderr))
    marker.write_text(json.dumps({"config": want, "counts": counts}))
    return p.raw


def _demo(args: argparse.Namespace) -> int:
    import dagster as dg
    import polars as pl

    t0 = time.perf_counter()
    p = paths()
    if os.environ.get("CXR_RAW_DIR") is None:
        ensure_demo_replica(args.patients, args.image_size)
    _ensure_dagster_home()
    from cxr_pipeline.definitions import build_defs

    defs = build_defs()
    instance = dg.DagsterInstance.get()
    quiet = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}

    def run(job: str, partition: str | None = None) -> bool:
        print(f"demo: running {job}{f' [{partition}]' if partition else ''} ...", file=sys.stderr)
        job_def = defs.resolve_job_def(job)
        demo_config = {**DEMO_RUN_CONFIG, "classifier": {**DEMO_RUN_CONFIG["classifier"], "epochs": args.epochs}}
        ops = {op: {"config": c} for op, c in demo_config.items() if op in {n.name for n in job_def.graph.node_defs}}
        result = job_def.execute_in_process(
            instance=instance, run_config={**quiet, "ops": ops}, partition_key=partition, raise_on_error=False
        )
        if not result.success:
            print(f"demo: {job} failed; see the run in the Dagster UI (make ui)", file=sys.stderr)
        return result.success

    if not (run("observe_raw") and run("manifest_job")):
        return 1
    from cxr_pipeline.data.shards import partition_column

    manifest_file = p.assets / "manifest" / "manifest.parquet"
    parts = sorted(pl.read_parquet(manifest_file, columns=["path"]).select(partition_column().unique())["path"])
    for part in parts:
        if not run("shards_job", part):
            return 1
    from cxr_pipeline.labels import SLUGS

    for label_slug in SLUGS:
        if not run("classifier_job", label_slug):
            return 1
    if not run("classifier_summary_job"):
        return 1
    if not run("report_job"):
        return 1

    m = pl.read_parquet(p.assets / "manifest" / "manifest.parquet")
    rej = pl.read_parquet(p.assets / "manifest" / "manifest_rejects.parquet")
    print()
    print(
        f"manifest: {m.height} images ({', '.join(f'{s} {n}' for s, n in m.group_by('split').len().sort('split').iter_rows())}); {rej.height} rejected rows"
    )
    print(f"  {p.assets / 'manifest' / 'manifest.parquet'}")
    shard_dirs = sorted((p.assets / "shards").glob("s*/p*/index.parquet"))
    n_shard = sum(pl.read_parquet(f).height for f in shard_dirs)
    n_srej = sum(pl.read_parquet(f.parent / "rejects.parquet").height for f in shard_dirs if (f.parent / "rejects.parquet").exists())
    print(
        f"shards:   {n_shard} images in {len(shard_dirs)} partitions ({n_srej} rejected); contact sheets: {p.assets / 'shards'}/s*/p*/contact_sheet.png"
    )
    metrics = pl.read_parquet(p.assets / "classifier" / "classifier_metrics.parquet")
    print("\nclassifiers (test split, threshold chosen on validation; 95% bootstrap CI; seeds' AUC for comparison):")
    ci = pl.when(pl.col("roc_auc_lo").is_not_null()).then(pl.format("{}-{}", pl.col("roc_auc_lo").round(2), pl.col("roc_auc_hi").round(2)))
    table = metrics.select(
        "pathology",
        "n_pos",
        "n_neg",
        pl.col("roc_auc").round(3).alias("auc"),
        ci.alias("auc 95% CI"),
        pl.col("average_precision").round(3).alias("AP"),
        pl.col("f1").round(3).alias("F1"),
        pl.col("accuracy").round(3).alias("acc"),
        pl.col("seed_auc").alias("seeds' auc"),
        pl.col("reason").str.slice(0, 40).alias("note"),
    )
    with pl.Config(
        tbl_rows=20, tbl_width_chars=200, tbl_cols=20, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, fmt_str_lengths=40
    ):
        print(table)
    print(f"  {p.assets / 'classifier'}  (checkpoints, metrics, roc_pr_all.png)")
    rm = pl.read_parquet(p.assets / "reports" / "report_metrics.parquet")
    print("\nreport generation (test split; the adapter is a tiny random Mllama fine-tuned for seconds: a pipeline check, not a model):")
    keep = [
        c
        for c in ("system", "BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "ce_micro14_f1", "ce_macro14_f1", "ce_micro5_f1")
        if c in rm.columns
    ]
    with pl.Config(tbl_width_chars=200, tbl_cols=20, tbl_hide_dataframe_shape=True, tbl_hide_column_data_types=True, float_precision=3):
        print(rm.select(keep))
    print(f"  {p.assets / 'reports'}  (report_pairs, adapter/, generated_reports.parquet, report_metrics.parquet)")
    print(f"dataset:  {p.raw}")
    print(f"state:    {p.home}  (Dagster home {os.environ['DAGSTER_HOME']}, MLflow {p.tracking_uri})")
    print("look:     make ui         -> Dagster UI  http://127.0.0.1:3000 (asset graph, runs, checks)")
    print("          make mlflow-ui  -> MLflow UI   http://127.0.0.1:5000 (experiment cxr_pipeline)")
    print(f"demo: done in {time.perf_counter() - t0:.0f} s")
    return 0


def _preview(args: argparse.Namespace) -> int:
    from cxr_pipeline.data.dicom import DecodeError, prepare
    from cxr_pipeline.data.shards import write_png

    try:
        img = prepare(args.input, args.size, name=args.input)
    except DecodeError as e:
        print(f"preview: {e}", file=sys.stderr)
        return 2
    write_png(img, Path(args.output))
    print(f"{args.output}: {args.size}x{args.size}, exactly as the shard builder stores it")
    return 0


def _label_reports(args: argparse.Namespace) -> int:
    """MIMIC-style .txt reports (a folder) or a CSV (study_id,text) -> MIMIC chexpert-layout CSV."""
    import csv
    import re

    from cxr_pipeline.data.io import atomic_path
    from cxr_pipeline.data.sections import parse_report
    from cxr_pipeline.labels import LABELS
    from cxr_pipeline.reports.labeler import label_reports

    src = Path(args.input)
    rows: list[tuple[str, str, str | None]] = []
    if src.is_dir():
        for f in sorted(src.rglob("*.txt")):
            m = re.search(r"p(\d{8})/s(\d+)\.txt$", f.as_posix())
            sec = parse_report(f.read_text(errors="replace"))
            # MIMIC's labels come from the impression, else findings, else the last paragraph
            rows.append(
                (m.group(1) if m else "", m.group(2) if m else f.stem.lstrip("s"), sec.impression or sec.findings or sec.last_paragraph)
            )
    elif src.is_file():
        with open(src, newline="") as fh:
            reader = csv.DictReader(fh)
            if not reader.fieldnames or not {"study_id", "text"} <= set(reader.fieldnames):
                print(f"label-reports: {src}: needs columns study_id,text (has: {', '.join(reader.fieldnames or [])})", file=sys.stderr)
                return 2
            rows = [(r.get("subject_id", "") or "", r["study_id"], r["text"]) for r in reader]
    else:
        print(f"label-reports: {src}: no such file or folder", file=sys.stderr)
        return 2
    labels, n_bad = label_reports([t for *_ids, t in rows])
    with atomic_path(Path(args.output)) as tmp, open(tmp, "w", newline="") as fh:
        w = csv.writer(fh, lineterminator="\n")
        w.writerow(["subject_id", "study_id", *LABELS])
        for (sub, stu, _t), lab in zip(rows, labels, strict=True):
            w.writerow([sub, stu, *("" if lab[x] is None else f"{lab[x]:.1f}" for x in LABELS)])
    print(f"{args.output}: {len(rows)} reports labelled ({n_bad} empty or malformed, left blank)")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="cxr-pipeline", description="MIMIC-CXR pipeline on Dagster and MLflow")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="generate a MIMIC-CXR replica (real layout, CSVs, DICOMs, reports)")
    s.add_argument("out_dir")
    s.add_argument("--patients", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--image-size", type=int, default=384, help="image rows in pixels (columns are 83-100%% of it)")
    s.add_argument("--format", choices=["dicom", "jpg"], default="dicom", help="jpg: the MIMIC-CXR-JPG variant")
    s.add_argument("--metadata-only", action="store_true", help="CSVs and reports only (scale tests)")
    s.add_argument("--workers", type=int, default=1)
    s.set_defaults(fn=_synth)

    d = sub.add_parser("demo", help="generate the demo replica (unless CXR_RAW_DIR is set) and run the whole graph")
    d.add_argument("--patients", type=int, default=DEMO_PATIENTS)
    d.add_argument("--image-size", type=int, default=DEMO_IMAGE_SIZE)
    d.add_argument("--epochs", type=int, default=DEMO_RUN_CONFIG["classifier"]["epochs"], help="classifier epochs")
    d.set_defaults(fn=_demo)

    v = sub.add_parser("preview", help="write one DICOM/JPG as a PNG exactly as the shard builder stores it")
    v.add_argument("input")
    v.add_argument("output")
    v.add_argument("--size", type=int, default=224)
    v.set_defaults(fn=_preview)

    lr = sub.add_parser("label-reports", help="CheXpert-style labels for a folder of MIMIC .txt reports or a CSV study_id,text")
    lr.add_argument("input")
    lr.add_argument("output")
    lr.set_defaults(fn=_label_reports)

    args = ap.parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
