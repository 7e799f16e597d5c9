"""manifest -> report_pairs -> report_adapter -> generated_reports -> report_metrics.

The work is in ``reports/`` (pairs, the Mllama adapter, baselines, metrics);
these assets read config, call it, log to MLflow and return metadata.
"""

import shutil
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.defs import needs
from cxr_pipeline.defs.io import Adapter, ShardSet
from cxr_pipeline.defs.keys import GENERATED_REPORTS, REPORT_ADAPTER, REPORT_HINTS, REPORT_METRICS, REPORT_PAIRS
from cxr_pipeline.defs.metadata import asset_metadata, inline_png, resolved_metadata, table_metadata
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking
from cxr_pipeline.defs.run_config import dagster_config, run_settings
from cxr_pipeline.defs.specs import ALL_SHARDS_IN, MANIFEST_IN, asset_factory
from cxr_pipeline.fields import params
from cxr_pipeline.files import write_parquet
from cxr_pipeline.reports.generate import SYSTEMS, test_split_reports
from cxr_pipeline.reports.labeler import labeler_version
from cxr_pipeline.reports.metrics import SHOWN, score_reports, side_by_side_markdown
from cxr_pipeline.reports.pairs import build_pairs, splits_by_study_ok
from cxr_pipeline.reports.prompts import hint_source
from cxr_pipeline.reports.sheet import report_sheet, sheet_rows
from cxr_pipeline.reports.tiny_base import training_digest
from cxr_pipeline.reports.vlm import AdapterConfig, adapter_training_set, base_info, ensure_base, report_token_budget, train_adapter

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
    ins={"manifest": MANIFEST_IN},
    **needs.TABLE.asset_args(),
)
def report_pairs(
    context: dg.AssetExecutionContext, manifest: pl.DataFrame, config: PairsConfig, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.Output:

    cfg = run_settings(context, storage.paths)
    pairs = build_pairs(manifest, cfg)
    if not splits_by_study_ok(pairs):
        raise needs.failure("a study appears in two splits: the manifest's split is broken")
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


@_asset(
    REPORT_ADAPTER,
    [],
    "QLoRA adapter (4-bit NF4 base, LoRA on the language model's attention incl. cross-attention and MLP) that writes a report from an image.",
    {"pytorch", "peft"},
    ins={"report_pairs": dg.AssetIn(REPORT_PAIRS), "image_shards": ALL_SHARDS_IN, "report_hints": dg.AssetIn(REPORT_HINTS)},
    **needs.VLM.asset_args(),
)
def report_adapter(
    context: dg.AssetExecutionContext,
    report_pairs: pl.DataFrame,
    image_shards: ShardSet,
    report_hints: pl.DataFrame,
    config: AdapterAssetConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.MaterializeResult:

    paths, source = storage.paths, hint_source(report_hints)
    cfg: AdapterConfig = run_settings(context, paths)
    hw = compute.resolved(paths)
    examples, rows, variant = adapter_training_set(report_pairs, image_shards.at(cfg.size), cfg, report_hints)
    base = _base(cfg, paths, examples, rows, context.log.info)
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**params(cfg), **hw.params, **base_info(base), "train_pairs": len(examples)})
        run.log_params({"prompt_variant": variant, "hint_source": source})
        _log_pairs(run, rows, examples.prompts, cfg.size, "train", paths.report_pairs)
        card = {"prompt_variant": variant, "size": cfg.size, "hint_source": source}
        res = train_adapter(
            base, examples, cfg, paths.adapter, paths.adapter_checkpoints, device=hw.device, card=card, log=context.log.info,
            on_log=lambda step, logs: run.log_metrics({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=step),
        )  # fmt: skip
        run.log_artifact(paths.adapter, "adapter")
    return dg.MaterializeResult(metadata=asset_metadata(run, **_adapter_metadata(res, paths, variant, source, len(examples), cfg)))


def _base(cfg, paths, examples, rows: pl.DataFrame, log) -> Path:
    """The base model the adapter trains on (the tiny offline base is built from the training reports when missing)."""

    if rows.height == 0:
        raise needs.failure(
            f"no training pairs with {cfg.size}-px shard images: materialize image_shards (it builds every size its consumers read)"
        )
    try:
        tiny = paths.tiny_base_dir(cfg.tiny_width, cfg.tiny_pretrain_steps, cfg.tiny_vision_pretrain_steps, cfg.tiny_instruct_steps)
        return ensure_base(cfg, tiny, examples.reports, training_digest(rows), log, images=examples.images)
    except FileNotFoundError as e:
        raise needs.failure(str(e)) from None


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
        "image_shards": ALL_SHARDS_IN,
        "report_hints": dg.AssetIn(REPORT_HINTS),
    },
    **needs.VLM.asset_args(),
)
def generated_reports(
    context: dg.AssetExecutionContext,
    report_adapter: Adapter,
    report_pairs: pl.DataFrame,
    image_shards: ShardSet,
    report_hints: pl.DataFrame,
    config: GenerateConfig,
    storage: CxrStorage,
    mlflow: MlflowTracking,
    compute: Compute,
) -> dg.Output:

    paths, card = storage.paths, report_adapter.card  # the card: the adapter's base, size, prompt variant
    hw = compute.resolved(paths)
    train_texts = report_pairs.filter(pl.col("split") == "train")["text"].to_list()
    cfg = run_settings(context, paths, derived={"max_new_tokens": lambda: report_token_budget(report_adapter.base, train_texts)})
    shards = image_shards.at(report_adapter.size)
    out, rows, prompts, variant = test_split_reports(report_pairs, shards, report_adapter.dir, card, report_hints, cfg, hw.device)
    sheet = report_sheet(paths.report_sheet, shards, out, prompts)
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**params(cfg), **hw.params, "prompt_variant": variant, "base": card["base"]})
        run.log_params({"quantize": card.get("quantize", True)})
        _log_pairs(run, rows, prompts, report_adapter.size, "test", paths.report_pairs)
        run.log_metrics({"reports": out.height, "empty_adapter_reports": sum(1 for t in out["adapter"].to_list() if not (t or "").strip())})
        run.log_table(out.head(50), "generated_reports")
        if sheet is not None:
            run.log_artifact(sheet)
    md = {"prompt_variant": variant, "decoding": "greedy" if cfg.num_beams == 1 else f"beam {cfg.num_beams}"}
    md["report_sheet"] = (
        inline_png(sheet, f"{len(sheet_rows(out))} test studies: image, reference, generated") if sheet else "no test study"
    )
    md.update(examples=table_metadata(out.head(5)), **resolved_metadata(cfg))
    return dg.Output(out, metadata=asset_metadata(run, **md))


@_asset(
    REPORT_METRICS,
    [],
    "System x BLEU-1..4 / METEOR / ROUGE-L / CIDEr (pycocoevalcap) and clinical-efficacy P/R/F1 from the report labeler.",
    {"polars", "parquet"},
    **needs.TABLE.asset_args(),
)
def report_metrics(
    context: dg.AssetExecutionContext, generated_reports: pl.DataFrame, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.Output:

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
