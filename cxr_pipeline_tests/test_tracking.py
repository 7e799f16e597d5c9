"""MLflow bookkeeping: registry aliases (``vision.checkpoint.register``), orphaned runs."""

from __future__ import annotations

import dagster as dg
import pytest

from cxr_pipeline.defs.resources import close_orphaned_runs
from cxr_pipeline.tracking import get_client, tracked_run
from cxr_pipeline.vision.checkpoint import register as register_version
from cxr_pipeline.vision.checkpoint import retire_aliases


def register(auc, name="cxr-edema"):
    with tracked_run("t") as run:
        return register_version(run, name, score=auc, description="d", tags={"pathology": "Edema"})


def test_registry_aliases_follow_the_score(cxr_home):
    versions = [register(auc) for auc in (0.8, 0.7, 0.9, None)]
    assert [v["version"] for v in versions] == [1, 2, 3, 4]
    assert [v["champion"] for v in versions] == [True, False, True, False]
    client, _ = get_client()
    assert str(client.get_model_version_by_alias("cxr-edema", "champion").version) == "3"
    assert str(client.get_model_version_by_alias("cxr-edema", "candidate").version) == "4"
    assert client.get_model_version("cxr-edema", "3").tags["val_auc"] == "0.900000"


def test_a_tracking_server_error_does_not_promote(cxr_home, monkeypatch):
    """Reading the champion fails transiently: the registration fails; the champion stays."""
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    register(0.8)

    def unavailable(self, name, version):
        raise MlflowException("tracking server unavailable", error_code="TEMPORARILY_UNAVAILABLE")

    with monkeypatch.context() as m:
        m.setattr(MlflowClient, "get_model_version", unavailable)
        m.setattr(MlflowClient, "get_model_version_by_alias", unavailable)
        with pytest.raises(MlflowException, match="unavailable"):
            register(0.5)
    client, _ = get_client()
    assert str(client.get_model_version_by_alias("cxr-edema", "champion").version) == "1"


def test_retired_aliases_say_why(cxr_home):
    register(0.8)
    client, _ = get_client()
    assert retire_aliases(client, "cxr-edema", "not trainable: 0 positives") == ["champion", "candidate"]
    model = client.get_registered_model("cxr-edema")
    assert not model.aliases and model.tags["cxr_pipeline.no_current_model"] == "not trainable: 0 positives"
    assert retire_aliases(client, "cxr-never-registered", "x") == []


@dg.op
def _noop():
    pass


@dg.job
def _finished():
    _noop()


def test_orphans_are_closed_by_a_run_of_any_of_their_assets(cxr_home):
    """A killed run of the manifest multi-asset (both keys) is closed by a later run of ``manifest`` alone."""
    with dg.DagsterInstance.ephemeral() as instance:
        ended = _finished.execute_in_process(instance=instance).run_id
        client, _ = get_client()
        with tracked_run("orphan", {"dagster.asset_key": "manifest,manifest_rejects", "dagster.partition": "", "dagster.run_id": ended}):
            pass
        orphan = client.search_runs([client.get_experiment_by_name("cxr_pipeline").experiment_id])[0]
        client.update_run(orphan.info.run_id, status="RUNNING")  # as a SIGKILL leaves it
        with tracked_run("other", {"dagster.asset_key": "report_pairs", "dagster.partition": "", "dagster.run_id": ended}) as other:
            pass
        client.update_run(other.run_id, status="RUNNING")
        with tracked_run("new", {"dagster.asset_key": "manifest"}) as run:
            assert close_orphaned_runs(run, instance, ["manifest"], "", "new-dagster-run") == 1
        assert client.get_run(orphan.info.run_id).info.status == "KILLED"
        assert client.get_run(other.run_id).info.status == "RUNNING"  # another asset's run is not touched


def test_champion_follows_validation_auc_not_test_auc(cxr_home):
    """Version 2 is better on validation and worse on test: it becomes champion (selecting on test
    would make the champion's test figure optimistic); both AUCs are on the version."""
    from cxr_pipeline.vision.record import register_finding as register_classifier

    data = validation_data(["d1", "d2"])
    outcomes = []
    for val_auc, test_auc in ((0.80, 0.90), (0.85, 0.70), (0.83, 0.95)):
        with tracked_run("t") as run:
            outcomes.append(register_classifier(run, data, {"val_roc_auc": val_auc, "roc_auc": test_auc, "evaluable": True}))
    assert [o["champion"] for o in outcomes] == [True, True, False]
    client, _ = get_client()
    champ = client.get_model_version_by_alias("cxr-edema", "champion")
    assert str(champ.version) == "2"
    assert champ.tags["val_auc"] == "0.850000" and champ.tags["test_auc"] == "0.700000"


def validation_data(ids: list[str]):
    """A classifier's data as ``register_classifier`` reads it: its label and its validation rows."""
    from types import SimpleNamespace

    import polars as pl

    rows = pl.DataFrame({"dicom_id": ids, "content_hash": [f"h{i}" for i in ids], "target": [1.0, 0.0] * (len(ids) // 2)})
    return SimpleNamespace(label_slug="edema", label="Edema", splits={"validate": SimpleNamespace(rows=rows)})


def test_champion_is_compared_on_the_same_validation_data(cxr_home):
    """After a data change the champion's validation AUC was computed on other images: it is no benchmark.
    The old rule compared 0.80 (new data) with 0.95 (old data) and kept a stale champion."""
    from cxr_pipeline.vision.record import register_finding as register_classifier

    def reg(data, val_auc):
        with tracked_run("t") as run:
            return register_classifier(run, data, {"val_roc_auc": val_auc, "roc_auc": 0.5, "evaluable": True})

    old, new = validation_data(["d1", "d2"]), validation_data(["d1", "d2", "d3", "d4"])
    assert reg(old, 0.95)["champion"]
    moved = reg(new, 0.80)  # lower, but on other data: the comparison resets
    assert moved["champion"] and moved["comparison"].startswith("reset")
    same = reg(new, 0.79)  # now on the same data: the ordinary rule
    assert not same["champion"] and same["comparison"] == "same data"
    client, _ = get_client()
    assert str(client.get_model_version_by_alias("cxr-edema", "champion").version) == "2"
