"""The test split's reports from every system: the adapter, and the two baselines built from the classifiers."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from cxr_pipeline.data.shard_reader import Shards, load_images
from cxr_pipeline.reports.baselines import baseline_reports
from cxr_pipeline.reports.pairs import evaluation_name
from cxr_pipeline.reports.prompts import prompts_for
from cxr_pipeline.reports.vlm import generate_reports

SYSTEMS = ("adapter", "template", "retrieval")


def test_split_reports(pairs: pl.DataFrame, shards: Shards, adapter_dir: Path, card: dict, hints: pl.DataFrame | None, cfg, device):
    """Reports for the test split (the first ``cfg.max_test_pairs`` by ``dicom_id``) from the adapter (deterministic
    decoding under the resolved ``GenerateConfig``), a template and nearest-neighbour retrieval from the
    report hints table (``vision.folds.report_hints``). Returns the table (one row per test image: ids,
    reference, radiologist labels, one column per system, the evaluation's name), the test rows read (with each
    image's ``content_hash``), the prompts and their variant."""

    test = pairs.filter(pl.col("split") == "test").sort("dicom_id")
    test = test.head(cfg.max_test_pairs) if cfg.max_test_pairs is not None else test
    images, rows = load_images(shards, test)  # at the adapter's size (``card["size"]``)
    prompts, variant = prompts_for(rows, hints, card["prompt_variant"] != "instruction")
    gen = {"max_new_tokens": cfg.max_new_tokens, "num_beams": cfg.num_beams, "batch_size": cfg.batch_size, "device": device}
    adapter_out = generate_reports(Path(card["base"]), adapter_dir, [im.numpy() for im in images], prompts, **gen)
    # retrieval matches test images to training images by the hint probabilities: out-of-fold on the training side
    template, retrieval = baseline_reports(rows, pairs.filter(pl.col("split") == "train"), hints)
    radiologist = [c for c in rows.columns if c.startswith("radiologist_")]
    source = pairs["text_source"][0] if "text_source" in pairs.columns and pairs.height else "findings"
    out = rows.select("dicom_id", "subject_id", "study_id", pl.col("text").alias("reference"), *radiologist).with_columns(
        *[pl.Series(name, texts, dtype=pl.String) for name, texts in zip(SYSTEMS, (adapter_out, template, retrieval), strict=True)],
        pl.lit(evaluation_name(source, cfg.max_test_pairs or 0)).alias("evaluation"),
    )
    return out, rows, prompts, variant
