"""``make demo``: a replica, then every asset in order through Dagster, then a summary.

The sequence is the one a user would click in the UI (observe, manifest, each
shard partition, each classifier, the summaries, the report branch), executed in
this process against the Dagster instance in ``DAGSTER_HOME``, so ``make ui``
afterwards shows the same runs.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path

import polars as pl

from cxr_pipeline.console import quiet, time_table
from cxr_pipeline.data.external import FORMATS
from cxr_pipeline.data.replica_external import DEMO_SHIFTS, EXPORT_VERSION, ExternalReplica, generate_external
from cxr_pipeline.data.shard_reader import PARTITIONS
from cxr_pipeline.data.synthetic import SynthConfig, generate, planted_effect
from cxr_pipeline.labels import SLUGS, slug
from cxr_pipeline.reports.metrics import HEADLINE
from cxr_pipeline.reports.tiny_base import TINY_MARKER
from cxr_pipeline.settings import Paths, env, paths, usable_cpus, write_pipeline_config
from cxr_pipeline.vision.localization import MIN_PATIENTS, summary
from cxr_pipeline.vision.subgroups import gap_tests, largest_gaps, publishable

DEMO_PATIENTS = 300
# A larger test split than MIMIC's (0.5% of patients) so rare findings have test positives.
DEMO_SPLIT = {"validate_fraction": 0.15, "test_fraction": 0.2}
# A planted subgroup effect for the audit (subgroup_metrics) to find: cardiomegaly drawn at 0.3x its strength
# in female patients' images. The replica's other findings are drawn alike in every group (no gap to find).
DEMO_EFFECT = "Cardiomegaly:sex=F:0.3"
DEMO_REPLICA = {**DEMO_SPLIT, "effect": DEMO_EFFECT}
DEMO_SOURCE_ROWS = 256  # the replica's radiographs (rows, px); the shards are DEMO_SHARD_SIZE
# The demo's run config: frontal views, every image (not one per subject), small
# shards and few epochs so that all 14 classifiers train on a 2-core CPU in minutes.
DEMO_SHARD_SIZE = 64
DEMO_EPOCHS = 4
DEMO_RUN_CONFIG = {
    "manifest": {"views": ["PA", "AP"], "one_image_per_subject": False},
    # image_shards builds every size a consumer reads: here both read DEMO_SHARD_SIZE, so one size
    "classifier": {"size": DEMO_SHARD_SIZE, "epochs": DEMO_EPOCHS, "blank": "zeros", "bootstrap": 300},
    # every champion (14 per-finding, the multi-label's 14 outputs) on each external replica: fewer resamples than
    # the default 1,000, as for the classifiers, so the three sets take about a minute each on 2 cores
    "external_validation": {"bootstrap": 100},
    # the report adapter's recipe is read from benchmarks/recipes/<recipe>.yaml (demo_config); greedy decoding
    "generated_reports": {"max_new_tokens": 48, "batch_size": 16},
}
# The report adapter's recipe, a pipeline.yaml under benchmarks/recipes/ whose report_adapter section the demo runs
# at its shard size: "demo" (the default), chosen among recipes/candidates/demo.yaml on the validate split of a
# demo-sized replica drawn with another seed, the classifiers' findings in the prompt, at most DEMO_ADAPTER_BUDGET_S
# of base building and training (benchmarks/bench_demo_adapter.py; test_config re-runs the choice on the recorded
# scores); or "learning", the recipe bench_vlm.py --learning checks (instruction-only prompt, 1,000 steps of a 4x
# wider, vision-pretrained base: about 5 minutes more here, an estimate from the learning check's 270 s adapters).
ADAPTER_RECIPES = ("demo", "learning", "short")  # short: a pipeline check (recipes/short.yaml)
DEMO_ADAPTER_RECIPE = "demo"
DEMO_ADAPTER_BUDGET_S = 120
RECIPES = Path(__file__).resolve().parent.parent / "benchmarks" / "recipes"
TABLE_STYLE = {"tbl_width_chars": 200, "tbl_cols": 20, "tbl_hide_dataframe_shape": True, "tbl_hide_column_data_types": True}


log = logging.getLogger("cxr_pipeline.demo")


def say(message: str) -> None:
    print(f"demo: {message}", file=sys.stderr)


def ensure_dagster_home() -> Path:
    """``DAGSTER_HOME`` (default ``$CXR_HOME/dagster``) with the project's ``dagster.yaml`` in it."""
    home = paths().dagster_home  # DAGSTER_HOME, else $CXR_HOME/dagster
    home.mkdir(parents=True, exist_ok=True)
    os.environ["DAGSTER_HOME"] = str(home)
    target = home / "dagster.yaml"
    if not target.exists():
        src = Path(__file__).resolve().parent.parent / "dagster.yaml"
        if src.exists():
            shutil.copy(src, target)
    return home


