"""Two report baselines every run is compared with (a template and nearest-neighbour retrieval), and the
image-blind bars of the learning check (the best and the optimal constant report, shuffled references)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import polars as pl

from cxr_pipeline.labels import LABEL_BY_SLUG, LABELS, SLUGS
from cxr_pipeline.reports.labeler import label_reports
from cxr_pipeline.reports.metrics import binary_labels
from cxr_pipeline.reports.prompts import row_calls, row_hints

POSITIVE = {
    "atelectasis": "There is atelectasis.",
    "cardiomegaly": "The heart is enlarged.",
    "consolidation": "There is focal consolidation.",
    "edema": "There is pulmonary edema.",
    "enlarged_cardiomediastinum": "The cardiomediastinal silhouette is widened.",
    "fracture": "There is a rib fracture.",
    "lung_lesion": "There is a pulmonary nodule.",
    "lung_opacity": "There is a focal opacity.",
    "pleural_effusion": "There is a pleural effusion.",
    "pleural_other": "There is pleural thickening.",
    "pneumonia": "Findings are consistent with pneumonia.",
    "pneumothorax": "There is a pneumothorax.",
    "support_devices": "Support devices are in place.",
}
NEGATIVE = {
    "cardiomegaly": "Heart size is normal.",
    "consolidation": "No focal consolidation.",
    "edema": "No pulmonary edema.",
    "pleural_effusion": "No pleural effusion.",
    "pneumothorax": "No pneumothorax.",
}
NORMAL = "No acute cardiopulmonary process."


def template_report(
    probs: Mapping[str, float | None],
    thresholds: Mapping[str, float] | None = None,
    negative_below: float = 0.1,
    calls: Mapping[str, bool] | None = None,
) -> str:
    """A sentence per finding called positive (``calls``: the hints table's, read on the network's score; a finding
    without a call: its probability at or above its threshold), negated sentences for confident negatives."""
    thresholds, calls = thresholds or {}, calls or {}

    def called(s: str) -> bool:
        return calls[s] if calls.get(s) is not None else probs[s] >= thresholds.get(s, 0.5)

    pos = [s for s in POSITIVE if probs.get(s) is not None and called(s)]
    neg = [NEGATIVE[s] for s in NEGATIVE if s not in pos and probs.get(s) is not None and probs[s] < negative_below]
    sentences = [POSITIVE[s] for s in pos] + neg
    if not [s for s in pos if s != "support_devices"]:
        sentences.append(NORMAL)
    return " ".join(sentences)


def nearest_reports(train_vectors: np.ndarray, train_texts: Sequence[str], query_vectors: np.ndarray) -> list[str]:
    """Report of the most similar training image (cosine similarity of classifier outputs)."""
    from sklearn.neighbors import NearestNeighbors

    if len(train_texts) == 0:
        return [""] * len(query_vectors)
    nn = NearestNeighbors(n_neighbors=1, metric="cosine").fit(np.nan_to_num(train_vectors, nan=0.0) + 1e-6)
    idx = nn.kneighbors(np.nan_to_num(query_vectors, nan=0.0) + 1e-6, return_distance=False)[:, 0]
    return [train_texts[i] for i in idx]


def baseline_reports(test_rows: pl.DataFrame, train_pairs: pl.DataFrame, hints: pl.DataFrame | None) -> tuple[list[str], list[str]]:
    """The template and retrieval reports for each test row (``dicom_id``), from the report hints table
    (``vision.folds.report_hints``: probabilities, and the thresholds the template reads them at).

    ``train_pairs``: training rows with ``dicom_id`` and ``text`` (the retrieval corpus).
    Without hints the template says "normal" and retrieval has nothing to go on.
    """

    cols = [s for s in SLUGS if hints is not None and s in hints.columns]
    if not cols:
        return [template_report({})] * test_rows.height, [""] * test_rows.height
    found = zip(row_hints(test_rows, hints), row_calls(test_rows, hints), strict=True)
    template = [template_report(p, t, calls=c) for (p, t), c in found]
    query = test_rows.select("dicom_id").join(hints, on="dicom_id", how="left", maintain_order="left").select(cols)
    train = train_pairs.join(hints, on="dicom_id", how="inner")
    retrieval = nearest_reports(train.select(cols).to_numpy(), train["text"].to_list(), query.to_numpy())
    return template, retrieval


def best_constant_report(candidates: Sequence[str], reference_labels: Sequence[Mapping[str, float | None]]) -> tuple[str, float]:
    """The one report that, written for every study, scores the highest CE micro-F1 (14 observations,
    uncertain as absent) against ``reference_labels``: the bar a report model that ignores its image can
    reach at best. Pick it on validation labels and score it on test, like any other choice.

    Each distinct candidate is labelled once; a constant report's micro-F1 follows from its label vector
    and the references' column sums. Ties go to the first candidate in sorted order. Returns (report, F1).
    """

    texts = sorted({t for t in candidates if isinstance(t, str) and t.strip()})
    if not texts:
        raise ValueError("best_constant_report: no non-empty candidate report")
    labels, _ = label_reports(texts)
    hyp, ref = binary_labels(labels, LABELS).astype(float), binary_labels(list(reference_labels), LABELS).astype(float)  # as CE scores them
    positives, n = ref.sum(0), len(ref)
    tp = hyp @ positives  # a constant report is right on every reference positive of a finding it names
    fp = hyp.sum(1) * n - tp
    fn = positives.sum() - tp
    denom = 2 * tp + fp + fn
    f1 = np.divide(2 * tp, denom, out=np.zeros_like(tp), where=denom > 0)
    best = int(np.argmax(f1))
    return texts[best], float(f1[best])


def optimal_constant_report(reference_labels: Sequence[Mapping[str, float | None]]) -> tuple[str, float]:
    """The constant report that states the findings the references' prevalence favours, written like the
    template, and its CE micro-F1 (14, uncertain as absent) on those references: the strongest report a
    model that ignores its image can write, where ``best_constant_report`` only searches reports that exist.

    For a constant report naming a set S of findings, micro-F1 = 2 TP / (TP + |S| n + P) with TP the
    references' positives of S and P all their positives: for a given |S| it is highest when S holds the
    |S| most prevalent findings. So the candidates are the template's report for the top k findings by
    prevalence, k = 0 (the normal report) to every finding the template can state; each is labelled by the
    labeler, as every report is scored, and the best is kept. Choose it on validation labels, score it on test.
    """

    refs = list(reference_labels)
    prevalence = {s: sum(1 for r in refs if r.get(LABEL_BY_SLUG[s]) == 1.0) for s in POSITIVE}
    ranked = sorted(POSITIVE, key=lambda s: -prevalence[s])  # stable: ties keep the template's order
    candidates = [template_report({s: 1.0 if s in ranked[:k] else 0.0 for s in POSITIVE}) for k in range(len(ranked) + 1)]
    return best_constant_report(candidates, refs)


def shuffled_references(reference_labels: Sequence, patients: Sequence, seed: int = 0) -> list:
    """The references permuted across patients: every report gets the reference of a report of another
    patient, so a system scored against them keeps its own outputs (how often it names each finding) but
    loses their link to the image. The control for "are the reports about this image": a system that scores
    no better against the true references than against these does not read the image.

    Patients are put in a random order (``seed``), their reports laid out in it, and each report takes the
    reference lying the largest patient's report count further on (cyclically): never its own patient's.
    """
    refs, pts = list(reference_labels), list(patients)
    if len(refs) != len(pts):
        raise ValueError(f"shuffled_references: {len(refs)} references but {len(pts)} patients")
    groups: dict = {}
    for i, p in enumerate(pts):
        groups.setdefault(p, []).append(i)
    if not groups:
        return []
    largest = max(len(g) for g in groups.values())
    if len(refs) < 2 * largest:
        raise ValueError(
            f"shuffled_references: one patient has {largest} of {len(refs)} reports; the references cannot leave every patient"
        )
    keys = list(groups)
    order = [groups[keys[j]] for j in np.random.default_rng(seed).permutation(len(keys))]
    laid = [i for g in order for i in g]
    out = [None] * len(refs)
    for pos, i in enumerate(laid):
        out[i] = refs[laid[(pos + largest) % len(laid)]]
    return out
