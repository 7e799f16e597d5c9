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
from cxr_pipeline.defs.classifier import CLASSIFIER_METRICS, CLASSIFIER_PREDICTIONS, MULTILABEL_CLASSIFIER
from cxr_pipeline.defs.helpers import (
    asset_factory,
    asset_metadata,
    dagster_config,
    gpu_asset,
    resolved_metadata,
    run_settings,
    table_metadata,
)
from cxr_pipeline.defs.io import Adapter, ShardSet
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.shards import IMAGE_SHARDS
from cxr_pipeline.reports.generate import SYSTEMS
from cxr_pipeline.settings import ClassifierFiles

REPORT_PAIRS = "report_pairs"
REPORT_ADAPTER = "report_adapter"
GENERATED_REPORTS = "generated_reports"
REPORT_METRICS = "report_metrics"
REPORTS_CODE_VERSION = "1"


_asset = asset_factory("reports", REPORTS_CODE_VERSION)


PairsConfig = dagster_config(REPORT_PAIRS, "PairsConfig")
AdapterAssetConfig = dagster_config(REPORT_ADAPTER, "AdapterAssetConfig")
GenerateConfig = dagster_config(GENERATED_REPORTS, "GenerateConfig")


@_asset(
    REPORT_PAIRS,
    [],
    "Image reference + target report text per manifest image, in the manifest's patient-level split (a study never spans two splits).",
    {"polars", "parquet"},
)
def report_pairs(
    context: dg.AssetExecutionContext, manifest: pl.DataFrame, config: PairsConfig, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.Output:
    from cxr_pipeline.reports.pairs import build_pairs, splits_by_study_ok

    cfg = run_settings(context, storage.paths)
    pairs = build_pairs(manifest, cfg)
    if not splits_by_study_ok(pairs):
        raise dg.Failure("a study appears in two splits: the manifest's split is broken")
    counts = {s: int((pairs["split"] == s).sum()) for s in ("train", "validate", "test")}
    mean_words = float(pairs["words"].mean() or 0)
    with mlflow.run(context) as run:
        run.log_params(params(cfg))
        run.log_metrics({**{f"pairs_{k}": v for k, v in counts.items()}, "mean_words": mean_words})
    return dg.Output(
        pairs, metadata=asset_metadata(run, by_split=dg.MetadataValue.json(counts), mean_words=mean_words, **resolved_metadata(cfg))
    )


def _log_pairs(run, rows: pl.DataFrame, prompts: list[str], size: int, context: str, source: Path) -> None:
    """The pairs a report run read (image content, report text, the prompt with its hints), as an MLflow dataset."""
    seen = rows.select("dicom_id", "study_id", *(c for c in ("content_hash",) if c in rows.columns), "text")
    run.log_datasets(f"report-pairs-{size}px", {context: seen.with_columns(pl.Series("prompt", prompts))}, source)


# The classifiers' hints for the prompts and the retrieval baseline: the multi-label model's out-of-fold
# probabilities (its files), else the per-pathology predictions with the metrics table's thresholds.
HINT_INPUTS = {
    "multilabel_classifier": dg.AssetIn(MULTILABEL_CLASSIFIER, input_manager_key="handles"),
    "classifier_predictions": dg.AssetIn(CLASSIFIER_PREDICTIONS, metadata={"optional": True}),
    "classifier_metrics": dg.AssetIn(CLASSIFIER_METRICS, metadata={"optional": True}),
}


@_asset(
    REPORT_ADAPTER,
    [],
    "QLoRA adapter (4-bit NF4 base, LoRA on the language model's attention incl. cross-attention and MLP) that writes a report from an image.",
    {"pytorch", "peft"},
    ins={
        "report_pairs": dg.AssetIn(REPORT_PAIRS),
        "image_shards": dg.AssetIn(IMAGE_SHARDS, partition_mapping=dg.AllPartitionMapping(), input_manager_key="handles"),
        **HINT_INPUTS,
    },
    **gpu_asset(),
)
def report_adapter(
    context: dg.AssetExecutionContext,
    report_pairs: pl.DataFrame,
    image_shards: ShardSet,
    multilabel_classifier: ClassifierFiles,
    classifier_predictions: pl.DataFrame | None,
    classifier_metrics: pl.DataFrame | None,
    config: AdapterAssetConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:
    from cxr_pipeline.reports.vlm import AdapterConfig, adapter_training_set, base_info, ensure_base, train_adapter
    from cxr_pipeline.vision.fit import report_hints

    paths = storage.paths
    cfg: AdapterConfig = run_settings(context, paths)
    hints, thresholds, hint_source = report_hints(multilabel_classifier, classifier_predictions, classifier_metrics)
    examples, rows, variant = adapter_training_set(report_pairs, image_shards.root(cfg.size), cfg, hints, thresholds)
    if rows.height == 0:
        raise dg.Failure(
            f"no training pairs with {cfg.size}-px shard images: materialize image_shards (it builds every size its consumers read)"
        )
    try:
        base = ensure_base(cfg, paths.tiny_base_dir(cfg.tiny_width, cfg.tiny_pretrain_steps), examples.reports, context.log.info)
    except FileNotFoundError as e:
        raise dg.Failure(str(e)) from None
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**params(cfg), **compute.params(paths), **base_info(base), "train_pairs": len(examples)})
        run.log_params({"prompt_variant": variant, "hint_source": hint_source})
        _log_pairs(run, rows, examples.prompts, cfg.size, "train", paths.report_pairs)
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
    return dg.MaterializeResult(metadata=asset_metadata(run, **_adapter_metadata(res, paths, variant, hint_source, len(examples), cfg)))


