"""``cxr-pipeline`` subcommands."""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from cxr_pipeline.config import resolved_all, sections
from cxr_pipeline.console import quiet
from cxr_pipeline.data.csvs import DatasetError
from cxr_pipeline.data.dicom import DecodeError, prepare
from cxr_pipeline.data.external import FORMAT_NAMES, NOT_MAPPED, NULL_IS_UNSCORABLE, read_labels, scored_findings
from cxr_pipeline.data.sections import parse_report
from cxr_pipeline.data.shard_reader import write_png
from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.demo import ADAPTER_RECIPES, DEMO_ADAPTER_RECIPE, DEMO_EPOCHS, DEMO_PATIENTS, DEMO_SOURCE_ROWS, demo
from cxr_pipeline.fields import ConfigError
from cxr_pipeline.files import atomic_path, write_parquet
from cxr_pipeline.labels import LABELS
from cxr_pipeline.pacs import PacsError, PacsSettings, serve
from cxr_pipeline.reports.labeler import label_reports
from cxr_pipeline.reports.vlm import read_adapter_card, report_token_budget
from cxr_pipeline.settings import env, paths
from cxr_pipeline.vision.checkpoint import ALIASES, CHAMPION


def _synth(args: argparse.Namespace) -> int:

    try:
        cfg = SynthConfig(
            patients=args.patients,
            seed=args.seed,
            source_rows=args.source_rows,
            fmt=args.format,
            metadata_only=args.metadata_only,
            workers=args.workers,
            effect=args.effect,
        )
    except ValueError as e:
        print(f"synth: {e}", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    counts = generate(cfg, Path(args.out_dir), progress=lambda m: print(f"synth: {m}", file=sys.stderr))
    counts["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(counts))
    return 0


def _external_labels(args: argparse.Namespace) -> int:
    """Read one external label file, print what it holds, write its rejects; the last line is the summary."""

    t0 = time.perf_counter()
    try:
        found = read_labels(args.format, Path(args.file))
    except (DatasetError, FileNotFoundError) as e:
        print(f"external-labels: {e}", file=sys.stderr)
        return 2
    out = args.rejects or paths().home / "external" / f"{args.format}-label-rejects.csv"
    out.parent.mkdir(parents=True, exist_ok=True)
    if out.suffix == ".parquet":
        write_parquet(found.rejects, out)
    else:
        with atomic_path(out) as tmp:
            found.rejects.write_csv(tmp)
    m = found.manifest
    print(f"{FORMAT_NAMES[args.format]} label file {args.file}: {found.records} records in {time.perf_counter() - t0:.1f} s")
    print(f"  views: {', '.join(f'{v}={n}' for v, n in m['view_position'].value_counts(sort=True).iter_rows())}")
    unscored = [lab for lab in LABELS if lab not in scored_findings(args.format)]
    print(f"  not scored in this dataset (null, never negative): {', '.join(unscored) or 'none'}")
    if NOT_MAPPED[args.format]:
        print(f"  its own labels not mapped: {NOT_MAPPED[args.format]}")
    if args.format in NULL_IS_UNSCORABLE:  # CheXpert's blanks are 'not mentioned', read under the model's policy
        print(f"  null (this record cannot be scored for it): {', '.join(f'{k}={v}' for k, v in found.nulls().items())}")
    if found.rejects.height:
        for reason, n in found.rejects.group_by("reason").len().sort("len", descending=True).head(5).iter_rows():
            print(f"  rejected {n}: {reason}")
    print(f"  rejects file: {out}")
    print(found.summary_line())
    return 0


def _demo(args: argparse.Namespace) -> int:

    return demo(args.patients, args.source_rows, args.epochs, args.adapter_recipe)


def _preview(args: argparse.Namespace) -> int:

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


def _predict(args: argparse.Namespace) -> int:
    """Registered classifiers (MLflow registry, by alias) applied to radiograph files."""
    from cxr_pipeline.vision.predict import PredictError, predict_files

    if args.dicom_out or args.send:
        return _predict_dicom(args)

    error = None
    with quiet(paths().home / "logs", "predict"):  # MLflow's and torch's messages go to the log, the answer to the terminal
        try:
            results = predict_files([Path(p) for p in args.images], alias=args.alias, model=args.model, cam_dir=args.cam)
        except (DecodeError, PredictError) as e:
            error = e
    if error is not None:
        print(f"predict: {error}", file=sys.stderr)
        return 2
    for r in results:
        print(r.table())
        for f in r.overlays:
            print(f"  saliency: {f}")
    return 0


def _predict_dicom(args: argparse.Namespace) -> int:
    """--dicom-out / --send: studies in, a TID 1500 SR + a GSPS and an SC per positive call out (vision.pacs_intake)."""
    from cxr_pipeline.vision.pacs_intake import PacsUnavailable, StoreRefused, results_for_files
    from cxr_pipeline.vision.predict import PredictError, Scorer

    error = None
    with quiet(paths().home / "logs", "predict"):
        try:
            studies = results_for_files([Path(p) for p in args.images], Scorer(args.alias, args.model), args.dicom_out, args.send)
        except (PredictError, PacsUnavailable, StoreRefused) as e:
            error = e
    if error is not None:
        print(f"predict: {error}", file=sys.stderr)
        return 2
    for st in studies:
        o = st.outcome
        where = f"study {o.study}" if o.study else str(st.files[0])
        what = f"{o.status}: 1 SR, {o.positives} GSPS, {o.positives} SC" if o.status in ("written", "stored") else o.status
        print(f"{where} ({len(st.files)} files): {what}" + (f"; left out: {o.reason}" if o.reason else ""))
        for f in st.written:
            print(f"  {f}")
    return 0 if any(st.outcome.status in ("written", "stored") for st in studies) else 1


def _generation_budget(p):
    """The generation budget as ``generated_reports`` would work it out now, when its inputs exist."""
    import polars as pl

    if not (p.report_pairs.exists() and (p.adapter / "cxr_adapter.json").exists()):
        return {}
    base = Path(read_adapter_card(p.adapter)["base"])
    texts = pl.read_parquet(p.report_pairs).filter(pl.col("split") == "train")["text"].to_list()
    return {"max_new_tokens": lambda: report_token_budget(base, texts)}


def _config(args: argparse.Namespace) -> int:
    """The resolved configuration each asset would run with now: pipeline.yaml, environment, every auto worked out."""
    import yaml

    p = paths()
    section = {"manifest_rejects": "manifest", "shard_rejects": "image_shards"}.get(args.asset, args.asset)
    if section and section not in sections():
        print(f"config: {args.asset}: no configuration (configured assets: {', '.join(sections())})", file=sys.stderr)
        return 2
    try:
        resolved = resolved_all(p, {"generated_reports": _generation_budget(p)})
    except ConfigError as e:
        print(f"config: {e}", file=sys.stderr)
        return 2
    shown = {section: resolved[section]} if section else resolved
    print(f"# resolved from {p.pipeline_config}{'' if p.pipeline_config.exists() else ' (absent: defaults)'} and the environment")
    print(yaml.safe_dump(shown, sort_keys=False, width=120), end="")
    return 0


def _pacs(a: argparse.Namespace) -> int:
    """``make pacs``: the local Orthanc in the foreground (``pacs.serve``)."""
    try:
        password = env("CXR_PACS_PASSWORD") if a.network else ""
        if a.network and not password:
            raise PacsError("--network needs a password in CXR_PACS_PASSWORD (HTTP basic authentication for user cxr)")
        return serve(paths().home / "pacs", PacsSettings(a.http_port, a.dicom_port, stable_age=a.stable_age, password=password))
    except PacsError as e:
        print(f"pacs: {e}", file=sys.stderr)
        return 2


def _pacs_rescore(a: argparse.Namespace) -> int:
    """Every study in the PACS scored by the current champions where they have not scored it yet."""
    from cxr_pipeline.vision.pacs_intake import PacsUnavailable, ledger_path, rescore, summary
    from cxr_pipeline.vision.predict import PredictError, Scorer

    error = None
    with quiet(paths().home / "logs", "pacs-rescore"):
        try:
            outcomes = rescore(a.url, Scorer(a.alias))
        except (PredictError, PacsUnavailable) as e:
            error = e
    if error is not None:
        print(f"pacs-rescore: {error}", file=sys.stderr)
        return 2
    counts = summary(outcomes)
    print(
        f"pacs-rescore: {counts['studies']} studies: {counts['stored']} scored and stored, {counts['already_stored']} already scored by "
        f"these versions, {counts['no_frontal_chest_image']} without a frontal chest image, {counts['failed']} failed "
        f"(ledger: {ledger_path()})"
    )
    return 1 if counts["failed"] else 0


def parser() -> argparse.ArgumentParser:
    """The command line (its reference page, ``docs/reference/cli.md``, is generated from this)."""
    ap = argparse.ArgumentParser(prog="cxr-pipeline", description="MIMIC-CXR pipeline on Dagster and MLflow")
    sub = ap.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("synth", help="generate a MIMIC-CXR replica (real layout, CSVs, DICOMs, reports)")
    s.add_argument("out_dir")
    s.add_argument("--patients", type=int, default=200)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--source-rows", type=int, default=384, help="image rows in pixels (columns are 83-100%% of it)")
    s.add_argument("--format", choices=["dicom", "jpg"], default="dicom", help="jpg: the MIMIC-CXR-JPG variant")
    s.add_argument("--metadata-only", action="store_true", help="CSVs and reports only (scale tests)")
    s.add_argument("--workers", type=int, default=1)
    s.add_argument(
        "--effect", default="", help="plant a subgroup effect for the audit, e.g. Cardiomegaly:sex=F:0.3 (that finding at 0.3x strength)"
    )
    s.set_defaults(fn=_synth)

    d = sub.add_parser("demo", help="generate the demo replica (unless CXR_RAW_DIR is set) and run the whole graph")
    d.add_argument("--patients", type=int, default=DEMO_PATIENTS)
    d.add_argument("--source-rows", type=int, default=DEMO_SOURCE_ROWS, help="the replica's image rows in pixels")
    d.add_argument("--epochs", type=int, default=DEMO_EPOCHS, help="classifier epochs")
    d.add_argument(
        "--adapter-recipe",
        choices=ADAPTER_RECIPES,
        default=DEMO_ADAPTER_RECIPE,
        help="the report adapter's recipe: demo (benchmarks/recipes/demo.yaml, chosen on validate within 120 s), or learning"
        " (benchmarks/recipes/learning.yaml, the learning check's: about 5 minutes more here, an estimate), or short"
        " (benchmarks/recipes/short.yaml: an 80-step pipeline check)",
    )
    d.set_defaults(fn=_demo)

    v = sub.add_parser("preview", help="write one DICOM/JPG as a PNG exactly as the shard builder stores it")
    v.add_argument("input")
    v.add_argument("output")
    v.add_argument("--size", type=int, default=224)
    v.set_defaults(fn=_preview)

    ex = sub.add_parser(
        "external-labels",
        help="read an external label file (CheXpert, NIH ChestX-ray14, PadChest) as the external validation does; print its counts",
        description="Every record is kept or rejected (with its record number and reason, into the rejects file); the findings "
        "are harmonised to the 14 CheXpert names (the reference's external-validation table). The last line: "
        "'external-labels: <format>: <N> images, <P> patients, <R> rejected; positives: <Finding>=<n>, ...' (definite positives).",
    )
    ex.add_argument("file", help="the label file as released (.csv or .csv.gz)")
    ex.add_argument("--format", choices=["chexpert", "nih", "padchest"], required=True)
    ex.add_argument(
        "--rejects", type=Path, help="where the rejects go (.csv or .parquet; default $CXR_HOME/external/<format>-label-rejects.csv)"
    )
    ex.set_defaults(fn=_external_labels)

    lr = sub.add_parser("label-reports", help="CheXpert-style labels for a folder of MIMIC .txt reports or a CSV study_id,text")
    lr.add_argument("input")
    lr.add_argument("output")
    lr.set_defaults(fn=_label_reports)

    pr = sub.add_parser(
        "predict",
        help="apply the registered classifiers to DICOM/JPG/PNG files (decoded as the shards are); print a table per image",
        description="Loads cxr-<finding>@ALIAS (or cxr-multilabel@ALIAS) from the MLflow registry at MLFLOW_TRACKING_URI "
        "(default: the pipeline's own store under CXR_HOME). Nothing is downloaded.",
    )
    pr.add_argument("images", nargs="+", help="image files; with --dicom-out/--send also folders of DICOM files")
    pr.add_argument("--alias", default=CHAMPION, help=f"registry alias to load ({', '.join(ALIASES)}, ...)")
    pr.add_argument("--model", choices=["per-pathology", "multilabel"], default="per-pathology")
    pr.add_argument("--cam", metavar="OUT_DIR", type=Path, help="write a Grad-CAM overlay PNG per positive finding here")
    pr.add_argument(
        "--dicom-out",
        metavar="OUT_DIR",
        type=Path,
        help="DICOM files or folders, grouped into studies: write per study a TID 1500 SR, and a GSPS and a Secondary Capture "
        "per positive call, under OUT_DIR/<study hash>/ (one frontal chest image per study is scored)",
    )
    pr.add_argument(
        "--send", metavar="URL", help="store those objects by STOW-RS at this DICOMweb URL (e.g. http://127.0.0.1:8042/dicom-web)"
    )
    pr.set_defaults(fn=_predict)

    pa = sub.add_parser(
        "pacs",
        help="run a local PACS (Orthanc with DICOMweb, Debian's orthanc and orthanc-dicomweb) on 127.0.0.1 until interrupted",
        description="State under $CXR_HOME/pacs. HTTP and DICOMweb answer this machine only; C-STORE is accepted from the "
        "calling AE title CXR_SCU on 127.0.0.1. A study is stable (whole) when nothing has arrived for --stable-age seconds.",
    )
    pa.add_argument("--http-port", type=int, default=8042)
    pa.add_argument("--dicom-port", type=int, default=4242)
    pa.add_argument("--stable-age", type=int, default=60, help="seconds without a new instance before a study counts as whole")
    pa.add_argument(
        "--network",
        action="store_true",
        help="answer other hosts too (the Compose service): HTTP basic authentication, user cxr, password from CXR_PACS_PASSWORD; "
        "C-STORE from AE CXR_SCU on any host",
    )
    pa.set_defaults(fn=_pacs)

    rs = sub.add_parser(
        "pacs-rescore",
        help="score every study in the PACS with the current champions where they have not scored it yet (after a promotion)",
        description="Stores a new SR (and GSPS, SC) beside the old champions' in each study; a study these versions already "
        "scored is left alone. Outcomes are appended to $CXR_HOME/pacs/intake.csv.",
    )
    rs.add_argument("--url", default="http://127.0.0.1:8042", help="the Orthanc (REST and DICOMweb) to read and store into")
    rs.add_argument("--alias", default=CHAMPION)
    rs.set_defaults(fn=_pacs_rescore)

    c = sub.add_parser(
        "config",
        help="print the resolved configuration each asset would run with now (pipeline.yaml + environment, every auto worked out)",
    )
    c.add_argument("asset", nargs="?", default="", help="one asset (default: every configured asset)")
    c.set_defaults(fn=_config)
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
