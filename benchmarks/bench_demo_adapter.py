"""The demo's report-adapter recipe, chosen on the validate split of a demo-sized replica (#48, the product path).

The demo's adapter is the product's: the classifiers' findings in the prompt (``report_hints``), the tiny offline
base, at most ``demo.DEMO_ADAPTER_BUDGET_S`` (120 s) of base building and training on the demo's 2 cores. Which
recipe does that best is chosen here, before the demo runs, on a replica no demo figure comes from:

    CXR_HOME=/tmp/dchoice/home CXR_RAW_DIR=/tmp/dchoice/raw cxr-pipeline demo   # once, on a 300-patient replica
    CXR_HOME=/tmp/dchoice/home python benchmarks/bench_demo_adapter.py         # drawn with another seed (3)

For each candidate in ``recipes/candidates/demo.yaml`` (a ``report_adapter`` overlay on the demo's settings,
``demo.demo_config``, resolved in a state folder of the benchmark's own: nothing comes from the instance's
pipeline.yaml), the adapter is trained as the ``report_adapter`` asset trains it (``adapter_training_set`` with the
instance's hints, ``ensure_base``, ``train_adapter``) in a folder of its own, its base built afresh there and timed
with the training; then the validate split's reports are written (the recipe's prompt: with the classifiers'
findings) and scored as ``report_metrics`` scores the test split: CE micro-F1 against the labeler on the reference
reports, beside the template's on the same reports, with the paired patient-bootstrap interval of adapter minus
template. On a CPU with every usable core, one process at a time: the seconds are the demo's. A candidate whose
base and training took over the budget cannot be chosen; the choice is ``reports.learning_check.choose_within_budget``
(the best validate CE micro-F1 among those within it). The record (scores, seconds, intervals, each candidate's
resolved recipe, device, threads, commit) goes to ``<work>/demo-validate.json`` whatever the outcome, committed as
``recipes/candidates/demo-validate.json``; ``test_config`` re-runs the choice on it and checks that the demo's
resolved recipe is the winner's as recorded. Finished candidates are kept in ``<work>/runs.json``, keyed by the
resolved recipe and the instance's data and code (a killed run resumes; a change retrains).

Last line: ``demo adapter: chosen NAME, validate CE micro-F1 F vs template T, adapter - template D [lo-hi],
base+training S s (budget B s), candidates N`` (exit 0), or ``demo adapter: no candidate within B s`` (exit 1).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import time
from pathlib import Path

RECIPES = Path(__file__).resolve().parent / "recipes"


def _instance_digest(p) -> str:
    """What the runs depend on besides their resolved recipe: the instance's report pairs and hints, and the code that
    trains and writes reports (``cxr_pipeline/reports``, the config and the shard reader; an edit elsewhere does not
    retrain)."""
    h = hashlib.sha256()
    for f in (p.report_pairs, p.report_hints):
        h.update(f.read_bytes())
    package = Path(__file__).resolve().parent.parent / "cxr_pipeline"
    for f in sorted([*(package / "reports").rglob("*.py"), package / "config.py", package / "data" / "shard_reader.py"]):
        h.update(str(f.relative_to(package)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _demo_state(work: Path):
    """A CXR_HOME of the benchmark's own whose ``pipeline.yaml`` is the demo's (``demo.demo_config``): candidates
    resolve on the demo's settings alone, never on whatever the measured instance's pipeline.yaml says."""
    from cxr_pipeline.demo import demo_config
    from cxr_pipeline.settings import Paths, write_pipeline_config

    home = work / "demo-settings"
    state = Paths(home=home, raw=home / "raw")
    home.mkdir(parents=True, exist_ok=True)
    write_pipeline_config(state, demo_config(), "bench_demo_adapter.py: the demo's settings, on which every candidate resolves")
    return state


def recipe_record(cfg) -> dict:
    """A resolved recipe as recorded beside its score: every field but the base's folder (a path of the run)."""
    from cxr_pipeline.fields import record

    return {k: v for k, v in record(cfg).items() if k != "base"}


