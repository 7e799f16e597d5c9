"""Automation: new data flows downstream by itself; unchanged data requests nothing."""

from __future__ import annotations

import dagster as dg
import pytest

from cxr_pipeline.data.synthetic import SynthConfig, generate
from cxr_pipeline.definitions import build_defs


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
    generate(SynthConfig(patients=6, seed=11, image_size=48), raw)
    monkeypatch.setenv("CXR_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("CXR_RAW_DIR", str(raw))
    return raw


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
        assert "report_pairs" in req and "classifier" not in req
        cursor = settled.cursor

        observe.execute_in_process(instance=instance)  # unchanged data
        same = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=cursor)
        assert requested(same).keys() <= req.keys() and "manifest" not in requested(same)

        generate(SynthConfig(patients=8, seed=11, image_size=48), small)  # new patients arrive
        observe.execute_in_process(instance=instance)
        changed = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=same.cursor)
        assert {"manifest", "manifest_rejects"} <= requested(changed).keys()
