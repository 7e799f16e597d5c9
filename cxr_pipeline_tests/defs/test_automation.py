"""Automation: new data flows downstream by itself; unchanged data requests nothing."""

from __future__ import annotations

import dagster as dg
import polars as pl
import pytest

from cxr_pipeline.data.shards import partition_fingerprints
from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.definitions import build_defs
from cxr_pipeline.defs.automation import with_automation
from cxr_pipeline.defs.manifest import MANIFEST_CHECKS
from cxr_pipeline.defs.manifest import manifest as manifest_assets
from cxr_pipeline.defs.raw import raw_mimic_cxr
from cxr_pipeline.defs.run_config import with_config_versions
from cxr_pipeline.defs.shards import image_shards
from cxr_pipeline.settings import paths


def requested(result) -> dict[str, set]:
    out: dict[str, set] = {}
    for r in result.results:
        if r.true_subset.size:
            out[r.key.to_user_string()] = (
                set(r.true_subset.expensively_compute_partition_keys()) if r.true_subset.is_partitioned else {None}
            )
    return out


@pytest.fixture
def small(tmp_path, monkeypatch):
    raw = tmp_path / "raw"
    generate(SynthConfig(patients=6, seed=11, source_rows=48), raw)
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_RAW_DIR", str(raw))
    return raw, tmp_path / "home"


def test_schedules_and_sensor_defaults():
    defs = build_defs()
    assert defs.resolve_schedule_def("observe_raw_schedule").default_status == dg.DefaultScheduleStatus.RUNNING
    assert defs.resolve_schedule_def("observe_raw_schedule").cron_schedule == "0 * * * *"
    assert defs.resolve_schedule_def("weekly_full_refresh").default_status == dg.DefaultScheduleStatus.STOPPED
    assert defs.resolve_sensor_def("automation").default_status == dg.DefaultSensorStatus.RUNNING
    graph = defs.resolve_asset_graph()
    raw = dg.AssetKey("raw_mimic_cxr")
    assert all(graph.get(k).automation_condition is not None for k in graph.materializable_asset_keys if k != raw)


def test_new_data_is_requested_downstream_and_unchanged_data_is_not(small):
    small, home = small
    defs = build_defs()
    observe = defs.resolve_job_def("observe_raw")
    with dg.DagsterInstance.ephemeral() as instance:
        observe.execute_in_process(instance=instance)
        first = dg.evaluate_automation_conditions(defs=defs, instance=instance)
        assert first.total_requested == 0  # the first tick only records the state
        defs.resolve_job_def("manifest_job").execute_in_process(instance=instance)
        settled = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=first.cursor)
        # the manifest was just materialized: its children are requested, nothing above it;
        # the classifiers wait until the shards they read exist
        req = requested(settled)
        assert "manifest" not in req and "raw_mimic_cxr" not in req
        assert req["image_shards"] == req["shard_rejects"] == {f"p{n}" for n in range(10, 20)}
        assert "report_pairs" in req and "classifier" not in req and "multilabel_classifier" not in req
        cursor = settled.cursor

        observe.execute_in_process(instance=instance)  # unchanged data
        same = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        assert requested(same) == {}  # unchanged data: nothing at all

        # the shards are built: the classifiers follow, the shard partitions are settled
        defs.resolve_job_def("manifest_job").execute_in_process(instance=instance)  # (nothing changed: same rows)
        for part in sorted(req["image_shards"]):
            defs.resolve_job_def("shards_job").execute_in_process(instance=instance, partition_key=part)
        built = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=same.cursor)
        assert "image_shards" not in requested(built) and {"classifier", "multilabel_classifier"} <= requested(built).keys()
        assert "report_pairs" not in requested(built)  # the manifest was rebuilt with the same content
        before = partition_fingerprints(pl.read_parquet(home / "assets/manifest/manifest.parquet"))

        generate(SynthConfig(patients=10, seed=11, source_rows=48), small)  # new patients arrive
        observe.execute_in_process(instance=instance)
        changed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=built.cursor)
        assert {"manifest", "manifest_rejects"} <= requested(changed).keys()
        assert "image_shards" not in requested(changed)  # not before the new manifest exists

        defs.resolve_job_def("manifest_job").execute_in_process(instance=instance)
        after = partition_fingerprints(pl.read_parquet(home / "assets/manifest/manifest.parquet"))
        affected = {p for p in after if after[p] != before[p]}
        assert affected and len(affected) < len(after)  # the replica puts the new patients in some groups only
        flowing = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=changed.cursor)
        flowed = requested(flowing)
        assert flowed["image_shards"] == flowed["shard_rejects"] == affected  # only the affected partitions
        assert "manifest" not in flowed
        assert "classifier" not in flowed  # not on the old shards: after the new ones

        for part in sorted(affected):
            defs.resolve_job_def("shards_job").execute_in_process(instance=instance, partition_key=part)
        retrain = requested(dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=flowing.cursor))
        # every per-pathology model and the multi-label model, once the new shards exist
        assert retrain.keys() == {"classifier", "multilabel_classifier"} and len(retrain["classifier"]) == 14


