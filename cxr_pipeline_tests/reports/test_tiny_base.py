"""The tiny offline base is keyed by the training split it was built from (#48)."""

from __future__ import annotations

import json

import polars as pl
import pytest

from cxr_pipeline.reports import tiny_base

PAIRS = pl.DataFrame(
    {
        "dicom_id": ["a", "b", "c", "d"],
        "study_id": [1, 2, 3, 4],
        "split": ["train", "train", "validate", "test"],
        "text": ["No acute process.", "Small left effusion.", "Right pneumothorax.", "Cardiomegaly."],
    }
)


def train(pairs: pl.DataFrame) -> pl.DataFrame:
    return pairs.filter(pl.col("split") == "train")


def test_the_digest_covers_the_training_rows_only():
    digest = tiny_base.training_digest(train(PAIRS))
    assert tiny_base.training_digest(train(PAIRS).reverse()) == digest  # order does not matter
    # another validate or test report: the same training split, the same base
    other = PAIRS.with_columns(pl.when(pl.col("split") != "train").then(pl.lit("Other words.")).otherwise(pl.col("text")).alias("text"))
    assert tiny_base.training_digest(train(other)) == digest
    # a corrected training report, a new training image: another base
    fixed = PAIRS.with_columns(
        pl.when(pl.col("dicom_id") == "b").then(pl.lit("Small right effusion.")).otherwise(pl.col("text")).alias("text")
    )
    assert tiny_base.training_digest(train(fixed)) != digest
    added = pl.concat([PAIRS, pl.DataFrame({"dicom_id": ["e"], "study_id": [5], "split": ["train"], "text": ["No effusion."]})])
    assert tiny_base.training_digest(train(added)) != digest
    with pytest.raises(ValueError, match="1 rows are not in the training split.*c"):
        tiny_base.training_digest(PAIRS.filter(pl.col("split") != "test"))


def test_a_changed_training_split_builds_a_new_base_and_the_same_one_reuses_it(tmp_path):
    family = tmp_path / "tiny_base" / "w1_lm0"
    rows = train(PAIRS)
    first = tiny_base.ensure_tiny_base(family, rows["text"].to_list(), tiny_base.training_digest(rows))
    marker = first / tiny_base.TINY_MARKER
    built = marker.stat().st_mtime_ns
    assert json.loads(marker.read_text())["training_digest"] == tiny_base.training_digest(rows)
    assert json.loads(marker.read_text())["build_seconds"] > 0  # what the demo's budget reads
    assert tiny_base.ensure_tiny_base(family, rows["text"].to_list(), tiny_base.training_digest(rows)) == first
    assert marker.stat().st_mtime_ns == built  # reused, not rebuilt

    changed = rows.with_columns(pl.lit("Moderate cardiomegaly with pulmonary edema.").alias("text"))
    second = tiny_base.ensure_tiny_base(family, changed["text"].to_list(), tiny_base.training_digest(changed))
    assert second != first and second.parent == first.parent and first.exists()
    vocab = json.loads((second / "tokenizer.json").read_text())["model"]["vocab"]
    assert any("edema" in token for token in vocab)  # its tokenizer learned the new reports' words
    assert tiny_base.base_info(second)["base_training_digest"] == tiny_base.training_digest(changed)[:16]


def test_report_targets_read_the_labelers_labels():
    from cxr_pipeline.labels import LABELS

    targets = tiny_base.report_targets(["Small left pleural effusion.", "No pneumothorax.", "Possible pneumonia.", ""])
    col = {name: j for j, name in enumerate(LABELS)}
    assert targets.shape == (4, len(LABELS))
    assert targets[0, col["Pleural Effusion"]] == 1 and targets[1, col["Pneumothorax"]] == 0
    assert targets[2, col["Pneumonia"]] != targets[2, col["Pneumonia"]]  # uncertain: NaN, out of the loss
    assert (targets[3] == 0).all()  # nothing mentioned: negative


