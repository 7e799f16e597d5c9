"""Re-runs on data change: observe the raw dataset on a schedule, let automation carry updates downstream.

Every asset below the raw dataset carries Dagster's ``eager`` condition
(requested when a parent is updated, or when a parent will be
requested in the same tick; never while a parent is missing or running) and-ed
with "every blocking check of the parents passed", so a manifest that fails its
checks stops there. The raw source's data version is a content fingerprint, so
an observation of unchanged data requests nothing.

Three refinements, each covered by ``test_automation.py``:

- ``ManifestSliceChanged`` (shard partitions only): the manifest is one table, so
  to Dagster any new patient updates the parent of all ten pNN partitions; this
  narrows that to the partitions whose rows differ from the rows they were built from.
- ``ParentRequestedInAnotherRun``: a child waits while a parent it cannot share a
  run with (other partitioning) is requested, instead of running on old data.
- For the content-versioned parents (manifest, shards) "updated" means "new data
  version", so a rebuild that reproduces the same content starts nothing.

The first two are Python, so the automation sensor runs in the code location
(``use_user_code_server``).
"""

import dagster as dg

from cxr_pipeline.defs.manifest import MANIFEST
from cxr_pipeline.defs.raw import RAW
from cxr_pipeline.defs.shards import IMAGE_SHARDS, SHARD_REJECTS
from cxr_pipeline.settings import observe_cron


def _latest_metadata(instance: dg.DagsterInstance, key: str, partition: str | None, field: str):
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(field)
    return None if value is None else value.value


class ManifestSliceChanged(dg.AutomationCondition):
    """True for the shard partitions never built, or built from other manifest rows than the latest manifest has.

    Compares the latest manifest's ``partition_fingerprints`` metadata with each
    partition's ``manifest_fingerprint``. Both digest ``(dicom_id, path)``: an
    image replaced in place under the same name is picked up by the shard
    builder's content hash when the partition next runs, not by this condition.
    """

    @property
    def name(self) -> str:
        return "manifest_slice_changed"

    @property
    def description(self) -> str:
        return "This partition's rows of the manifest differ from those it was built from"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        instance = context.asset_graph_view.instance
        wanted = _latest_metadata(instance, MANIFEST, None, "partition_fingerprints") or {}
        changed = set()
        for part in context.candidate_subset.expensively_compute_partition_keys():
            # both keys of the multi-asset are built by one step; image_shards carries the record
            built = _latest_metadata(instance, IMAGE_SHARDS, part, "manifest_fingerprint")
            if built is None or built != wanted.get(part):
                changed.add(part)
        return dg.AutomationResult(context, context.candidate_subset.compute_intersection_with_partition_keys(changed))


class ParentRequestedInAnotherRun(dg.AutomationCondition):
    """True while a parent is requested this tick in a run the target cannot join.

    ``eager`` requests a child in the same tick as a parent only when both fit in
    one run. A classifier (partitioned by label) and the shard partitions it
    reads (partitioned by pNN) never do, so when the manifest changes, ``eager``
    would start the classifiers at once on the old shards, and again after the
    new shards: 28 trainings instead of 14. Waiting for such a parent's run fixes
    that; the trigger is kept until handled, so the child goes once it is done.
    """

    @property
    def name(self) -> str:
        return "parent_requested_in_another_run"

    @property
    def description(self) -> str:
        return "A parent with other partitions is requested this tick"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        graph = context.asset_graph
        node = graph.get(context.key)
        waiting = any(
            (sub := context.request_subsets_by_key.get(parent)) is not None
            and not sub.is_empty
            and graph.get(parent).partitions_def != node.partitions_def
            for parent in node.parent_keys
        )
        return dg.AutomationResult(context, context.candidate_subset if waiting else context.get_empty_subset())


# The manifest and the shards carry content data versions (a digest of the Parquet file, of
# the decoded images), so for them "updated" means "updated with other content": a weekly
# refresh or a re-run that reproduces the same manifest or the same images starts nothing
# below them. Other parents count any new materialization (their data versions are derived
# from code version and inputs, which would hide a change of run config).
_CONTENT_VERSIONED = dg.AssetSelection.assets(MANIFEST, IMAGE_SHARDS)
_newly_updated = dg.AutomationCondition.newly_updated() & ~dg.AutomationCondition.executed_with_root_target()
_any_deps_updated = (
    dg.AutomationCondition.any_deps_match(_newly_updated | dg.AutomationCondition.will_be_requested()).ignore(_CONTENT_VERSIONED)
    | dg.AutomationCondition.any_deps_match(
        (_newly_updated & dg.AutomationCondition.data_version_changed()) | dg.AutomationCondition.will_be_requested()
    ).allow(_CONTENT_VERSIONED)
).with_label("any_deps_updated")
EAGER = dg.AutomationCondition.eager().replace("any_deps_updated", _any_deps_updated)

AUTOMATION = EAGER & ~ParentRequestedInAnotherRun() & dg.AutomationCondition.all_deps_blocking_checks_passed()
SHARD_AUTOMATION = AUTOMATION & ManifestSliceChanged()
_BY_KEY = {IMAGE_SHARDS: SHARD_AUTOMATION, SHARD_REJECTS: SHARD_AUTOMATION}


def with_automation(assets: list) -> list:
    """The same assets with ``AUTOMATION`` on every spec (the raw source keeps none)."""
    return list(
        dg.map_asset_specs(
            lambda spec: spec.replace_attributes(automation_condition=_BY_KEY.get(spec.key.to_user_string(), AUTOMATION)), assets
        )
    )


def schedules_and_sensors(observe_job, manifest_job) -> tuple[list, list]:
    observe = dg.ScheduleDefinition(
        name="observe_raw_schedule",
        job=observe_job,
        cron_schedule=observe_cron(),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description=f"Observe {RAW} (CXR_OBSERVE_CRON, hourly by default); a changed fingerprint starts the automation chain.",
    )
    weekly = dg.ScheduleDefinition(
        name="weekly_full_refresh",
        job=manifest_job,
        cron_schedule="0 3 * * 0",
        default_status=dg.DefaultScheduleStatus.STOPPED,
        description="Rebuild the manifest every Sunday 03:00 (off by default); automation refreshes whatever it changes.",
    )
    sensor = dg.AutomationConditionSensorDefinition(
        "automation",
        target=dg.AssetSelection.all(),
        default_status=dg.DefaultSensorStatus.RUNNING,
        minimum_interval_seconds=60,
        use_user_code_server=True,  # ManifestSliceChanged is Python, evaluated where the code is
        description="Evaluates the assets' automation conditions every minute (running by default).",
    )
    return [observe, weekly], [sensor]
