"""External validation and the drift monitor share each external set's shard folder: they build it alike (the same
rows, decoded at the same level), so neither run rebuilds what the other built."""

from __future__ import annotations

import json
from types import SimpleNamespace

from cxr_pipeline.config import resolve
from cxr_pipeline.data.external import ExternalSettings, scored_images
from cxr_pipeline.data.replica_external import ExternalReplica, generate_external
from cxr_pipeline.defs.drift import external_window
from cxr_pipeline.defs.io import external_shard_settings
from cxr_pipeline.settings import paths, write_pipeline_config
from cxr_pipeline.vision.external import EXTERNAL_PARTITION, external_validation


def test_the_drift_monitor_reads_external_validation_s_folder_without_rebuilding_it(cxr_home, tmp_path, monkeypatch):
    """With ``image_shards.sizes`` null and every view scored, external validation builds CheXpert's folder at its
    champion's size (32 px) from its laterals and frontals, decoded at the largest size a consumer reads (the tiny
    report base's 56); the drift monitor's window then reads that folder as it is. (The drift monitor selected
    frontal views alone, and external validation decoded at its champions' size: each run dropped the other's rows
    or level, and the set was decoded again.)"""
    monkeypatch.delenv("CXR_VLM_BASE", raising=False)  # the tiny report base: its tile is the largest size
    folder = tmp_path / "chexpert"
    generate_external(ExternalReplica("chexpert", patients=12, seed=5, source_rows=64), folder)
    write_pipeline_config(
        paths(),
        {
            "classifier": {"size": 32},
            "multilabel_classifier": {"size": 32},
            "external_validation": {"chexpert_dir": str(folder), "views": []},
        },
        "every view scored; image_shards.sizes left null",
    )
    p = paths()
    settings = external_shard_settings(p)
    assert settings.sizes == resolve(p, "image_shards").sizes == [32, 56]
    champion = SimpleNamespace(model=SimpleNamespace(size=32, slugs=[], probabilities=lambda images: None))
    cfg: ExternalSettings = resolve(p, "external_validation")
    result = external_validation(p, "chexpert", cfg, [champion], shards=settings)
    assert not result.skipped and result.counts["image_rejects"] == 0
    built = p.external_shard_root("chexpert", 32) / EXTERNAL_PARTITION
    before = _listing(built)
    assert json.loads((built / "spec.json").read_text())["decoded_at"] == 56
    _, _, scored = scored_images(cfg, "chexpert", p.home)
    assert "LATERAL" in scored["view_position"].to_list()  # laterals as well as frontals: the rows the drift asset dropped

    window, reason = external_window(p, "chexpert", 32, seed=0)
    assert not reason and len(window.images) == result.counts["patients"]  # a frontal image per patient (each study has one)
    assert set(window.views) <= {"PA", "AP"}
    assert _listing(built) == before  # the index, the shards and the recorded level untouched: nothing decoded again


def _listing(folder):
    """Every file's bytes, and the shards' times: an index rewritten with the same rows is the same; a shard
    written again (an image decoded again) is not."""
    return {f.name: (f.read_bytes(), f.stat().st_mtime_ns if f.suffix == ".u8" else None) for f in sorted(folder.iterdir())}