def test_vision_pretraining_teaches_the_tower_only_on_the_training_images(tmp_path):
    """A bright disc where the report says effusion, none where it says clear: the tower's loss falls; only the
    vision tower's weights change; the marker records it; a base asked for it without images is refused."""
    import numpy as np
    import torch
    from safetensors.torch import load_file

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:64, :64]
    disc = ((yy - 44) ** 2 + (xx - 20) ** 2 < 120).astype(np.float32)
    texts = ["Large left pleural effusion." if i % 2 else "The lungs are clear." for i in range(32)]
    images = [np.clip(rng.normal(90, 20, (64, 64)) + 120 * disc * (i % 2), 0, 255).astype(np.uint8) for i in range(32)]
    rows = pl.DataFrame({"dicom_id": [f"d{i}" for i in range(32)], "study_id": list(range(32)), "text": texts})
    digest = tiny_base.training_digest(rows)
    with pytest.raises(ValueError, match="one image per training report"):
        tiny_base.ensure_tiny_base(tmp_path / "v", texts, digest, vision_steps=5)
    plain = tiny_base.ensure_tiny_base(tmp_path / "plain", texts, digest)
    seen = tiny_base.ensure_tiny_base(tmp_path / "v", texts, digest, vision_steps=40, images=images)
    marker = json.loads((seen / tiny_base.TINY_MARKER).read_text())
    assert marker["vision_steps"] == 40 and marker["vision_loss_last"] < 0.7 * marker["vision_loss_first"]
    before, after = load_file(plain / "model.safetensors"), load_file(seen / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all("vision_model" in k for k in changed)
    assert tiny_base.base_info(seen)["base_model"].startswith("cxr-tiny-mllama w1 lm0 v40")


def test_instruct_prompts_carry_only_the_reports_own_positive_findings():
    prompts = tiny_base.instruct_prompts(
        ["Small right pleural effusion. No pneumothorax.", "Possible pneumonia.", "Moderate cardiomegaly."]
    )
    assert [p.split("\n")[1] for p in prompts] == [
        "Classifier findings: pleural effusion 1.00",  # the negated pneumothorax is not a finding
        "Classifier findings: none",  # uncertain: left out
        "Classifier findings: cardiomegaly 1.00",
    ]


def test_a_base_taught_from_findings_lists_writes_about_the_finding_it_is_told_of(tmp_path):
    """The stand-in for an instruction-tuned base: after findings-list pretraining on the training reports, told of
    an effusion (in the classifiers' hint format, at a probability it never saw) it writes the effusion report, told
    of no finding the normal one; a base given as many steps of plain language pretraining on the same reports does not."""
    import numpy as np

    from cxr_pipeline.reports.prompts import findings_hint, user_prompt
    from cxr_pipeline.reports.vlm import generate_reports

    texts = ["Large left pleural effusion.", "The lungs are clear. No pleural effusion."] * 16
    rows = pl.DataFrame({"dicom_id": [f"d{i}" for i in range(32)], "study_id": list(range(32)), "text": texts})
    digest = tiny_base.training_digest(rows)
    told = [user_prompt(findings_hint({"pleural_effusion": 0.83})), user_prompt(findings_hint({"no_finding": 0.71}))]
    blank = [np.zeros((56, 56), np.uint8)] * 2
    taught = tiny_base.ensure_tiny_base(tmp_path / "i", texts, digest, instruct_steps=150)
    assert json.loads((taught / tiny_base.TINY_MARKER).read_text())["instruct_steps"] == 150
    assert generate_reports(taught, None, blank, told, max_new_tokens=16, quantize=False) == texts[:2]
    # the control: as many steps of language pretraining on the same reports, the instruction alone before each
    plain = tiny_base.ensure_tiny_base(tmp_path / "p", texts, digest, pretrain_steps=150)
    assert generate_reports(plain, None, blank, told, max_new_tokens=16, quantize=False) != texts[:2]
