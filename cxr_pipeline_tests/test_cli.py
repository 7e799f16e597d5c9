"""The command line: the demo path on a tiny replica."""

from __future__ import annotations

import dagster as dg

from cxr_pipeline.cli import main
from cxr_pipeline_tests.conftest import raw_version, run_job  # noqa: F401


def test_cli_demo_on_a_tiny_replica(cxr_home, tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("CXR_RAW_DIR", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    assert main(["demo", "--patients", "12", "--image-size", "48", "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "manifest:" in out and "make ui" in out and "beside the one multi-label model (threshold chosen on validation" in out
    assert "multi-label auc" in out  # both AUC columns side by side
    # both test label sources, in the classifier table and in the report table
    assert out.count("┆ chexpert") >= 14 and out.count("┆ radiologist") >= 14 and "┆ labeler" in out
    assert (cxr_home / "raw" / ".replica.json").exists()
    assert "epochs: 1" in (cxr_home / "pipeline.yaml").read_text()  # the demo's choices, for make ui to continue
    assert (tmp_path / "dh" / "dagster.yaml").exists()
    with dg.DagsterInstance.get() as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("manifest")) is not None
