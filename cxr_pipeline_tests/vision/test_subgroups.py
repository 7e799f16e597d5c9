"""The subgroup audit's statistics on scores with a known gap, and with none."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cxr_pipeline.vision.subgroups import POOL, AuditSettings, audit, audit_cell, gap_tests, largest_gaps, publishable

CFG = AuditSettings(min_patients=10, bootstrap=300, seed=0, min_positives=5)


def scores(n_patients: int, tpr_a: float, tpr_b: float, seed: int, images_per_patient: int = 3):
    """Patients in group a (first half) or b; each image positive with p 0.4; a positive is called (prob 0.9
    against a threshold 0.5) with the group's TPR, a negative with FPR 0.1 in both groups."""
    rng = np.random.default_rng(seed)
    pid = np.repeat(np.arange(n_patients), images_per_patient)
    group = np.where(pid < n_patients // 2, "a", "b")
    y = (rng.uniform(size=pid.size) < 0.4).astype(int)
    tpr = np.where(group == "a", tpr_a, tpr_b)
    called = np.where(y == 1, rng.uniform(size=pid.size) < tpr, rng.uniform(size=pid.size) < 0.1)
    p = np.where(called, rng.uniform(0.5, 1.0, pid.size), rng.uniform(0.0, 0.5, pid.size))
    return y, p, pid, group


def test_a_known_tpr_gap_is_found_at_its_size():
    y, p, pid, group = scores(300, 0.55, 0.90, seed=1)  # 150 patients a side, gap -0.35
    cell = audit_cell(y, p, 0.5, pid, group == "a", CFG)
    assert cell["n_patients"] == 150 and not cell["small_cell"]
    assert cell["tpr_gap_hi"] < 0  # detected: the paired interval excludes 0
    assert cell["tpr_gap_lo"] < -0.35 < cell["tpr_gap_hi"]  # and covers the planted size
    assert abs(cell["fpr_gap"]) < 0.1 and cell["fpr_gap_lo"] < 0 < cell["fpr_gap_hi"]  # no FPR gap was planted


def test_no_gap_is_not_found_at_the_stated_number_of_patients():
    y, p, pid, group = scores(300, 0.8, 0.8, seed=2)
    cell = audit_cell(y, p, 0.5, pid, group == "a", CFG)
    assert cell["tpr_gap_lo"] < 0 < cell["tpr_gap_hi"]
    assert cell["tpr_gap_hi"] - cell["tpr_gap_lo"] < 0.3  # and not because the interval is uninformative


def test_intervals_resample_patients_not_images():
    """A patient's repeat images agree with each other (here: copies); resampling images would count them as
    independent evidence and narrow the interval, resampling patients does not."""
    y1, p1, pid1, group1 = scores(60, 0.8, 0.8, seed=3, images_per_patient=1)
    y, p, pid, group = (np.repeat(a, 6) for a in (y1, p1, pid1, group1))
    by_patient = audit_cell(y, p, 0.5, pid, group == "a", CFG)
    by_image = audit_cell(y, p, 0.5, np.arange(len(pid)), group == "a", CFG)
    assert (by_patient["tpr_hi"] - by_patient["tpr_lo"]) > 1.8 * (by_image["tpr_hi"] - by_image["tpr_lo"])


def _table(pid, y, p, threshold=0.5, **attributes) -> pl.DataFrame:
    cols = {"sex": None, "age_band": None, "race": None, "insurance": None, **attributes}
    return pl.DataFrame({"view": "test", "labels": "chexpert", "model": "per_pathology", "slug": "edema", "subject_id": pid,
                         "target": y.astype(float), "prob": p, "threshold": threshold, **cols})  # fmt: skip


def test_small_groups_are_pooled_never_a_row_of_their_own():
    y, p, pid, _ = scores(100, 0.8, 0.8, seed=4)
    attr = np.where(pid < 6, "rare", np.where(pid < 53, "common", "other"))  # 6 patients < 10
    table = audit(_table(pid, y, p, sex=attr), CFG)
    assert set(table["group"]) == {"common + rare", "other"}  # the pool takes in the smallest other group
    pooled = table.filter(pl.col("group") == "common + rare").row(0, named=True)
    assert pooled["pooled"] and pooled["n_patients"] == 53 and not pooled["small_cell"] and pooled["tpr"] is not None
    assert publishable(table).equals(table)  # nothing left to blank: every row has 10 patients or more


def test_a_group_just_above_the_minimum_is_published_alone():
    y, p, pid, _ = scores(100, 0.8, 0.8, seed=6)
    attr = np.select([pid < 10, pid < 14, pid < 21], ["ten", "four", "seven"], "rest")  # 10 patients: published alone
    table = publishable(audit(_table(pid, y, p, race=attr), CFG))
    ten = table.filter(pl.col("group") == "ten").row(0, named=True)
    assert not ten["pooled"] and ten["n_patients"] == 10 and ten["n_images"] == 30 and ten["prevalence"] is not None
    assert set(table["group"]) == {"ten", "four + seven", "rest"}  # 4 + 7 patients: pooled, 11


def _recover(published: pl.DataFrame, truth: dict, categories: dict) -> dict:
    """The attacker: everything in ``published`` plus each block's totals (``truth[block]["total"]``: what
    ``classifier_metrics`` and the demographics counts give) and the categories of each attribute. Unknowns: each
    category's counts (images, positives, true positives, false positives); each published row says the sum of its
    members' (rates times counts are counts), the totals the sum of all. A category's counts follow iff its indicator
    lies in the span of those equations (differences from the total, a two-group block's gap, any combination);
    returns {(block, category): counts} for every category recovered that way."""
    out = {}
    keys = ["view", "labels", "model", "slug", "attribute"]
    for block, rows in published.group_by(keys):
        cats = categories[block[-1]]
        eqs, rhs = [], []
        for r in rows.iter_rows(named=True):
            if r["n_images"] is None:
                continue
            members = set(r["group"].split(POOL))
            tp = r["tpr"] * r["n_pos"] if r["tpr"] is not None else None
            fp = r["fpr"] * (r["n_images"] - r["n_pos"]) if r["fpr"] is not None else None
            eqs.append([float(c in members) for c in cats])
            rhs.append([r["n_images"], r["n_pos"], tp, fp])
        eqs.append([1.0] * len(cats))
        rhs.append(truth[tuple(block)]["total"])
        a = np.array(eqs)
        for i, c in enumerate(cats):
            e = np.eye(len(cats))[i]
            if np.linalg.matrix_rank(np.vstack([a, e])) == np.linalg.matrix_rank(a):  # e in the row space
                w = np.linalg.lstsq(a.T, e, rcond=None)[0]  # e = w @ a
                b = np.array([[np.nan if v is None else v for v in row] for row in rhs], dtype=float)
                out[(tuple(block), c)] = w @ b
    return out


def test_the_attacker_recovers_no_small_group_from_the_published_table():
    """Small groups in every attribute: one alone, two together under the minimum, one beside a single other group.
    The attacker (``_recover``) recovers each from the old publication (every group a row, small ones blanked)
    exactly, and none from the published table."""
    rng = np.random.default_rng(7)
    pid = np.repeat(np.arange(120), 2)
    y = (rng.uniform(size=pid.size) < 0.4).astype(int)
    p = np.clip(y * 0.3 + rng.uniform(0, 0.7, pid.size), 0, 1)
    sex = np.where(pid < 7, "F", "M")  # two groups, one small: its rate would be M's rate minus M's gap
    race = np.select([pid < 4, pid < 9, pid < 60], ["C", "D", "A"], "B")  # C (4) and D (5): together 9 < 10
    age = np.select([pid < 8, pid < 50], ["18-39", "40-59"], "60-79")  # one small group alone
    scores_ = _table(pid, y, p, sex=sex, race=race, age_band=age)
    categories = {
        "sex": ["F", "M"],
        "race_group": [],
        "race": ["A", "B", "C", "D"],
        "age_band": ["18-39", "40-59", "60-79"],
        "insurance": [],
    }
    called = p >= 0.5
    total = [len(y), int(y.sum()), int((called & (y == 1)).sum()), int((called & (y == 0)).sum())]
    block = ("test", "chexpert", "per_pathology", "edema")
    truth = {(*block, a): {"total": total} for a in ("sex", "race", "age_band")}
    small = {("sex", "F"), ("race", "C"), ("race", "D"), ("age_band", "18-39")}

    # the old publication: every group its own row, a small group's values blanked
    old = audit(scores_, AuditSettings(min_patients=1, bootstrap=20, seed=0, min_positives=1))
    blank = pl.col("n_patients") < 10
    old = old.with_columns(pl.when(blank).then(None).otherwise(pl.col(c)).alias(c) for c in ("n_images", "n_pos", "tpr", "fpr"))
    got = _recover(old, truth, categories)
    for attribute, group in small - {("race", "C"), ("race", "D")}:  # C and D are blanked together: only their sum follows
        n_images = 2 * int(np.unique(pid[{"sex": sex, "age_band": age}[attribute] == group]).size)
        assert got[((*block, attribute), group)][0] == pytest.approx(n_images)

    new = publishable(audit(scores_, AuditSettings(min_patients=10, bootstrap=20, seed=0, min_positives=1)))
    got = _recover(new, truth, categories)
    assert not {(b[-1], g) for b, g in got} & small
    assert {(b[-1], g) for b, g in got} >= {("race", "B"), ("age_band", "60-79")}  # published alone


def test_a_small_group_stays_in_the_same_pool_in_every_finding():
    """Group C (4 patients) pooled with A (12) for the view; in a finding where C's images have no label, A alone
    would be published, and A + C (another finding) minus A would be C: the view's pool holds in both."""
    y, p, pid, _ = scores(100, 0.8, 0.8, seed=10)
    race = np.select([pid < 4, pid < 16], ["C", "A"], "B")
    x = _table(pid, y, p, race=race)
    no_label_for_c = x.with_columns(
        pl.lit("pleural_effusion").alias("slug"), pl.when(pl.col("race") == "C").then(None).otherwise(pl.col("target")).alias("target")
    )
    table = audit(pl.concat([x, no_label_for_c]), CFG)
    for slug in ("edema", "pleural_effusion"):
        assert set(table.filter(pl.col("slug") == slug)["group"]) == {"A + C", "B"}, slug


def test_a_fold_model_s_own_threshold_reads_its_shifted_scores():
    """Out of fold, each image is read at its own fold model's threshold: a fold whose scores (and so its
    validation-chosen threshold) sit 0.3 higher gives the same rates as unshifted; one threshold for all would not."""
    y, p, pid, group = scores(200, 0.6, 0.9, seed=8)
    fold = pid % 5
    shifted, own = p + 0.3 * (fold == 2), 0.5 + 0.3 * (fold == 2)
    base = audit_cell(y, p, 0.5, pid, group == "a", CFG)
    per_fold = audit_cell(y, shifted, own, pid, group == "a", CFG)
    one = audit_cell(y, shifted, 0.5, pid, group == "a", CFG)
    assert per_fold["tpr"] == base["tpr"] and per_fold["fpr"] == base["fpr"] and np.isnan(per_fold["threshold"])
    assert one["fpr"] > base["fpr"] + 0.05


def test_a_small_group_that_every_positive_is_called_in_is_not_a_finding_by_itself():
    """No gap planted (TPR 0.9 everywhere); in a group of 10 patients every positive happens to be called. Its TPR is
    1.0 in every resample, so the bootstrap interval of the gap is narrow and excludes 0, and a p-value from the
    bootstrap's spread would be tiny; against random groups of 10 patients it is not."""
    y, p, pid, _ = scores(200, 0.9, 0.9, seed=11)
    in_g = pid < 10
    p = np.where(in_g & (y == 1), 0.9, p)
    cell = audit_cell(y, p, 0.5, pid, in_g, AuditSettings(min_patients=10, bootstrap=1000, seed=0, min_positives=5))
    assert cell["tpr"] == 1.0 and cell["tpr_gap_lo"] > 0  # the degenerate interval
    assert cell["tpr_gap_p"] > 0.05


def test_q_values_count_a_two_group_comparison_once_and_find_the_planted_gap():
    y, p, pid, group = scores(300, 0.5, 0.9, seed=9)  # gap -0.4 by "sex"
    noise = np.random.default_rng(1).choice(["x", "y", "z"], size=300)[pid]  # no gap by "race"
    table = audit(_table(pid, y, p, sex=group, race=noise), AuditSettings(min_patients=10, bootstrap=1000, seed=0, min_positives=5))
    sex = table.filter(pl.col("attribute") == "sex").sort("group")
    assert sex["tpr_gap_q"][0] == sex["tpr_gap_q"][1] < 0.05  # one test, both rows carry its q-value
    assert sex["tpr_gap"][0] == pytest.approx(-sex["tpr_gap"][1])
    family = gap_tests(table)
    assert family.height == 1 + 3  # sex once, race's three groups
    assert (table.filter(pl.col("attribute") == "race")["tpr_gap_q"] > 0.05).all()
    assert largest_gaps(table)["attribute"].to_list() == ["sex"]


def test_a_rate_resting_on_a_handful_of_patients_is_left_empty_not_given_a_degenerate_interval():
    """One positive patient in the subgroup: its TPR is 0 or 1 in every resample that has it, an 'interval' of one
    value. The rate and its gap stay empty; FPR (many negative patients) is still given."""
    y, p, pid, group = scores(200, 0.8, 0.8, seed=5, images_per_patient=1)
    in_g = pid < 30
    y = np.where(in_g & (pid > 0), 0, y)  # the subgroup's only possible positive: patient 0
    y[0] = 1
    cell = audit_cell(y, p, 0.5, pid, in_g, CFG)
    assert np.isnan(cell["tpr"]) and np.isnan(cell["tpr_gap_lo"]) and np.isnan(cell["auc"])
    neg = in_g & (y == 0)
    assert cell["fpr"] == pytest.approx(((p >= 0.5) & neg).sum() / neg.sum())  # the subgroup's own false-positive rate
    assert cell["fpr_lo"] < cell["fpr"] < cell["fpr_hi"]
