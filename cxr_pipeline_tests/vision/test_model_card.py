"""The model card's subgroup section: the publishable rows only, largest gaps first, every row in the JSON."""

from __future__ import annotations

import polars as pl

from cxr_pipeline.vision.checkpoint import config_from_json
from cxr_pipeline.vision.model_card import SUBGROUP_SHOWN, build_card, with_subgroups


def _card() -> dict:
    config = config_from_json({"arch": "resnet18", "size": 64, "pathology": "Edema", "calibration": {"method": "none", "reason": "x"}})
    _md, card = build_card(
        name="cxr-edema",
        version="3",
        run_id="r1",
        config=config.as_json(),
        rows=[{"pathology": "Edema", "test_labels": "chexpert", "evaluable": False, "reason": "few"}],
        counts={"train": {"images": 10, "positives": 2}},
        views=["PA"],
        manifest_version="m1",
        source={"kind": "replica", "note": "synthetic"},
    )
    return card


def test_subgroup_gaps_enter_the_card_largest_first_and_never_a_suppressed_row():
    card = _card()
    assert "not yet audited" in card["subgroups"]["status"]
    gaps = [0.01 * i * (-1) ** i for i in range(1, 16)]
    table = pl.DataFrame(
        {
            "labels": ["chexpert"] * 16,
            "slug": ["edema"] * 16,
            "attribute": ["race"] * 16,
            "group": [f"g{i}" for i in range(16)],
            "n_patients": [12 + i for i in range(15)] + [None],
            "tpr": [0.5] * 15 + [None],
            "tpr_gap": [*gaps, None],  # the last row: a small cell, its values already nulled by publishable()
            "tpr_gap_lo": [g - 0.1 for g in gaps] + [None],
            "tpr_gap_hi": [g + 0.1 for g in gaps] + [None],
            "tpr_gap_q": [0.2] * 15 + [None],
        }
    )
    md, out = with_subgroups(card, table, "audit-run")
    rows = out["subgroups"]["rows"]
    assert len(rows) == 15 and all(r["tpr_gap"] is not None for r in rows)
    assert [abs(r["tpr_gap"]) for r in rows] == sorted((abs(g) for g in gaps), reverse=True)
    assert out["subgroups"]["audit_run"] == "audit-run" and card["subgroups"]["rows"] == []  # the input is not changed
    assert "| chexpert | edema | race | g14 | 26 | 0.500 | -0.150 [-0.250, -0.050] | 0.200 |" in md
    assert md.count("| chexpert | edema | race |") == SUBGROUP_SHOWN and "g15" not in md
    md, skipped = with_subgroups(card, table.clear(), "audit-run", skipped="no MIMIC-IV files")
    assert skipped["subgroups"]["status"] == "not audited: no MIMIC-IV files" and "not audited: no MIMIC-IV files." in md
