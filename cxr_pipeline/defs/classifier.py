"""image_shards + manifest -> classifier[14 pathologies] -> classifier_metrics, classifier_predictions."""

import json
from pathlib import Path

import dagster as dg
import polars as pl

from cxr_pipeline.data.io import atomic_path, write_parquet
from cxr_pipeline.data.shards import load_images
from cxr_pipeline.defs.manifest import MANIFEST, read_manifest
from cxr_pipeline.defs.resources import Compute, CxrStorage, MlflowTracking, mlflow_metadata, table_metadata, to_dataclass
from cxr_pipeline.defs.shards import IMAGE_SHARDS, shard_root
from cxr_pipeline.labels import LABEL_BY_SLUG, LABELS, SLUGS, slug
from cxr_pipeline.settings import image_size

CLASSIFIER = "classifier"
CLASSIFIER_METRICS = "classifier_metrics"
CLASSIFIER_PREDICTIONS = "classifier_predictions"
CLASSIFIER_CODE_VERSION = "1"
# On Kubernetes (docker/helm/values.yaml) the step pod asks for one GPU.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}
label_partitions = dg.StaticPartitionsDefinition(list(SLUGS))

# The 2024 seeds' published test ROC-AUC (ResNet-18, MIMIC-CXR-JPG PA), with the three
# rows their notebook shifted by one put back under the right pathology.
SEED_AUC = {
    "Pneumonia": 0.6914,
    "Pleural Effusion": 0.8618,
    "Pneumothorax": 0.6667,
    "Cardiomegaly": 0.8279,
    "Consolidation": 0.6000,
    "Edema": 0.7270,
}


def registered_name(label_slug: str) -> str:
    return "cxr-" + label_slug.replace("_", "-")


def classifier_dir(storage: CxrStorage, label_slug: str) -> Path:
    return storage.asset_dir("classifier", label_slug)


class ClassifierConfig(dg.Config):
    """Defaults follow the 2024 seeds (ResNet-18, AdamW 1e-4 / 0.01, batch 32 x 4, patience 5)."""

    arch: str = "resnet18"
    weights: str = ""  # optional local backbone weights (.safetensors / .pt)
    size: int = image_size()  # must match the image_shards size
    epochs: int = 20
    batch_size: int = 32
    accumulation: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.01
    patience: int = 5
    imbalance: str = "pos_weight"
    rotation: float = 10.0
    hflip: bool = True
    dropout: float = 0.2
    precision: str = "auto"
    seed: int = 0
    uncertain: str = "ignore"
    blank: str = "ignore"
    bootstrap: int = 1000

    def train_config(self):
        from cxr_pipeline.vision.train import TrainConfig

        return to_dataclass(self, TrainConfig, weights=self.weights or None)


def _register(run, label_slug: str, test_auc: float | None, log) -> dict:
    """New model version -> alias ``candidate``; ``champion`` when its test AUC beats the champion's."""
    client = run.client
    name = registered_name(label_slug)
    try:
        client.get_registered_model(name)
    except Exception:
        client.create_registered_model(
            name, description=f"Binary {LABEL_BY_SLUG[label_slug]} classifier on chest radiographs (cxr_pipeline)"
        )
    source = f"{client.get_run(run.run_id).info.artifact_uri}/checkpoint"
    tags = {"test_auc": "nan" if test_auc is None else f"{test_auc:.6f}", "pathology": LABEL_BY_SLUG[label_slug]}
    mv = client.create_model_version(name, source=source, run_id=run.run_id, tags=tags)
    client.set_registered_model_alias(name, "candidate", mv.version)
    champion_auc = None
    try:
        champ = client.get_model_version_by_alias(name, "champion")
        champion_auc = float(champ.tags.get("test_auc", "nan"))
    except Exception:
        champ = None
    promoted = False
    if test_auc is not None and (champ is None or not champion_auc == champion_auc or test_auc > champion_auc):
        client.set_registered_model_alias(name, "champion", mv.version)
        promoted = True
    log(f"registered {name} v{mv.version} (candidate{', champion' if promoted else ''})")
    return {"name": name, "version": int(mv.version), "champion": promoted, "previous_champion_auc": champion_auc}