def ensure_demo_replica(patients: int = DEMO_PATIENTS, source_rows: int = DEMO_SOURCE_ROWS, workers: int | None = None) -> Path:
    """Generate the demo replica under CXR_HOME/raw once (a marker records it finished)."""

    p = paths()
    marker = p.raw / ".replica.json"
    cfg = SynthConfig(patients=patients, source_rows=source_rows, workers=workers or usable_cpus(), **DEMO_REPLICA)
    want = {"patients": cfg.patients, "seed": cfg.seed, "source_rows": cfg.source_rows, "fmt": cfg.fmt, **DEMO_REPLICA}
    if marker.exists() and json.loads(marker.read_text()).get("config") == want:
        return p.raw
    say(f"generating a {patients}-patient MIMIC-CXR replica in {p.raw} ...")
    counts = generate(cfg, p.raw, progress=lambda m: print(f"synth: {m}", file=sys.stderr))
    marker.write_text(json.dumps({"config": want, "counts": counts}))
    return p.raw


def ensure_external_replicas(patients: int, source_rows: int = DEMO_SOURCE_ROWS) -> dict[str, Path]:
    """Replicas of CheXpert, NIH ChestX-ray14 and PadChest under ``$CXR_HOME/external`` (where the external
    validation looks by default), each with its own equipment shift (``replica_external.DEMO_SHIFTS``); once."""

    out = {}
    for fmt in FORMATS:
        cfg = ExternalReplica(fmt, patients=patients, source_rows=source_rows, **DEMO_SHIFTS[fmt])
        folder = out[fmt] = paths().external / fmt
        marker = folder / ".replica.json"
        want = {**dataclasses.asdict(cfg), "export": EXPORT_VERSION}  # a replica written the old way is made again
        if marker.exists() and json.loads(marker.read_text()).get("config") == want:
            continue
        shutil.rmtree(folder, ignore_errors=True)
        counts = generate_external(cfg, folder)
        marker.write_text(json.dumps({"config": want, "counts": counts}))
    return out


def demo_config(epochs: int = DEMO_EPOCHS, adapter_recipe: str = DEMO_ADAPTER_RECIPE) -> dict[str, dict]:
    """The demo's ``pipeline.yaml``: ``DEMO_RUN_CONFIG`` with its epochs and the adapter recipe chosen."""
    import yaml

    if adapter_recipe not in ADAPTER_RECIPES:
        raise ValueError(f"adapter recipe must be one of {ADAPTER_RECIPES}, not {adapter_recipe!r}")
    config = {**DEMO_RUN_CONFIG, "classifier": {**DEMO_RUN_CONFIG["classifier"], "epochs": epochs}}
    recipe = yaml.safe_load((RECIPES / f"{adapter_recipe}.yaml").read_text())["report_adapter"]
    config["report_adapter"] = {**recipe, "size": DEMO_SHARD_SIZE}
    return config


def write_demo_config(epochs: int = DEMO_EPOCHS, adapter_recipe: str = DEMO_ADAPTER_RECIPE) -> Path:
    """The demo's choices as ``$CXR_HOME/pipeline.yaml``: every later run (``make ui``, automation) continues them."""
    config = demo_config(epochs, adapter_recipe)
    note = (
        "Written by `make demo` (cxr_pipeline.demo). Every run without its own run config reads this file when it starts:\n"
        "automation, schedules, Materialize in the UI, the CLI. A run config given in the launchpad overrides it for one run.\n"
        "Edit it to change the policy; then materialize the asset whose section you changed (see README, Configuration)."
    )
    return write_pipeline_config(paths(), config, note)


