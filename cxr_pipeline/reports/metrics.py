"""Report-generation metrics, computed the way the literature does.

NLG: BLEU-1..4, METEOR, ROUGE-L and CIDEr from ``pycocoevalcap`` (the COCO
caption scorers that R2Gen and its successors call through their
``compute_scores``), on reports cleaned the way R2Gen cleans MIMIC-CXR text
(lower case, punctuation split off, ``___`` and numbering removed). BLEU-n is
the cumulative corpus BLEU with brevity penalty, not the n-gram precision
alone. METEOR runs the bundled METEOR 1.5 jar and so needs ``java``.

Clinical efficacy: generated and reference reports are labelled with the
report labeler (``reports/labeler.py``; its version goes to MLflow with the
figures). Two conventions, side by side because papers use both: ``ce_*``
counts an observation present when its label is 1 (uncertain, negative and not
mentioned are absent), as R2Gen's CE metrics do; ``ce_upos_*`` also counts
uncertain (-1) as present, as the CheXbert-based scorers of recent
report-generation papers do. Each gives precision / recall / F1, micro and
macro, over the 14 observations and over the five common ones.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from cxr_pipeline.labels import COMMON5, LABELS, SLUGS
from cxr_pipeline.reports.labeler import label_reports, labeler_version
from cxr_pipeline.vision.resampling import resample_indices

if TYPE_CHECKING:
    from pycocoevalcap.meteor.meteor import Meteor


def clean_report(text: str | None) -> str:
    """R2Gen's ``clean_report_mimic_cxr``: sentences lower-cased, punctuation out, joined with ' . '."""
    if not text:
        return ""
    t = text.replace("\n", " ").replace("__", "_").replace("  ", " ")
    t = re.sub(r"\.\.+", ".", t)
    t = re.sub(r"\d+\. ", "", t).strip().lower()
    sents = [
        re.sub(r"[.,?;*!%^&_+():-\[\]{}]", "", s.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower())
        for s in t.split(". ")
    ]
    sents = [" ".join(s.split()) for s in sents if s.strip()]
    return " . ".join(sents) + " ." if sents else ""


