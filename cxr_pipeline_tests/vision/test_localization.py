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
        m[max(0, y - 8) : y + h + 8, max(0, x - 8) : x + w + 8] = 0.55
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


def _baselines(mean, lungs):
    """Baselines made from one training box at ``mean`` (so its prior is that box)."""
    return Baselines({"Pneumothorax": mean}, lungs, {"Pneumothorax": 1}, {"Pneumothorax": loc.box_map(mean, (loc.PRIOR_GRID,) * 2)})


def _table(monkeypatch, val, test, baselines, levels=None):
    monkeypatch.setattr(loc, "grad_cam_maps", _true_maps)
    no_images = Split(val, lambda size: np.zeros((len(val), size, size), np.uint8), [(64, 64)] * len(val))
    tested = Split(test, lambda size: np.zeros((len(test), size, size), np.uint8), [(64, 64)] * len(test))
    chosen = loc.choose_levels([_Champion()], {"Pneumothorax": no_images}) if levels is None else levels
    return loc.localization_table("mimic", [_Champion()], {"Pneumothorax": tested}, baselines, chosen, 200, 0)


def test_a_map_on_the_finding_beats_the_baselines_with_a_paired_interval(monkeypatch):
    baselines = _baselines((0.3, 0.3, 0.6, 0.6), lungs=(0.05, 0.05, 0.95, 0.95))
    table = _table(monkeypatch, _cases(20, 1), _cases(30, 2), baselines)
    assert set(table["method"]) == {loc.GRAD_CAM, loc.MEAN_BOX, loc.BOX_PRIOR, loc.UNIFORM_LUNGS}
    g = table.filter(pl.col("method") == loc.GRAD_CAM).row(0, named=True)
    # of the levels that cut the halo off (0.6 and up), the one nearest the default
    assert g["level"] == 0.6 and g["level_from"] == "validate (20 images)"
    assert g["pointing"] == 1.0 and all(g[loc.iobb_column(t)] == 1.0 for t in IOBB_T)
    assert g["n_images"] == 30 and g["n_patients"] == 15 and g["n_boxes"] == 30
    assert g["pointing_vs_mean_box_lo"] > 0 and g["pointing_vs_box_prior_lo"] > 0 and g["pointing_lo"] <= g["pointing"] <= g["pointing_hi"]
    mean = table.filter(pl.col("method") == loc.MEAN_BOX).row(0, named=True)
    assert g["pointing_vs_mean_box"] == pytest.approx(g["pointing"] - mean["pointing"])
    # the flat region map points at its whole plateau: its score is the share of the region inside each box
    lungs = table.filter(pl.col("method") == loc.UNIFORM_LUNGS).row(0, named=True)
    assert lungs["pointing"] == pytest.approx(256 / (58 * 58), abs=0.01)


def test_the_level_is_chosen_on_validate_and_test_boxes_never_move_it(monkeypatch):
    baselines = _baselines((0.3, 0.3, 0.6, 0.6), lungs=(0.0, 0.0, 1.0, 1.0))
    val = _cases(12, 3)
    first = _table(monkeypatch, val, _cases(30, 4), baselines).filter(pl.col("method") == loc.GRAD_CAM)
    other = _table(monkeypatch, val, _cases(9, 5), baselines).filter(pl.col("method") == loc.GRAD_CAM)
    assert first["level"][0] == other["level"][0]
    none = _table(monkeypatch, [], _cases(9, 5), baselines).filter(pl.col("method") == loc.GRAD_CAM).row(0, named=True)
    assert (none["level"], none["level_from"]) == (loc.DEFAULT_LEVEL, "default (no boxed validate image)")
    # a map that finds nothing on validate at any level chooses nothing: the default, said so (not the lowest level)
    blank = [np.zeros(c.shape, np.float32) for c in val]
    assert loc.choose_level(blank, val) == (loc.DEFAULT_LEVEL, "default (no level found a box on validate, 12 images)")
    fixed = _table(monkeypatch, val, _cases(30, 4), baselines, levels={("cxr-pneumothorax v1", "pneumothorax"): (0.1, "internal x")})
    row = fixed.filter(pl.col("method") == loc.GRAD_CAM).row(0, named=True)
    assert row["level"] == 0.1 and row["level_from"] == "internal x"  # an external set keeps the internal choice
    assert row[loc.iobb_column(0.75)] < 1.0  # at 0.1 the halo joins the box: its IoBB falls