class _Runner:
    """Executes the project's jobs in this process; their config comes from ``pipeline.yaml``."""

    def __init__(self):
        import dagster as dg

        from cxr_pipeline.definitions import build_defs

        self.defs = build_defs()
        self.instance = dg.DagsterInstance.get()

    def __call__(self, job: str, partition: str | None = None) -> bool:
        log.info(f"running {job}{f' [{partition}]' if partition else ''}")
        run_config = {"loggers": {"console": {"config": {"log_level": "INFO"}}}}
        result = self.defs.resolve_job_def(job).execute_in_process(
            instance=self.instance, run_config=run_config, partition_key=partition, raise_on_error=False
        )
        if not result.success:
            say(f"{job}{f' [{partition}]' if partition else ''} failed; see the run in the Dagster UI (make ui)")
        return result.success


def run_all(console=None) -> bool:
    """Every asset, in dependency order, under ``pipeline.yaml``; stops at the first failure.

    The raw source is observed first, so automation (``make ui``) later sees the data
    as already handled and starts nothing until it changes. ``console``: one progress
    line or bar per stage group (``console.Console``); without it, stages are logged.
    """

    run = _Runner()
    stages = [
        ("observe+manifest", [("observe_raw", None), ("manifest_job", None)]),
        # all ten partitions, empty ones too: a partition left missing would be built by automation later
        ("image shards", [("shards_job", p) for p in PARTITIONS]),
        ("classifiers", [("classifier_job", s) for s in SLUGS]),
        ("multi-label+audit", [("classifier_summary_job", None)]),
        ("external sets", [("external_job", fmt) for fmt in FORMATS]),
        ("localization", [("localization_job", None)]),
        ("report branch", [("report_job", None)]),
    ]
    for name, steps in stages:
        stage = console.stage(name, len(steps) if len(steps) > 1 else None) if console else contextlib.nullcontext(lambda: None)
        with stage as advance:
            for job, part in steps:
                if not run(job, part):
                    return False
                advance()
    return True


def adapter_note(p: Paths, adapter_recipe: str) -> str:
    """What the demo's adapter is and did, read from its run: the recipe file, the steps and seconds its training took
    (the adapter's card) and its base's build (the tiny base's marker) against the demo's budget, and whether it
    reached the template: the paired patient interval of adapter minus template CE micro-F1 (report_differences)."""
    card = json.loads((p.adapter / "cxr_adapter.json").read_text()) if (p.adapter / "cxr_adapter.json").exists() else {}
    marker = Path(card.get("base", "")) / TINY_MARKER
    built = json.loads(marker.read_text()).get("build_seconds") if card.get("base") and marker.exists() else None
    trained = card.get("train_seconds")
    spent = f"{card.get('steps', '?')} steps in {trained if trained is not None else '?'} s of training" + (
        f", its base built in {built} s (once per training split)" if built is not None else ""
    )
    note = f"benchmarks/recipes/{adapter_recipe}.yaml, {spent}"
    if adapter_recipe == "demo" and trained is not None:
        fits = "within" if trained + (built or 0) <= DEMO_ADAPTER_BUDGET_S else "OVER"
        note += f" ({fits} the {DEMO_ADAPTER_BUDGET_S} s budget for both; the recipe's choice: recipes/candidates/demo-validate.json)"
    d = pl.read_parquet(p.report_differences) if p.report_differences.exists() else pl.DataFrame()
    d = d.filter((pl.col("a") == "adapter") & (pl.col("b") == "template") & (pl.col("metric") == "ce_micro14_f1")) if d.height else d
    if d.height and d["lo"][0] is not None:
        r = d.row(0, named=True)
        verdict = (
            "at least the template's (lower end >= -0.02)" if r["lo"] >= -0.02 else "not shown to reach the template's (lower end < -0.02)"
        )
        note += f"; adapter - template CE micro-F1 {r['difference']:+.3f} [{r['lo']:+.3f}, {r['hi']:+.3f}]: {verdict}"
    return note


