"""Who the models fail: per-subgroup AUC, TPR and FPR with patient-bootstrap intervals, and the gap to the rest.

As CheXclusion (Seyyed-Kalantari et al., PSB 2021) measured it: for a model, a finding and a subgroup
(a sex, an age band, a race group, an insurance), the true-positive rate at the model's own
validation-chosen threshold in that subgroup against the rest of the patients; and, as the underdiagnosis
study (Nature Medicine 2021) did, the false-positive rate of "No Finding": patients with a finding whom the
model calls healthy.

Intervals resample **patients** (all of a patient's images together), and a gap's interval comes from
the same resamples as both of its sides (paired), so it is the interval of the difference, not two
intervals compared by eye. Each gap also has a Monte-Carlo permutation p-value against random groups with as
many patients with the finding (without it, for FPR gaps) as the group has (``vision.gap_statistics``), and a
Benjamini-Hochberg q-value within its panel (a view, label source and model: the family one chart shows; TPR
and FPR gaps apart); a two-group attribute's two gaps are one test, since one is minus the other. The false
discovery rate holds within each panel, not across a list drawn from several panels.

**What is published leaks no small group** (``vision.disclosure``): every attribute has a "not recorded"
group; a row's ``n_patients`` and ``n_images`` count its group in the view and label source (the same in every
finding's row; ``prevalence`` is ``n_pos`` over them), while its rates read the block's labelled images; the
groups are pooled once per view, over every region two published numbers can be differenced across, and the plan
is coarsened until a linear attacker who knows every published number and the test split's totals recovers no
group of fewer than ``min_patients`` patients. Every published row has ``min_patients`` patients or more in each
such region; a view smaller than that is one row, ``all``, marked small and published without numbers.

**Across data versions** the guarantee does not hold: a patient added or removed between two data versions
changes every row it is in, so the difference of two versions' published tables is the changed patients' counts,
however few. A deployment that publishes outside the team should publish one version (the audit of a frozen test
split), or let the data change only in batches of ``min_patients`` patients or more.

Written here rather than taken from a library: fairlearn's ``MetricFrame`` computes per-group metrics,
but neither its bootstrap (by row, unpaired) nor its metrics (no threshold from another split) are the
patient-level paired ones an audit of repeated-study data needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.data.demographics import ATTRIBUTES, missing_reason, per_image, read_demographics
from cxr_pipeline.fields import at_least_one, setting
from cxr_pipeline.files import png_figure, write_parquet
from cxr_pipeline.labels import LABEL_BY_SLUG, SLUGS
from cxr_pipeline.vision.checkpoint import MULTILABEL
from cxr_pipeline.vision.disclosure import (
    POOL,
    UNKNOWN,
    fpr_publishable,
    plan_units,
    recoverable,
    small_sources,
    unit_name,
    units_present,
    with_unknown,
)
from cxr_pipeline.vision.evaluate import stored_threshold
from cxr_pipeline.vision.folds import call_column, threshold_column
from cxr_pipeline.vision.gap_statistics import GAPS, METRICS, cell_statistics, null_gaps, permutation_p, permutations_for
from cxr_pipeline.vision.splits import RADIOLOGIST
from cxr_pipeline.vision.targets import targets

__all__ = ["POOL", "UNKNOWN", "AuditSettings", "audit", "audit_cell", "publishable", "largest_gaps", "gap_tests"]
COLUMNS = {
    "view": pl.String, "labels": pl.String, "model": pl.String, "slug": pl.String, "attribute": pl.String, "group": pl.String,
    "pooled": pl.Boolean, "n_patients": pl.Int64, "n_images": pl.Int64, "n_pos": pl.Int64, "small_cell": pl.Boolean,
    "threshold": pl.Float64, "prevalence": pl.Float64,
    **{f"{m}{s}": pl.Float64 for m in METRICS for s in ("", "_lo", "_hi")},
    **{f"{g}{s}": pl.Float64 for g in GAPS for s in ("_p", "_q")},
}  # fmt: skip
SMALL_CELL_RULE = 10  # the usual data-use rule: no published cell of fewer than 10 patients


@dataclass(frozen=True)
class AuditSettings:
    """The subgroup audit (``pipeline.yaml``'s ``subgroup_metrics`` section)."""

    min_patients: int = setting(
        10,
        "no group of fewer patients has a row of its own or any count a linear combination of published numbers gives "
        "(vision.disclosure); below 10 only with allow_small_cells",
    )
    allow_small_cells: bool = setting(
        False,
        "let min_patients go below 10: breaks the usual data-use rule (no published cell of fewer than 10 patients); "
        "for audits that never leave the team",
    )
    bootstrap: int = setting(1000, "patient resamples for each cell's 95% intervals (paired for the gaps)")
    permutations: int | None = setting(
        None,
        "random patient groups for each gap's Monte-Carlo p-value",
        null="auto: enough that the smallest attainable p-value passes Benjamini-Hochberg at 0.05 in the largest panel "
        "(20 x its tests), and at least 1000",
    )
    min_positives: int = setting(
        5,
        "TPR and its gap need at least this many patients with the finding in the subgroup and in the rest (FPR: without it; "
        "AUC: both); below it they are left empty (reported, not scored), as their intervals would be degenerate",
    )
    seed: int = setting(0, "random seed of the resamples")

    def __post_init__(self) -> None:
        at_least_one(self, "min_patients", "bootstrap", "min_positives", "permutations")
        if self.min_patients < SMALL_CELL_RULE and not self.allow_small_cells:
            raise ValueError(
                f"subgroup_metrics.min_patients: {self.min_patients} is below {SMALL_CELL_RULE}, the usual data-use rule for "
                "published cells; set allow_small_cells: true to publish smaller groups (only for audits that stay in the team)"
            )


def _enough(y: np.ndarray, codes: np.ndarray, in_group: np.ndarray, min_positives: int) -> dict[str, bool]:
    """Which metrics have ``min_positives`` patients with (TPR), without (FPR) or both (AUC) on each side."""
    enough = {}
    for kind, mask in (("pos", y == 1), ("neg", y == 0)):
        n_g, n_r = np.unique(codes[mask & in_group]).size, np.unique(codes[mask & ~in_group]).size
        enough[kind] = min(n_g, n_r) >= min_positives
    return {
        "tpr": enough["pos"],
        "tpr_gap": enough["pos"],
        "fpr": enough["neg"],
        "fpr_gap": enough["neg"],
        "auc": enough["pos"] and enough["neg"],
    }


def audit_cell(
    y: np.ndarray,
    p: np.ndarray,
    threshold: float | np.ndarray,
    patients: np.ndarray,
    in_group: np.ndarray,
    cfg: AuditSettings,
    permutations: int | None = None,
    called: np.ndarray | None = None,
) -> dict:
    """One (model, finding, subgroup) cell over a block's images: the group's metrics and its gaps to the rest, with
    95% percentile intervals over ``cfg.bootstrap`` patient resamples (paired) and each gap's Monte-Carlo p-value
    against ``permutations`` random groups (``gap_statistics.null_gaps``; default ``cfg.permutations`` or 1000).
    ``threshold``: one for every image, or one per image (out-of-fold predictions are each read at their own fold
    model's threshold); the row's ``threshold`` is null then. ``called``: each image's call where it was read
    before calibration (the fold models'), else ``p >= threshold``. The counts are the block's (``audit`` replaces
    ``n_patients`` and ``n_images`` with the group's in the view)."""
    y, p, in_group = np.asarray(y, dtype=np.int64), np.asarray(p, dtype=float), np.asarray(in_group, dtype=bool)
    called = p >= threshold if called is None else np.asarray(called, dtype=bool)
    _, codes = np.unique(patients, return_inverse=True)
    n_pat_g = int(np.unique(codes[in_group]).size)
    one = np.unique(threshold)
    row = {"n_patients": n_pat_g, "n_images": int(in_group.sum()), "n_pos": int((y[in_group] == 1).sum())}
    row["threshold"] = float(one[0]) if one.size == 1 else float("nan")
    row["small_cell"] = n_pat_g < cfg.min_patients
    row["prevalence"] = float(y[in_group].mean()) if in_group.any() and not row["small_cell"] else float("nan")
    if row["small_cell"]:
        return row  # too few patients to mean anything or to publish: the count only
    point, draws = cell_statistics(y, p, called, patients, in_group, cfg.bootstrap, cfg.seed)
    usable = _enough(y, codes, in_group, cfg.min_positives)
    null = null_gaps(y, called, patients, in_group, permutations or cfg.permutations or 1000, cfg.seed + 1)
    for m in METRICS:
        if not usable[m] or np.isnan(point[m]):
            row[m] = row[f"{m}_lo"] = row[f"{m}_hi"] = float("nan")
            continue
        d = draws[m][~np.isnan(draws[m])]
        row[m] = point[m]
        row[f"{m}_lo"], row[f"{m}_hi"] = (float(v) for v in (np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan)))
        if m in GAPS:
            row[f"{m}_p"] = permutation_p(*null[m])
    return row


