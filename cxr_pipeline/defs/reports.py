"""manifest -> report_pairs -> report_adapter -> generated_reports -> report_metrics.

The work is in ``reports/`` (pairs, the Mllama adapter, baselines, metrics);
these assets read config, call it, log to MLflow and return metadata.
"""

import os
import shutil
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.data.io import write_parquet
from cxr_pipeline.data.shards import lazy_images, load_images
from cxr_pipeline.defs.classifier import CLASSIFIER_PREDICTIONS, MULTILABEL_CLASSIFIER
from cxr_pipeline.defs.helpers import (
    asset_factory,
    asset_metadata,
    effective_config,
    every_partition_of,
    gpu_asset,
    report_shard_size,
    table_metadata,
    to_dataclass,
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


class PairsConfig(dg.Config):
    text_source: str = "findings"  # findings (else impression) | impression | findings+impression | findings_only (R2Gen)
    min_words: int = 1
    max_words: int = 0  # 0: no limit (the seeds kept 20-65 words)


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

    config = effective_config(context, config, storage.paths)
    pairs = build_pairs(read_manifest(storage), config.text_source, config.min_words, config.max_words)
    if not splits_by_study_ok(pairs):
        raise dg.Failure("a study appears in two splits: the manifest's split is broken")
    path = write_parquet(pairs, storage.paths.report_pairs)
    counts = {s: int((pairs["split"] == s).sum()) for s in ("train", "validate", "test")}
    mean_words = float(pairs["words"].mean() or 0)
    with mlflow.run(context) as run:
        run.log_params(config.model_dump())
        run.log_metrics({**{f"pairs_{k}": v for k, v in counts.items()}, "mean_words": mean_words})
    return dg.MaterializeResult(
        metadata=asset_metadata(run, path, pairs.height, by_split=dg.MetadataValue.json(counts), mean_words=mean_words)
    )


class AdapterAssetConfig(dg.Config):
    """The seeds' QLoRA recipe; ``base`` empty: $CXR_VLM_BASE, else the tiny offline Mllama."""

    base: str = ""
    size: int = 0  # shard size the images are read at; 0: the base's tile (560 for the 11B, 56 for the tiny base)
    r: int = 20
    alpha: int = 20
    dropout: float = 0.0
    target: str = "language"
    lr: float = 1e-4
    warmup_steps: int = 5
    max_steps: int = 200
    batch_size: int = 8
    accumulation: int = 4
    max_length: int = 2048
    quantize: bool = True
    use_classifier_findings: bool = True  # when classifier_predictions exist
    max_train_pairs: int = 0  # 0: all
    seed: int = 0

    def adapter_config(self):
        from cxr_pipeline.reports.vlm import AdapterConfig

        return to_dataclass(self, AdapterConfig)


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


def _base_dir(paths: Paths, config_base: str, train_texts: list[str], log) -> Path:
    from cxr_pipeline.reports.vlm import TINY_MARKER, build_tiny_base

    base = config_base or os.environ.get("CXR_VLM_BASE", "")
    if base:
        if not Path(base).is_dir():
            raise dg.Failure(f"{base}: base model directory not found (nothing is downloaded; set CXR_VLM_BASE to a local copy)")
        return Path(base)
    if not (paths.tiny_base / TINY_MARKER).exists():
        log(f"building the tiny offline Mllama base in {paths.tiny_base}")
        build_tiny_base(paths.tiny_base, train_texts)
    return paths.tiny_base


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
    from cxr_pipeline.reports.vlm import TrainingPairs, base_info, prompts_for, train_adapter

    config = effective_config(context, config, storage.paths)
    paths, size, cfg = storage.paths, report_shard_size(config.size, config.base), config.adapter_config()
    train = pl.read_parquet(paths.report_pairs).filter(pl.col("split") == "train")
    if config.max_train_pairs:
        train = train.sample(min(config.max_train_pairs, train.height), seed=config.seed)
    images, rows = lazy_images(paths.shard_root(size), train, size)  # read from the shards batch by batch
    if rows.height == 0:
        raise dg.Failure(
            f"no training pairs with {size}-px shard images: materialize image_shards (with its default size 0 it builds"
            " every size pipeline.yaml's consumers read, this one included)"
        )
    hints, thresholds, hint_source = _hints(paths)
    prompts, variant = prompts_for(rows, hints, config.use_classifier_findings, thresholds)
    base = _base_dir(paths, config.base, rows["text"].to_list(), context.log.info)
    examples = TrainingPairs(images, prompts, rows["text"].to_list())
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**cfg.__dict__, **base_info(base), "prompt_variant": variant, "train_pairs": len(examples), "size": size})
        run.log_params({"hint_source": hint_source})
        _log_pairs(run, rows, prompts, size, "train", paths)
        res = train_adapter(
            base,
            examples,
            cfg,
            paths.adapter,
            paths.adapter_checkpoints,
            device=compute.torch_device(),
            card={"prompt_variant": variant, "size": size, "hint_source": hint_source},
            log=context.log.info,
            on_log=lambda step, logs: run.log_metrics({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=step),
        )
        run.log_artifact(paths.adapter, "adapter")
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    return dg.MaterializeResult(
        metadata=asset_metadata(
            run,
            adapter=dg.MetadataValue.path(str(paths.adapter)),
            base=str(base),
            prompt_variant=variant,
            hint_source=hint_source,
            train_pairs=len(examples),
            first_loss=float(losses[0]) if losses else float("nan"),
            last_loss=float(losses[-1]) if losses else float("nan"),
            resumed_from=res["resumed_from"] or "",
        )
    )


class GenerateConfig(dg.Config):
    max_new_tokens: int = 0  # 0: the 99th percentile of the training reports' token lengths
    num_beams: int = 1  # greedy; > 1: beam search. No sampling.
    batch_size: int = 8
    max_test_pairs: int = 0  # 0: every test pair


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

    paths, config = storage.paths, effective_config(context, config, storage.paths)
    card = read_adapter_card(paths.adapter)  # the adapter's base, quantisation, size and prompt variant
    pairs = pl.read_parquet(paths.report_pairs)
    test = pairs.filter(pl.col("split") == "test").sort("dicom_id")
    if config.max_test_pairs:
        test = test.head(config.max_test_pairs)
    images, rows = load_images(paths.shard_root(int(card["size"])), test, int(card["size"]))
    preds, thresholds, hint_source = _hints(paths)
    prompts, variant = prompts_for(rows, preds, card["prompt_variant"] != "instruction", thresholds)
    train_pairs = pairs.filter(pl.col("split") == "train")
    max_new = config.max_new_tokens or report_token_budget(Path(card["base"]), train_pairs["text"].to_list())
    adapter_out = generate_reports(
        Path(card["base"]),
        paths.adapter,
        [im.numpy() for im in images],
        prompts,
        max_new_tokens=max_new,
        num_beams=config.num_beams,
        batch_size=config.batch_size,
        device=compute.torch_device(),
    )
    # retrieval matches test images to training images by these probabilities: out-of-fold on the training side
    template, retrieval = baseline_reports(rows, train_pairs, preds, thresholds)
    radiologist = [c for c in rows.columns if c.startswith("radiologist_")]
    source = pairs["text_source"][0] if "text_source" in pairs.columns and pairs.height else "findings"
    out = rows.select("dicom_id", "study_id", pl.col("text").alias("reference"), *radiologist).with_columns(
        *[pl.Series(name, texts, dtype=pl.String) for name, texts in zip(SYSTEMS, (adapter_out, template, retrieval), strict=True)],
        pl.lit(evaluation_name(source, config.max_test_pairs)).alias("evaluation"),
    )
    path = write_parquet(out, paths.generated_reports)
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**config.model_dump(), "prompt_variant": variant, "base": card["base"], "quantize": card.get("quantize", True)})
        run.log_params({"max_new_tokens_used": max_new})
        _log_pairs(run, rows, prompts, int(card["size"]), "test", paths)
        run.log_metrics({"reports": out.height, "empty_adapter_reports": sum(1 for t in adapter_out if not t.strip())})
        run.log_table(out.head(50), "generated_reports")
    decoding = "greedy" if config.num_beams == 1 else f"beam {config.num_beams}"
    return dg.MaterializeResult(
        metadata=asset_metadata(
            run, path, out.height, prompt_variant=variant, decoding=decoding, max_new_tokens=max_new, examples=table_metadata(out.head(5))
        )
    )


