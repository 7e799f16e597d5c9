"""manifest -> report_pairs -> report_adapter -> generated_reports -> report_metrics."""

import json
import os
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.data.io import write_parquet
from cxr_pipeline.data.shards import load_images
from cxr_pipeline.defs.classifier import CLASSIFIER_PREDICTIONS, GPU_TAGS, classifier_dir
from cxr_pipeline.defs.manifest import MANIFEST, read_manifest
from cxr_pipeline.defs.resources import CxrStorage, MlflowTracking, mlflow_metadata, table_metadata, to_dataclass
from cxr_pipeline.defs.shards import IMAGE_SHARDS, shard_root
from cxr_pipeline.labels import SLUGS
from cxr_pipeline.settings import image_size

REPORT_PAIRS = "report_pairs"
REPORT_ADAPTER = "report_adapter"
GENERATED_REPORTS = "generated_reports"
REPORT_METRICS = "report_metrics"
REPORTS_CODE_VERSION = "1"


def reports_dir(storage: CxrStorage) -> Path:
    return storage.asset_dir("reports")


class PairsConfig(dg.Config):
    text_source: str = "findings"  # findings (else impression) | impression | findings+impression
    min_words: int = 1
    max_words: int = 0  # 0: no limit (the seeds kept 20-65 words)


@dg.asset(
    name=REPORT_PAIRS,
    deps=[MANIFEST],
    group_name="reports",
    code_version=REPORTS_CODE_VERSION,
    kinds={"polars", "parquet"},
    description="Image reference + target report text per manifest image, in the manifest's patient-level split (a study never spans two splits).",
)
def report_pairs(
    context: dg.AssetExecutionContext, config: PairsConfig, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    from cxr_pipeline.reports.pairs import build_pairs, splits_by_study_ok

    pairs = build_pairs(read_manifest(storage), config.text_source, config.min_words, config.max_words)
    if not splits_by_study_ok(pairs):
        raise dg.Failure("a study appears in two splits: the manifest's split is broken")
    path = write_parquet(pairs, reports_dir(storage) / "report_pairs.parquet")
    counts = {s: int((pairs["split"] == s).sum()) for s in ("train", "validate", "test")}
    with mlflow.run(context) as run:
        run.log_params(config.model_dump())
        run.log_metrics({**{f"pairs_{k}": v for k, v in counts.items()}, "mean_words": float(pairs["words"].mean() or 0)})
        links = mlflow_metadata(run)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "dagster/row_count": pairs.height,
            "by_split": dg.MetadataValue.json(counts),
            "mean_words": float(pairs["words"].mean() or 0),
            **links,
        }
    )


class AdapterAssetConfig(dg.Config):
    """The seeds' QLoRA recipe; ``base`` empty: $CXR_VLM_BASE, else the tiny offline Mllama."""

    base: str = ""
    size: int = image_size()  # shard size the images are read at
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


def _predictions(storage: CxrStorage) -> pl.DataFrame | None:
    p = storage.paths.assets / "classifier" / "classifier_predictions.parquet"
    return pl.read_parquet(p) if p.exists() else None


def _prompts(rows: pl.DataFrame, preds: pl.DataFrame | None, use: bool) -> tuple[list[str], str]:
    from cxr_pipeline.reports.vlm import findings_hint, user_prompt

    if not use or preds is None:
        return [user_prompt()] * rows.height, "instruction"
    cols = [s for s in SLUGS if s in preds.columns]
    j = rows.select("dicom_id").join(preds, on="dicom_id", how="left", maintain_order="left")
    return [user_prompt(findings_hint({c: r[c] for c in cols})) for r in j.iter_rows(named=True)], "instruction+classifier_findings"


def _base_dir(storage: CxrStorage, config_base: str, train_texts: list[str], log) -> Path:
    from cxr_pipeline.reports.vlm import TINY_MARKER, build_tiny_base

    base = config_base or os.environ.get("CXR_VLM_BASE", "")
    if base:
        if not Path(base).is_dir():
            raise dg.Failure(f"{base}: base model directory not found (nothing is downloaded; set CXR_VLM_BASE to a local copy)")
        return Path(base)
    tiny = storage.asset_dir("reports", "tiny_base")
    if not (tiny / TINY_MARKER).exists():
        log(f"building the tiny offline Mllama base in {tiny}")
        build_tiny_base(tiny, train_texts)
    return tiny