PANEL = ["view", "labels", "model"]  # one chart panel: a family of tests


def adjust_gaps(table: pl.DataFrame) -> pl.DataFrame:
    """Benjamini-Hochberg q-values (``{gap}_q``) within each panel: the TPR (or FPR) gaps of one view, label
    source and model over every finding and subgroup, the family one gap chart shows and a reader scans for
    bold cells. A block with two groups is one test, not two (each gap is minus the other's): its first group's
    p-value enters the family and both rows carry that q-value."""
    from scipy.stats import false_discovery_control

    if not table.height:
        return table
    block = [*PANEL, "slug", "attribute"]
    t = table.with_row_index("_row").with_columns(
        (pl.len().over(block) == 2).alias("_two"), (pl.col("group").rank("ordinal").over(block) == 1).alias("_first")
    )
    q_of = {}
    for gap in GAPS:
        for _, family in gap_tests(t, gap).group_by(PANEL):
            q = false_discovery_control(family[f"{gap}_p"].to_numpy(), method="bh")
            q_of.update({(r, gap): float(v) for r, v in zip(family["_row"], q, strict=True)})
    block_first = t.select("_row", pl.col("_row").filter(pl.col("_first")).first().over(block).alias("_lead"), "_two")
    out = {}
    for gap in GAPS:
        p = t[f"{gap}_p"].to_list()
        out[f"{gap}_q"] = [q_of.get((lead if two else r, gap)) for r, lead, two in block_first.iter_rows()]
        out[f"{gap}_p"] = [p[lead] if two else p[r] for r, lead, two in block_first.iter_rows()]  # one test, one p-value
    return table.with_columns(pl.Series(k, v, dtype=pl.Float64) for k, v in out.items())