@dg.asset(
    name=CLASSIFIER,
    deps=[dg.AssetDep(IMAGE_SHARDS, partition_mapping=dg.AllPartitionMapping()), MANIFEST],
    partitions_def=label_partitions,
    group_name="classifiers",
    code_version=CLASSIFIER_CODE_VERSION,
    pool="gpu",
    op_tags=GPU_TAGS,
    kinds={"pytorch", "safetensors"},
    retry_policy=dg.RetryPolicy(max_retries=1, delay=10),
    description="One binary CNN per CheXpert observation: best-validation-loss weights (safetensors), test metrics with CIs, MLflow run and registered model.",
)
def classifier(
    context: dg.AssetExecutionContext, config: ClassifierConfig, storage: CxrStorage, mlflow: MlflowTracking, compute: Compute
) -> dg.MaterializeResult:
    import torch
    from safetensors.torch import save_file

    from cxr_pipeline.vision.evaluate import curves_figure, evaluate
    from cxr_pipeline.vision.labels import targets
    from cxr_pipeline.vision.train import predict, resolve_precision, train

    label_slug = context.partition_key
    label = LABEL_BY_SLUG[label_slug]
    cfg = config.train_config()
    device = compute.torch_device()
    out = classifier_dir(storage, label_slug)
    manifest = read_manifest(storage)
    usable = targets(manifest, label_slug, config.uncertain, config.blank)
    root = shard_root(storage, config.size)

    def split(name: str):
        imgs, rows = load_images(root, usable.filter(pl.col("split") == name), config.size)
        return imgs, torch.tensor(rows["target"].to_numpy(), dtype=torch.float32), rows

    (xtr, ytr, _), (xva, yva, _), (xte, yte, rte) = split("train"), split("validate"), split("test")
    counts = {f"n_{s}": int(x.shape[0]) for s, x in (("train", xtr), ("validate", xva), ("test", xte))}
    counts.update({f"n_{s}_pos": int(y.sum()) for s, y in (("train", ytr), ("validate", yva), ("test", yte))})
    context.log.info(f"{label}: {counts} on {compute.describe()}")
    if counts["n_train"] == 0 or counts["n_train_pos"] in (0, counts["n_train"]):
        # Rare labels on small subsets: record why, keep no model, never crash the backfill.
        reason = f"not trainable: the training split has {counts['n_train_pos']} positives of {counts['n_train']} (uncertain={config.uncertain}, blank={config.blank})"
        context.log.warning(f"{label}: {reason}")
        row = {
            "pathology": label,
            "slug": label_slug,
            "evaluable": False,
            "reason": reason,
            "n_test": counts["n_test"],
            "n_pos": counts["n_test_pos"],
            "n_neg": counts["n_test"] - counts["n_test_pos"],
        }
        for name in ("predictions.parquet", "test_scores.parquet"):
            (out / name).unlink(missing_ok=True)
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(row, indent=2))
        return dg.MaterializeResult(metadata={"evaluable": False, "reason": reason, **counts})

    with mlflow.run(context, {"pathology": label}) as run:
        run.log_params(
            {**cfg.__dict__, "uncertain": config.uncertain, "blank": config.blank, "size": config.size, "device": str(device), **counts}
        )
        result = train(
            xtr,
            ytr,
            xva,
            yva,
            cfg,
            device,
            checkpoint_dir=out,
            log=context.log.info,
            on_epoch=lambda row: run.log_metrics({k: v for k, v in row.items() if k != "epoch"}, step=int(row["epoch"])),
        )
        model = result.model
        precision = resolve_precision(cfg.precision, torch.device("cpu"))
        p_val = predict(model, xva, torch.device("cpu"), cfg.eval_batch_size, precision)
        p_test = predict(model, xte, torch.device("cpu"), cfg.eval_batch_size, precision)
        row = evaluate(yte.numpy(), p_test, yva.numpy(), p_val, n_boot=config.bootstrap, seed=config.seed)
        row.update(
            pathology=label,
            slug=label_slug,
            best_epoch=result.best_epoch,
            epochs_run=result.epochs_run,
            train_seconds=round(result.seconds, 1),
        )

        # every manifest image that has a shard gets a probability (report generation uses them)
        all_imgs, all_rows = load_images(root, manifest.select("dicom_id", "split"), config.size)
        p_all = predict(model, all_imgs, torch.device("cpu"), cfg.eval_batch_size, precision)
        preds = all_rows.with_columns(pl.Series("prob", p_all, dtype=pl.Float32))
        write_parquet(preds, out / "predictions.parquet")
        write_parquet(
            rte.select("dicom_id", "target").with_columns(pl.Series("prob", p_test, dtype=pl.Float32)), out / "test_scores.parquet"
        )

        ckpt = out / "checkpoint"
        ckpt.mkdir(exist_ok=True)
        with atomic_path(ckpt / "model.safetensors") as tmp:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
        meta = {
            "arch": cfg.arch,
            "dropout": cfg.dropout,
            "size": config.size,
            "pathology": label,
            "threshold": row["threshold"],
            "normalise": {"mean": 0.5, "std": 0.5},
            "input": "grey uint8 letterboxed, repeated to 3 channels",
        }
        (ckpt / "config.json").write_text(json.dumps(meta, indent=2))
        with atomic_path(out / "metrics.json") as tmp:
            tmp.write_text(json.dumps(row, indent=2))
        (out / "resume.pt").unlink(missing_ok=True)  # finished: the next materialization trains afresh

        run.log_metrics(
            {
                f"test_{k}": v
                for k, v in row.items()
                if k in ("accuracy", "f1", "sensitivity", "specificity", "roc_auc", "average_precision", "threshold") and v is not None
            }
        )
        run.log_metrics({"best_epoch": result.best_epoch, "train_images_per_second": result.images_per_second})
        run.log_artifact(ckpt, "checkpoint")
        run.log_dict(row, "metrics.json")
        if row["evaluable"]:
            fig = curves_figure({label: (yte.numpy(), p_test)}, title=f"{label} ({cfg.arch})")
            run.client.log_figure(run.run_id, fig, "roc_pr.png")
            fig.savefig(out / "roc_pr.png", dpi=80)
        registry = _register(run, label_slug, row["roc_auc"] if row["evaluable"] else None, context.log.info)
        links = mlflow_metadata(run)

    headline = {
        k: (round(row[k], 4) if isinstance(row[k], float) else row[k])
        for k in ("roc_auc", "average_precision", "accuracy", "f1", "threshold", "n_pos", "n_neg")
        if row.get(k) is not None
    }
    return dg.MaterializeResult(
        metadata={
            **headline,
            "evaluable": row["evaluable"],
            "reason": row["reason"],
            "best_epoch": result.best_epoch,
            "epochs_run": result.epochs_run,
            "resumed_from_epoch": result.resumed_from,
            "train_images_per_second": round(result.images_per_second, 1),
            "checkpoint": dg.MetadataValue.path(str(ckpt)),
            "registered_model": f"{registry['name']} v{registry['version']}" + (" (champion)" if registry["champion"] else ""),
            **links,
        }
    )


