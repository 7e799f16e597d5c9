"""The subgroup audit's statistics on scores with a known gap, and with none."""

from __future__ import annotations

import numpy as np
import polars as pl

from cxr_pipeline.vision.subgroups import AuditSettings, audit, audit_cell, largest_gaps, publishable

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


def test_small_cells_are_marked_kept_and_never_published_with_values():
    y, p, pid, _ = scores(100, 0.8, 0.8, seed=4)
    attr = np.where(pid < 6, "rare", np.where(pid < 53, "common", "other"))  # 6 patients < 10
    df = pl.DataFrame({"view": "test", "labels": "chexpert", "model": "per_pathology", "slug": "edema", "subject_id": pid,
                       "target": y.astype(float), "prob": p, "threshold": 0.5, "sex": attr, "age_band": None, "race": None,
                       "insurance": None})  # fmt: skip
    table = audit(df, CFG)
    rare = table.filter(pl.col("group") == "rare").row(0, named=True)
    assert rare["small_cell"] and rare["n_patients"] == 6 and rare["tpr"] is None and rare["auc"] is None
    common = table.filter(pl.col("group") == "common").row(0, named=True)
    assert not common["small_cell"] and common["tpr"] is not None and 0.5 < common["auc"] <= 1
    shown = publishable(table).filter(pl.col("group") == "rare").row(0, named=True)
    assert shown["n_patients"] is None and shown["n_images"] is None and shown["tpr"] is None
    assert largest_gaps(table).filter(pl.col("group") == "rare").height == 0


def test_a_rate_resting_on_a_handful_of_patients_is_left_empty_not_given_a_degenerate_interval():
    """One positive patient in the subgroup: its TPR is 0 or 1 in every resample that has it, an 'interval' of one
    value. The rate and its gap stay empty; FPR (many negative patients) is still given."""
    y, p, pid, group = scores(200, 0.8, 0.8, seed=5, images_per_patient=1)
    in_g = pid < 30
    y = np.where(in_g & (pid > 0), 0, y)  # the subgroup's only possible positive: patient 0
    y[0] = 1
    cell = audit_cell(y, p, 0.5, pid, in_g, CFG)
    assert np.isnan(cell["tpr"]) and np.isnan(cell["tpr_gap_lo"]) and np.isnan(cell["auc"])
    assert not np.isnan(cell["fpr"]) and cell["fpr_lo"] <= cell["fpr"] <= cell["fpr_hi"]