def _group_counts(scores: pl.DataFrame, units: dict) -> dict:
    """Each unit's patients and images in its view and label source: the counts a row publishes."""
    out = {}
    for (view, labels), part in scores.group_by(["view", "labels"], maintain_order=True):
        images = part.unique("dicom_id")
        for a in ATTRIBUTES:
            whole = tuple(v for unit in units[(view, a)] for v in unit)  # a small source's one row
            for u in [*units[(view, a)], whole]:
                m = images.filter(pl.col(a).is_in(list(u)))
                out[(view, labels, a, u)] = (m["subject_id"].n_unique(), m.height)
    return out


def prepare(scores: pl.DataFrame) -> pl.DataFrame:
    """The rows an audit (and ``disclosure.recoverable``) reads: images with a target, unknown attributes as
    ``UNKNOWN``, every attribute the patient's within a view (age: the band of its first study there, so a patient
    is in one group of each attribute, as the null's random groups and the published patient counts assume), each
    image's call at its threshold, ``raw`` and ``policy`` (null and "ignore" where not given)."""
    scores = with_unknown(scores.filter(pl.col("target").is_not_null()))
    if scores.height:  # an attribute of the patient, not the image: the age band of its first study in the view
        order = "age" if "age" in scores.columns else "age_band"
        first = (
            scores.filter(pl.col("age_band") != UNKNOWN)
            .sort(order, "dicom_id")
            .group_by("view", "subject_id")
            .agg(pl.col("age_band").first().alias("_band"))
        )
        scores = (
            scores.join(first, on=["view", "subject_id"], how="left")
            .with_columns(pl.col("_band").fill_null(UNKNOWN).alias("age_band"))
            .drop("_band")
        )
    return scores.with_columns(
        *(pl.lit(v, t).alias(c) for c, v, t in (("raw", None, pl.Float64), ("policy", "ignore", pl.String)) if c not in scores.columns),
        pl.coalesce(*(["called"] if "called" in scores.columns else []), pl.col("prob") >= pl.col("threshold")).alias("called"),
    )


