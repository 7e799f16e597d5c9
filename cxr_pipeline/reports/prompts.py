"""What the report model reads and learns from: the one instruction (optionally with the classifiers'
findings), the chat messages, and the collator that puts the loss on the report tokens only.

Shared by the adapter's training and generation (``reports.vlm``) and the tiny base's language
pretraining (``reports.tiny_base``). No Dagster here.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from cxr_pipeline.labels import SLUGS
from cxr_pipeline.vision.folds import call_column, threshold_column

INSTRUCTION = "You are an expert radiographer. Describe accurately what you see in this image."


def user_prompt(findings_hint: str | None = None) -> str:
    """The one instruction used at training and at inference (optionally with classifier findings)."""
    return INSTRUCTION if not findings_hint else f"{INSTRUCTION}\n{findings_hint}"


def findings_hint(
    probs: dict[str, float | None], thresholds: dict[str, float] | None = None, top: int = 5, calls: dict[str, bool] | None = None
) -> str:
    """'Classifier findings: pleural effusion 0.91, ...' from per-pathology probabilities; a finding is
    named when its call says so (``calls``: the hints table's, decided on the network's score, so a calibrated
    probability tied with its carried threshold at the map's clip cannot flip it), else, for a finding without
    a call, when its probability reaches its own threshold (0.5 where none is given)."""
    thresholds, calls = thresholds or {}, calls or {}

    def named(k: str, p: float) -> bool:
        return calls[k] if calls.get(k) is not None else p >= thresholds.get(k, 0.5)

    picked = sorted(((p, k) for k, p in probs.items() if p is not None and named(k, p)), reverse=True)[:top]
    if not picked:
        return "Classifier findings: none"
    return "Classifier findings: " + ", ".join(f"{k.replace('_', ' ').lower()} {p:.2f}" for p, k in picked)


def hint_source(hints: pl.DataFrame | None) -> str:
    """Where a hints table's training-split probabilities come from (``vision.folds.report_hints``)."""
    if hints is None or hints.height == 0:
        return "none"
    return "multilabel_out_of_fold" if (hints["source"] == "out_of_fold").any() else "per_pathology_in_sample"


def row_hints(rows: pl.DataFrame, hints: pl.DataFrame) -> list[tuple[dict[str, float | None], dict[str, float]]]:
    """For each row (``dicom_id``), its findings' probabilities and their carried thresholds, from the report
    hints table (``vision.folds.report_hints``: one probability and one threshold column per slug); a row the
    table does not have gets no probabilities. The thresholds are for display: a call comes from ``row_calls``."""
    cols = [s for s in SLUGS if s in hints.columns]
    j = rows.select("dicom_id").join(hints, on="dicom_id", how="left", maintain_order="left")
    out = []
    for r in j.iter_rows(named=True):
        thresholds = {c: r[threshold_column(c)] for c in cols if r.get(threshold_column(c)) is not None}
        out.append(({c: r[c] for c in cols}, thresholds))
    return out


def row_calls(rows: pl.DataFrame, hints: pl.DataFrame) -> list[dict[str, bool]]:
    """For each row (``dicom_id``), its findings' calls from the report hints table (``vision.folds.call_column``:
    decided on the network's score at its threshold, before calibration); a finding without one is left out (a
    table from before the calls were carried has none: ``findings_hint`` then reads the thresholds)."""
    cols = [s for s in SLUGS if call_column(s) in hints.columns]
    calls = hints.select("dicom_id", *(call_column(s) for s in cols))
    j = rows.select("dicom_id").join(calls, on="dicom_id", how="left", maintain_order="left")
    return [{c: r[call_column(c)] for c in cols if r[call_column(c)] is not None} for r in j.iter_rows(named=True)]


def prompts_for(rows: pl.DataFrame, hints: pl.DataFrame | None, use_findings: bool) -> tuple[list[str], str]:
    """The prompt of each row (a polars frame with ``dicom_id``) and the prompt variant's name.

    With ``use_findings`` and a hints table, each prompt carries that image's classifier findings, each
    named when the table's call for it says so (the network's score at its threshold).
    """
    if not use_findings or hints is None:
        return [user_prompt()] * rows.height, "instruction"
    found = zip(row_hints(rows, hints), row_calls(rows, hints), strict=True)
    return [user_prompt(findings_hint(p, t, calls=c)) for (p, t), c in found], "instruction+classifier_findings"


def messages(prompt: str, report: str | None = None) -> list[dict]:
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": prompt}]}]
    if report is not None:
        msgs.append({"role": "assistant", "content": [{"type": "text", "text": report}]})
    return msgs


def to_rgb(img: np.ndarray):
    """A uint8 grey shard image -> the RGB PIL image the processor expects."""
    from PIL import Image

    return Image.fromarray(np.asarray(img, dtype=np.uint8), mode="L").convert("RGB")


@dataclass
class MllamaCollator:
    """Batches (image, prompt, report) for SFT, with the loss on the report tokens only.

    TRL's built-in vision collator leaves Mllama's ``<|image|>`` token in the
    labels and does not keep ``cross_attention_mask`` the length of a truncated
    sequence; this one masks the prompt (everything up to and including the
    assistant header), padding and the image token with -100, and truncates
    ``input_ids``, ``attention_mask``, ``labels`` and ``cross_attention_mask``
    together.
    """

    processor: object
    max_length: int = 2048
    images: Sequence | None = None  # examples carrying ``idx`` instead of ``image`` are read from here

    def __call__(self, examples: Sequence[dict]) -> dict:
        proc = self.processor
        tok = proc.tokenizer
        full = [proc.apply_chat_template(messages(e["prompt"], e["report"])) for e in examples]
        prompts = [proc.apply_chat_template(messages(e["prompt"]), add_generation_prompt=True) for e in examples]
        images = [[to_rgb(e["image"] if "image" in e else self.images[e["idx"]])] for e in examples]
        tok.padding_side = "right"
        # the chat template already writes <|begin_of_text|>: a tokenizer that adds one itself (Llama-3's
        # does) must not add a second, and the prompt length below counts the same tokens
        batch = proc(images=images, text=full, return_tensors="pt", padding=True, add_special_tokens=False)
        ids = batch["input_ids"]
        labels = ids.clone()
        for i, p in enumerate(prompts):
            n_prompt = len(tok(p, add_special_tokens=False)["input_ids"])
            labels[i, :n_prompt] = -100
        labels[batch["attention_mask"] == 0] = -100
        labels[ids == proc.image_token_id] = -100
        batch["labels"] = labels
        if ids.shape[1] > self.max_length:
            for k in ("input_ids", "attention_mask", "labels", "cross_attention_mask"):
                batch[k] = batch[k][:, : self.max_length]
        return dict(batch)


@dataclass
class TrainingPairs:
    """(image, prompt, report) examples as a map-style dataset; ``images`` may be lazy (``data.shards.StreamedImages``)."""

    images: Sequence
    prompts: Sequence[str]
    reports: Sequence[str]

    def __len__(self) -> int:
        return len(self.reports)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.images[i], "prompt": self.prompts[i], "report": self.reports[i]}

    @classmethod
    def from_examples(cls, examples: Sequence[dict]) -> TrainingPairs:
        return cls([e["image"] for e in examples], [e["prompt"] for e in examples], [e["report"] for e in examples])
