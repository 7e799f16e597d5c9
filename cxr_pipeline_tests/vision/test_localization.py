"""ChestX-ray8's localization measures, the baselines and the level's choice (vision.localization)."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from cxr_pipeline.vision import localization as loc
from cxr_pipeline.vision.localization import IOBB_T, Baselines, Case, Split


def test_heat_boxes_cut_each_connected_region_at_the_level():
    heat = np.zeros((40, 60), np.float32)
    heat[5:15, 10:30] = 1.0  # rows 5-14, cols 10-29
    heat[25:35, 40:50] = 0.5
    np.testing.assert_array_equal(loc.heat_boxes(heat, 0.6), [[10, 5, 20, 10]])  # the weaker region is under 0.6 of the peak
    boxes = loc.heat_boxes(heat, 0.4)
    assert sorted(map(tuple, boxes.tolist())) == [(10, 5, 20, 10), (40, 25, 10, 10)]
    assert loc.heat_boxes(np.zeros((8, 8)), 0.5).shape == (0, 4)  # a map that says nothing boxes nothing


def test_iobb_is_over_the_detected_box_and_found_needs_more_than_t():
    truth = np.array([[10.0, 10.0, 20.0, 20.0]])
    inside = np.array([[15.0, 15.0, 5.0, 5.0]])  # wholly inside: IoBB 1 (IoU would be 1/16)
    twice = np.array([[10.0, 10.0, 40.0, 20.0]])  # half of it on the truth
    assert loc.iobb(inside, truth)[0, 0] == pytest.approx(1.0)
    assert loc.iobb(twice, truth)[0, 0] == pytest.approx(0.5)
    assert loc.found(twice, truth).tolist() == [[t < 0.5 for t in IOBB_T]]  # 0.5 is not above T = 0.5
    assert not loc.found(np.zeros((0, 4)), truth).any()


def test_pointing_scores_the_maximum_and_shares_a_plateau():
    truth = np.array([[0.0, 0.0, 10.0, 20.0]])  # the left half of a 20 x 20 frame
    heat = np.zeros((20, 20), np.float32)
    heat[5, 3] = 1.0
    assert loc.pointing(heat, truth) == 1.0
    heat[5, 3], heat[5, 15] = 0.0, 1.0
    assert loc.pointing(heat, truth) == 0.0
    assert loc.pointing(np.ones((20, 20), np.float32), truth) == pytest.approx(0.5)  # a flat map: half its plateau inside


def _sized(rows):
    return pl.DataFrame(rows, schema=["finding", "x", "y", "w", "h", "rows", "cols"], orient="row")


def test_baselines_are_shares_of_the_training_boxes_whatever_the_image_size():
    train = _sized([("Pneumothorax", 0, 0, 50, 100, 200, 100), ("Pneumothorax", 50, 100, 50, 100, 400, 200)])
    b = Baselines.of(train)
    assert b.mean_box["Pneumothorax"] == pytest.approx((0.125, 0.125, 0.5, 0.5))
    m = b.maps(loc.MEAN_BOX, "Pneumothorax", [Case("a", "p", (80, 40), np.zeros((1, 4)))])[0]
    assert m.shape == (80, 40) and m[10:40, 5:20].all() and m.sum() == 30 * 15  # rows 10-39, cols 5-19


def _cases(n: int, seed: int, shape=(64, 64)) -> list[Case]:
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        x, y = rng.integers(0, 40, 2)
        out.append(Case(f"d{seed}-{i}", f"p{seed}-{i // 2}", shape, np.array([[float(x), float(y), 16.0, 16.0]])))
    return out


def _true_maps(model, images, output, cases, sizes):
    """A stand-in for Grad-CAM that looks exactly where the finding is, with a faint halo around it."""
    maps = []
    for c in cases:
        x, y, w, h = c.truth[0].astype(int)
        m = np.full(c.shape, 0.05, np.float32)
        m[max(0, y - 8) : y + h + 8, max(0, x - 8) : x + w + 8] = 0.35
        m[y : y + h, x : x + w] = 1.0
        m[y + h // 2, x + w // 2] = 1.01
        maps.append(m)
    return maps


class _Model:
    slugs = ["pneumothorax"]
    size = 32
    arch = "resnet18"


class _Champion:
    name, version, kind, model = "cxr-pneumothorax", "1", "per_pathology", _Model()


def _table(monkeypatch, val, test, baselines, levels=None):
    monkeypatch.setattr(loc, "grad_cam_maps", _true_maps)
    no_images = Split(val, lambda size: np.zeros((len(val), size, size), np.uint8), [(64, 64)] * len(val))
    tested = Split(test, lambda size: np.zeros((len(test), size, size), np.uint8), [(64, 64)] * len(test))
    chosen = loc.choose_levels([_Champion()], {"Pneumothorax": no_images}) if levels is None else levels
    return loc.localization_table("mimic", [_Champion()], {"Pneumothorax": tested}, baselines, chosen, 200, 0)


def test_a_map_on_the_finding_beats_the_baselines_with_a_paired_interval(monkeypatch):
    baselines = Baselines(mean_box={"Pneumothorax": (0.3, 0.3, 0.6, 0.6)}, lungs=(0.05, 0.05, 0.95, 0.95))
    table = _table(monkeypatch, _cases(20, 1), _cases(30, 2), baselines)
    assert set(table["method"]) == {loc.GRAD_CAM, loc.MEAN_BOX, loc.UNIFORM_LUNGS}
    g = table.filter(pl.col("method") == loc.GRAD_CAM).row(0, named=True)
    assert g["level"] == 0.4 and g["level_from"] == "validate (20 images)"  # the lowest level that cuts the halo off
    assert g["pointing"] == 1.0 and all(g[loc.iobb_column(t)] == 1.0 for t in IOBB_T)
    assert g["n_images"] == 30 and g["n_patients"] == 15 and g["n_boxes"] == 30
    assert g["pointing_vs_mean_box_lo"] > 0 and g["pointing_lo"] <= g["pointing"] <= g["pointing_hi"]
    mean = table.filter(pl.col("method") == loc.MEAN_BOX).row(0, named=True)
    assert g["pointing_vs_mean_box"] == pytest.approx(g["pointing"] - mean["pointing"])
    # the flat region map points at its whole plateau: its score is the share of the region inside each box
    lungs = table.filter(pl.col("method") == loc.UNIFORM_LUNGS).row(0, named=True)
    assert lungs["pointing"] == pytest.approx(256 / (58 * 58), abs=0.01)


def test_the_level_is_chosen_on_validate_and_test_boxes_never_move_it(monkeypatch):
    baselines = Baselines(mean_box={"Pneumothorax": (0.3, 0.3, 0.6, 0.6)}, lungs=(0.0, 0.0, 1.0, 1.0))
    val = _cases(12, 3)
    first = _table(monkeypatch, val, _cases(30, 4), baselines).filter(pl.col("method") == loc.GRAD_CAM)
    other = _table(monkeypatch, val, _cases(9, 5), baselines).filter(pl.col("method") == loc.GRAD_CAM)
    assert first["level"][0] == other["level"][0]
    none = _table(monkeypatch, [], _cases(9, 5), baselines).filter(pl.col("method") == loc.GRAD_CAM).row(0, named=True)
    assert (none["level"], none["level_from"]) == (loc.DEFAULT_LEVEL, "default (no boxed validate image)")
    fixed = _table(monkeypatch, val, _cases(30, 4), baselines, levels={("cxr-pneumothorax v1", "pneumothorax"): (0.1, "internal x")})
    row = fixed.filter(pl.col("method") == loc.GRAD_CAM).row(0, named=True)
    assert row["level"] == 0.1 and row["level_from"] == "internal x"  # an external set keeps the internal choice
    assert row[loc.iobb_column(0.75)] < 1.0  # at 0.1 the halo joins the box: its IoBB falls


def test_the_ceiling_counts_boxes_a_coarse_maps_maximum_can_reach():
    """A 4 x 4 map over a 64-px letterbox of a 128 x 128 image has its cell centres at 16, 48, 80 and 112 source px: a
    box around one of them is reachable, a 10-px box between them is not, whatever the model."""
    reach = Case("a", "p", (128, 128), np.array([[40.0, 40.0, 16.0, 16.0]]))
    between = Case("b", "p", (128, 128), np.array([[20.0, 20.0, 10.0, 10.0]]))
    assert loc.grid_ceiling(4, 64, [reach], [(128, 128)]) == 1.0
    assert loc.grid_ceiling(4, 64, [between], [(128, 128)]) == 0.0
    assert loc.grid_ceiling(16, 64, [between], [(128, 128)]) == 1.0  # a finer map reaches it (centres every 8 px)
    # a wide image is letterboxed: no centre falls in the padding, the rest map back onto the source's rows
    # (its 64 x 128 source is 32 x 64 in the letterbox, rows 16-47: two rows of centres, at source rows 16 and 48)
    edge = Case("c", "p", (64, 128), np.array([[40.0, 0.0, 16.0, 6.0]]))
    assert loc.grid_ceiling(4, 64, [edge], [(64, 128)]) == 0.0
    row16 = Case("d", "p", (64, 128), np.array([[40.0, 10.0, 16.0, 10.0]]))
    assert loc.grid_ceiling(4, 64, [row16], [(64, 128)]) == 1.0