def audit(scores: pl.DataFrame, cfg: AuditSettings) -> pl.DataFrame:
    """Every cell of ``scores`` (one row per image and model/finding: ``view, labels, model, slug, subject_id,
    target, prob, threshold``, the attributes ``sex, age_band, race, insurance``, and ``raw`` (the label as
    released) and ``policy`` (the model's uncertain policy) when known) by every planned group (``plan_units``)."""
    keys = ["view", "labels", "model", "slug"]
    scores = prepare(scores)
    if not scores.height:
        return pl.DataFrame(schema=COLUMNS)
    units = plan_units(scores, cfg.min_patients)
    small = small_sources(scores, cfg.min_patients)
    counts = _group_counts(scores, units)
    sources = {k: part["dicom_id"].n_unique() for k, part in scores.group_by(["view", "labels"])}
    cells = []
    for key, part in scores.group_by(keys, maintain_order=True):
        head = dict(zip(keys, key, strict=True))
        y, p, threshold = part["target"].to_numpy(), part["prob"].to_numpy(), part["threshold"].to_numpy()
        patients, called = part["subject_id"].to_numpy(), part["called"].to_numpy()
        for attribute in ATTRIBUTES:
            values, plan = part[attribute].to_numpy(), units[(head["view"], attribute)]
            if (head["view"], head["labels"]) in small:  # one row, "all", without numbers: no group's name shown
                plan = [tuple(v for u in plan for v in u)]
            for u in plan:
                in_group = np.isin(values, u)
                if in_group.any():
                    cells.append((head, attribute, u, unit_name(u, units_present(plan)), y, p, threshold, patients, in_group, called))
    b = cfg.permutations or permutations_for(_largest_panel(cells, cfg))
    rows = []
    for head, attribute, u, name, y, p, threshold, patients, in_group, called in cells:
        cell = audit_cell(y, p, threshold, patients, in_group, cfg, b, called)
        n_patients, n_images = counts[(head["view"], head["labels"], attribute, u)]
        if not fpr_publishable(sources[(head["view"], head["labels"])], len(y)):  # vision.disclosure, rule 3
            hidden = [f"fpr{x}" for x in ("", "_lo", "_hi", "_gap", "_gap_lo", "_gap_hi", "_gap_p")] + ["auc", "auc_lo", "auc_hi"]
            cell.update(dict.fromkeys(hidden, float("nan")))  # an AUC is C / (n_pos x negatives): its exact value names them
        cell.update(n_patients=n_patients, n_images=n_images)
        if not cell["small_cell"]:
            cell["prevalence"] = cell["n_pos"] / n_images
        rows.append({**head, "attribute": attribute, "group": name, "pooled": len(u) > 1, **cell})
    df = pl.DataFrame(rows, infer_schema_length=None)
    df = df.with_columns(pl.lit(None, t).alias(c) for c, t in COLUMNS.items() if c not in df.columns)
    df = df.select(list(COLUMNS)).cast(COLUMNS).with_columns(pl.col(pl.Float64).fill_nan(None))
    return adjust_gaps(df.drop([f"{g}_q" for g in GAPS])).select(list(COLUMNS))


def _largest_panel(cells: list, cfg: AuditSettings) -> int:
    """The most TPR- or FPR-gap tests one panel will hold (a two-group block once), from the cells' counts alone."""
    tests: dict = {}
    blocks: dict = {}
    for head, attribute, _, _, y, _, _, patients, in_group, _ in cells:
        blocks.setdefault((*[head[k] for k in ("view", "labels", "model", "slug")], attribute), []).append((head, y, patients, in_group))
    for (view, labels, model, _, _), members in blocks.items():
        for gap in GAPS:
            ok = []
            for _, y, patients, in_group in members:
                _, codes = np.unique(patients, return_inverse=True)
                ok.append(_enough(y, codes, in_group, cfg.min_positives)[gap] and np.unique(codes[in_group]).size >= cfg.min_patients)
            n = (1 if any(ok[:1]) else 0) if len(members) == 2 else sum(ok)
            tests[(view, labels, model, gap)] = tests.get((view, labels, model, gap), 0) + n
    return max(tests.values(), default=0)