@_asset(
    REPORT_METRICS,
    [GENERATED_REPORTS],
    "System x BLEU-1..4 / METEOR / ROUGE-L / CIDEr (pycocoevalcap) and clinical-efficacy P/R/F1 from the report labeler.",
    {"polars", "parquet"},
)
def report_metrics(context: dg.AssetExecutionContext, storage: CxrStorage, mlflow: MlflowTracking) -> dg.MaterializeResult:
    from cxr_pipeline.reports.labeler import labeler_version
    from cxr_pipeline.reports.metrics import INTERVAL_METRICS, radiologist_labels, report_intervals, score_systems, side_by_side_markdown

    gen = pl.read_parquet(storage.paths.generated_reports)
    meteor = shutil.which("java") is not None
    if not meteor:
        context.log.warning("java not found: METEOR is skipped")
    rows, bad_total = score_systems(gen["reference"].to_list(), {s: gen[s].to_list() for s in SYSTEMS}, meteor=meteor)
    if "radiologist_labelled" in gen.columns and gen["radiologist_labelled"].any():
        # the radiologist-labelled test studies, the references' labels from the radiologist
        rad = gen.filter(pl.col("radiologist_labelled"))
        systems = {s: rad[s].to_list() for s in SYSTEMS}
        more, _ = score_systems(rad["reference"].to_list(), systems, meteor, radiologist_labels(rad), "radiologist")
        rows += more
    evaluation = gen["evaluation"][0] if "evaluation" in gen.columns and gen.height else "findings references"
    table = pl.DataFrame(rows).with_columns(pl.lit(evaluation).alias("evaluation"), pl.lit(labeler_version()).alias("labeler"))
    # 95% intervals over test studies, and paired ones for each difference between systems
    iv, diffs = report_intervals(gen["reference"].to_list(), {s: gen[s].to_list() for s in SYSTEMS}, gen["study_id"].to_list())
    bounds = [f"{m}_{b}" for m in INTERVAL_METRICS for b in ("lo", "hi")]
    iv_table = pl.DataFrame(iv).select("system", *bounds).with_columns(pl.lit("labeler").alias("test_labels"))
    table = table.join(iv_table, on=["system", "test_labels"], how="left")
    differences = pl.DataFrame(diffs, schema_overrides={"lo": pl.Float64, "hi": pl.Float64, "better": pl.String})
    write_parquet(differences, storage.paths.report_metrics.with_name("report_differences.parquet"))
    path = write_parquet(table, storage.paths.report_metrics)
    if bad_total:
        context.log.warning(f"{bad_total} empty or malformed reports were labelled all-blank")
    with mlflow.run(context) as run:
        run.log_params({"labeler": labeler_version(), "evaluation": evaluation})
        run.log_datasets("generated-reports", {"test": gen.select("study_id", "reference", *SYSTEMS)}, storage.paths.generated_reports)
        run.log_table(table, "report_metrics")
        run.log_table(differences, "report_differences")
        for r in rows:
            prefix = r["system"] + (".radiologist" if r["test_labels"] == "radiologist" else "")
            run.log_metrics({f"{prefix}.{k}": v for k, v in r.items() if isinstance(v, float)})
        run.log_table(gen.head(20), "example_reports")
    shown = (
        "system",
        "BLEU_1",
        "BLEU_4",
        *(["METEOR"] if meteor else []),
        "ROUGE_L",
        "CIDEr",
        "ce_micro14_f1",
        "ce_macro14_f1",
        "ce_micro5_f1",
        "ce_micro14_f1_lo",
        "ce_micro14_f1_hi",
        "ce_upos_micro14_f1",
        "ce_upos_micro5_f1",
    )
    show = table.select(shown).with_columns(pl.col(pl.Float64).round(4))
    examples = dg.MetadataValue.md(side_by_side_markdown(gen, SYSTEMS))
    return dg.MaterializeResult(
        metadata=asset_metadata(
            run,
            path,
            table=table_metadata(show),
            empty_or_malformed=bad_total,
            examples=examples,
            evaluation=evaluation,
            labeler=labeler_version(),
        )
    )


REPORT_ASSETS = [report_pairs, report_adapter, generated_reports, report_metrics]
