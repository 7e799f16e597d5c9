"""image_drift's per-finding champions are signals beside the alarm: one that cannot be read never stops it."""

from __future__ import annotations

from types import SimpleNamespace

import dagster as dg

from cxr_pipeline.defs.drift import per_finding_sides


class _SizesBuilt:
    """Training shards at ``sizes`` only; another size fails as ``ShardSet.at`` does."""

    def __init__(self, *sizes: int):
        self.sizes = sizes

    def at(self, size: int):
        if size not in self.sizes:
            raise dg.Failure(f"no image shards at {size} px")
        return f"shards {size}"


def test_a_champion_at_a_size_without_training_shards_is_left_out_with_why():
    """The multi-label side's images serve a champion at the same size; one at a size the shards lack is left out,
    named with the reason, instead of failing the window's run (and its alarm)."""
    at32 = SimpleNamespace(name="cxr-cardiomegaly", model=SimpleNamespace(size=32))
    at48 = SimpleNamespace(name="cxr-edema", model=SimpleNamespace(size=48))
    cfg = SimpleNamespace(seed=0, reference=10)
    sides, left = per_finding_sides(None, None, _SizesBuilt(32), "external-nih", [at32, at48], cfg, {32: ("reference", "window")})
    assert sides == [(at32, "reference", "window")]
    assert left == {"cxr-edema": "no image shards at 48 px"}