def _metrics_frame(storage: CxrStorage) -> pl.DataFrame:
    rows = []
    for s in SLUGS:
        f = classifier_dir(storage, s) / "metrics.json"
        if f.exists():
            rows.append(json.loads(f.read_text()))
    if not rows:
        return pl.DataFrame()
    df = pl.DataFrame(rows, infer_schema_length=None)
    order = {lab: i for i, lab in enumerate(LABELS)}
    df = df.with_columns(pl.col("pathology").replace_strict(SEED_AUC, default=None, return_dtype=pl.Float64).alias("seed_auc"))
    return df.sort(pl.col("pathology").replace_strict(order, return_dtype=pl.Int32))


@dg.asset(
    name=CLASSIFIER_METRICS,
    deps=[dg.AssetDep(CLASSIFIER, partition_mapping=dg.AllPartitionMapping())],
    group_name="classifiers",
    code_version=CLASSIFIER_CODE_VERSION,
    kinds={"polars", "parquet"},
    description="Pathology x accuracy / F1 / sensitivity / specificity / ROC-AUC / AP with 95% bootstrap CIs, next to the 2024 seeds' AUC.",
)
def classifier_metrics(context: dg.AssetExecutionContext, storage: CxrStorage, mlflow: MlflowTracking) -> dg.MaterializeResult:
    from cxr_pipeline.vision.evaluate import curves_figure

    df = _metrics_frame(storage)
    if df.height == 0:
        raise dg.Failure("no classifier partition has been materialized yet")
    path = write_parquet(df, storage.asset_dir("classifier") / "classifier_metrics.parquet")
    curves = {}
    for s in df["slug"].to_list():
        f = classifier_dir(storage, s) / "test_scores.parquet"
        if f.exists():
            sc = pl.read_parquet(f)
            curves[LABEL_BY_SLUG[s]] = (sc["target"].to_numpy(), sc["prob"].to_numpy())
    show = df.select(
        "pathology",
        "evaluable",
        "n_pos",
        "n_neg",
        "roc_auc",
        "roc_auc_lo",
        "roc_auc_hi",
        "average_precision",
        "accuracy",
        "f1",
        "sensitivity",
        "specificity",
        "threshold",
        "seed_auc",
        "reason",
    )
    with mlflow.run(context) as run:
        run.log_table(show, "classifier_metrics")
        for r in show.iter_rows(named=True):
            if r["evaluable"]:
                run.log_metrics({f"{slug(r['pathology'])}.roc_auc": r["roc_auc"], f"{slug(r['pathology'])}.f1": r["f1"]})
        fig = curves_figure(curves, "All pathologies, test split")
        fig.savefig(storage.asset_dir("classifier") / "roc_pr_all.png", dpi=80)
        run.client.log_figure(run.run_id, fig, "roc_pr_all.png")
        links = mlflow_metadata(run)
    ev = show.filter(pl.col("evaluable"))
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "table": table_metadata(show.with_columns(pl.col(pl.Float64).round(4))),
            "pathologies": df.height,
            "evaluable": ev.height,
            "mean_roc_auc": float(ev["roc_auc"].mean()) if ev.height else float("nan"),
            "roc_pr": dg.MetadataValue.path(str(storage.asset_dir("classifier") / "roc_pr_all.png")),
            **links,
        }
    )