def publishable(table: pl.DataFrame) -> pl.DataFrame:
    """The table as it may leave the machine (MLflow, logs). Small groups are already pooled (``pool_groups``); a
    row still marked small (a whole block under ``min_patients`` patients) keeps its row and flag, and its counts
    and metrics are null."""
    metric_cols = [c for c in table.columns if table.schema[c] == pl.Float64 and c != "threshold"]
    return table.with_columns(
        *(pl.when(pl.col("small_cell")).then(None).otherwise(pl.col(c)).alias(c) for c in metric_cols),
        *(pl.when(pl.col("small_cell")).then(None).otherwise(pl.col(c)).alias(c) for c in ("n_images", "n_pos", "n_patients")),
    )


def largest_gaps(table: pl.DataFrame, n: int = 5, metric: str = "tpr_gap", q: float = 0.05) -> pl.DataFrame:
    """The ``n`` gaps furthest from 0 among those with a Benjamini-Hochberg q-value below ``q``, largest first (a
    two-group block once: its first group's row)."""
    t = gap_tests(table, metric).filter(~pl.col("small_cell") & (pl.col(f"{metric}_q") < q))
    return t.sort(pl.col(metric).abs(), descending=True).head(n)


def gap_tests(table: pl.DataFrame, metric: str = "tpr_gap") -> pl.DataFrame:
    """The rows that are distinct tests of ``metric`` (a block with exactly two rows is one test: its second row's
    gap is minus its first's), the family ``adjust_gaps`` corrects."""
    block = ["view", "labels", "model", "slug", "attribute"]
    two = pl.len().over(block) == 2  # counted over the whole block, before rows without a p-value drop out
    first = pl.col("group").rank("ordinal").over(block) == 1
    return table.filter(~two | first).filter(pl.col(f"{metric}_p").is_not_null())


def audit_scores(
    classifiers, metrics: pl.DataFrame, manifest: pl.DataFrame, people: pl.DataFrame, hints: pl.DataFrame | None
) -> pl.DataFrame:
    """The long table ``audit`` reads: every trained model's probability, target and threshold per image of
    each view, with the image's patient attributes (``people``: ``data.demographics.per_image``).

    Views: the test split with the automatic labels and with the radiologist's (the threshold stays the one
    chosen on validation), and for the multi-label model its out-of-fold predictions over the training
    patients (``hints``: the report hints table; many more patients than the test split: MIMIC's has 293), each
    image read at its fold model's threshold: that view audits the five fold models (each trained on four fifths
    of the training patients), not the registered model, and its AUC pools their scores. Targets follow the
    label policy each model was trained with (its metrics row)."""

    source = manifest["label_source"][0] if manifest.height and "label_source" in manifest.columns else "chexpert"
    test = manifest.filter(pl.col("split") == "test")
    rad = test.filter(pl.col("radiologist_labelled")) if "radiologist_labelled" in test.columns else test.clear()
    train = manifest.filter(pl.col("split") == "train")
    oof = hints.filter(pl.col("source") == "out_of_fold") if hints is not None else None
    oof = oof if oof is not None and oof.height else None
    parts, read = [], {}  # the multi-label model's wide table serves all 14 findings: read it once
    usable = metrics.filter((pl.col("test_labels") != RADIOLOGIST) & pl.col("threshold").is_not_null())
    for r in usable.iter_rows(named=True):
        model, s, unc, blank = r["model"], r["slug"], r["uncertain_policy"], r["blank_policy"]
        folder = classifiers.classifier(MULTILABEL if model == MULTILABEL else s)
        if not folder.predictions.exists():
            continue
        table = read.get(folder.predictions)
        if table is None:
            table = read[folder.predictions] = pl.read_parquet(folder.predictions)
        at = pl.lit(stored_threshold(r["threshold"])).alias("threshold")  # the model's validation-chosen threshold
        probs = table.select("dicom_id", pl.col("prob" if model != MULTILABEL else s).alias("prob"), at)
        head = {"model": model, "slug": s}
        views = [("test", source, targets(test, s, unc, blank), probs)]
        if rad.height:
            views.append(("test", RADIOLOGIST, targets(rad.with_columns(pl.col(f"radiologist_{s}").alias(s)), s, unc, "zeros"), probs))
        if model == MULTILABEL and oof is not None:  # each image at its own fold model's threshold
            # the fold network's own call (read before calibration: at the map's clip a probability can tie its threshold)
            called = [pl.col(call_column(s)).alias("called")] if call_column(s) in oof.columns else []
            fold_probs = oof.select("dicom_id", pl.col(s).alias("prob"), pl.col(threshold_column(s)).alias("threshold"), *called)
            views.append(("train_out_of_fold", source, targets(train, s, unc, blank), fold_probs))
        for view, labels, rows, p in views:
            t = rows.select("dicom_id", pl.col("target").cast(pl.Float64), pl.col(s).cast(pl.Float64).alias("raw"))
            t = t.join(p, on="dicom_id", how="inner").with_columns(pl.lit(unc).alias("policy"))
            parts.append(
                t.with_columns(pl.lit(view).alias("view"), pl.lit(labels).alias("labels"), *(pl.lit(v).alias(k) for k, v in head.items()))
            )
    if not parts:
        return pl.DataFrame()
    return pl.concat(parts, how="diagonal_relaxed").join(people, on="dicom_id", how="inner")


