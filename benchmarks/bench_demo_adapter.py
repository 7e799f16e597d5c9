"""The demo's report-adapter recipe, chosen on the validate split of a demo-sized replica (#48, the product path).

The demo's adapter is the product's: the classifiers' findings in the prompt (``report_hints``), the tiny offline
base, at most 120 s of training on the demo's 2 cores. Which recipe does that best is chosen here, before the
demo runs, on a replica no demo figure comes from:

    CXR_RAW_DIR=<a 300-patient replica drawn with another seed> cxr-pipeline demo   # once: classifiers, hints
    CXR_HOME=<that instance> python benchmarks/bench_demo_adapter.py

For each candidate in ``recipes/candidates/demo.yaml`` (a ``report_adapter`` overlay on the demo's run config,
``demo.demo_config``: recipes/demo.yaml at the demo's shard size), the adapter is trained as the ``report_adapter`` asset trains it
(``adapter_training_set`` with the instance's hints, ``ensure_base``, ``train_adapter``) in a folder of its own,
its base built afresh there and timed with the training (the demo builds its base too); then the validate
split's reports are written with the classifiers' findings in the prompt and scored, as ``report_metrics`` scores
the test split: CE micro-F1 against the labeler on the reference reports, beside the template's on the same
reports, with the paired patient-bootstrap interval of adapter minus template. A candidate whose base and training
took over ``--budget`` seconds (120) cannot be chosen (its time stays in the record). The choice is
``reports.learning_check.choose_within_budget`` (the best validate CE micro-F1 among those within the budget); the scores, seconds
and the instance's replica go to ``<work>/demo-validate.json`` (committed as
``recipes/candidates/demo-validate.json``; ``test_config`` re-runs the choice on it and checks that
``recipes/demo.yaml``, what the demo runs, holds the winner). Timings are of this machine under whatever else ran:
the demo's own figure is the one to quote. Finished candidates are kept in ``<work>/runs.json`` (a killed run
resumes); a changed instance or package retrains.

Last line: ``demo adapter: chosen NAME, validate CE micro-F1 F vs template T, adapter - template D [lo-hi],
base+training S s (budget B s), candidates N``
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
    """What the runs depend on: the instance's report pairs and hints, the demo's settings, and the code that trains and writes
    reports (``cxr_pipeline/reports``, the config and the shard reader; an edit elsewhere does not retrain)."""
    from cxr_pipeline.demo import demo_config

    h = hashlib.sha256(json.dumps(demo_config(), sort_keys=True).encode())  # the settings every candidate overlays
    for f in (p.report_pairs, p.report_hints):
        h.update(f.read_bytes())
    package = Path(__file__).resolve().parent.parent / "cxr_pipeline"
    for f in sorted([*(package / "reports").rglob("*.py"), package / "config.py", package / "data" / "shard_reader.py"]):
        h.update(str(f.relative_to(package)).encode() + f.read_bytes())
    return h.hexdigest()[:16]


def _candidate(p, name: str, overlay: dict, work: Path, val, hints, device) -> dict:
    """Train one candidate as the asset does (own base folder, timed) and write the validate reports."""
    import polars as pl

    from cxr_pipeline.config import resolve
    from cxr_pipeline.data.shard_reader import Shards
    from cxr_pipeline.demo import demo_config
    from cxr_pipeline.reports.tiny_base import training_digest
    from cxr_pipeline.reports.vlm import adapter_training_set, ensure_base, generate_reports, train_adapter

    folder = work / name
    shutil.rmtree(folder, ignore_errors=True)
    tiny = folder / "tiny-base"  # a base of its own, built (and timed) as the demo builds its own
    cfg = resolve(p, "report_adapter", explicit={**demo_config()["report_adapter"], **overlay, "base": str(tiny)})
    shards = Shards.open(p.shard_root(cfg.size), cfg.size)
    pairs = pl.read_parquet(p.report_pairs)
    examples, rows, variant = adapter_training_set(pairs, shards, cfg, hints)
    t0 = time.perf_counter()
    base = ensure_base(cfg, tiny, examples.reports, training_digest(rows), images=examples.images)
    t_base = time.perf_counter() - t0
    res = train_adapter(base, examples, cfg, folder / "adapter", folder / "ckpt", device=device, card={"prompt_variant": variant})
    t_train = time.perf_counter() - t0 - t_base
    images, prompts, max_new_tokens, batch_size = val
    hyps = generate_reports(base, folder / "adapter", images, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, device=device)
    steps = sum(1 for h in res["log_history"] if "loss" in h)
    shutil.rmtree(folder / "ckpt", ignore_errors=True)
    return {"reports": hyps, "steps": steps, "base_s": round(t_base, 1), "train_s": round(t_train, 1), "variant": variant}


def main() -> int:
    import polars as pl
    import torch
    import yaml

    from cxr_pipeline.config import resolve
    from cxr_pipeline.data.shard_reader import Shards, load_images
    from cxr_pipeline.demo import demo_config
    from cxr_pipeline.files import atomic_path
    from cxr_pipeline.reports.baselines import baseline_reports
    from cxr_pipeline.reports.learning_check import choose_within_budget
    from cxr_pipeline.reports.metrics import clinical_efficacy, report_intervals
    from cxr_pipeline.reports.prompts import prompts_for
    from cxr_pipeline.settings import paths

    ap = argparse.ArgumentParser()
    ap.add_argument("--candidates", default=str(RECIPES / "candidates" / "demo.yaml"))
    ap.add_argument("--budget", type=float, default=120.0, help="seconds of base building and training a candidate may take")
    ap.add_argument("--only", default="", help="comma-separated candidates to run (a trial; the choice needs them all)")
    ap.add_argument("--reverse", action="store_true", help="train from the other end (a second process shares the work)")
    ap.add_argument("--work", default="", help="state folder (default $CXR_HOME/bench/demo-adapter)")
    args = ap.parse_args()
    p = paths()
    work = Path(args.work or p.bench("demo-adapter"))
    work.mkdir(parents=True, exist_ok=True)
    candidates = yaml.safe_load(Path(args.candidates).read_text())["candidates"]
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    digest = _instance_digest(p)
    pairs, hints = pl.read_parquet(p.report_pairs), pl.read_parquet(p.report_hints)
    demo = demo_config()  # the demo's settings (recipes/demo.yaml for the adapter), whatever the instance ran
    gen = resolve(p, "generated_reports", explicit=demo["generated_reports"], derived={"max_new_tokens": lambda: 48})
    size = resolve(p, "report_adapter", explicit=demo["report_adapter"]).size
    rows = pairs.filter(pl.col("split") == "validate").sort("dicom_id")
    images, rows = load_images(Shards.open(p.shard_root(size), size), rows)
    prompts, _ = prompts_for(rows, hints, True)
    val = ([im.numpy() for im in images], prompts, gen.max_new_tokens, gen.batch_size)
    refs, patients = rows["text"].to_list(), rows["subject_id"].to_list()
    template, _ = baseline_reports(rows, pairs.filter(pl.col("split") == "train"), hints)
    print(f"instance {p.home} (data+code {digest}): {rows.height} validate reports of {len(set(patients))} patients", flush=True)

    runs_file = work / "runs.json"
    runs = json.loads(runs_file.read_text()) if runs_file.exists() else {}
    names = [n for n in candidates if not args.only or n in args.only.split(",")]
    for name in names[::-1] if args.reverse else names:
        key = json.dumps({"name": name, "overlay": candidates[name], "data": digest}, sort_keys=True)
        fresh = json.loads(runs_file.read_text()) if runs_file.exists() else {}
        if key in fresh:
            runs[key] = fresh[key]
            continue
        print(f"training {name} ...", flush=True)
        entry = _candidate(p, name, candidates[name], work, val, hints, device)
        runs = {**(json.loads(runs_file.read_text()) if runs_file.exists() else {}), key: entry}
        with atomic_path(runs_file) as tmp:
            tmp.write_text(json.dumps(runs))

    t_ce, _ = clinical_efficacy(refs, template)
    scores, seconds, table = {}, {}, []
    for name in names:
        e = runs.get(json.dumps({"name": name, "overlay": candidates[name], "data": digest}, sort_keys=True))
        if e is None:
            print(f"  {name}: not run yet (another process?)", flush=True)
            continue
        ce, _ = clinical_efficacy(refs, e["reports"])
        _, diffs = report_intervals(refs, {"adapter": e["reports"], "template": template}, patients)
        d = next(x for x in diffs if x["metric"] == "ce_micro14_f1")
        scores[name], seconds[name] = ce["ce_micro14_f1"], e["base_s"] + e["train_s"]
        table.append((name, d))
        print(
            f"  {name:22} validate CE micro-F1 {ce['ce_micro14_f1']:.3f} (template {t_ce['ce_micro14_f1']:.3f}), adapter - template"
            f" {d['difference']:+.3f} [{d['lo']:+.3f}-{d['hi']:+.3f}]; base {e['base_s']:.0f} s + training {e['train_s']:.0f} s,"
            f" {e['steps']} steps, {len(set(e['reports']))} distinct reports; e.g. {e['reports'][0][:80]!r}",
            flush=True,
        )
    if len(scores) < len(candidates):
        print("not every candidate has run: no choice", flush=True)
        return 1
    winner = choose_within_budget(scores, seconds, args.budget)
    record = {
        "instance": str(p.home),
        "data": digest,
        "budget_s": args.budget,
        "validate_reports": rows.height,
        "template_validate_ce_micro14_f1": t_ce["ce_micro14_f1"],
        "seconds": seconds,
        "validate_ce_micro14_f1": scores,
    }
    with atomic_path(work / "demo-validate.json") as tmp:
        tmp.write_text(json.dumps(record, indent=1) + "\n")
    d = dict(table)[winner]
    print(f"scores: {work / 'demo-validate.json'} (copy to benchmarks/recipes/candidates/demo-validate.json)")
    print(
        f"demo adapter: chosen {winner}, validate CE micro-F1 {scores[winner]:.3f} vs template {t_ce['ce_micro14_f1']:.3f}, adapter -"
        f" template {d['difference']:+.3f} [{d['lo']:+.3f}-{d['hi']:+.3f}], base+training {seconds[winner]:.0f} s"
        f" (budget {args.budget:.0f} s), candidates {len(scores)}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