def _candidate(p, cfg, folder: Path, val, hints, device) -> dict:
    """Train one resolved candidate as the asset does (a base of its own, built and timed with the training) and write
    the validate reports."""
    import dataclasses

    import polars as pl

    from cxr_pipeline.data.shard_reader import Shards
    from cxr_pipeline.reports.prompts import prompts_for
    from cxr_pipeline.reports.tiny_base import training_digest
    from cxr_pipeline.reports.vlm import adapter_training_set, ensure_base, generate_reports, train_adapter

    shutil.rmtree(folder, ignore_errors=True)
    tiny = folder / "tiny-base"  # a base of its own, built (and timed) as the demo builds its own
    cfg = dataclasses.replace(cfg, base=str(tiny))
    shards = Shards.open(p.shard_root(cfg.size), cfg.size)
    examples, rows, variant = adapter_training_set(pl.read_parquet(p.report_pairs), shards, cfg, hints)
    t0 = time.perf_counter()
    base = ensure_base(cfg, tiny, examples.reports, training_digest(rows), images=examples.images)
    t_base = time.perf_counter() - t0
    res = train_adapter(base, examples, cfg, folder / "adapter", folder / "ckpt", device=device, card={"prompt_variant": variant})
    t_train = time.perf_counter() - t0 - t_base
    images, rows_val, max_new_tokens, batch_size = val
    prompts, _ = prompts_for(rows_val, hints, cfg.use_classifier_findings)
    hyps = generate_reports(base, folder / "adapter", images, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    steps = sum(1 for h in res["log_history"] if "loss" in h)
    shutil.rmtree(folder / "ckpt", ignore_errors=True)
    return {"reports": hyps, "steps": steps, "base_s": round(t_base, 1), "train_s": round(t_train, 1), "variant": variant}


def main() -> int:
    import subprocess

    import polars as pl
    import torch
    import yaml

    from cxr_pipeline.config import resolve
    from cxr_pipeline.data.shard_reader import Shards, load_images
    from cxr_pipeline.demo import DEMO_ADAPTER_BUDGET_S
    from cxr_pipeline.files import atomic_path
    from cxr_pipeline.reports.baselines import baseline_reports
    from cxr_pipeline.reports.learning_check import choose_within_budget
    from cxr_pipeline.reports.metrics import clinical_efficacy, report_intervals
    from cxr_pipeline.settings import paths, usable_cpus

    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", default=str(RECIPES / "candidates" / "demo.yaml"))
    ap.add_argument("--only", default="", help="comma-separated candidates to run (a trial; the choice needs them all)")
    ap.add_argument("--work", default="", help="state folder (default $CXR_HOME/bench/demo-adapter)")
    args = ap.parse_args()
    p = paths()
    work = Path(args.work or p.bench("demo-adapter"))
    work.mkdir(parents=True, exist_ok=True)
    candidates = yaml.safe_load(Path(args.candidates).read_text())["candidates"]
    # the demo's device and threads: a CPU, every usable core (the compute resource's default); one process at a time,
    # so that the seconds are the demo's (a second process on the same cores would slow both)
    device, threads = torch.device("cpu"), usable_cpus()
    torch.set_num_threads(threads)
    state = _demo_state(work)
    digest = _instance_digest(p)
    pairs, hints = pl.read_parquet(p.report_pairs), pl.read_parquet(p.report_hints)
    gen = resolve(state, "generated_reports", derived={"max_new_tokens": lambda: 48})
    size = resolve(state, "report_adapter").size
    rows = pairs.filter(pl.col("split") == "validate").sort("dicom_id")
    images, rows = load_images(Shards.open(p.shard_root(size), size), rows)
    val = ([im.numpy() for im in images], rows, gen.max_new_tokens, gen.batch_size)
    refs, patients = rows["text"].to_list(), rows["subject_id"].to_list()
    template, _ = baseline_reports(rows, pairs.filter(pl.col("split") == "train"), hints)
    print(f"instance {p.home} (data+code {digest}): {rows.height} validate reports of {len(set(patients))} patients", flush=True)

    runs_file = work / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    names = [n for n in candidates if not args.only or n in args.only.split(",")]
    recipes = {name: resolve(state, "report_adapter", explicit=candidates[name]) for name in names}
    key = {name: json.dumps({"recipe": recipe_record(recipes[name]), "data": digest}, sort_keys=True, default=str) for name in names}
    for name in names:
        if key[name] in runs:
            continue
        print(f"training {name} ...", flush=True)
        runs[key[name]] = _candidate(p, recipes[name], work / name, val, hints, device)
        with atomic_path(runs_file) as tmp:
            tmp.write_text(json.dumps(runs))

    t_ce, _ = clinical_efficacy(refs, template)
    scores, seconds, intervals = {}, {}, {}
    for name in names:
        e = runs[key[name]]
        ce, _ = clinical_efficacy(refs, e["reports"])
        _, diffs = report_intervals(refs, {"adapter": e["reports"], "template": template}, patients)
        d = next(x for x in diffs if x["metric"] == "ce_micro14_f1")
        scores[name], seconds[name] = ce["ce_micro14_f1"], round(e["base_s"] + e["train_s"], 1)
        intervals[name] = [d["difference"], d["lo"], d["hi"]]
        lo, hi = (f"{x:+.3f}" if x is not None else "-" for x in (d["lo"], d["hi"]))
        print(
            f"  {name:28} validate CE micro-F1 {ce['ce_micro14_f1']:.3f} (template {t_ce['ce_micro14_f1']:.3f}), adapter - template"
            f" {d['difference']:+.3f} [{lo}-{hi}]; base {e['base_s']:.0f} s + training {e['train_s']:.0f} s, {e['steps']} steps,"
            f" {len(set(e['reports']))} distinct reports; e.g. {e['reports'][0][:80]!r}",
            flush=True,
        )
    if len(scores) < len(candidates):
        print("a trial (--only): no choice recorded", flush=True)
        return 0
    fits = [n for n in names if seconds[n] <= DEMO_ADAPTER_BUDGET_S]
    winner = choose_within_budget(scores, seconds, DEMO_ADAPTER_BUDGET_S) if fits else None
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=RECIPES).stdout.strip()
    record = {
        "instance": str(p.home),
        "data": digest,
        "commit": commit,
        "device": device.type,
        "threads": threads,
        "budget_s": DEMO_ADAPTER_BUDGET_S,
        "validate_reports": rows.height,
        "template_validate_ce_micro14_f1": t_ce["ce_micro14_f1"],
        "chosen": winner,
        "seconds": seconds,
        "validate_ce_micro14_f1": scores,
        "adapter_minus_template": intervals,
        "recipes": {name: recipe_record(recipes[name]) for name in names},
    }
    with atomic_path(work / "demo-validate.json") as tmp:  # written whatever the outcome: the runs are the evidence
        tmp.write_text(json.dumps(record, indent=1, default=str) + "\n")
    print(f"scores: {work / 'demo-validate.json'} (copy to benchmarks/recipes/candidates/demo-validate.json)")
    if winner is None:
        print(f"demo adapter: no candidate within {DEMO_ADAPTER_BUDGET_S} s, candidates {len(scores)}")
        return 1
    d, lo, hi = intervals[winner]
    print(
        f"demo adapter: chosen {winner}, validate CE micro-F1 {scores[winner]:.3f} vs template {t_ce['ce_micro14_f1']:.3f}, adapter -"
        f" template {d:+.3f} [{lo:+.3f}-{hi:+.3f}], base+training {seconds[winner]:.0f} s (budget {DEMO_ADAPTER_BUDGET_S} s),"
        f" candidates {len(scores)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