def classifier_table(metrics: pl.DataFrame) -> pl.DataFrame:
    """One row per finding: each model's AUC [CI] on both test label sources side by side, positives, the seeds' AUC."""
    if "model" not in metrics.columns:
        metrics = metrics.with_columns(pl.lit("per_pathology").alias("model"))
    cell = (
        pl.when(pl.col("roc_auc").is_null())
        .then(pl.lit("-"))
        .when(pl.col("roc_auc_lo").is_null())
        .then(pl.format("{}", pl.col("roc_auc").round(3)))
        .otherwise(pl.format("{} [{}-{}]", pl.col("roc_auc").round(3), pl.col("roc_auc_lo").round(2), pl.col("roc_auc_hi").round(2)))
    )
    source = pl.when(pl.col("test_labels") == "radiologist").then(pl.lit("rad")).otherwise(pl.lit("auto"))
    model = pl.when(pl.col("model") == "multilabel").then(pl.lit("multi-label")).otherwise(pl.lit("per-finding"))
    long = metrics.select(
        "pathology", "reference_auc", (model + " " + source).alias("column"), cell.alias("auc"), "n_pos", source.alias("src")
    )
    wide = long.pivot(on="column", index="pathology", values="auc", aggregate_function="first")
    pos = long.filter(pl.col("column").str.starts_with("per-finding")).pivot(
        on="src", index="pathology", values="n_pos", aggregate_function="first"
    )
    pos = pos.select(
        "pathology", pl.format("{}/{}", *(pl.col(c) if c in pos.columns else pl.lit("-") for c in ("auto", "rad"))).alias("n_pos auto/rad")
    )
    seeds = long.group_by("pathology", maintain_order=True).agg(pl.col("reference_auc").first().alias("seeds' auc"))
    cols = [c for c in ("per-finding auto", "per-finding rad", "multi-label auto", "multi-label rad") if c in wide.columns]
    out = wide.select("pathology", *cols).join(pos, on="pathology", how="left").join(seeds, on="pathology", how="left")
    calibration = calibration_table(metrics)
    if calibration.height:  # the per-finding models' calibration on the automatic labels; the rest is in the table
        per = calibration.filter(pl.col("model") == "per-finding").select(
            "pathology", pl.col("ece_auto").alias("ece auto"), pl.col("brier_auto").alias("brier auto")
        )
        out = out.join(per, on="pathology", how="left")
    return out


def calibration_table(metrics: pl.DataFrame) -> pl.DataFrame:
    """One row per finding and model: ECE and Brier on the test split before -> after the validate-fitted map,
    on both label sources (``vision.calibration``); a table written before calibration gives no rows."""
    if "ece_before" not in metrics.columns or "model" not in metrics.columns:
        return pl.DataFrame()
    t = metrics.filter(pl.col("evaluable") & pl.col("ece_before").is_not_null())

    def arrow(m: str) -> pl.Expr:
        return pl.format("{} -> {}", pl.col(f"{m}_before").round(3), pl.col(f"{m}_after").round(3))

    source = pl.when(pl.col("test_labels") == "radiologist").then(pl.lit("rad")).otherwise(pl.lit("auto"))
    long = t.select(
        "pathology",
        pl.when(pl.col("model") == "multilabel").then(pl.lit("multi-label")).otherwise(pl.lit("per-finding")).alias("model"),
        source.alias("src"),
        arrow("ece").alias("ece"),
        arrow("brier").alias("brier"),
        "n_pos",
    )
    wide = long.pivot(on="src", index=["pathology", "model"], values=["ece", "brier", "n_pos"], aggregate_function="first")
    cols = [c for c in ("n_pos_auto", "ece_auto", "brier_auto", "n_pos_rad", "ece_rad", "brier_rad") if c in wide.columns]
    return wide.select("pathology", "model", *cols)


