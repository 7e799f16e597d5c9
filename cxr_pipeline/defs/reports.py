"""manifest -> report_pairs -> report_adapter -> generated_reports -> report_metrics.

The work is in ``reports/`` (pairs, the Mllama adapter, baselines, metrics);
these assets read config, call it, log to MLflow and return metadata.
"""

import shutil
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.config import params
from cxr_pipeline.data.io import write_parquet
from cxr_pipeline.data.shards import load_images
from cxr_pipeline.defs.classifier import CLASSIFIER_PREDICTIONS, MULTILABEL_CLASSIFIER
from cxr_pipeline.defs.helpers import (
    asset_factory,
    asset_metadata,
    dagster_config,
    every_partition_of,
    gpu_asset,
    resolved_metadata,
    run_settings,
    table_metadata,
)
from cxr_pipeline.defs.manifest import MANIFEST, read_manifest
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.shards import IMAGE_SHARDS
from cxr_pipeline.settings import Paths

REPORT_PAIRS = "report_pairs"
REPORT_ADAPTER = "report_adapter"
GENERATED_REPORTS = "generated_reports"
REPORT_METRICS = "report_metrics"
REPORTS_CODE_VERSION = "1"
SYSTEMS = ("adapter", "template", "retrieval")


_asset = asset_factory("reports", REPORTS_CODE_VERSION)


PairsConfig = dagster_config(REPORT_PAIRS, "PairsConfig")
AdapterAssetConfig = dagster_config(REPORT_ADAPTER, "AdapterAssetConfig")
GenerateConfig = dagster_config(GENERATED_REPORTS, "GenerateConfig")