def _adapter_metadata(res: dict, paths, variant: str, hint_source: str, n_pairs: int, cfg) -> dict:
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    md = {"adapter": dg.MetadataValue.path(str(paths.adapter)), "prompt_variant": variant, "hint_source": hint_source}
    md.update(train_pairs=n_pairs, resumed_from=res["resumed_from"] or "", **resolved_metadata(cfg))
    md.update(first_loss=float(losses[0]) if losses else float("nan"), last_loss=float(losses[-1]) if losses else float("nan"))
    return md


@_asset(
    GENERATED_REPORTS,
    [],
    "Test-split reports from the adapter (deterministic decoding), a template from the classifiers, and nearest-neighbour retrieval.",
    {"pytorch", "parquet"},
    ins={
        "report_adapter": dg.AssetIn(REPORT_ADAPTER, input_manager_key="handles"),
        "report_pairs": dg.AssetIn(REPORT_PAIRS),
        "image_shards": dg.AssetIn(IMAGE_SHARDS, partition_mapping=dg.AllPartitionMapping(), input_manager_key="handles"),
        **HINT_INPUTS,
    },
    **gpu_asset(),
)
def generated_reports(
    context: dg.AssetExecutionContext,
    report_adapter: Adapter,
    report_pairs: pl.DataFrame,
    image_shards: ShardSet,
    multilabel_classifier: ClassifierFiles,
    classifier_predictions: pl.DataFrame | None,
    classifier_metrics: pl.DataFrame | None,
    config: GenerateConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.Output:
    from cxr_pipeline.reports.generate import test_split_reports
    from cxr_pipeline.reports.vlm import read_adapter_card, report_token_budget
    from cxr_pipeline.vision.fit import report_hints

    paths, card = storage.paths, read_adapter_card(report_adapter.dir)  # the adapter's base, quantisation, size and prompt variant
    train_texts = report_pairs.filter(pl.col("split") == "train")["text"].to_list()
    cfg = run_settings(context, paths, derived={"max_new_tokens": lambda: report_token_budget(Path(card["base"]), train_texts)})
    hints = report_hints(multilabel_classifier, classifier_predictions, classifier_metrics)
    out, rows, prompts, variant = test_split_reports(
        report_pairs, image_shards.root(int(card["size"])), report_adapter.dir, card, hints, cfg, compute.torch_device(paths)
    )
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**params(cfg), **compute.params(paths), "prompt_variant": variant, "base": card["base"]})
        run.log_params({"quantize": card.get("quantize", True)})
        _log_pairs(run, rows, prompts, int(card["size"]), "test", paths.report_pairs)
        run.log_metrics({"reports": out.height, "empty_adapter_reports": sum(1 for t in out["adapter"].to_list() if not (t or "").strip())})
        run.log_table(out.head(50), "generated_reports")
    md = {"prompt_variant": variant, "decoding": "greedy" if cfg.num_beams == 1 else f"beam {cfg.num_beams}"}
    md.update(examples=table_metadata(out.head(5)), **resolved_metadata(cfg))
    return dg.Output(out, metadata=asset_metadata(run, **md))


@_asset(
    REPORT_METRICS,
    [],
    "System x BLEU-1..4 / METEOR / ROUGE-L / CIDEr (pycocoevalcap) and clinical-efficacy P/R/F1 from the report labeler.",
    {"polars", "parquet"},
)
def report_metrics(
    context: dg.AssetExecutionContext, generated_reports: pl.DataFrame, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.Output:
    from cxr_pipeline.reports.labeler import labeler_version
    from cxr_pipeline.reports.metrics import SHOWN, score_reports, side_by_side_markdown

    paths, gen = storage.paths, generated_reports
    meteor = shutil.which("java") is not None
    if not meteor:
        context.log.warning("java not found: METEOR is skipped")
    scored = score_reports(gen, SYSTEMS, meteor)
    table, differences = scored.table, scored.differences
    write_parquet(differences, paths.report_differences)
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
    return dg.Output(table, metadata=asset_metadata(run, **md))


REPORT_ASSETS = [report_pairs, report_adapter, generated_reports, report_metrics]