def print_summary(p: Paths, adapter_recipe: str = DEMO_ADAPTER_RECIPE) -> None:
    """What the demo built: counts, the classifier table, the report table, where to look next."""
    m, rej = pl.read_parquet(p.manifest), pl.read_parquet(p.manifest_rejects)
    by_split = ", ".join(f"{s} {n}" for s, n in m.group_by("split").len().sort("split").iter_rows())
    print(f"\nmanifest: {m.height} images ({by_split}); {rej.height} rejected rows: {p.manifest}")
    indexes = sorted(p.shards.glob("s*/p*/index.parquet"))
    n_shard = sum(pl.read_parquet(f).height for f in indexes)
    n_srej = sum(pl.read_parquet(f.parent / "rejects.parquet").height for f in indexes if (f.parent / "rejects.parquet").exists())
    print(
        f"shards:   {n_shard} images in {len(indexes)} partitions ({n_srej} rejected); contact sheets: {p.shards}/s*/p*/contact_sheet.png"
    )
    print(
        "\nclassifiers: test-split ROC-AUC [95% CI by patient], threshold chosen on validation; auto: the automatic labels, rad: the"
        " radiologist-labelled studies with the radiologist's labels; one binary model per finding beside the multi-label model:"
    )
    with pl.Config(tbl_rows=20, fmt_str_lengths=40, **TABLE_STYLE):
        print(classifier_table(pl.read_parquet(p.classifier_metrics)))
    print(
        "  ece / brier auto: the per-finding model's calibration on the test split, before -> after Platt scaling fitted on"
        f" validate (ECE: 10 equal-width bins, biased upward on a small test split); both models and label sources, checkpoints,"
        f" roc_pr_all.png: {p.classifiers}"
    )
    rm = pl.read_parquet(p.report_metrics)
    print(
        "\nreport generation (test split, CE against the labeler on the reference reports, and on the radiologist-labelled"
        f" studies against the radiologist's labels; report adapter: {adapter_note(p, adapter_recipe)}):"
    )

    cols = ("system", "test_labels", "n", *HEADLINE, "ce_upos_micro14_f1")
    with pl.Config(float_precision=3, **TABLE_STYLE):
        print(rm.select([c for c in cols if c in rm.columns]))
    where = f"report_pairs, adapter/, generated_reports.parquet, report_metrics.parquet: {p.reports}"
    if "evaluation" in rm.columns and rm.height:
        where = (
            f"references: {rm['evaluation'][0]}; labeler {rm['labeler'][0]}; ce_* count uncertain as absent, ce_upos_* as present; {where}"
        )
    print(f"  {where}")
    print_external(p)
    print_localization(p)
    print_subgroups(p)
    print(f"data:     {p.raw}; state {p.home} (Dagster home {os.environ['DAGSTER_HOME']}, MLflow {p.tracking_uri})")
    print(
        "look:     make ui -> Dagster UI http://127.0.0.1:3000 (asset graph, runs, checks); make mlflow-ui -> MLflow UI"
        " http://127.0.0.1:5000/#/experiments?workflowType=machine_learning (experiment cxr_pipeline)"
    )
    print("use:      .venv/bin/cxr-pipeline predict FILE.dcm --cam cams/  -> the champions on a radiograph, Grad-CAM per positive")
    print("          make serve MODEL=cxr-cardiomegaly@champion              -> mlflow models serve on http://127.0.0.1:5001")


def print_external(p: Paths) -> None:
    """The external validation, one line per set: the per-finding champions' median AUC and median change from the
    internal test split, and the largest drop (every champion and finding, with intervals: the parquet files)."""
    files = sorted(p.external_validation.glob("*.parquet"))
    tables = [pl.read_parquet(f) for f in files]
    t = pl.concat([x for x in tables if x.height], how="diagonal_relaxed") if any(x.height for x in tables) else pl.DataFrame()
    if not t.height:
        return
    t = t.filter((pl.col("model") == "per_pathology") & pl.col("evaluable"))
    replica = " (the project's REPLICAS of their formats, shifted equipment)" if t["replica"].any() else ""
    print(
        f"\nexternal validation{replica}: per-finding champions, ROC-AUC and its change from the internal test split"
        f" (every champion and finding with 95% CIs, sensitivity, specificity, ECE: {p.external_validation}):"
    )
    for ds in sorted(set(t["dataset"])):
        d = t.filter(pl.col("dataset") == ds)
        changed = d.drop_nulls("roc_auc_change").sort("roc_auc_change")  # a finding without an internal row has no change
        median = f"{changed['roc_auc_change'].median():+.3f}" if changed.height else "-"
        worst = f"{changed['pathology'][0]} {changed['roc_auc_change'][0]:+.3f}" if changed.height else "-"
        print(f"  {ds}: {d.height} findings, median AUC {d['roc_auc'].median():.3f}, median change {median}; largest drop {worst}")


def print_localization(p: Paths) -> None:
    """Where the models look: one line per model kind, the median pointing-game rate over the findings with boxed test
    images and its median change from the mean training box (every finding, IoBB accuracies, intervals: the table)."""
    if not p.localization_metrics.exists():
        return
    t = pl.read_parquet(p.localization_metrics)
    if not t.height:
        return
    print(
        "\nlocalization (Grad-CAM against the replica's planted boxes, test split, ChestX-ray8's measures; pointing game: the map's"
        f" maximum inside the box; vs mean box: minus a box that never sees the image, paired 95% CI by patient): {p.localization}"
    )
    for kind, s in summary(t.filter(pl.col("dataset") == "mimic")).items():
        print(
            f"  {kind}: median pointing {s['pointing']:.2f} over {s['findings']} findings, median vs mean box {s['vs_mean_box']:+.2f};"
            f" above the mean box (lower end > 0) {s['above']}, above the box prior {s['above_prior']}"
            + (f" ({s['too_few']} with under {MIN_PATIENTS} patients not counted)" if s["too_few"] else "")
        )