@dg.asset(
    name=CLASSIFIER_PREDICTIONS,
    deps=[dg.AssetDep(CLASSIFIER, partition_mapping=dg.AllPartitionMapping())],
    group_name="classifiers",
    code_version=CLASSIFIER_CODE_VERSION,
    kinds={"polars", "parquet"},
    description="Per-image probability for each trained pathology (all splits; report generation uses the test split).",
)
def classifier_predictions(context: dg.AssetExecutionContext, storage: CxrStorage, mlflow: MlflowTracking) -> dg.MaterializeResult:
    wide = None
    done = []
    for s in SLUGS:
        f = classifier_dir(storage, s) / "predictions.parquet"
        if not f.exists():
            continue
        p = pl.read_parquet(f).select("dicom_id", "split", pl.col("prob").alias(s))
        wide = p if wide is None else wide.join(p.drop("split"), on="dicom_id", how="full", coalesce=True)
        done.append(s)
    if wide is None:
        raise dg.Failure("no classifier partition has been materialized yet")
    path = write_parquet(wide.sort("dicom_id"), storage.asset_dir("classifier") / "classifier_predictions.parquet")
    context.log.info(f"predictions for {wide.height} images x {len(done)} pathologies")
    with mlflow.run(context) as run:
        run.log_metrics({"images": wide.height, "pathologies": len(done)})
        links = mlflow_metadata(run)
    return dg.MaterializeResult(
        metadata={
            "path": dg.MetadataValue.path(str(path)),
            "dagster/row_count": wide.height,
            "pathologies": dg.MetadataValue.json(done),
            **links,
        }
    )


CLASSIFIER_ASSETS = [classifier, classifier_metrics, classifier_predictions]
