"""The phantom's line masks drawn on a block of the grid give the bytes the whole-grid drawing gave (#47).

The reference is the phantom's ``_segment`` / ``_polyline`` as they were before they were limited to the block a
segment can touch (kept in ``benchmarks/bench_replica.py``, which times one against the other); rendering and whole
replicas are compared byte for byte with it swapped back in.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from cxr_pipeline.data import phantom
from cxr_pipeline.data.phantom import Anatomy, render
from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.labels import LABELS
from cxr_pipeline_tests.services import benchmark

reference_segment = benchmark("bench_replica").reference_segment
reference_polyline = benchmark("bench_replica").reference_polyline


@pytest.fixture
def whole_grid(monkeypatch):
    """Switches the phantom to the whole-grid reference while the test asks for it."""

    def use():
        monkeypatch.setattr(phantom, "_segment", reference_segment)
        monkeypatch.setattr(phantom, "_polyline", reference_polyline)

    return use


def _renders() -> list[bytes]:
    """Every finding at once and each alone, frontal (PA, AP: sheared grids), lateral, wide and tall images, a
    large one (drawn on the work grid, then resized) and a tiny one."""
    out = []
    for k, (view, rows, cols) in enumerate([("PA", 300, 256), ("AP", 256, 300), ("LATERAL", 320, 320), ("PA", 700, 600), ("AP", 9, 12)]):
        for j, findings in enumerate([{name: 1.0 for name in LABELS}, *({name: 0.8} for name in LABELS)]):
            anatomy = Anatomy.draw(np.random.default_rng(100 * k + j))
            out.append(render(np.random.default_rng(1000 * k + j), rows, cols, view, findings, anatomy).tobytes())
    return out


def _tree(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.rglob("*")) if p.is_file()}


def test_block_drawing_renders_the_bytes_the_whole_grid_rendered(whole_grid):
    fast = _renders()
    whole_grid()
    assert _renders() == fast


def test_a_replica_is_byte_identical_with_the_whole_grid_drawing(tmp_path, whole_grid):
    cfg = SynthConfig(patients=6, seed=5, source_rows=48)
    generate(cfg, tmp_path / "block")
    whole_grid()
    generate(cfg, tmp_path / "whole")
    block, whole = _tree(tmp_path / "block"), _tree(tmp_path / "whole")
    assert sum(name.endswith(".dcm") for name in block) >= 15
    assert block == whole


def test_the_reference_would_catch_a_changed_mask(whole_grid, monkeypatch):
    """The comparison is not blind: one pixel's worth of width more on every line changes the bytes."""
    fast = _renders()
    monkeypatch.setattr(phantom, "_segment", lambda x, y, x0, y0, x1, y1, w: reference_segment(x, y, x0, y0, x1, y1, w + 0.004))
    monkeypatch.setattr(phantom, "_polyline", lambda x, y, pts, w: reference_polyline(x, y, pts, w + 0.004))
    assert _renders() != fast


@pytest.mark.parametrize("name", phantom.LOCALIZED)
def test_a_planted_findings_box_is_where_it_was_drawn(name):
    """The box ``render`` records for a localized finding (#49) holds what the finding drew: the same patient drawn with
    the finding at full strength and at a trace (the same random draws, so the same place) differ inside the box.
    Atelectasis also raises the left hemidiaphragm (volume loss), drawn outside its band's box: for it the box need
    only hold far more of the difference than its share of the image (the shares printed on failure). Recording draws nothing: same pixels."""
    anatomy = Anatomy(1.0, 1.0, 0.0, 0.0)
    for seed in range(4):
        regions: dict = {}
        full = render(np.random.default_rng(seed), 256, 240, "PA", {name: 1.0}, anatomy, regions)
        assert np.array_equal(full, render(np.random.default_rng(seed), 256, 240, "PA", {name: 1.0}, anatomy))
        trace = render(np.random.default_rng(seed), 256, 240, "PA", {name: 1e-6}, anatomy)
        assert set(regions) == {name} and regions[name]
        inside = np.zeros((256, 240), dtype=bool)
        for x, y, w, h in regions[name]:
            assert 0 <= x and 0 <= y and w > 0 and h > 0 and x + w <= 240 and y + h <= 256
            inside[int(y) : int(np.ceil(y + h)), int(x) : int(np.ceil(x + w))] = True
        diff = np.abs(full - trace)
        share, area = diff[inside].sum() / diff.sum(), inside.mean()
        # most of the difference inside, and far more than the box's share of the image (the region is cut at a
        # quarter of its peak: a blob's tails lie outside)
        if name == "Atelectasis":
            assert share >= 0.05 and share >= 10 * area, (seed, share, area)
        else:
            assert share >= 0.85 and share >= 3 * area, (seed, share, area)
    regions = {}
    render(np.random.default_rng(0), 256, 240, "LATERAL", {name: 1.0}, anatomy, regions)
    assert regions == {}  # a lateral view records none (NIH boxed frontal images)


def test_separate_regions_of_one_finding_get_a_box_each():
    """Two lesions drawn apart are two boxes (NIH boxes each nodule), not one box around both holding mostly lung."""
    anatomy = Anatomy(1.0, 1.0, 0.0, 0.0)
    counts = []
    for seed in range(12):
        regions: dict = {}
        render(np.random.default_rng(seed), 256, 240, "PA", {"Lung Lesion": 1.0}, anatomy, regions)
        counts.append(len(regions["Lung Lesion"]))
        assert all(w < 0.2 * 240 and h < 0.2 * 256 for _, _, w, h in regions["Lung Lesion"]), regions
    assert 1 in counts and 2 in counts  # one or two lesions per image, each boxed alone