@_asset(
    REPORT_PAIRS,
    [MANIFEST],
    "Image reference + target report text per manifest image, in the manifest's patient-level split (a study never spans two splits).",
    {"polars", "parquet"},
)
def report_pairs(
    context: dg.AssetExecutionContext, config: PairsConfig, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    from cxr_pipeline.reports.pairs import build_pairs, splits_by_study_ok

    cfg = run_settings(context, storage.paths)
    pairs = build_pairs(read_manifest(storage), cfg)
    if not splits_by_study_ok(pairs):
        raise dg.Failure("a study appears in two splits: the manifest's split is broken")
    path = write_parquet(pairs, storage.paths.report_pairs)
    counts = {s: int((pairs["split"] == s).sum()) for s in ("train", "validate", "test")}
    mean_words = float(pairs["words"].mean() or 0)
    with mlflow.run(context) as run:
        run.log_params(params(cfg))
        run.log_metrics({**{f"pairs_{k}": v for k, v in counts.items()}, "mean_words": mean_words})
    md = asset_metadata(run, path, pairs.height, by_split=dg.MetadataValue.json(counts), mean_words=mean_words, **resolved_metadata(cfg))
    return dg.MaterializeResult(metadata=md)


def _hints(paths: Paths) -> tuple[pl.DataFrame | None, dict[str, float], str]:
    """The classifier probabilities report prompts and the retrieval baseline use, their per-finding
    thresholds, and where they come from.

    The multi-label model's: out-of-fold for training images (a hint never comes from a model that
    saw the image, so training prompts are as good as test prompts, not better), out-of-sample for
    the other splits, with its validation-chosen thresholds. Without them (``oof_folds: 0``), the
    per-pathology predictions, which are in-sample on the training split, and named so.
    """
    import json

    from cxr_pipeline.vision.fit import MULTILABEL, classifier_thresholds

    files = paths.classifier(MULTILABEL)
    if files.hints.exists():
        thresholds = json.loads((files.checkpoint / "config.json").read_text()).get("thresholds", {})
        return pl.read_parquet(files.hints), thresholds, "multilabel_out_of_fold"
    if paths.classifier_predictions.exists():
        return pl.read_parquet(paths.classifier_predictions), classifier_thresholds(paths), "per_pathology_in_sample"
    return None, {}, "none"


def _log_pairs(run, rows: pl.DataFrame, prompts: list[str], size: int, context: str, paths: Paths) -> None:
    """The pairs a report run read (image content, report text, the prompt with its hints), as an MLflow dataset."""
    seen = rows.select("dicom_id", "study_id", *(c for c in ("content_hash",) if c in rows.columns), "text")
    run.log_datasets(f"report-pairs-{size}px", {context: seen.with_columns(pl.Series("prompt", prompts))}, paths.report_pairs)


@_asset(
    REPORT_ADAPTER,
    [REPORT_PAIRS, every_partition_of(IMAGE_SHARDS), CLASSIFIER_PREDICTIONS, MULTILABEL_CLASSIFIER],
    "QLoRA adapter (4-bit NF4 base, LoRA on the language model's attention incl. cross-attention and MLP) that writes a report from an image.",
    {"pytorch", "peft"},
    **gpu_asset(),
)
def report_adapter(
    context: dg.AssetExecutionContext, config: AdapterAssetConfig, storage: CxrStorage, mlflow: MlflowTracking, compute: Compute
) -> dg.MaterializeResult:
    from cxr_pipeline.reports.vlm import AdapterConfig, adapter_training_set, base_info, ensure_base, train_adapter

    paths = storage.paths
    cfg: AdapterConfig = run_settings(context, paths)
    hints, thresholds, hint_source = _hints(paths)
    examples, rows, variant = adapter_training_set(pl.read_parquet(paths.report_pairs), paths.shard_root(cfg.size), cfg, hints, thresholds)
    if rows.height == 0:
        raise dg.Failure(
            f"no training pairs with {cfg.size}-px shard images: materialize image_shards (it builds every size its consumers read)"
        )
    try:
        base = ensure_base(cfg, paths.tiny_base_dir(cfg.tiny_width, cfg.tiny_pretrain_steps), examples.reports, context.log.info)
    except FileNotFoundError as e:
        raise dg.Failure(str(e)) from None
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**params(cfg), **compute.params(paths), **base_info(base), "prompt_variant": variant, "hint_source": hint_source})
        run.log_params({"train_pairs": len(examples)})
        _log_pairs(run, rows, examples.prompts, cfg.size, "train", paths)
        res = train_adapter(
            base,
            examples,
            cfg,
            paths.adapter,
            paths.adapter_checkpoints,
            device=compute.torch_device(paths),
            card={"prompt_variant": variant, "size": cfg.size, "hint_source": hint_source},
            log=context.log.info,
            on_log=lambda step, logs: run.log_metrics({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=step),
        )
        run.log_artifact(paths.adapter, "adapter")
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    md = {"adapter": dg.MetadataValue.path(str(paths.adapter)), "prompt_variant": variant, "hint_source": hint_source}
    md.update(train_pairs=len(examples), resumed_from=res["resumed_from"] or "", **resolved_metadata(cfg))
    md.update(first_loss=float(losses[0]) if losses else float("nan"), last_loss=float(losses[-1]) if losses else float("nan"))
    return dg.MaterializeResult(metadata=asset_metadata(run, **md))


@_asset(
    GENERATED_REPORTS,
    [REPORT_ADAPTER, REPORT_PAIRS, CLASSIFIER_PREDICTIONS, MULTILABEL_CLASSIFIER],
    "Test-split reports from the adapter (deterministic decoding), a template from the classifiers, and nearest-neighbour retrieval.",
    {"pytorch", "parquet"},
    **gpu_asset(),
)
def generated_reports(
    context: dg.AssetExecutionContext, config: GenerateConfig, storage: CxrStorage, mlflow: MlflowTracking, compute: Compute
) -> dg.MaterializeResult:
    from cxr_pipeline.reports.baselines import baseline_reports
    from cxr_pipeline.reports.pairs import evaluation_name
    from cxr_pipeline.reports.vlm import generate_reports, prompts_for, read_adapter_card, report_token_budget

    paths = storage.paths
    card = read_adapter_card(paths.adapter)  # the adapter's base, quantisation, size and prompt variant
    pairs = pl.read_parquet(paths.report_pairs)
    train_pairs = pairs.filter(pl.col("split") == "train")
    budget = {"max_new_tokens": lambda: report_token_budget(Path(card["base"]), train_pairs["text"].to_list())}
    cfg = run_settings(context, paths, derived=budget)
    test = pairs.filter(pl.col("split") == "test").sort("dicom_id")
    test = test.head(cfg.max_test_pairs) if cfg.max_test_pairs is not None else test
    images, rows = load_images(paths.shard_root(int(card["size"])), test, int(card["size"]))
    preds, thresholds, hint_source = _hints(paths)
    prompts, variant = prompts_for(rows, preds, card["prompt_variant"] != "instruction", thresholds)
    device = compute.torch_device(paths)
    gen = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "batch_size": cfg.batch_size}
    adapter_out = generate_reports(Path(card["base"]), paths.adapter, [im.numpy() for im in images], prompts, **gen, device=device)
    # retrieval matches test images to training images by these probabilities: out-of-fold on the training side
    template, retrieval = baseline_reports(rows, train_pairs, preds, thresholds)
    radiologist = [c for c in rows.columns if c.startswith("radiologist_")]
    source = pairs["text_source"][0] if "text_source" in pairs.columns and pairs.height else "findings"
    out = rows.select("dicom_id", "study_id", pl.col("text").alias("reference"), *radiologist).with_columns(
        *[pl.Series(name, texts, dtype=pl.String) for name, texts in zip(SYSTEMS, (adapter_out, template, retrieval), strict=True)],
        pl.lit(evaluation_name(source, cfg.max_test_pairs or 0)).alias("evaluation"),
    )
    path = write_parquet(out, paths.generated_reports)
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**params(cfg), **compute.params(paths), "prompt_variant": variant, "base": card["base"]})
        run.log_params({"quantize": card.get("quantize", True)})
        _log_pairs(run, rows, prompts, int(card["size"]), "test", paths)
        run.log_metrics({"reports": out.height, "empty_adapter_reports": sum(1 for t in adapter_out if not t.strip())})
        run.log_table(out.head(50), "generated_reports")
    md = {"prompt_variant": variant, "decoding": "greedy" if cfg.num_beams == 1 else f"beam {cfg.num_beams}"}
    md.update(examples=table_metadata(out.head(5)), **resolved_metadata(cfg))
    return dg.MaterializeResult(metadata=asset_metadata(run, path, out.height, **md))