VIEWS = (("test", "per_pathology"), ("test", "multilabel"), ("train_out_of_fold", "multilabel"))


def _gap_panel(ax, t: pl.DataFrame, slugs: list[str], title: str) -> None:
    """One heat map: TPR gap per finding (rows) and subgroup (columns); small or thin cells grey, bold where q < 0.05."""

    groups = sorted(set(t["group"].to_list()))
    grid = np.full((len(slugs), len(groups)), np.nan)
    for r in t.iter_rows(named=True):
        i, j = slugs.index(r["slug"]), groups.index(r["group"])
        gap = None if r["small_cell"] else r["tpr_gap"]
        grid[i, j] = np.nan if gap is None else gap
        label = "n<k" if r["small_cell"] else "-" if gap is None else f"{gap:+.2f}"
        sig = gap is not None and r["tpr_gap_q"] is not None and r["tpr_gap_q"] < 0.05
        ax.text(j, i, label, ha="center", va="center", fontsize=7, fontweight="bold" if sig else "normal")
    ax.imshow(np.ma.masked_invalid(grid), cmap="RdBu", vmin=-0.5, vmax=0.5, aspect="auto")
    ax.set_facecolor("#dddddd")
    ax.set_xticks(range(len(groups)), groups, rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(slugs)), [LABEL_BY_SLUG[s] for s in slugs], fontsize=8)
    ax.set_title(title, fontsize=8)


def gap_chart(table: pl.DataFrame, attribute: str, out):
    """CheXclusion's figure for one attribute: TPR gap (subgroup - rest) per finding and subgroup, one panel per
    view (per-pathology and multi-label on the test split, the multi-label out-of-fold over training patients),
    automatic labels; grey: too few patients (n<k) or positives (-); bold: Benjamini-Hochberg q < 0.05 in the panel."""

    t = table.filter((pl.col("attribute") == attribute) & (pl.col("labels") != "radiologist"))
    views = [(v, m) for v, m in VIEWS if t.filter((pl.col("view") == v) & (pl.col("model") == m)).height]
    slugs = [s for s in SLUGS if s in set(t["slug"].to_list())]
    n_groups = max(1, t["group"].n_unique())
    size = (2.4 + 1.6 * n_groups * max(1, len(views)), 1.4 + 0.36 * max(1, len(slugs)))
    with png_figure(out, 1, max(1, len(views)), dpi=110, figsize=size, squeeze=False) as (fig, axes):
        for ax, (view, model) in zip(axes[0], views, strict=False):
            _gap_panel(ax, t.filter((pl.col("view") == view) & (pl.col("model") == model)), slugs, f"{model}, {view}")
        for ax in axes[0][1:]:
            ax.set_yticklabels([])
        fig.suptitle(f"TPR gap by {attribute} (subgroup - other patients); bold: BH q < 0.05", fontsize=9)
    return out