def test_the_ceiling_counts_boxes_a_coarse_maps_maximum_can_reach():
    """A 4 x 4 map over a 64-px letterbox of a 128 x 128 image has its cell centres at 16, 48, 80 and 112 source px,
    and a border cell's value held to the edge (a 16-px band): a box around a centre or in the band is reachable, a
    10-px box between centres is not, whatever the model."""
    reach = Case("a", "p", (128, 128), np.array([[40.0, 40.0, 16.0, 16.0]]))
    between = Case("b", "p", (128, 128), np.array([[20.0, 20.0, 10.0, 10.0]]))
    band = Case("c", "p", (128, 128), np.array([[20.0, 2.0, 10.0, 6.0]]))  # between centres, but against the top edge
    assert loc.grid_ceiling(4, 64, [reach], [(128, 128)]) == 1.0
    assert loc.grid_ceiling(4, 64, [between], [(128, 128)]) == 0.0
    assert loc.grid_ceiling(4, 64, [band], [(128, 128)]) == 1.0
    assert loc.grid_ceiling(16, 64, [between], [(128, 128)]) == 1.0  # a finer map reaches it (centres every 8 px)
    # it bounds what a map does score: an upsampled border cell's plateau reaches the edge
    import torch

    cam = torch.zeros(1, 1, 4, 4)
    cam[0, 0, 0, 1] = 1.0
    up = torch.nn.functional.interpolate(cam, (64, 64), mode="bilinear")[0, 0].numpy()
    heat = loc.to_source(up, 128, 128)
    edge = Case("e", "p", (128, 128), np.array([[44.0, 2.0, 10.0, 6.0]]))  # above the centre at (48, 16), against the edge
    assert loc.pointing(heat, edge.truth) > 0 and loc.grid_ceiling(4, 64, [edge], [(128, 128)]) == 1.0


def test_a_box_table_row_without_a_finding_is_rejected(tmp_path):
    from cxr_pipeline.data.boxes import read_box_table

    f = tmp_path / "boxes.csv"
    f.write_text(
        "dicom_id,finding,x,y,w,h\na,Pneumothorax,1,2,3,4\nb,,1,2,3,4\nc,Nodule,1,2,3,4\n,Edema,1,2,3,4\nd,Edema,1,x,3,4\ne,Edema,1,2,0,4\n"
    )
    boxes, rejects = read_box_table(f)
    assert boxes["dicom_id"].to_list() == ["a"]
    assert rejects["record"].to_list() == [3, 4, 5, 6, 7] and rejects["reason"][0].startswith("finding (blank)")
    assert "not four numbers" in rejects["reason"][3] and "not above 0" in rejects["reason"][4]


def test_the_sheet_shows_every_finding_in_turn_and_no_image_twice():
    from cxr_pipeline.vision.localization_data import sheet_picks

    def split(ids):
        return Split([Case(i, "p", (8, 8), np.zeros((1, 4))) for i in ids], None, [])

    picks = sheet_picks({"A": split(["x", "y", "z"]), "B": split(["x", "w"]), "C": split(["v"])}, n=5)
    assert picks == [("A", 0), ("B", 1), ("C", 0), ("A", 1), ("A", 2)]  # B's x was shown for A


def test_the_grid_is_the_target_layers():
    import torch

    from cxr_pipeline.vision.models import build_model
    from cxr_pipeline.vision.serving import cam_grid, target_layer

    for arch, size in (("resnet18", 64), ("resnet18", 128), ("densenet121", 64)):
        net = build_model(arch).eval()
        seen: list[int] = []
        handle = target_layer(net, arch, size).register_forward_hook(lambda m, i, o, seen=seen: seen.append(o.shape[-1]))
        with torch.no_grad():
            net(torch.zeros(1, 3, size, size))
        handle.remove()
        assert seen == [cam_grid(arch, size)], (arch, size)


def test_summary_counts_a_finding_above_a_baseline_only_with_enough_patients():
    row = {"method": loc.GRAD_CAM, "model": "per_pathology", "pointing": 0.8, "pointing_vs_mean_box": 0.3}
    t = pl.DataFrame(
        [
            {**row, "n_patients": 30, "pointing_vs_mean_box_lo": 0.1, "pointing_vs_box_prior_lo": -0.1},
            {**row, "n_patients": 3, "pointing_vs_mean_box_lo": 0.2, "pointing_vs_box_prior_lo": 0.2},
        ]
    )
    assert loc.summary(t)["per_pathology"] == {
        "findings": 2,
        "pointing": 0.8,
        "vs_mean_box": 0.3,
        "above": 1,
        "above_prior": 0,
        "too_few": 1,
    }