@dg.asset(
    name=REPORT_ADAPTER,
    deps=[REPORT_PAIRS, dg.AssetDep(IMAGE_SHARDS, partition_mapping=dg.AllPartitionMapping()), CLASSIFIER_PREDICTIONS],
    group_name="reports",
    code_version=REPORTS_CODE_VERSION,
    pool="gpu",
    op_tags=GPU_TAGS,
    kinds={"pytorch", "peft"},
    retry_policy=dg.RetryPolicy(max_retries=1, delay=10),
    description="QLoRA adapter (4-bit NF4 base, LoRA on the language model's attention incl. cross-attention and MLP) that writes a report from an image.",
)
def report_adapter(
    context: dg.AssetExecutionContext, config: AdapterAssetConfig, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    from cxr_pipeline.reports.vlm import base_info, train_adapter

    pairs = pl.read_parquet(reports_dir(storage) / "report_pairs.parquet")
    train = pairs.filter(pl.col("split") == "train")
    if config.max_train_pairs:
        train = train.sample(min(config.max_train_pairs, train.height), seed=config.seed)
    images, rows = load_images(shard_root(storage, config.size), train, config.size)
    if rows.height == 0:
        raise dg.Failure("no training pairs with shard images: materialize image_shards (at this size) first")
    prompts, variant = _prompts(rows, _predictions(storage), config.use_classifier_findings)
    base = _base_dir(storage, config.base, rows["text"].to_list(), context.log.info)
    out = storage.asset_dir("reports", "adapter")
    cfg = config.adapter_config()
    examples = [{"image": images[i].numpy(), "prompt": prompts[i], "report": t} for i, t in enumerate(rows["text"].to_list())]
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**cfg.__dict__, **base_info(base), "prompt_variant": variant, "train_pairs": len(examples), "size": config.size})
        res = train_adapter(
            base,
            examples,
            cfg,
            out,
            log=context.log.info,
            on_log=lambda step, logs: run.log_metrics({k: v for k, v in logs.items() if isinstance(v, int | float)}, step=step),
        )
        run.log_artifact(out / "adapter", "adapter")
        links = mlflow_metadata(run)
    losses = [h["loss"] for h in res["log_history"] if "loss" in h]
    (out / "adapter" / "cxr_adapter.json").write_text(
        json.dumps({"base": str(base), "prompt_variant": variant, "size": config.size, **base_info(base)})
    )
    return dg.MaterializeResult(
        metadata={
            "adapter": dg.MetadataValue.path(str(out / "adapter")),
            "base": str(base),
            "prompt_variant": variant,
            "train_pairs": len(examples),
            "first_loss": float(losses[0]) if losses else float("nan"),
            "last_loss": float(losses[-1]) if losses else float("nan"),
            "resumed_from": res["resumed_from"] or "",
            **links,
        }
    )


class GenerateConfig(dg.Config):
    max_new_tokens: int = 96
    num_beams: int = 1  # greedy; > 1: beam search. No sampling.
    batch_size: int = 8
    max_test_pairs: int = 0  # 0: every test pair