def underdiagnosis_chart(table: pl.DataFrame, out, view: str = "test", model: str = "per_pathology"):
    """The underdiagnosis figure: per subgroup, the share of patients with a finding whom the "No Finding"
    model calls healthy (its FPR: images with a finding called "No Finding"), with 95% patient-bootstrap
    intervals; one panel per attribute."""

    t = table.filter((pl.col("slug") == "no_finding") & (pl.col("view") == view) & (pl.col("model") == model) & ~pl.col("small_cell"))
    t = t.filter(pl.col("labels") == t["labels"][0]) if t.height else t
    with png_figure(out, 1, len(ATTRIBUTES), dpi=110, figsize=(3.2 * len(ATTRIBUTES), 3.0), sharey=True) as (fig, axes):
        for ax, attribute in zip(axes, ATTRIBUTES, strict=True):
            a = t.filter((pl.col("attribute") == attribute) & pl.col("fpr").is_not_null()).sort("group")
            x = np.arange(a.height)
            if a.height:
                fpr = a["fpr"].to_numpy()
                err = np.vstack([fpr - a["fpr_lo"].fill_null(np.nan).to_numpy(), a["fpr_hi"].fill_null(np.nan).to_numpy() - fpr])
                ax.bar(x, fpr, yerr=np.nan_to_num(err), capsize=3, color="#b2182b")
            ax.set_xticks(x, a["group"].to_list(), rotation=30, ha="right", fontsize=8)
            ax.set_title(attribute, fontsize=9)
        axes[0].set_ylabel('"No Finding" called, images with a finding')
        fig.suptitle(f"Underdiagnosis ({model}, {view})", fontsize=10)
    return out


@dataclass(frozen=True)
class AuditResult:
    """A subgroup audit: the full table (small cells included: it stays on the machine), the demographics
    rows that could not be used, the publishable counts (images and patients of the manifest), the charts, and how
    many small groups the attacker recovers from the publishable table (``vision.disclosure``: 0 by design); or the
    reason it could not run (no MIMIC-IV demographics)."""

    table: pl.DataFrame
    rejects: pl.DataFrame
    counts: dict[str, int]
    charts: dict[str, Path]
    skipped: str | None = None
    recovered: pl.DataFrame | None = None

    @property
    def small_cells(self) -> int:
        return int(self.table["small_cell"].sum()) if self.table.height else 0


def subgroup_audit(
    classifiers, metrics: pl.DataFrame, manifest: pl.DataFrame, hints: pl.DataFrame | None, mimic_iv: Path, cfg: AuditSettings, out: Path
) -> AuditResult:
    """Every model's subgroup cells on the test split (both label sources) and the fold models' out-of-fold
    predictions (``hints``), by the MIMIC-IV demographics under ``mimic_iv``; the demographics rejects and the
    charts are written under ``out``. Without the demographics the audit is empty and says why. The counts of
    patients without demographics or without an admission are not published: they are the "not recorded" groups,
    published as rows only when they are large enough."""

    reason = missing_reason(mimic_iv)
    if reason:
        return AuditResult(pl.DataFrame(schema=COLUMNS), pl.DataFrame(), {}, {}, skipped=reason)
    demo = read_demographics(mimic_iv)
    people, counts = per_image(manifest, demo.patients)
    write_parquet(demo.rejects, out / "demographics_rejects.parquet")
    scores = audit_scores(classifiers, metrics, manifest, people, hints)
    table = audit(scores, cfg)
    recovered = recoverable(prepare(scores), publishable(table), cfg.min_patients) if table.height else None
    charts = {a: gap_chart(table, a, out / f"tpr_gap_{a}.png") for a in ATTRIBUTES}
    charts["underdiagnosis"] = underdiagnosis_chart(table, out / "underdiagnosis.png")
    published = {k: counts[k] for k in ("images", "patients")}
    return AuditResult(table, demo.rejects, published, charts, recovered=recovered)