def test_code_version_change_marks_the_changed_assets_stale(small):
    # the resolver the UI's "stale" badges come from
    from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
    from dagster._core.definitions.events import AssetKeyPartitionKey
    from dagster._core.loader import LoadingContextForTest

    defs = build_defs()
    with dg.DagsterInstance.ephemeral() as instance:
        defs.resolve_job_def("observe_raw").execute_in_process(instance=instance)
        defs.resolve_job_def("manifest_job").execute_in_process(instance=instance)
        defs.resolve_job_def("shards_job").execute_in_process(instance=instance, partition_key="p10")
        shard = AssetKeyPartitionKey(dg.AssetKey("image_shards"), "p10")

        def status(d, key):
            resolver = CachingStaleStatusResolver(instance, d.resolve_asset_graph(), LoadingContextForTest(instance))
            return resolver.get_status(key.asset_key, key.partition_key)

        manifest = AssetKeyPartitionKey(dg.AssetKey("manifest"))
        assert status(defs, manifest) == StaleStatus.FRESH and status(defs, shard) == StaleStatus.FRESH

        def bump(assets):
            return assets.map_asset_specs(lambda s: s.replace_attributes(code_version="2"))

        def graph(manifest_assets_def, shard_assets_def):
            return dg.Definitions(
                # as build_defs: code versions carry the pipeline.yaml section digests
                assets=[raw_mimic_cxr, *with_config_versions(with_automation([manifest_assets_def, shard_assets_def]), paths())],
                asset_checks=[*MANIFEST_CHECKS],
                resources=defs.resources,
            )

        new_shard_code = graph(manifest_assets, bump(image_shards))
        assert status(new_shard_code, shard) == StaleStatus.STALE
        assert status(new_shard_code, manifest) == StaleStatus.FRESH  # only what the change touches
        new_manifest_code = graph(bump(manifest_assets), image_shards)
        assert status(new_manifest_code, manifest) == StaleStatus.STALE
        assert status(new_manifest_code, AssetKeyPartitionKey(dg.AssetKey("manifest_rejects"))) == StaleStatus.STALE


def test_the_gates_cache_lives_until_the_instance_writes_an_event():
    """One evaluation's answers are shared between the assets that ask, until any event is written (an observation
    mid-evaluation must be seen by the gate as by the triggers); where the newest event id cannot say that
    (Postgres, MySQL), nothing is shared."""
    from types import SimpleNamespace
    from unittest import mock

    from cxr_pipeline.defs import automation

    instance = dg.DagsterInstance.ephemeral()
    view = SimpleNamespace(instance=instance, asset_graph=None, effective_dt=None, last_event_id=None)
    first = automation._tick(view)
    first.out_of_date[dg.AssetKey("manifest")] = None  # "current", as an earlier asset's gate found it
    assert automation._tick(view) is first
    instance.report_runless_asset_event(dg.AssetObservation(asset_key="raw_mimic_cxr"))
    fresh = automation._tick(view)
    assert fresh is not first and fresh.out_of_date == {}
    with mock.patch.object(automation, "_serial_ids", return_value=False):
        assert automation._tick(view) is not automation._tick(view)