@dg.asset(
    name=GENERATED_REPORTS,
    deps=[REPORT_ADAPTER, REPORT_PAIRS, CLASSIFIER_PREDICTIONS],
    group_name="reports",
    code_version=REPORTS_CODE_VERSION,
    pool="gpu",
    op_tags=GPU_TAGS,
    retry_policy=dg.RetryPolicy(max_retries=1, delay=10),
    kinds={"pytorch", "parquet"},
    description="Test-split reports from the adapter (deterministic decoding), a template from the classifiers, and nearest-neighbour retrieval.",
)
def generated_reports(
    context: dg.AssetExecutionContext, config: GenerateConfig, storage: CxrStorage, mlflow: MlflowTracking
) -> dg.MaterializeResult:
    from cxr_pipeline.reports.baselines import nearest_reports, template_report
    from cxr_pipeline.reports.vlm import generate_reports

    meta = json.loads((storage.paths.assets / "reports" / "adapter" / "adapter" / "cxr_adapter.json").read_text())
    size = int(meta["size"])
    pairs = pl.read_parquet(reports_dir(storage) / "report_pairs.parquet")
    test = pairs.filter(pl.col("split") == "test").sort("dicom_id")
    if config.max_test_pairs:
        test = test.head(config.max_test_pairs)
    images, rows = load_images(shard_root(storage, size), test, size)
    preds = _predictions(storage)
    prompts, variant = _prompts(rows, preds, meta["prompt_variant"] != "instruction")
    adapter_out = generate_reports(
        Path(meta["base"]),
        storage.paths.assets / "reports" / "adapter" / "adapter",
        [im.numpy() for im in images],
        prompts,
        max_new_tokens=config.max_new_tokens,
        num_beams=config.num_beams,
        batch_size=config.batch_size,
    )
    cols = [s for s in SLUGS if preds is not None and s in preds.columns]
    thresholds = {}
    for s in cols:
        f = classifier_dir(storage, s) / "metrics.json"
        if f.exists():
            thresholds[s] = json.loads(f.read_text()).get("threshold") or 0.5
    if preds is not None and cols:
        pt = rows.select("dicom_id").join(preds, on="dicom_id", how="left", maintain_order="left")
        template = [template_report({c: r[c] for c in cols}, thresholds) for r in pt.iter_rows(named=True)]
        train = pairs.filter(pl.col("split") == "train").join(preds, on="dicom_id", how="inner")
        retrieval = nearest_reports(train.select(cols).to_numpy(), train["text"].to_list(), pt.select(cols).to_numpy())
    else:
        template = [template_report({})] * rows.height
        retrieval = [""] * rows.height
    out = rows.select("dicom_id", "study_id", pl.col("text").alias("reference")).with_columns(
        pl.Series("adapter", adapter_out, dtype=pl.String),
        pl.Series("template", template, dtype=pl.String),
        pl.Series("retrieval", retrieval, dtype=pl.String),
    )
    path = write_parquet(out, reports_dir(storage) / "generated_reports.parquet")
    with mlflow.run(context, {"prompt_variant": variant}) as run:
        run.log_params({**config.model_dump(), "prompt_variant": variant, "base": meta["base"]})
        run.log_metrics({"reports": out.height, "empty_adapter_reports": sum(1 for t in adapter_out if not t.strip())})
        run.log_table(out.head(50), "generated_reports")
        links = mlflow_metadata(run)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "dagster/row_count": out.height,
            "prompt_variant": variant,
            "decoding": "greedy" if config.num_beams == 1 else f"beam {config.num_beams}",
            "examples": table_metadata(out.head(5)),
            **links,
        }
    )


SYSTEMS = ("adapter", "template", "retrieval")


@dg.asset(
    name=REPORT_METRICS,
    deps=[GENERATED_REPORTS],
    group_name="reports",
    code_version=REPORTS_CODE_VERSION,
    kinds={"polars", "parquet"},
    description="System x BLEU-1..4 / METEOR / ROUGE-L / CIDEr (pycocoevalcap) and clinical-efficacy P/R/F1 from the report labeler.",
)
def report_metrics(context: dg.AssetExecutionContext, storage: CxrStorage, mlflow: MlflowTracking) -> dg.MaterializeResult:
    import shutil

    from cxr_pipeline.reports.metrics import clinical_efficacy, nlg_scores

    gen = pl.read_parquet(reports_dir(storage) / "generated_reports.parquet")
    refs = gen["reference"].to_list()
    rows, bad_total = [], 0
    meteor = shutil.which("java") is not None
    if not meteor:
        context.log.warning("java not found: METEOR is skipped")
    for system in SYSTEMS:
        hyps = gen[system].to_list()
        ce, bad = clinical_efficacy(refs, hyps)
        bad_total += bad
        rows.append({"system": system, "n": len(hyps), **nlg_scores(refs, hyps, meteor=meteor), **ce})
    table = pl.DataFrame(rows)
    path = write_parquet(table, reports_dir(storage) / "report_metrics.parquet")
    if bad_total:
        context.log.warning(f"{bad_total} empty or malformed reports were labelled all-blank")
    with mlflow.run(context) as run:
        run.log_table(table, "report_metrics")
        for r in rows:
            run.log_metrics({f"{r['system']}.{k}": v for k, v in r.items() if isinstance(v, float)})
        run.log_table(gen.head(20), "example_reports")
        links = mlflow_metadata(run)
    show = table.select(
        "system", "BLEU_1", "BLEU_4", *(["METEOR"] if meteor else []), "ROUGE_L", "CIDEr", "ce_micro14_f1", "ce_macro14_f1", "ce_micro5_f1"
    ).with_columns(pl.col(pl.Float64).round(4))
    examples = "\n".join(
        f"| {r['reference'][:120]} | {r['adapter'][:120]} | {r['template'][:120]} | {r['retrieval'][:120]} |"
        for r in gen.head(4).iter_rows(named=True)
    )
    md = "| reference | adapter | template | retrieval |\n|---|---|---|---|\n" + examples
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "table": table_metadata(show),
            "empty_or_malformed": bad_total,
            "examples": dg.MetadataValue.md(md),
            **links,
        }
    )


REPORT_ASSETS = [report_pairs, report_adapter, generated_reports, report_metrics]