def nlg_scores(references: Sequence[str], hypotheses: Sequence[str], meteor: bool | Meteor = True) -> dict[str, float]:
    """Corpus BLEU-1..4, METEOR, ROUGE-L, CIDEr (pycocoevalcap) over paired reports.

    ``meteor``: True starts a METEOR process for this call, False skips METEOR, and a running one
    (``meteor_process``) is reused: scoring several systems, start it once."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if len(references) != len(hypotheses):
        raise ValueError(f"{len(references)} references but {len(hypotheses)} hypotheses")
    if meteor is True:
        with meteor_process() as running:
            return nlg_scores(references, hypotheses, running)
    # An empty hypothesis would crash the scorers; score it as the empty token "."
    gts = {i: [clean_report(r) or "."] for i, r in enumerate(references)}
    res = {i: [clean_report(h) or "."] for i, h in enumerate(hypotheses)}
    out: dict[str, float] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for n, b in enumerate(bleu, start=1):
        out[f"BLEU_{n}"] = float(b)
    if meteor:
        out["METEOR"] = float(meteor.compute_score(gts, res)[0])
    out["ROUGE_L"] = float(Rouge().compute_score(gts, res)[0])
    out["CIDEr"] = float(Cider().compute_score(gts, res)[0])
    return out


@contextlib.contextmanager
def meteor_process(enabled: bool = True) -> Iterator[Meteor | None]:
    """One METEOR 1.5 process (a JVM) for many scorings, closed at the end; None when ``enabled`` is False.

    Its first score costs about 8 s here (the JVM and the paraphrase table), every later one milliseconds:
    ``report_metrics`` scores three systems on two label sources, and started one process for each (48 s)."""
    if not enabled:
        yield None
        return
    from pycocoevalcap.meteor.meteor import Meteor

    m = Meteor()
    try:
        yield m
    finally:
        _close_meteor(m)


def _close_meteor(m: Meteor) -> None:
    try:
        with m.lock:
            m.meteor_p.stdin.close()
            m.meteor_p.kill()
            m.meteor_p.wait()
    except Exception:
        pass


# Convention -> metric prefix and the label values counted as "present".
CE_CONVENTIONS: dict[str, tuple[str, tuple[float, ...]]] = {
    "uncertain_negative": ("ce", (1.0,)),
    "uncertain_positive": ("ce_upos", (1.0, -1.0)),
}


def binary_labels(labels: list[dict[str, float | None]], names: Sequence[str], present: tuple[float, ...] = (1.0,)) -> np.ndarray:
    return np.array([[1 if row.get(n) in present else 0 for n in names] for row in labels], dtype=int).reshape(len(labels), len(names))


def clinical_efficacy(
    references: Sequence[str], hypotheses: Sequence[str], reference_labels: Sequence[dict] | None = None
) -> tuple[dict[str, float], int]:
    """CE precision/recall/F1 (micro, macro) over 14 and over the 5 common observations, under both
    conventions (``CE_CONVENTIONS``: ``ce_*`` uncertain as absent, ``ce_upos_*`` uncertain as present).

    The references' labels come from the labeler run on the reference reports, or are
    given (``reference_labels``: e.g. a radiologist's, ``{label: 1.0/0.0/-1.0/None}``).
    Returns the scores and the number of empty or malformed reports (labelled all-blank).
    """
    from sklearn.metrics import precision_recall_fscore_support

    ref_labels, n_bad_ref = (list(reference_labels), 0) if reference_labels is not None else label_reports(references)
    hyp_labels, n_bad_hyp = label_reports(hypotheses)
    out: dict[str, float] = {}
    for prefix, present in CE_CONVENTIONS.values():
        for tag, names in (("14", LABELS), ("5", COMMON5)):
            y, p = binary_labels(ref_labels, names, present), binary_labels(hyp_labels, names, present)
            for avg in ("micro", "macro"):
                pr, rc, f1, _ = precision_recall_fscore_support(y, p, average=avg, zero_division=0)
                out[f"{prefix}_{avg}{tag}_precision"] = float(pr)
                out[f"{prefix}_{avg}{tag}_recall"] = float(rc)
                out[f"{prefix}_{avg}{tag}_f1"] = float(f1)
    return out, n_bad_ref + n_bad_hyp


INTERVAL_METRICS = ("ce_micro14_f1", "ce_upos_micro14_f1", "ROUGE_L")
# ce_macro*: an observation absent from both the references and the reports has no F1; scikit-learn's
# zero_division=0 counts it as 0 in the mean (other papers leave it out). Named in the metrics table.
CE_MACRO_CONVENTION = "an observation absent from both references and reports counts as F1 0"


def _per_report(references: Sequence[str], hyps: Sequence[str], ref_labels: list[dict], rouge: bool = True) -> dict[str, np.ndarray]:
    """What each report adds to the interval metrics: CE true/false positive and false negative counts
    over the 14 observations (both conventions), and its ROUGE-L (NaN without ``rouge``)."""
    from pycocoevalcap.rouge.rouge import Rouge

    hyp_labels, _ = label_reports(hyps)
    out = {}
    for prefix, present in CE_CONVENTIONS.values():
        y, p = binary_labels(ref_labels, LABELS, present), binary_labels(hyp_labels, LABELS, present)
        out[f"{prefix}_tp"], out[f"{prefix}_fp"], out[f"{prefix}_fn"] = (y & p).sum(1), ((1 - y) & p).sum(1), (y & (1 - p)).sum(1)
    if not rouge:
        out["rouge"] = np.full(len(hyps), np.nan)
        return out
    gts = {i: [clean_report(r) or "."] for i, r in enumerate(references)}
    res = {i: [clean_report(h) or "."] for i, h in enumerate(hyps)}
    out["rouge"] = np.asarray(Rouge().compute_score(gts, res)[1], dtype=float) if len(hyps) else np.zeros(0)
    return out


def _interval_values(per: dict[str, np.ndarray], idx: np.ndarray) -> dict[str, float]:
    vals = {}
    for prefix in ("ce", "ce_upos"):
        tp, fp, fn = (float(per[f"{prefix}_{k}"][idx].sum()) for k in ("tp", "fp", "fn"))
        vals[f"{prefix}_micro14_f1"] = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else 0.0
    vals["ROUGE_L"] = float(per["rouge"][idx].mean()) if len(idx) else float("nan")
    return vals


def report_intervals(
    references: Sequence[str],
    systems: dict[str, Sequence[str]],
    patients: Sequence,
    reference_labels: Sequence[dict] | None = None,
    n_boot: int = 1000,
    seed: int = 0,
) -> tuple[list[dict], list[dict]]:
    """95% bootstrap intervals over test patients for CE micro-F1 (both conventions) and ROUGE-L of each
    system, and paired intervals for each difference between two systems (same resamples for both),
    so "better" means the interval of the difference excludes 0. ``patients``: each report's patient
    (``subject_id``); a patient's reports are resampled together (MIMIC has about 3.5 studies a patient,
    so resampling studies would make the intervals too narrow), as the classifiers' intervals are.

    Corpus BLEU and CIDEr are left out: their corpus statistics (n-gram counts, document
    frequencies) would have to be recomputed per resample. Returns (per-system rows, difference rows).
    """

    ref_labels = list(reference_labels) if reference_labels is not None else label_reports(references)[0]
    per = {name: _per_report(references, hyps, ref_labels) for name, hyps in systems.items()}
    n = len(references)
    point = {name: _interval_values(p, np.arange(n)) for name, p in per.items()}
    rng = np.random.default_rng(seed)
    draws: dict[str, list[dict]] = {name: [] for name in systems}
    unit = "report"
    for _ in range(n_boot if n else 0):
        idx, drawn = resample_indices(n, np.asarray(patients), rng)
        unit = "report" if drawn == "image" else "patient"  # whole groups when a patient has several reports
        for name, p in per.items():
            draws[name].append(_interval_values(p, idx))

    rows, diffs = [], []
    for name in systems:
        row = {"system": name, "n": n, "resamples": n_boot, "bootstrap_unit": unit}
        for m in INTERVAL_METRICS:
            row[m] = point[name][m]
            row[f"{m}_lo"], row[f"{m}_hi"] = _ci([d[m] for d in draws[name]])
        rows.append(row)
    names = list(systems)
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            for m in INTERVAL_METRICS:
                d = [x[m] - y[m] for x, y in zip(draws[a], draws[b], strict=True)]
                lo, hi = _ci(d)
                better = None if lo is None else (a if lo > 0 else b if hi < 0 else "neither")
                diffs.append({"a": a, "b": b, "metric": m, "difference": point[a][m] - point[b][m], "lo": lo, "hi": hi, "better": better})
    return rows, diffs


def _ci(values) -> tuple[float | None, float | None]:
    v = np.asarray([x for x in values if x == x])
    return (float(np.percentile(v, 2.5)), float(np.percentile(v, 97.5))) if len(v) else (None, None)


def seed_mean_intervals(
    reference_labels: Sequence[dict],
    arms: dict[str, Sequence[Sequence[str]]],
    patients: Sequence,
    n_boot: int = 1000,
    seed: int = 0,
    arm_references: dict[str, Sequence[Sequence[dict]]] | None = None,
) -> tuple[dict[str, tuple[float, float | None, float | None]], dict[tuple[str, str], tuple[float, float | None, float | None]]]:
    """CE micro-F1 (14, uncertain as absent) of arms that were each trained with several seeds, averaged over
    the seeds, with a 95% two-stage bootstrap interval (seeds, then patients) and the paired interval of every
    difference between two arms.

    Each resample first draws the seeds with replacement (seed index i of every multi-seed arm is the same
    seed, so the arms stay paired by seed), then the test patients with replacement; an arm's value is the mean
    over the drawn seeds of its micro-F1 on the drawn patients. So the interval carries the seed-to-seed
    spread as well as the patients' (with three seeds the seed stage is coarse: it cannot show more spread
    than the three seeds have). Arms with one run (a constant report) take that run in every resample.

    ``arms``: name -> one list of reports per seed, each aligned with ``reference_labels`` and ``patients``.
    ``arm_references``: name -> one reference list per run, for an arm scored against other references than
    ``reference_labels`` (the shuffled-references control); its reports are resampled with the same indices,
    so the control is paired with the arms it is compared with.
    Returns ({arm: (point, lo, hi)}, {(a, b): (a - b, lo, hi)}).
    """

    refs = list(reference_labels)
    other = arm_references or {}
    per = {
        a: [_per_report([""] * len(refs), hyps, list(other[a][i]) if a in other else refs, rouge=False) for i, hyps in enumerate(runs)]
        for a, runs in arms.items()
    }
    counts = {len(runs) for runs in per.values()} - {1}
    if len(counts) > 1:
        raise ValueError(f"seed_mean_intervals: multi-seed arms must have the same number of seeds, not {sorted(counts)}")
    n_seeds = counts.pop() if counts else 1
    n = len(refs)

    def score(idx: np.ndarray, seeds: np.ndarray) -> dict[str, float]:
        return {
            a: float(np.mean([_interval_values(runs[s if len(runs) > 1 else 0], idx)["ce_micro14_f1"] for s in seeds]))
            for a, runs in per.items()
        }

    point = score(np.arange(n), np.arange(n_seeds))
    rng = np.random.default_rng(seed)
    draws = []
    for _ in range(n_boot if n else 0):
        seeds = rng.integers(0, n_seeds, n_seeds)
        draws.append(score(resample_indices(n, np.asarray(patients), rng)[0], seeds))
    out = {a: (point[a], *_ci([d[a] for d in draws])) for a in arms}
    names = list(arms)
    diffs = {(a, b): (point[a] - point[b], *_ci([d[a] - d[b] for d in draws])) for i, a in enumerate(names) for b in names[i + 1 :]}
    return out, diffs


def score_systems(
    references: Sequence[str],
    systems: dict[str, Sequence[str]],
    meteor: bool | Meteor = True,
    reference_labels: Sequence[dict] | None = None,
    test_labels: str = "labeler",
) -> tuple[list[dict], int]:
    """One row per system: ``system``, ``test_labels``, ``n``, the NLG scores and clinical efficacy;
    and the count of empty or malformed reports (labelled all-blank) over all systems."""
    rows, bad_total = [], 0
    for system, hyps in systems.items():
        ce, bad = clinical_efficacy(references, hyps, reference_labels)
        bad_total += bad
        row = {"system": system, "test_labels": test_labels, "n": len(hyps)}
        rows.append({**row, **nlg_scores(references, hyps, meteor=meteor), **ce})
    return rows, bad_total


def radiologist_labels(reports) -> list[dict]:
    """The radiologist's labels of each row (a frame with ``radiologist_<slug>`` columns) as labeler-style dicts."""

    cols = [f"radiologist_{s}" for s in SLUGS]
    return [{lab: (None if v is None else float(v)) for lab, v in zip(LABELS, r, strict=True)} for r in reports.select(cols).iter_rows()]


