"""A real Dagster run of a classifier partition, killed mid-training, re-executed from failure.

The retry (what the daemon's run retries do: re-execute from failure) must pick
up the epoch checkpoint the killed run left, not start over.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import dagster as dg
import pytest
import torch
from dagster._core.definitions.reconstruct import ReconstructableRepository

from cxr_pipeline.tracking import get_client
from cxr_pipeline_tests.services import BIN, ROOT

EPOCHS = 40


@pytest.mark.slow
def test_killed_classifier_run_resumes_from_its_checkpoint(replica_copy, tmp_path, monkeypatch):
    home, dh = tmp_path / "home", tmp_path / "dagster_home"
    dh.mkdir()
    (dh / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    for k, v in {"CXR_HOME": str(home), "CXR_RAW_DIR": str(replica_copy), "DAGSTER_HOME": str(dh)}.items():
        monkeypatch.setenv(k, v)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = {
        "ops": {
            "image_shards": {"config": {"sizes": [64], "workers": 1}},
            "classifier": {"config": {"size": 64, "epochs": EPOCHS, "patience": 1000, "batch_size": 8, "accumulation": 1, "bootstrap": 20}},
        }
    }
    from cxr_pipeline.definitions import build_defs

    defs = build_defs()
    with dg.DagsterInstance.from_config(str(dh)) as instance:
        defs.resolve_job_def("manifest_job").execute_in_process(instance=instance)
        shards = defs.resolve_job_def("shards_job")
        for part in shards.partitions_def.get_partition_keys():
            shards.execute_in_process(
                instance=instance, partition_key=part, run_config={"ops": {"image_shards": config["ops"]["image_shards"]}}
            )

        cfg = tmp_path / "classifier.yaml"
        cfg.write_text(json.dumps({"ops": {"classifier": config["ops"]["classifier"]}}))
        cmd = [str(BIN / "dagster"), "asset", "materialize", "-m", "cxr_pipeline.definitions", "--select", "classifier"]
        cmd += ["--partition", "cardiomegaly", "-c", str(cfg)]
        log = tmp_path / "killed.log"
        proc = subprocess.Popen(cmd, cwd=ROOT, env={**os.environ}, stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)
        ckpt = home / "assets/classifier/cardiomegaly/resume.pt"
        killed_after = 0
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None:
            if ckpt.exists():
                try:
                    killed_after = torch.load(ckpt, map_location="cpu", weights_only=True)["epoch"]
                except Exception:  # never half-written (atomic), but a rename can race the read
                    killed_after = 0
                if killed_after >= 2:
                    os.killpg(proc.pid, signal.SIGKILL)  # the whole run: orchestrator and step process
                    break
            time.sleep(0.05)
        proc.wait(timeout=30)
        assert 2 <= killed_after < EPOCHS, f"not killed mid-training ({killed_after}):\n{log.read_text()[-3000:]}"

        (killed,) = instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": "cardiomegaly"}))
        assert killed.status == dg.DagsterRunStatus.STARTED  # nobody was left to report the end
        instance.report_run_failed(killed)  # what run monitoring does when a run's worker is gone

        # the killed run's own job (the implicit asset job of `dagster asset materialize`), as the daemon reloads it
        repo = ReconstructableRepository.for_module("cxr_pipeline.definitions", "defs", working_directory=str(ROOT))
        recon = repo.get_reconstructable_job(killed.job_name)
        options = dg.ReexecutionOptions.from_failure(killed.run_id, instance)
        # the daemon's retries carry the parent's tags (its partition among them) the same way
        with dg.execute_job(recon, instance=instance, reexecution_options=options, tags=killed.tags) as retry:
            assert retry.success
            (mat,) = [e.event_specific_data.materialization for e in retry.all_events if e.event_type_value == "ASSET_MATERIALIZATION"]
        md = mat.metadata
        assert mat.partition == "cardiomegaly"
        assert md["resumed_from_epoch"].value >= killed_after  # the retry went on from the checkpoint
        assert md["epochs_run"].value == EPOCHS
        assert not ckpt.exists()  # a finished run leaves no resume point behind

    # MLflow: the killed run's MLflow run, left RUNNING by the dead process, was closed by the retry
    client, _ = get_client()
    runs = client.search_runs(
        [client.get_experiment_by_name("cxr_pipeline").experiment_id], filter_string="tags.`dagster.asset_key` = 'classifier'"
    )
    status = {r.data.tags["dagster.run_id"]: r.info.status for r in runs}
    assert status == {killed.run_id: "KILLED", retry.run_id: "FINISHED"}
