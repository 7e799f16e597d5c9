"""Does Grad-CAM point at the finding? The localization goal of #49, measured through the pipeline's own assets.

For each image size in ``--sizes`` (each in its own state folder, on one replica the demo's way: ``--patients``
patients drawn with ``--seed``, its split and planted subgroup effect, frontal views), the Dagster jobs run as a
user runs them: the manifest, the shards at that size, a per-finding classifier for each goal finding (ResNet-18,
``--epochs``, the demo's recipe otherwise; each registered as champion), then ``localization_metrics``. It prints
each size's Grad-CAM rows beside the mean-box baseline and, last, the goal line:

    localization: size S: Lung Lesion +d [lo, hi], ...; k of 5 findings above the mean box (lower end > 0); ...

The goal (#49): for Lung Lesion, Consolidation, Pneumothorax, Pleural Effusion and Atelectasis the per-finding
champion's pointing rate above the mean box's with the paired patient-bootstrap interval's lower end above 0.

    python benchmarks/bench_localization.py [--sizes 64] [--patients 600] [--epochs 8] [--out /tmp/bench_loc]

The ceiling printed beside each finding is the most any map of Grad-CAM's grid could score in the pointing game
(``vision.localization.grid_ceiling``): the share of test images where a cell centre of the map falls in a box.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

GOAL = ("Lung Lesion", "Consolidation", "Pneumothorax", "Pleural Effusion", "Atelectasis")


def arm(out: Path, raw: Path, size: int, epochs: int) -> dict:
    """One size, in its own CXR_HOME: every job of the path to localization_metrics; returns the goal rows."""
    import dagster as dg
    import polars as pl

    from cxr_pipeline.data.shard_reader import PARTITIONS
    from cxr_pipeline.definitions import build_defs
    from cxr_pipeline.demo import DEMO_RUN_CONFIG
    from cxr_pipeline.labels import slug
    from cxr_pipeline.settings import paths, write_pipeline_config
    from cxr_pipeline.vision.checkpoint import ClassifierSet
    from cxr_pipeline.vision.tables import metrics_table

    p = paths()
    config = {**DEMO_RUN_CONFIG, "classifier": {**DEMO_RUN_CONFIG["classifier"], "size": size, "epochs": epochs}}
    write_pipeline_config(p, {k: v for k, v in config.items() if k in ("manifest", "classifier")}, "bench_localization")
    defs = build_defs()
    t0 = time.perf_counter()
    done = p.localization_metrics.exists()  # a finished arm is read again, not re-trained
    with dg.DagsterInstance.ephemeral() as instance:

        def run(job: str, partition: str | None = None) -> None:
            res = defs.resolve_job_def(job).execute_in_process(instance=instance, partition_key=partition, raise_on_error=False)
            if not res.success:
                raise SystemExit(f"{job} [{partition}] failed at size {size}")

        for job, part in [("manifest_job", None), *(("shards_job", x) for x in PARTITIONS), *(("classifier_job", slug(f)) for f in GOAL)]:
            if not done:
                run(job, part)
        run("localization_job")
    table = pl.read_parquet(p.localization_metrics).filter(pl.col("dataset") == "mimic")
    metrics = metrics_table(ClassifierSet.of(p)).filter((pl.col("model") == "per_pathology") & (pl.col("test_labels") != "radiologist"))
    auc = dict(zip(metrics["pathology"], metrics["roc_auc"], strict=True))
    rows = {}
    for r in table.filter(pl.col("method") == "grad_cam").iter_rows(named=True):
        mean = table.filter((pl.col("method") == "mean_box") & (pl.col("pathology") == r["pathology"])).row(0, named=True)
        rows[r["pathology"]] = {
            "auc": auc.get(r["pathology"]),
            **{k: r[k] for k in ("n_images", "n_patients", "level", "pointing", "pointing_vs_mean_box", "pointing_vs_mean_box_lo")},
            **{k: r[k] for k in ("pointing_vs_mean_box_hi", "iobb_10", "iobb_25", "iobb_50", "cam_grid", "pointing_ceiling")},
            **{k: r[k] for k in ("pointing_vs_box_prior", "pointing_vs_box_prior_lo", "pointing_vs_box_prior_hi")},
            "mean_box_pointing": mean["pointing"],
        }
    return {"size": size, "seconds": round(time.perf_counter() - t0), "rows": rows}


def goal_line(results: list[dict]) -> str:
    parts = []
    for res in results:
        cells, met = [], 0
        for f in GOAL:
            r = res["rows"].get(f)
            if r is None:
                cells.append(f"{f} -")
                continue
            met += r["pointing_vs_mean_box_lo"] is not None and r["pointing_vs_mean_box_lo"] > 0
            lo, hi = r["pointing_vs_mean_box_lo"], r["pointing_vs_mean_box_hi"]
            cells.append(f"{f} {r['pointing_vs_mean_box']:+.2f} [{lo:+.2f}, {hi:+.2f}]" if lo is not None else f"{f} -")
        prior = sum(r["pointing_vs_box_prior_lo"] is not None and r["pointing_vs_box_prior_lo"] > 0 for r in res["rows"].values() if r)
        parts.append(
            f"size {res['size']}: {', '.join(cells)}; {met} of {len(GOAL)} findings above the mean box (lower end > 0),"
            f" {prior} above the box prior"
        )
    return "localization: " + "; ".join(parts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[64])
    ap.add_argument("--patients", type=int, default=600)
    ap.add_argument("--seed", type=int, default=3)
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--out", type=Path, default=Path("/tmp/bench_loc"))
    ap.add_argument("--arm", type=int, help=argparse.SUPPRESS)  # one size, in a child process with its own CXR_HOME
    a = ap.parse_args()
    raw = a.out / "raw"
    if a.arm is not None:
        res = arm(a.out / f"s{a.arm}", raw, a.arm, a.epochs)
        (a.out / f"s{a.arm}.json").write_text(json.dumps(res, indent=1))
        return 0
    from cxr_pipeline.data.synthetic import SynthConfig, generate
    from cxr_pipeline.demo import DEMO_REPLICA, DEMO_SOURCE_ROWS
    from cxr_pipeline.settings import usable_cpus

    if not (raw / ".done").exists():
        generate(SynthConfig(patients=a.patients, seed=a.seed, source_rows=DEMO_SOURCE_ROWS, workers=usable_cpus(), **DEMO_REPLICA), raw)
        (raw / ".done").write_text("")
    results = []
    for size in a.sizes:
        home = a.out / f"s{size}"
        env = {**os.environ, "CXR_HOME": str(home), "CXR_RAW_DIR": str(raw), "DAGSTER_HOME": str(home / "dagster")}
        env.update(HF_HUB_OFFLINE="1", MLFLOW_DISABLE_TELEMETRY="true", CXR_EXECUTOR="in_process")
        (home / "dagster").mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, __file__, "--arm", str(size), "--epochs", str(a.epochs), "--out", str(a.out)]
        subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL, stderr=open(home / "log.txt", "w"))  # noqa: SIM115
        res = json.loads((a.out / f"s{size}.json").read_text())
        results.append(res)
        print(f"\nsize {size} ({res['seconds']} s): pointing game on the test split's boxed images, per-finding champions")
        for f, r in res["rows"].items():
            print(
                f"  {f:17s} AUC {r['auc']:.3f}  n {r['n_images']:3d} ({r['n_patients']} patients)  level {r['level']:.1f}  pointing"
                f" {r['pointing']:.3f} vs mean box {r['mean_box_pointing']:.3f}: {r['pointing_vs_mean_box']:+.3f}"
                f" [{r['pointing_vs_mean_box_lo']:+.3f}, {r['pointing_vs_mean_box_hi']:+.3f}]  IoBB>0.1 {r['iobb_10']:.2f}"
                f" >0.25 {r['iobb_25']:.2f} >0.5 {r['iobb_50']:.2f}  ceiling of a {r['cam_grid']}x{r['cam_grid']} map {r['pointing_ceiling']:.2f}"
                f"  vs box prior {r['pointing_vs_box_prior']:+.3f} [{r['pointing_vs_box_prior_lo']:+.3f}, {r['pointing_vs_box_prior_hi']:+.3f}]"
            )
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    print(f"\nmachine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores; commit {commit}; {time.strftime('%Y-%m-%d')}")
    print(f"replica: {a.patients} patients, seed {a.seed}; epochs {a.epochs}")
    print(goal_line(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