def side_by_side_markdown(reports, systems: Sequence[str], n: int = 4, width: int = 120) -> str:
    """A markdown table of the first ``n`` references beside each system's report (cut to ``width``)."""
    head = "| reference | " + " | ".join(systems) + " |\n|---|" + "---|" * len(systems)
    lines = ["| " + " | ".join(str(r[c])[:width] for c in ("reference", *systems)) + " |" for r in reports.head(n).iter_rows(named=True)]
    return "\n".join([head, *lines])


# the headline report metrics (the demo's summary), and those the asset's metadata shows (METEOR where Java ran it)
HEADLINE = ("BLEU_1", "BLEU_4", "METEOR", "ROUGE_L", "CIDEr", "ce_micro14_f1", "ce_macro14_f1", "ce_micro5_f1")
SHOWN = ("system", *HEADLINE, "ce_micro14_f1_lo", "ce_micro14_f1_hi", "ce_upos_micro14_f1", "ce_upos_micro5_f1")


@dataclass
class ScoredReports:
    """The report metrics table (system x test labels), the paired differences, and what went into them."""

    table: pl.DataFrame
    differences: pl.DataFrame
    rows: list[dict]
    bad_total: int
    evaluation: str


def score_reports(gen: pl.DataFrame, systems: Sequence[str], meteor: bool) -> ScoredReports:
    """Score every system's reports against the references (``generated_reports``' columns): NLG metrics and CE
    with the labeler on the references; again on the radiologist-labelled studies with the radiologist's labels;
    95% intervals for the labeler rows and paired intervals for each difference between systems, from resamples
    of test patients (each patient's reports together; a table without ``subject_id``, written before it carried
    one, resamples studies). The table's ``bootstrap_unit`` says which: patient, study, or report."""

    hyps = {s: gen[s].to_list() for s in systems}
    with meteor_process(meteor) as running:  # one METEOR process for every system and label source
        rows, bad_total = score_systems(gen["reference"].to_list(), hyps, meteor=running or False)
        if "radiologist_labelled" in gen.columns and gen["radiologist_labelled"].any():
            rad = gen.filter(pl.col("radiologist_labelled"))
            more, _ = score_systems(
                rad["reference"].to_list(), {s: rad[s].to_list() for s in systems}, running or False, radiologist_labels(rad), "radiologist"
            )
            rows += more
    evaluation = gen["evaluation"][0] if "evaluation" in gen.columns and gen.height else "findings references"
    table = pl.DataFrame(rows).with_columns(
        pl.lit(evaluation).alias("evaluation"), pl.lit(labeler_version()).alias("labeler"), pl.lit(CE_MACRO_CONVENTION).alias("ce_macro")
    )
    # by patient; a generated_reports table written before it carried subject_id falls back to studies
    groups = gen["subject_id"] if "subject_id" in gen.columns else gen["study_id"]
    iv, diffs = report_intervals(gen["reference"].to_list(), hyps, groups.to_list())
    bounds = [f"{m}_{b}" for m in INTERVAL_METRICS for b in ("lo", "hi")]
    unit = {"patient": "patient" if "subject_id" in gen.columns else "study", "report": "report"}
    iv_table = (
        pl.DataFrame(iv)
        .select("system", *bounds, pl.col("bootstrap_unit").replace_strict(unit))
        .with_columns(pl.lit("labeler").alias("test_labels"))
    )
    table = table.join(iv_table, on=["system", "test_labels"], how="left")
    differences = pl.DataFrame(diffs, schema_overrides={"lo": pl.Float64, "hi": pl.Float64, "better": pl.String})
    return ScoredReports(table, differences, rows, bad_total, evaluation)