def print_subgroups(p: Paths, effect: str = DEMO_EFFECT) -> None:
    """The subgroup audit: the planted effect beside what the audit measured for it, then the largest gaps."""

    if not p.subgroup_metrics.exists():
        return
    t = publishable(pl.read_parquet(p.subgroup_metrics))
    if not t.height:
        print("\nsubgroups: no MIMIC-IV demographics (CXR_MIMIC_IV_DIR): the audit is empty")
        return

    def line(r: dict) -> str:
        where = f"{r['view']}, {r['labels']} labels, {r['model']}"
        gap = f"{r['tpr_gap']:+.3f} [{r['tpr_gap_lo']:+.3f}, {r['tpr_gap_hi']:+.3f}]"
        # a two-group attribute is one test: its second group's row carries no q of its own
        q = f"q={r['tpr_gap_q']:.3g}" if r["tpr_gap_q"] is not None else "q: the other group's row (one test)"
        return f"    {where}: {gap} {q} ({r['n_patients']} patients)"

    print("\nsubgroups (MIMIC-IV demographics; TPR gap to the other patients at the validation threshold, 95% paired patient bootstrap):")
    if not env("CXR_RAW_DIR"):
        finding, attribute, group, scale = planted_effect(effect)
        planted = t.filter((pl.col("slug") == slug(finding)) & (pl.col("attribute") == attribute) & (pl.col("group") == group))
        print(f"  planted in the replica: {finding} drawn at {scale}x its strength for {attribute} = {group}; measured:")
        for r in planted.filter(pl.col("tpr_gap").is_not_null()).iter_rows(named=True):
            print(line(r))
    tests = gap_tests(t)
    found = largest_gaps(t, tests.height)
    print(
        f"  {found.height} of {tests.height} TPR-gap tests have a q-value below 0.05 (Benjamini-Hochberg within each view, label"
        " source and model, so the 5% holds within a panel, not across this list; a two-group attribute tested once; p against"
        " random groups with as many patients with the finding): about 1 in 20 of them is a false lead; the largest:"
    )
    for r in found.head(3).iter_rows(named=True):
        print(line(r).replace(": ", f", {r['slug']}, {r['attribute']} = {r['group']}: ", 1))
    print(
        f"  {p.subgroups}  (subgroup_metrics.parquet, tpr_gap_*.png, underdiagnosis.png); MIMIC's test split has 293 patients:"
        " most test intervals there include 0, the out-of-fold view over the training patients has many more"
    )


def demo(
    patients: int = DEMO_PATIENTS,
    source_rows: int = DEMO_SOURCE_ROWS,
    epochs: int = DEMO_EPOCHS,
    adapter_recipe: str = DEMO_ADAPTER_RECIPE,
) -> int:
    """The whole demo; returns the process exit code."""

    t0 = time.perf_counter()
    with quiet(paths().home / "logs", "demo") as (console, log_file):
        times = console.times
        console.say(f"demo: progress here; every log line in {log_file}")
        if not env("CXR_RAW_DIR"):
            with console.stage("replica"):
                ensure_demo_replica(patients, source_rows)
                ensure_external_replicas(max(20, patients // 3), source_rows)
        ensure_dagster_home()
        console.say(f"demo: configuration {write_demo_config(epochs, adapter_recipe)} (report adapter recipe: {adapter_recipe})")
        ok = run_all(console)
    if not ok:
        say(f"failed: see {log_file} and the run in the Dagster UI (make ui)")
        return 1
    print_summary(paths(), adapter_recipe)
    table = time_table(times, time.perf_counter() - t0)
    with open(log_file, "a") as log:  # the log ends with it too: where the time went, beside every line of the run
        log.write(f"\nwhere the time went:\n{table}\n")
    print(f"\nwhere the time went:\n{table}")
    print(f"demo: done in {time.perf_counter() - t0:.0f} s")
    return 0
