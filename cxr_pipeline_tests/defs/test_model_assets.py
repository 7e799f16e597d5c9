"""The classifier, summary and report assets through Dagster, end to end on the test replica."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import dagster as dg
import polars as pl
import pydicom
import pytest

from cxr_pipeline.data.external import scored_findings
from cxr_pipeline.definitions import build_defs
from cxr_pipeline.labels import slug as finding_slug
from cxr_pipeline.settings import paths
from cxr_pipeline.tracking import get_client
from cxr_pipeline.vision.checkpoint import ClassifierSet, read_config
from cxr_pipeline_tests.conftest import raw_version, run_job  # noqa: F401


@pytest.mark.slow(minutes=1.7)
def test_classifier_partition_trains_registers_and_summarises(env, cxr_home, monkeypatch):
    from cxr_pipeline.data.shards import partition_of

    defs = build_defs()
    size = 32
    with dg.DagsterInstance.ephemeral() as instance:
        run_job(defs, "manifest_job", instance, run_config={"ops": {"manifest": {"config": {"views": [], "one_image_per_subject": False}}}})
        m = pl.read_parquet(cxr_home / "assets" / "manifest" / "manifest.parquet")
        for part in sorted(set(m["path"].map_elements(partition_of, return_dtype=pl.String))):
            run_job(
                defs,
                "shards_job",
                instance,
                partition_key=part,
                run_config={"ops": {"image_shards": {"config": {"sizes": [size], "workers": 1}}}},
            )
        cfg = {
            "ops": {
                "classifier": {
                    "config": {"size": size, "epochs": 2, "blank": "zeros", "bootstrap": 50, "batch_size": 16, "accumulation": 1}
                }
            }
        }
        first = run_job(defs, "classifier_job", instance, partition_key="support_devices", run_config=cfg)
        md = next(e.materialization for e in first.get_asset_materialization_events()).metadata
        assert md["registered_model"].value.startswith("cxr-support-devices v1")
        files = ClassifierSet(cxr_home / "assets" / "classifier").classifier("support_devices")
        ckpt = files.checkpoint
        # the AUC shown is the model's on the test split: recomputed with scikit-learn from the probabilities the
        # asset wrote for every image (two epochs at 32 px learn little here: the planted-signal floor is in
        # vision/test_vision.py, where training runs long enough to learn)
        from sklearn.metrics import roc_auc_score

        scored = pl.read_parquet(ckpt.parent / "test_scores.parquet").select("dicom_id", "target")
        assert set(scored["dicom_id"]) <= set(m.filter(pl.col("split") == "test")["dicom_id"]) and scored.height == md["n_test"].value
        every = scored.join(pl.read_parquet(ckpt.parent / "predictions.parquet"), on="dicom_id", how="left")
        assert md["evaluable"].value is True
        assert md["roc_auc"].value == pytest.approx(roc_auc_score(every["target"].to_numpy(), every["prob"].to_numpy()), abs=1e-4)
        assert files.weights.exists() and files.config.exists()
        assert not (ckpt.parent / "resume.pt").exists()
        client, _ = get_client()
        run = client.get_run(md["mlflow_run_id"].value)
        assert "val_loss" in run.data.metrics and "test_roc_auc" in run.data.metrics
        assert len(client.get_metric_history(run.info.run_id, "val_loss")) == md["epochs_run"].value
        assert str(client.get_model_version_by_alias("cxr-support-devices", "candidate").version) == "1"
        assert str(client.get_model_version_by_alias("cxr-support-devices", "champion").version) == "1"
        # the registered version is an MLflow model: MLflow's own loader applies it to the shard images
        import mlflow.pyfunc
        import numpy as np

        from cxr_pipeline.data.shard_reader import Shards, load_images

        monkeypatch.setenv("MLFLOW_TRACKING_URI", get_client()[1])  # as a user points MLflow at the pipeline's store
        loaded = mlflow.pyfunc.load_model("models:/cxr-support-devices@champion")
        test_rows = m.filter(pl.col("split").is_in(["validate", "test"]))  # every validate and test image: the calls must not move
        imgs, test_rows = load_images(Shards.open(cxr_home / "assets" / "shards" / f"s{size}", size), test_rows)
        out = loaded.predict(imgs.numpy())
        stored = pl.read_parquet(ckpt.parent / "predictions.parquet")
        raw = test_rows.select("dicom_id").join(stored, on="dicom_id", how="left")["prob"].to_numpy()
        assert len(raw) == imgs.shape[0] > 10 and not np.isnan(raw).any()
        from cxr_pipeline.vision.calibration import apply, calibrated_threshold

        ckpt_cfg = read_config(ckpt)
        # it carries the windows its training images were read through: the served model reads a windowless file
        # through them, as external validation and the drift monitor do
        from cxr_pipeline.data.window_prior import training_window_prior

        prior = training_window_prior(paths(), size)
        assert prior is not None and ckpt_cfg.window_prior == prior.windows
        calibration, threshold = ckpt_cfg.calibration["support_devices"], ckpt_cfg.thresholds["support_devices"]
        assert calibration["fitted_on"] == "validate" and calibration["method"] in ("platt", "none")
        np.testing.assert_allclose(out["support_devices"].to_numpy(), apply(calibration, raw), atol=1e-5)  # calibrated
        # the calls of the raw scores; the threshold is a validate image's own score (Youden's J picks one), and the served
        # model recomputes that image's score, so at the tie one float32 ulp decides: that image is left out here
        off = np.abs(raw - threshold) > 1e-6
        assert off.sum() >= len(raw) - 1 and (out["support_devices_call"].to_numpy() == (raw >= threshold))[off].all()
        # through the map the calls agree wherever the calibrated value is not tied with the carried threshold (at the
        # map's clip two scores either side of the threshold can become one probability: calls are read on the raw score)
        cal, at = out["support_devices"].to_numpy(), calibrated_threshold(calibration, threshold)
        apart = np.abs(cal - at) > 1e-6
        assert (out["support_devices_call"].to_numpy()[apart] == (cal >= at)[apart]).all()
        # the version's model card: generated, logged beside the model, linked from the description, its figures the run's
        version = client.get_model_version("cxr-support-devices", "1")
        assert version.description.startswith(f"Model card: `runs:/{run.info.run_id}/model_card/model_card.md`")
        card = json.loads(Path(client.download_artifacts(run.info.run_id, "model_card/model_card.json")).read_text())
        assert card["training_data"]["source"]["kind"] == "replica" and card["model_details"]["version"] == "1"
        assert card["training_data"]["splits"]["train"]["images"] == int(run.data.params["n_train"])
        auto_row = next(r for r in card["metrics"] if r["test_labels"] != "radiologist")
        assert auto_row["roc_auc"] == pytest.approx(md["roc_auc"].value, abs=1e-4) and auto_row["ece_after"] is not None
        assert "## Intended use" in version.description and "Not for:" in version.description
        shipped = loaded.metadata.metadata
        assert shipped["calibration_parameters"]["support_devices"] == calibration and "calibration" in shipped
        # what the model saw, in MLflow's dataset tracking: one dataset per split, digests of the rows
        inputs = {i.tags[0].value: i.dataset for i in run.inputs.dataset_inputs}
        assert set(inputs) == {"train", "validate", "test"} and inputs["train"].name == f"mimic-cxr-{size}px"
        assert json.loads(inputs["train"].profile)["num_rows"] == int(run.data.params["n_train"])
        assert len({d.digest for d in inputs.values()}) == 3
        # the Grad-CAM sheet: inline in the metadata, a file beside the checkpoint, an MLflow artifact
        assert md["saliency"].value.startswith("![") and "data:image/png;base64," in md["saliency"].value
        assert (ckpt.parent / "saliency.png").exists()
        assert "saliency.png" in {a.path for a in client.list_artifacts(run.info.run_id)}
        run_job(defs, "classifier_job", instance, partition_key="no_finding", run_config=cfg)
        recipe = cfg["ops"]["classifier"]  # the multi-label model's and its fold models' (both read that section)
        summary = run_job(
            defs, "classifier_summary_job", instance, run_config={"ops": {"multilabel_classifier": recipe, "report_hints": recipe}}
        )
        mats = {e.asset_key.to_user_string(): e.materialization for e in summary.get_asset_materialization_events()}
        table = pl.read_parquet(mats["classifier_metrics"].metadata["path"].value)
        per = table.filter(pl.col("model") == "per_pathology")
        assert set(per["slug"]) == {"support_devices", "no_finding"}
        # the multi-label model: one row per label and test label source, evaluated like the others
        multi = table.filter(pl.col("model") == "multilabel")
        assert multi.height == 2 * 14 and set(multi["test_labels"]) == {"chexpert", "radiologist"}
        assert multi.filter(pl.col("slug") == "support_devices")["evaluable"].to_list()[0] is True
        assert mats["multilabel_classifier"].metadata["registered_model"].value.startswith("cxr-multilabel v1")
        assert "saliency" in mats["multilabel_classifier"].metadata
        assert str(client.get_model_version_by_alias("cxr-multilabel", "champion").version) == "1"
        for col in ("roc_auc_lo", "roc_auc_hi", "f1", "sensitivity", "specificity", "average_precision", "threshold", "n_pos", "n_neg"):
            assert col in table.columns
        # calibration before and after, every evaluable row of both models and both label sources
        evaluable = table.filter(pl.col("evaluable"))
        for col in ("ece_before", "ece_after", "ece_after_lo", "ece_after_hi", "brier_before", "brier_after"):
            assert evaluable[col].null_count() == 0, col
        assert set(evaluable["calibration"]) <= {"platt", "none"} and evaluable["calibration_fit"].null_count() == 0
        preds = pl.read_parquet(mats["classifier_predictions"].metadata["path"].value)
        assert {"dicom_id", "split", "support_devices", "no_finding"} <= set(preds.columns) and preds.height == m.height
        # the subgroup audit, from the replica's MIMIC-IV files: every trained model, finding and attribute
        sub = mats["subgroup_metrics"].metadata
        audit = pl.read_parquet(sub["path"].value)
        assert set(audit["attribute"]) == {"sex", "age_band", "race", "insurance"} and set(audit["view"]) >= {"test", "train_out_of_fold"}
        assert set(audit.filter(pl.col("model") == "per_pathology")["slug"]) == {"support_devices", "no_finding"}
        # the test replica's radiologist-labelled test block has fewer than 10 patients: small cells exist, and carry no value
        small_rows = audit.filter(pl.col("small_cell"))
        assert small_rows.height > 0 and small_rows["tpr"].null_count() == small_rows["fpr"].null_count() == small_rows.height
        assert all(sub[f"chart_{a}"].value.startswith("![") for a in ("sex", "age_band", "race", "insurance", "underdiagnosis"))
        assert sub["patients"].value == m["subject_id"].n_unique()
        srun = client.get_run(sub["mlflow_run_id"].value)
        logged = {a.path for a in client.list_artifacts(srun.info.run_id)}
        assert {"subgroup_metrics.json", "tpr_gap_sex.png", "underdiagnosis.png"} <= logged
        doc = json.loads(Path(client.download_artifacts(srun.info.run_id, "subgroup_metrics.json")).read_text())
        published = pl.DataFrame(doc["data"], schema=doc["columns"], orient="row", infer_schema_length=None)
        small = published.filter(pl.col("small_cell"))
        assert small.height == small_rows.height > 0
        assert small["n_patients"].null_count() == small.height  # not even a small cell's count leaves the machine
        assert (published.filter(~pl.col("small_cell"))["n_patients"] >= 10).all()  # every other row: min_patients or more
        assert {"tpr_gap_p", "tpr_gap_q", "pooled"} <= set(published.columns)
        # the audit adds each model's publishable test-split gaps to its registered version's card
        carded = 0  # (with_subgroups' rows and table: test_model_card)
        for name, model, slug in (("cxr-support-devices", "per_pathology", "support_devices"), ("cxr-multilabel", "multilabel", None)):
            desc = client.get_model_version(name, "1").description
            assert "## Subgroup gaps (test split; publishable: small groups pooled)" in desc and "not yet audited" not in desc
            vrun = client.get_model_version(name, "1").run_id
            card = json.loads(Path(client.download_artifacts(vrun, "model_card/model_card.json")).read_text())
            mine = published.filter((pl.col("view") == "test") & (pl.col("model") == model) & pl.col("tpr_gap").is_not_null())
            mine = mine.filter(pl.col("slug") == slug) if slug else mine
            assert len(card["subgroups"]["rows"]) == mine.height and card["subgroups"]["audit_run"] == srun.info.run_id
            assert card["subgroups"]["status"].startswith("audited on the test split")
            assert all(r["n_patients"] >= 10 for r in card["subgroups"]["rows"])  # never a small group's row
            carded += mine.height  # the test replica's test split is under min_patients per block: none here

        # external validation: every champion on replicas of CheXpert and NIH (their real file formats); PadChest absent
        from cxr_pipeline.data.replica_external import ExternalReplica, generate_external

        for fmt in ("chexpert", "nih"):
            generate_external(ExternalReplica(fmt, patients=25, source_rows=64, noise=0.02), cxr_home / "external" / fmt)
        ext = {}
        for fmt in ("chexpert", "nih", "padchest"):
            res = run_job(
                defs,
                "external_job",
                instance,
                partition_key=fmt,
                run_config={"ops": {"external_validation": {"config": {"bootstrap": 50}}}},
            )
            (mat,) = [e.materialization for e in res.get_asset_materialization_events()]
            ext[fmt] = (mat.metadata, pl.read_parquet(mat.metadata["path"].value))
        assert "PadChest: folder" in ext["padchest"][0]["reason"].value and ext["padchest"][1].height == 0
        chex, nih = ext["chexpert"][1], ext["nih"][1]
        assert set(chex["registered"]) == {"cxr-support-devices v1", "cxr-no-finding v1", "cxr-multilabel v1"} and chex["replica"].all()
        assert "support_devices" not in set(nih["slug"])  # NIH cannot score support devices: no row, never all-negative
        assert set(nih.filter(pl.col("model") == "multilabel")["slug"]) <= {finding_slug(x) for x in scored_findings("nih")}
        sd = chex.filter((pl.col("model") == "per_pathology") & (pl.col("slug") == "support_devices")).row(0, named=True)
        assert sd["threshold"] == pytest.approx(read_config(ckpt).thresholds["support_devices"])  # the internal one
        assert sd["internal_roc_auc"] == pytest.approx(md["roc_auc"].value, abs=1e-4)
        assert sd["roc_auc_change"] == pytest.approx(sd["roc_auc"] - sd["internal_roc_auc"])
        # scored on every frontal image with a definite label under the model's policy (blank: zeros): counted from the file
        with open(cxr_home / "external" / "chexpert" / "CheXpert-v1.0-small" / "valid.csv", newline="") as f:
            frontal = [r for r in csv.DictReader(f) if r["Frontal/Lateral"] == "Frontal"]
        assert sd["n_test"] == sum(r["Support Devices"] in ("1.0", "0.0", "") for r in frontal)
        assert sd["n_pos"] == sum(r["Support Devices"] == "1.0" for r in frontal)
        shown = {c.name for c in ext["chexpert"][0]["external_validation"].value.schema.columns}
        assert {"roc_auc", "roc_auc_change", "ece_after"} <= shown
        undescribed = [c.name for c in ext["chexpert"][0]["dagster/column_schema"].value.columns if not c.description]
        assert not undescribed, undescribed  # every column in the catalog says what it holds (columns.py)
        erun = client.get_run(ext["chexpert"][0]["mlflow_run_id"].value)
        assert "external_validation.json" in {a.path for a in client.list_artifacts(erun.info.run_id)}

        # image drift: each external set present is a window (the drift_windows sensor adds them), compared with frontal
        # images of the training split only; an absent set's window says why
        from cxr_pipeline.data.shard_reader import Shards
        from cxr_pipeline.defs.drift import drift_windows, reference_sample

        sensed = drift_windows(dg.build_sensor_context(instance=instance))
        (added,) = sensed.dynamic_partitions_requests
        assert sorted(added.partition_keys) == ["external-chexpert", "external-nih"] and not sensed.run_requests
        instance.add_dynamic_partitions("drift_windows", ["external-chexpert", "external-padchest"])
        dcfg = {"ops": {"image_drift": {"config": {"permutations": 100, "reference": 200}}}}
        dres = run_job(defs, "drift_job", instance, partition_key="external-chexpert", run_config=dcfg)
        (dmat,) = [e.materialization for e in dres.get_asset_materialization_events()]
        drift = pl.read_parquet(dmat.metadata["path"].value)
        # the test's unit is the patient: one frontal image each (the asset's draw, seed 0), labels counted from the file
        from cxr_pipeline.data.external import read_labels
        from cxr_pipeline.vision.drift import TOLERANCES, one_per_patient

        labelled = read_labels("chexpert", cxr_home / "external" / "chexpert" / "CheXpert-v1.0-small" / "valid.csv").manifest
        by_path = {r["Path"]: r for r in frontal}
        picked = [by_path[x] for x in one_per_patient(labelled.filter(pl.col("view_position").is_in(["PA", "AP"])), 0)["path"]]
        assert len(picked) == len({r["Path"].split("/")[2] for r in frontal}) < len(frontal)
        assert drift.height == 14 + 2 and drift["n_window"][0] == len(picked) and drift["model"][0] == "cxr-multilabel v1"
        # each per-finding champion's outputs too, for its own finding, under the same window signals
        own = drift.filter(pl.col("model") != "cxr-multilabel v1")
        assert sorted(zip(own["model"], own["slug"], strict=True)) == [
            ("cxr-no-finding v1", "no_finding"),
            ("cxr-support-devices v1", "support_devices"),
        ]
        assert own["drift_score"].to_list() == [drift["drift_score"][0]] * 2 and own["expected_auc"].is_not_nan().all()
        alarm = drift["p_value"][0] < 0.01 and drift["drift_score"][0] >= drift["tolerance"][0]  # the validated tolerance
        assert (
            drift["drifted"][0] == alarm
            and dmat.metadata["drifted"].value == drift["drifted"][0]
            and drift["tolerance"][0] == TOLERANCES[("outputs", "energy")]
        )
        # acquisition statistics from the headers: CheXpert's JPGs are 8-bit, the replica's DICOMs 10 to 16
        assert drift["bits_stored"][0] == 8 and 10 <= drift["bits_stored_reference"][0] <= 16 and drift["source_size_ratio"][0] > 0
        sd_drift = drift.filter((pl.col("slug") == "support_devices") & (pl.col("model") == "cxr-multilabel v1")).row(0, named=True)
        assert sd_drift["n_labelled"] == sum(r["Support Devices"] in ("1.0", "0.0", "") for r in picked)  # labels read back
        sd_own = own.filter(pl.col("slug") == "support_devices").row(0, named=True)  # and for the per-finding champion
        assert sd_own["n_labelled"] == sd_drift["n_labelled"] and (sd_own["auc"] is None) == (sd_drift["auc"] is None)
        (check,) = dres.get_asset_check_evaluations()
        assert check.passed == (not drift["drifted"][0]) and check.severity == dg.AssetCheckSeverity.WARN
        train_frontal = m.filter((pl.col("split") == "train") & pl.col("view_position").is_in(["PA", "AP"]))
        ref = reference_sample(m, Shards.open(paths().shard_root(size), size), 10**6, 0)
        assert set(ref.rows["split"]) == {"train"} and len(ref.images) == train_frontal["subject_id"].n_unique()  # never validate or test
        assert ref.rows["subject_id"].n_unique() == len(ref.images)  # one image per patient
        assert drift["n_reference"][0] == min(200, train_frontal["subject_id"].n_unique())
        assert not [c.name for c in dmat.metadata["dagster/column_schema"].value.columns if not c.description]
        dicoms = sorted(env.glob("files/p*/p*/s*/*.dcm"))  # the study folders are links: rglob would not enter them
        names = {str(pydicom.dcmread(f, stop_before_pixels=True).PatientName) for f in dicoms}
        assert len(names) > 5
        assert not [x for x in names if x in repr(drift.to_dicts())]  # no header text in the table
        drun = client.get_run(dmat.metadata["mlflow_run_id"].value)
        assert "image_drift.json" in {a.path for a in client.list_artifacts(drun.info.run_id)} and "drift_score" in drun.data.metrics
        assert "cxr-support-devices.support_devices.output_ks" in drun.data.metrics and dmat.metadata["champions_compared"].value == 3
        # the alarm's signal (the outputs by default) and both tests, in the table, the metadata and MLflow
        both = ("outputs_mmd", "outputs_p_value", "features_mmd", "features_p_value")
        assert drift["signal"][0] == dmat.metadata["signal"].value == "outputs" and drift["drift_score"][0] == drift["outputs_mmd"][0]
        assert all(drun.data.metrics[k] == pytest.approx(drift[k][0]) == dmat.metadata[k].value for k in both)
        assert drun.data.metrics["tolerance"] == drift["tolerance"][0] and drun.data.metrics["drifted"] == float(drift["drifted"][0])
        # a window that drifts warns: the same window at alpha 0.99 and tolerance 0 (p < 0.99 unless the window is the
        # most reference-like of all its permutations; these random-weight models' outputs move less than a trained one's)
        warned = run_job(defs, "drift_job", instance, partition_key="external-chexpert", run_config=_alpha(dcfg, 0.99))
        (wmat,) = [e.materialization for e in warned.get_asset_materialization_events()]
        assert wmat.metadata["drifted"].value and wmat.metadata["p_value"].value < 0.99 and wmat.metadata["tolerance"].value == 0
        (wcheck,) = warned.get_asset_check_evaluations()
        assert (
            not wcheck.passed and wcheck.severity == dg.AssetCheckSeverity.WARN and "drifts from the training images" in wcheck.description
        )
        # ... and says CBPE's figures, which assume the calibration holds, are not the drifted window's performance
        untrusted = "do not read them as this window's performance"
        assert untrusted in wcheck.description and (untrusted in check.description) == bool(drift["drifted"][0])
        assert any(untrusted in (e.user_message or "") for e in instance.all_logs(warned.run_id))  # and the run's log
        absent = run_job(defs, "drift_job", instance, partition_key="external-padchest", run_config=dcfg)
        (amat,) = [e.materialization for e in absent.get_asset_materialization_events()]
        assert "PadChest: folder" in amat.metadata["reason"].value
        (acheck,) = absent.get_asset_check_evaluations()
        assert acheck.passed and "not compared" in acheck.description  # never "no drift" for a window not compared
        # a window of studies the PACS intake kept (vision.pacs_windows): the sensor adds it; no labels, so CBPE alone
        from cxr_pipeline.vision.pacs_windows import WindowStore, pacs_windows_root

        store = WindowStore(pacs_windows_root(), [size], window=12)
        heads = [(f, pydicom.dcmread(f, stop_before_pixels=True)) for f in dicoms]
        received = [(f, h) for f, h in heads if h.ViewPosition in ("PA", "AP")][:12]
        assert len(received) == 12 and all(store.keep(f"study{k}", f.read_bytes(), h) for k, (f, h) in enumerate(received))
        assert store.close() == ["pacs-0001"]
        (added,) = drift_windows(dg.build_sensor_context(instance=instance)).dynamic_partitions_requests
        assert added.partition_keys == ["external-nih", "pacs-0001"]  # (the NIH window was not added above)
        instance.add_dynamic_partitions("drift_windows", added.partition_keys)
        pres = run_job(defs, "drift_job", instance, partition_key="pacs-0001", run_config=dcfg)
        (pmat,) = [e.materialization for e in pres.get_asset_materialization_events()]
        pacs_drift = pl.read_parquet(pmat.metadata["path"].value)
        assert pacs_drift["n_window"][0] == len({str(h.PatientID) for _f, h in received})  # one image per patient
        assert pacs_drift["auc"].null_count() == 16 and pacs_drift["expected_auc"].drop_nulls().drop_nans().len() == 16
        assert pacs_drift["bits_stored"][0] in {int(h.BitsStored) for _f, h in received}
        secrets = {str(x) for _f, h in received for x in (h.PatientName, h.PatientID, h.StudyInstanceUID)}
        prun = client.get_run(pmat.metadata["mlflow_run_id"].value)
        logged = Path(client.download_artifacts(prun.info.run_id, "image_drift.json")).read_text()
        tracked = repr(pacs_drift.to_dicts()) + json.dumps(prun.data.params) + json.dumps(prun.data.tags) + logged + repr(pmat.metadata)
        assert not [x for x in secrets if x in tracked]  # no header text in the table, MLflow or Dagster's metadata
        from cxr_pipeline.data.dicom import decode

        readings = pmat.metadata["readings"].value  # how the window's kept files were read (the replica's: their own window)
        assert sum(readings.values()) == pacs_drift["n_window"][0] and set(readings) <= {
            decode(f.read_bytes()).window for f, _h in received
        }
        assert {k: v for k, v in prun.data.metrics.items() if k.startswith("reading.")} == {
            f"reading.{k.replace(' ', '_')}": float(v) for k, v in readings.items()
        }
        # its images deleted (past pacs_windows_kept), a re-run keeps the last comparison rather than erasing it
        import shutil

        shutil.rmtree(pacs_windows_root() / "pacs-0001")
        again = run_job(defs, "drift_job", instance, partition_key="pacs-0001", run_config=dcfg)
        (rmat,) = [e.materialization for e in again.get_asset_materialization_events()]
        assert "the last comparison stands" in rmat.metadata["reason"].value
        assert rmat.metadata["champions_compared"].value == pmat.metadata["champions_compared"].value == 3
        assert (
            pl.read_parquet(rmat.metadata["path"].value).equals(pacs_drift) and rmat.metadata["drifted"].value == pacs_drift["drifted"][0]
        )
        # a table written before the alarm named its signal (it alarmed on the features) stands too, read as such
        before = pacs_drift.drop("signal", "outputs_mmd", "outputs_p_value", "features_mmd", "features_p_value")
        before.write_parquet(rmat.metadata["path"].value)
        older = run_job(defs, "drift_job", instance, partition_key="pacs-0001", run_config=dcfg)
        (omat,) = [e.materialization for e in older.get_asset_materialization_events()]
        assert "the last comparison stands" in omat.metadata["reason"].value and omat.metadata["signal"].value == "features"
        assert "outputs_mmd" not in omat.metadata and omat.metadata["drift_score"].value == pacs_drift["drift_score"][0]

        # localization: the champions' Grad-CAM against the replica's planted boxes and the NIH-format replica's box file
        lres = run_job(defs, "localization_job", instance, run_config={"ops": {"localization_metrics": {"config": {"bootstrap": 50}}}})
        (lmat,) = [e.materialization for e in lres.get_asset_materialization_events()]
        loc = pl.read_parquet(lmat.metadata["path"].value)
        boxes = pl.read_csv(env / "replica-planted-boxes.csv.gz")
        tested = boxes.join(m.filter(pl.col("split") == "test").select("dicom_id"), on="dicom_id")
        internal = loc.filter(pl.col("dataset") == "mimic")
        # every finding boxed in the test split has its baselines and the multi-label champion's row (the per-finding
        # champions here, support devices and no finding, have no boxes), each counted from the box file
        assert set(internal["pathology"]) == set(tested["finding"])
        for r in internal.iter_rows(named=True):
            assert r["n_images"] == tested.filter(pl.col("finding") == r["pathology"])["dicom_id"].n_unique()
        assert (
            set(internal["registered"]) == {"", "cxr-multilabel v1"}
            and internal.filter(pl.col("method") == "grad_cam")["level"].null_count() == 0
        )
        # the level is chosen on the validate split's boxed images, the baselines made from the training split's boxes
        split_of = dict(zip(m["dicom_id"], m["split"], strict=True))
        boxes = boxes.with_columns(pl.col("dicom_id").replace_strict(split_of, default=None).alias("split"))
        for r in internal.iter_rows(named=True):
            mine = boxes.filter(pl.col("finding") == r["pathology"])
            if r["method"] == "grad_cam":
                n_val = mine.filter(pl.col("split") == "validate")["dicom_id"].n_unique()
                assert f"{n_val} images)" in r["level_from"] or (n_val == 0 and r["level_from"].startswith("default (no boxed")), r
            else:
                assert r["training_boxes"] == mine.filter(pl.col("split") == "train").height, r
        nih_rows = loc.filter(pl.col("dataset") == "nih")
        assert nih_rows.height and (nih_rows.filter(pl.col("method") == "grad_cam")["level_from"].str.starts_with("internal ")).all()
        assert not [c.name for c in lmat.metadata["dagster/column_schema"].value.columns if not c.description]
        assert lmat.metadata["sheet_mimic"].value.startswith("![") and lmat.metadata["sheet_nih"].value.startswith("![")
        lrun = client.get_run(lmat.metadata["mlflow_run_id"].value)
        assert "localization_metrics.json" in {a.path for a in client.list_artifacts(lrun.info.run_id)}

        # the report branch end to end on the tiny offline Mllama
        rcfg = {
            "ops": {
                "report_adapter": {"config": {"size": size, "max_steps": 3, "batch_size": 2, "accumulation": 1, "max_train_pairs": 12}},
                "generated_reports": {"config": {"max_new_tokens": 6, "max_test_pairs": 6}},
            }
        }
        rep = run_job(defs, "report_job", instance, run_config=rcfg)
        rmats = {e.asset_key.to_user_string(): e.materialization for e in rep.get_asset_materialization_events()}
        assert set(rmats) == {"report_pairs", "report_adapter", "generated_reports", "report_metrics"}
        assert rmats["report_adapter"].metadata["prompt_variant"].value == "instruction+classifier_findings"
        # training prompts carry out-of-fold hints from the multi-label model's 5 fold models
        assert rmats["report_adapter"].metadata["hint_source"].value == "multilabel_out_of_fold"
        hints = pl.read_parquet(mats["report_hints"].metadata["path"].value)  # one table, read by the adapter as one input
        assert set(hints.filter(pl.col("split") == "train")["source"]) == {"out_of_fold"}
        assert mats["report_hints"].metadata["fold_models"].value == 5 and hints.height == m.height
        ml_config = read_config(ClassifierSet(cxr_home / "assets" / "classifier").classifier("multilabel").checkpoint)
        assert ml_config.window_prior and ml_config.window_prior == read_config(ckpt).window_prior  # the same training images
        from cxr_pipeline.vision.calibration import calibrated_threshold

        held_out = hints.filter(pl.col("source") == "held_out")  # the final model's, at its thresholds through its map
        at = calibrated_threshold(ml_config.calibration["support_devices"], ml_config.thresholds["support_devices"])
        assert held_out["threshold_support_devices"].unique().to_list() == [pytest.approx(at)]
        per_fold = hints.filter(pl.col("source") == "out_of_fold").group_by("fold").agg(pl.col("threshold_support_devices").n_unique())
        assert per_fold.height == 5 and per_fold["threshold_support_devices"].to_list() == [1] * 5  # each fold model its own
        arun = client.get_run(rmats["report_adapter"].metadata["mlflow_run_id"].value)
        assert arun.data.params["base_model"].startswith("cxr-tiny-mllama") and "loss" in arun.data.metrics
        # every training and metrics run says what it read (MLflow dataset tracking)
        assert [(i.dataset.name, i.tags[0].value) for i in arun.inputs.dataset_inputs] == [(f"report-pairs-{size}px", "train")]
        mrun = client.get_run(mats["classifier_metrics"].metadata["mlflow_run_id"].value)
        assert [(i.dataset.name, i.tags[0].value) for i in mrun.inputs.dataset_inputs] == [("classifier-test-scores", "test")]
        # the reliability diagram (every per-finding model, before and after calibration): MLflow and the catalog
        assert "reliability_all.png" in {a.path for a in client.list_artifacts(mrun.info.run_id)}
        assert mats["classifier_metrics"].metadata["reliability"].value.startswith("![")
        assert "support_devices.ece_after" in mrun.data.metrics
        assert any(a.path == "adapter" for a in client.list_artifacts(arun.info.run_id))
        # each configured asset's run recorded the configuration it resolved, whole, with no auto left
        for key, mat in {**mats, **rmats}.items():
            if key in ("classifier_metrics", "classifier_predictions", "report_metrics"):
                continue  # no configuration of their own
            resolved = mat.metadata["resolved_config"].value
            assert None not in resolved.values() and "auto" not in resolved.values(), (key, resolved)
            params = client.get_run(mat.metadata["mlflow_run_id"].value).data.params
            assert all(params[k] == (json.dumps(v) if isinstance(v, list) else str(v)) for k, v in resolved.items()), key
        assert rmats["report_adapter"].metadata["resolved_config"].value["size"] == size
        assert rmats["generated_reports"].metadata["resolved_config"].value["max_new_tokens"] == 6
        card = json.loads((cxr_home / "assets" / "reports" / "adapter" / "cxr_adapter.json").read_text())
        assert card["config"] == rmats["report_adapter"].metadata["resolved_config"].value
        gen = pl.read_parquet(rmats["generated_reports"].metadata["path"].value)
        assert gen.height == 6 and {"reference", "adapter", "template", "retrieval"} <= set(gen.columns)
        # the picture people look at: in the catalog inline, in MLflow as an artifact
        assert rmats["generated_reports"].metadata["report_sheet"].value.startswith("![")
        assert "data:image/png;base64," in rmats["generated_reports"].metadata["report_sheet"].value
        gen_run = rmats["generated_reports"].metadata["mlflow_run_id"].value
        assert "generated_reports.png" in [a.path for a in client.list_artifacts(gen_run)]
        rm = pl.read_parquet(rmats["report_metrics"].metadata["path"].value)
        assert rm.filter(pl.col("test_labels") == "labeler")["system"].to_list() == ["adapter", "template", "retrieval"]
        rad = gen.filter(pl.col("radiologist_labelled")).height
        assert rm.filter(pl.col("test_labels") == "radiologist")["system"].to_list() == (
            ["adapter", "template", "retrieval"] if rad else []
        )
        import shutil

        for col in (
            "BLEU_1",
            "BLEU_4",
            "ROUGE_L",
            "CIDEr",
            "ce_micro14_f1",
            "ce_macro5_f1",
            "ce_upos_micro14_f1",
            "ce_upos_macro5_f1",
            *(["METEOR"] if shutil.which("java") or os.environ.get("CI") == "true" else []),  # CI installs Java
        ):
            assert col in rm.columns
        from cxr_pipeline.reports.labeler import labeler_version

        # the references are named (this test caps the test pairs: not the R2Gen convention), the labeler versioned
        assert set(rm["evaluation"]) == {"findings references, first 6 test pairs"}
        assert set(rm["labeler"]) == {labeler_version()}
        mrun = client.get_run(rmats["report_metrics"].metadata["mlflow_run_id"].value)
        assert mrun.data.params["labeler"] == labeler_version()
        lab = rm.filter(pl.col("test_labels") == "labeler")
        # the intervals resample the generated reports' patients (each patient's reports together), and say so
        from cxr_pipeline.reports.metrics import report_intervals

        systems = lab["system"].to_list()
        redrawn, _ = report_intervals(gen["reference"].to_list(), {s: gen[s].to_list() for s in systems}, gen["subject_id"].to_list())
        for row, want in zip(lab.iter_rows(named=True), redrawn, strict=True):
            for col in ("ce_micro14_f1_lo", "ce_micro14_f1_hi", "ROUGE_L_lo", "ROUGE_L_hi"):
                assert row[col] == pytest.approx(want[col]), (row["system"], col)
        repeats = gen["subject_id"].n_unique() < gen.height
        assert set(lab["bootstrap_unit"]) == {"patient" if repeats else "report"}
        diffs = pl.read_parquet(Path(rmats["report_metrics"].metadata["path"].value).with_name("report_differences.parquet"))
        assert {(a, b) for a, b in diffs.select("a", "b").iter_rows()} == {
            ("adapter", "template"),
            ("adapter", "retrieval"),
            ("template", "retrieval"),
        }

        # every column of every table says what it holds, in the catalog's column schema (cxr_pipeline.columns)
        tables = ("manifest", "manifest_rejects", "classifier_metrics", "classifier_predictions", "report_hints", "subgroup_metrics")
        for key in (*tables, "report_pairs", "generated_reports", "report_metrics"):
            event = instance.get_latest_materialization_event(dg.AssetKey(key))
            schema = event.asset_materialization.metadata["dagster/column_schema"].value
            undescribed = [c.name for c in schema.columns if not c.description]
            assert not undescribed and schema.columns, (key, undescribed)

        # without MIMIC-IV the audit runs empty and says why; the rest of the graph is untouched
        import shutil as sh

        sh.rmtree(env / "mimic-iv")
        audit_job = defs.resolve_job_def("classifier_summary_job")
        res = audit_job.execute_in_process(instance=instance, asset_selection=[dg.AssetKey("subgroup_metrics")], raise_on_error=False)
        assert res.success
        (mat,) = [e.materialization for e in res.get_asset_materialization_events()]
        assert "MIMIC-IV demographics not found" in mat.metadata["reason"].value and "CXR_MIMIC_IV_DIR" in mat.metadata["reason"].value
        assert pl.read_parquet(mat.metadata["path"].value).height == 0


def _alpha(run_config: dict, alpha: float) -> dict:
    """``run_config`` with image_drift's alpha set to ``alpha``, its tolerance to 0 (significance alone)."""
    op = run_config["ops"]["image_drift"]["config"]
    return {"ops": {"image_drift": {"config": {**op, "alpha": alpha, "tolerance": 0.0}}}}
