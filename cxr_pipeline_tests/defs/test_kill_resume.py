"""A real Dagster run of a classifier partition, killed mid-training (``kill -9`` of its process group, what
the OOM killer does to a run), then materialized again as a user would.

The dead run held the ``gpu`` pool's only slot and nobody was left to report its end; the next
``dagster asset materialize`` must find that, say so, mark it failed and free the slot (``defs.slots``),
then start within 5 minutes and pick up the epoch checkpoint the killed run left, not start over.
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

from cxr_pipeline.tracking import get_client
from cxr_pipeline_tests.services import BIN, ROOT

EPOCHS = 12  # long enough that the kill at epoch 2 comes mid-training; each epoch the retry trains costs test time


@pytest.mark.slow(minutes=1.1)
def test_killed_classifier_run_resumes_from_its_checkpoint(replica_copy, tmp_path, monkeypatch):
    home, dh = tmp_path / "home", tmp_path / "dagster_home"
    dh.mkdir()
    (dh / "dagster.yaml").write_text((ROOT / "dagster.yaml").read_text())  # the project's instance: a gpu pool of 1
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
        holders = {c.run_id for c in instance.event_log_storage.get_concurrency_info("gpu").claimed_slots}
        assert holders == {killed.run_id}  # ... and it still holds the only gpu slot

        # the next materialization, as a user starts it: it frees the dead run's slot and resumes
        t0 = time.time()
        again = subprocess.run(cmd, cwd=ROOT, env={**os.environ}, capture_output=True, text=True, timeout=300)
        assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
        assert f"run {killed.run_id}: its run worker" in again.stderr and "pool slots freed" in again.stderr
        assert time.time() - t0 < 300
        killed = instance.get_run_by_id(killed.run_id)
        assert killed.status == dg.DagsterRunStatus.FAILURE
        retry = next(
            r for r in instance.get_runs(filters=dg.RunsFilter(tags={"dagster/partition": "cardiomegaly"})) if r.run_id != killed.run_id
        )
        assert retry.status == dg.DagsterRunStatus.SUCCESS
        event = instance.get_latest_materialization_event(dg.AssetKey("classifier"))
        assert event.run_id == retry.run_id and event.asset_materialization.partition == "cardiomegaly"
        md = event.asset_materialization.metadata
        assert md["resumed_from_epoch"].value >= killed_after  # it went on from the checkpoint
        assert md["epochs_run"].value == EPOCHS
        assert not ckpt.exists()  # a finished run leaves no resume point behind
        assert not instance.event_log_storage.get_concurrency_info("gpu").claimed_slots

    # MLflow: the killed run's MLflow run, left RUNNING by the dead process, was closed by the retry
    client, _ = get_client()
    runs = client.search_runs(
        [client.get_experiment_by_name("cxr_pipeline").experiment_id], filter_string="tags.`dagster.asset_key` = 'classifier'"
    )
    status = {r.data.tags["dagster.run_id"]: r.info.status for r in runs}
    assert status == {killed.run_id: "KILLED", retry.run_id: "FINISHED"}
