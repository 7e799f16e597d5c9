"""The command line: the demo path on a tiny replica."""

from __future__ import annotations

import dagster as dg

from cxr_pipeline.cli import main
from cxr_pipeline_tests.conftest import raw_version, run_job  # noqa: F401


def test_cli_demo_on_a_tiny_replica(cxr_home, tmp_path, monkeypatch, capfd):
    monkeypatch.delenv("CXR_RAW_DIR", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path / "dh"))
    assert main(["demo", "--patients", "12", "--image-size", "48", "--epochs", "1"]) == 0
    captured = capfd.readouterr()  # at the file-descriptor level: what a terminal shows
    out, err = captured.out, captured.err
    assert "manifest:" in out and "make ui" in out and "threshold chosen on validation" in out
    # one row per finding: both models and both test label sources side by side
    assert "per-finding auto" in out and "per-finding rad" in out and "multi-label auto" in out and "multi-label rad" in out
    assert out.count("│ Cardiomegaly ") == 1 and "┆ labeler" in out and "┆ radiologist" in out  # the report table: both sources
    # a console that shows progress, not logs: stage lines and bars, every library log line in the log file
    (log,) = (cxr_home / "logs").glob("demo-*.log")
    assert str(log) in err and "classifiers" in err and "report branch" in err
    assert "dagster - INFO" not in err and "Warning" not in err and "Validating input example" not in err
    assert "dagster - INFO" in log.read_text()
    assert (out + err).count("\n") <= 100, out + err  # lines as a terminal shows them (a bar redraws in place with \r)
    assert (cxr_home / "raw" / ".replica.json").exists()
    assert "epochs: 1" in (cxr_home / "pipeline.yaml").read_text()  # the demo's choices, for make ui to continue
    assert (tmp_path / "dh" / "dagster.yaml").exists()
    with dg.DagsterInstance.get() as instance:
        assert instance.get_latest_materialization_event(dg.AssetKey("manifest")) is not None