@_asset(
    REPORT_METRICS,
    [GENERATED_REPORTS],
    "System x BLEU-1..4 / METEOR / ROUGE-L / CIDEr (pycocoevalcap) and clinical-efficacy P/R/F1 from the report labeler.",
    {"polars", "parquet"},
)
def report_metrics(context: dg.AssetExecutionContext, storage: CxrStorage, mlflow: MlflowTracking) -> dg.MaterializeResult:
    from cxr_pipeline.reports.labeler import labeler_version
    from cxr_pipeline.reports.metrics import SHOWN, score_reports, side_by_side_markdown

    paths = storage.paths
    gen = pl.read_parquet(paths.generated_reports)
    meteor = shutil.which("java") is not None
    if not meteor:
        context.log.warning("java not found: METEOR is skipped")
    scored = score_reports(gen, SYSTEMS, meteor)
    table, differences = scored.table, scored.differences
    write_parquet(differences, paths.report_differences)
    path = write_parquet(table, paths.report_metrics)
    if scored.bad_total:
        context.log.warning(f"{scored.bad_total} empty or malformed reports were labelled all-blank")
    with mlflow.run(context) as run:
        run.log_params({"labeler": labeler_version(), "evaluation": scored.evaluation})
        run.log_datasets("generated-reports", {"test": gen.select("study_id", "reference", *SYSTEMS)}, paths.generated_reports)
        run.log_table(table, "report_metrics")
        run.log_table(differences, "report_differences")
        for r in scored.rows:
            prefix = r["system"] + (".radiologist" if r["test_labels"] == "radiologist" else "")
            run.log_metrics({f"{prefix}.{k}": v for k, v in r.items() if isinstance(v, float)})
        run.log_table(gen.head(20), "example_reports")
    show = table.select(c for c in SHOWN if c in table.columns).with_columns(pl.col(pl.Float64).round(4))
    md = {"table": table_metadata(show), "empty_or_malformed": scored.bad_total, "evaluation": scored.evaluation}
    md.update(examples=dg.MetadataValue.md(side_by_side_markdown(gen, SYSTEMS)), labeler=labeler_version())
    return dg.MaterializeResult(metadata=asset_metadata(run, path, **md))


REPORT_ASSETS = [report_pairs, report_adapter, generated_reports, report_metrics]
