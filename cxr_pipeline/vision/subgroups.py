"""Who the models fail: per-subgroup AUC, TPR and FPR with patient-bootstrap intervals, and the gap to the rest.

As CheXclusion (Seyyed-Kalantari et al., PSB 2021) measured it: for a model, a finding and a subgroup
(a sex, an age band, a race group, an insurance), the true-positive rate at the model's own
validation-chosen threshold in that subgroup against the rest of the patients whose attribute is known;
and, as the underdiagnosis study (Nature Medicine 2021) did, the false-positive rate of "No Finding":
patients with a finding whom the model calls healthy.

Intervals resample **patients** (all of a patient's images together), and a gap's interval comes from
the same resamples as both of its sides (paired), so it is the interval of the difference, not two
intervals compared by eye. Each gap also has a p-value (the gap against the gaps of random groups of the
same patient count: a permutation null) and a Benjamini-Hochberg q-value within its panel (a view, label
source and model: the family one chart shows; TPR and FPR gaps apart); a two-group attribute's two gaps are
one test, since one is minus the other.

Small groups are pooled, not blanked (``pool_groups``): a group with fewer than ``min_patients``
patients in a block (view, labels, model, finding, attribute) is never a row of its own; the block's
small groups make one row together ("Asian + Other"), which takes in the smallest other groups until it
has ``min_patients`` patients. Blanking a small cell and publishing its neighbours does not hide it: its
count is the block's total (published in ``classifier_metrics``) minus theirs, and with two groups its
rate is the other group's rate minus its gap. With pooling every published row has ``min_patients``
patients or more, and the rows of a block partition its patients, so a small group's values are in no
sum or difference of published ones.

Written here rather than taken from a library: fairlearn's ``MetricFrame`` computes per-group metrics,
but neither its bootstrap (by row, unpaired) nor its metrics (no threshold from another split) are the
patient-level paired ones an audit of repeated-study data needs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl

from cxr_pipeline.data.demographics import ATTRIBUTES
from cxr_pipeline.fields import at_least_one, setting

METRICS = ("auc", "tpr", "fpr", "tpr_gap", "fpr_gap")
GAPS = ("tpr_gap", "fpr_gap")
POOL = " + "  # joins the names of pooled groups
COLUMNS = {
    "view": pl.String, "labels": pl.String, "model": pl.String, "slug": pl.String, "attribute": pl.String, "group": pl.String,
    "pooled": pl.Boolean, "n_patients": pl.Int64, "n_images": pl.Int64, "n_pos": pl.Int64, "small_cell": pl.Boolean,
    "threshold": pl.Float64, "prevalence": pl.Float64,
    **{f"{m}{s}": pl.Float64 for m in METRICS for s in ("", "_lo", "_hi")},
    **{f"{g}{s}": pl.Float64 for g in GAPS for s in ("_p", "_q")},
}  # fmt: skip


@dataclass(frozen=True)
class AuditSettings:
    """The subgroup audit (``pipeline.yaml``'s ``subgroup_metrics`` section)."""

    min_patients: int = setting(
        10, "a subgroup with fewer patients in a block is never a row of its own: the block's small groups are pooled into one row"
    )
    bootstrap: int = setting(
        1000,
        "patient resamples for each cell's 95% intervals (paired for the gaps), and as many random patient groups for the gaps' p-values",
    )
    min_positives: int = setting(
        5,
        "TPR and its gap need at least this many patients with the finding in the subgroup and in the rest (FPR: without it; "
        "AUC: both); below it they are left empty, as their intervals would be degenerate",
    )
    seed: int = setting(0, "random seed of the resamples")

    def __post_init__(self) -> None:
        at_least_one(self, "min_patients", "bootstrap", "min_positives")


def _weighted_auc(y: np.ndarray, rank: np.ndarray, n_ranks: int, w: np.ndarray) -> float:
    """AUC with per-image weights (a bootstrap's patient counts); ``rank``: each score's dense rank (ties share one)."""
    pos = np.bincount(rank, weights=w * (y == 1), minlength=n_ranks)
    neg = np.bincount(rank, weights=w * (y == 0), minlength=n_ranks)
    wp, wn = pos.sum(), neg.sum()
    if wp == 0 or wn == 0:
        return float("nan")
    below = np.cumsum(neg) - neg  # negatives with a lower score
    return float((pos * (below + 0.5 * neg)).sum() / (wp * wn))


def _rates(y: np.ndarray, called: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    """(TPR, FPR) with per-image weights."""
    wp, wn = (w * (y == 1)).sum(), (w * (y == 0)).sum()
    tpr = (w * (y == 1) * called).sum() / wp if wp else float("nan")
    fpr = (w * (y == 0) * called).sum() / wn if wn else float("nan")
    return float(tpr), float(fpr)


def _cell_stats(y, p, rank, n_ranks, called, in_g, w) -> dict[str, float]:
    wg, wr = w * in_g, w * ~in_g
    tpr_g, fpr_g = _rates(y, called, wg)
    tpr_r, fpr_r = _rates(y, called, wr)
    return {
        "auc": _weighted_auc(y, rank, n_ranks, wg),
        "tpr": tpr_g,
        "fpr": fpr_g,
        "tpr_gap": tpr_g - tpr_r,
        "fpr_gap": fpr_g - fpr_r,
    }


def audit_cell(
    y: np.ndarray, p: np.ndarray, threshold: float | np.ndarray, patients: np.ndarray, in_group: np.ndarray, cfg: AuditSettings
) -> dict:
    """One (model, finding, subgroup) cell over the images whose attribute is known: the group's metrics and
    its gaps to the rest, with 95% percentile intervals over ``cfg.bootstrap`` patient resamples (paired) and
    each gap's two-sided p-value against random groups (``null_gaps``). ``threshold``: one for every image, or one per image (out-of-fold
    predictions are each read at their own fold model's threshold); the row's ``threshold`` is null then."""
    y = np.asarray(y, dtype=np.int64)
    _, inverse = np.unique(np.asarray(p), return_inverse=True)
    n_ranks = int(inverse.max()) + 1 if len(p) else 0
    called = np.asarray(p) >= threshold
    pid, codes = np.unique(patients, return_inverse=True)
    n_pat_g = int(np.unique(codes[in_group]).size)
    one = np.unique(threshold)
    row = {"n_patients": n_pat_g, "n_images": int(in_group.sum()), "n_pos": int((y[in_group] == 1).sum())}
    row["threshold"] = float(one[0]) if one.size == 1 else float("nan")
    row["small_cell"] = n_pat_g < cfg.min_patients
    row["prevalence"] = float(y[in_group].mean()) if in_group.any() else float("nan")
    if row["small_cell"]:
        row["prevalence"] = float("nan")
        return row  # too few patients to mean anything or to publish: the count only
    point = _cell_stats(y, p, inverse, n_ranks, called, in_group, np.ones(len(y)))
    rng = np.random.default_rng(cfg.seed)
    draws = {m: [] for m in METRICS}
    for _ in range(cfg.bootstrap):
        counts = np.bincount(rng.integers(0, len(pid), len(pid)), minlength=len(pid))
        s = _cell_stats(y, p, inverse, n_ranks, called, in_group, counts[codes].astype(float))
        for m in METRICS:
            draws[m].append(s[m])
    null = null_gaps(y, p, inverse, n_ranks, called, in_group, codes, len(pid), cfg)
    # too few patients with (without) the finding on either side: TPR (FPR) and its gap would rest on a handful
    enough = {}
    for kind, mask in (("pos", y == 1), ("neg", y == 0)):
        n_g, n_r = np.unique(codes[mask & in_group]).size, np.unique(codes[mask & ~in_group]).size
        enough[kind] = min(n_g, n_r) >= cfg.min_positives
    usable = {"tpr": enough["pos"], "tpr_gap": enough["pos"], "fpr": enough["neg"], "fpr_gap": enough["neg"]}
    usable["auc"] = enough["pos"] and enough["neg"]
    for m in METRICS:
        if not usable[m]:
            row[m] = row[f"{m}_lo"] = row[f"{m}_hi"] = float("nan")
            continue
        d = np.asarray(draws[m])
        d = d[~np.isnan(d)]
        row[m] = point[m]
        lo, hi = (np.percentile(d, [2.5, 97.5]) if len(d) else (np.nan, np.nan)) if not np.isnan(point[m]) else (np.nan, np.nan)
        row[f"{m}_lo"], row[f"{m}_hi"] = float(lo), float(hi)
        if m in GAPS:
            row[f"{m}_p"] = permutation_p(point[m], null[m])
    return row


def null_gaps(y, p, rank, n_ranks, called, in_group, codes, n_patients: int, cfg: AuditSettings) -> dict[str, np.ndarray]:
    """The TPR and FPR gaps of ``cfg.bootstrap`` groups of the same patients count drawn at random (the group's
    patient labels permuted, each patient's images kept together): what the gaps look like when membership means
    nothing. The group's own rate never enters, so a rate of 1.0 in a small group (no bootstrap spread at all)
    is judged against how far random groups of its size stray."""
    member = np.zeros(n_patients, dtype=bool)
    member[np.unique(codes[in_group])] = True
    rng = np.random.default_rng(cfg.seed + 1)
    out: dict[str, list] = {g: [] for g in GAPS}
    ones = np.ones(len(y))
    for _ in range(cfg.bootstrap):
        s = _cell_stats(y, p, rank, n_ranks, called, rng.permutation(member)[codes], ones)
        for g in GAPS:
            out[g].append(s[g])
    return {g: np.asarray(v) for g, v in out.items()}


def permutation_p(point: float, null: np.ndarray) -> float:
    """Two-sided p-value of "no gap": the gap over the spread of the random groups' gaps (``null_gaps``), read on
    the normal. The share of random gaps past the observed one is not used: it cannot go below 1/(B+1), too
    coarse to survive a Benjamini-Hochberg correction over hundreds of gaps. Not the bootstrap's spread either:
    a group whose rate is 0 or 1 has none, and its gap came out significant on 7 positives."""
    from scipy.stats import norm

    d = np.asarray(null, dtype=float)
    d = d[~np.isnan(d)]
    sd = float(np.sqrt(np.mean(d**2))) if len(d) > 1 else float("nan")  # spread around 0, the null's centre
    if np.isnan(point) or not sd > 0:
        return float("nan")
    return float(2 * norm.sf(abs(point) / sd))


def pool_groups(
    values: np.ndarray, patients: np.ndarray, min_patients: int, units: list[tuple[str, ...]] | None = None
) -> list[tuple[str, np.ndarray, bool]]:
    """The rows one block (its images' attribute ``values``) is published by: (name, image mask, pooled).

    Every unit (a group, or a pool of groups decided for the whole view: ``units``) with ``min_patients`` patients
    or more in the block alone; the units with fewer pooled into one row, which takes in the smallest other units
    (fewest patients first) until it has ``min_patients`` patients, named by its groups joined with " + ". The rows
    partition the block's images, so no published number, alone or with the block's total, is a small group's
    own. A block whose patients are all fewer than ``min_patients`` is one row (``audit_cell`` marks it small)."""
    units = units if units is not None else [(g,) for g in sorted(set(values.tolist()))]
    units = [u for u in units if np.isin(values, u).any()]

    def size(members: list) -> int:
        return int(np.unique(patients[np.isin(values, members)]).size)

    alone = [u for u in units if size(list(u)) >= min_patients]
    pool = [g for u in units if u not in alone for g in u]
    while pool and alone and size(pool) < min_patients:
        pool.extend(alone.pop(min(range(len(alone)), key=lambda i: (size(list(alone[i])), alone[i]))))
    rows = [(POOL.join(map(str, u)), np.isin(values, u), len(u) > 1) for u in alone]
    if pool:
        rows.append((POOL.join(str(g) for g in sorted(pool)), np.isin(values, pool), len(pool) > 1))
    return rows


def view_units(view: pl.DataFrame, attribute: str, min_patients: int) -> list[tuple[str, ...]]:
    """The groups of ``attribute`` a view (every model and finding of it together) pools before any block does.
    A finding's block holds the view's images less those without that finding's label, so a group can fall under
    the minimum in one finding and not in another; deciding the pools once for the view keeps a small group inside
    the same pool in every block, so no difference between two findings' rows isolates it."""
    known = view.filter(pl.col(attribute).is_not_null())
    rows = pool_groups(known[attribute].to_numpy(), known["subject_id"].to_numpy(), min_patients)
    return [tuple(name.split(POOL)) for name, _, _ in rows]


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
        out[f"{gap}_q"] = [q_of.get((lead if two else r, gap)) for r, lead, two in block_first.iter_rows()]
    return table.with_columns(pl.Series(k, v, dtype=pl.Float64) for k, v in out.items())


def audit(scores: pl.DataFrame, cfg: AuditSettings) -> pl.DataFrame:
    """Every cell of ``scores`` (one row per image and model/finding: ``view, labels, model, slug, subject_id,
    target, prob, threshold`` and the attributes ``sex, age_band, race, insurance``) by every subgroup."""
    rows = []
    keys = ["view", "labels", "model", "slug"]
    scores = scores.filter(pl.col("target").is_not_null())
    units = {}  # (view, labels, attribute) -> the view's pools
    for (view, labels), part in scores.group_by(["view", "labels"], maintain_order=True):
        units.update({(view, labels, a): view_units(part, a, cfg.min_patients) for a in ATTRIBUTES})
    for key, part in scores.group_by(keys, maintain_order=True):
        head = dict(zip(keys, key, strict=True))
        for attribute in ATTRIBUTES:
            known = part.filter(pl.col(attribute).is_not_null())
            if not known.height:
                continue
            y, p, threshold = known["target"].to_numpy(), known["prob"].to_numpy(), known["threshold"].to_numpy()
            patients, values = known["subject_id"].to_numpy(), known[attribute].to_numpy()
            base = units[(head["view"], head["labels"], attribute)]
            for group, in_group, pooled in pool_groups(values, patients, cfg.min_patients, base):
                cell = audit_cell(y, p, threshold, patients, in_group, cfg)
                rows.append({**head, "attribute": attribute, "group": group, "pooled": pooled, **cell})
    if not rows:
        return pl.DataFrame(schema=COLUMNS)
    df = pl.DataFrame(rows, infer_schema_length=None)
    df = df.with_columns(pl.lit(None, t).alias(c) for c, t in COLUMNS.items() if c not in df.columns)
    df = df.select(list(COLUMNS)).cast(COLUMNS).with_columns(pl.col(pl.Float64).fill_nan(None))
    return adjust_gaps(df.drop([f"{g}_q" for g in GAPS])).select(list(COLUMNS))


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
    from cxr_pipeline.vision.evaluate import stored_threshold
    from cxr_pipeline.vision.folds import threshold_column
    from cxr_pipeline.vision.splits import MULTILABEL, RADIOLOGIST
    from cxr_pipeline.vision.targets import targets

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
            fold_probs = oof.select("dicom_id", pl.col(s).alias("prob"), pl.col(threshold_column(s)).alias("threshold"))
            views.append(("train_out_of_fold", source, targets(train, s, unc, blank), fold_probs))
        for view, labels, rows, p in views:
            t = rows.select("dicom_id", pl.col("target").cast(pl.Float64)).join(p, on="dicom_id", how="inner")
            parts.append(
                t.with_columns(pl.lit(view).alias("view"), pl.lit(labels).alias("labels"), *(pl.lit(v).alias(k) for k, v in head.items()))
            )
    if not parts:
        return pl.DataFrame()
    return pl.concat(parts, how="diagonal_relaxed").join(people, on="dicom_id", how="inner")


VIEWS = (("test", "per_pathology"), ("test", "multilabel"), ("train_out_of_fold", "multilabel"))


def _gap_panel(ax, t: pl.DataFrame, slugs: list[str], title: str) -> None:
    """One heat map: TPR gap per finding (rows) and subgroup (columns); small or thin cells grey, bold where q < 0.05."""
    from cxr_pipeline.labels import LABEL_BY_SLUG

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
    from cxr_pipeline.files import png_figure
    from cxr_pipeline.labels import SLUGS

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
    from cxr_pipeline.files import png_figure

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
    rows that could not be used, the counts of images and patients without demographics, the charts; or the
    reason it could not run (no MIMIC-IV demographics)."""

    table: pl.DataFrame
    rejects: pl.DataFrame
    counts: dict[str, int]
    charts: dict[str, Path]
    skipped: str | None = None

    @property
    def small_cells(self) -> int:
        return int(self.table["small_cell"].sum()) if self.table.height else 0


def subgroup_audit(
    classifiers, metrics: pl.DataFrame, manifest: pl.DataFrame, hints: pl.DataFrame | None, mimic_iv: Path, cfg: AuditSettings, out: Path
) -> AuditResult:
    """Every model's subgroup cells on the test split (both label sources) and the fold models' out-of-fold
    predictions (``hints``), by the MIMIC-IV demographics under ``mimic_iv``; the demographics rejects and the
    charts are written under ``out``. Without the demographics the audit is empty and says why."""
    from cxr_pipeline.data.demographics import missing_reason, per_image, read_demographics
    from cxr_pipeline.files import write_parquet

    reason = missing_reason(mimic_iv)
    if reason:
        return AuditResult(pl.DataFrame(schema=COLUMNS), pl.DataFrame(), {}, {}, skipped=reason)
    demo = read_demographics(mimic_iv)
    people, counts = per_image(manifest, demo.patients)
    write_parquet(demo.rejects, out / "demographics_rejects.parquet")
    table = audit(audit_scores(classifiers, metrics, manifest, people, hints), cfg)
    charts = {a: gap_chart(table, a, out / f"tpr_gap_{a}.png") for a in ATTRIBUTES}
    charts["underdiagnosis"] = underdiagnosis_chart(table, out / "underdiagnosis.png")
    return AuditResult(table, demo.rejects, counts, charts)
