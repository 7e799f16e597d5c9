"""Re-runs on data change: observe the raw dataset on a schedule, let automation carry updates downstream.

The rule every asset below the raw dataset follows: **it runs once per data change,
after all its inputs are current.** Its condition is

    TRIGGER & GATE & all_deps_blocking_checks_passed

- TRIGGER (Dagster's ``eager`` trigger, made content-aware): a parent was updated
  since this asset was last requested, or it is missing. For the content-versioned
  parents (manifest = Parquet digest, image_shards = digest of the decoded images)
  "updated" means "new data version", so a rebuild that reproduces the same content
  starts nothing below it. A parent merely *requested* this tick does not trigger
  (its run may change nothing). Shard partitions trigger only when their own rows
  of the manifest changed (``ManifestSliceChanged``): the manifest is one table, so
  to Dagster any new patient updates the parent of all ten pNN partitions.
- GATE (``InputsPending``, negated, plus ``eager``'s own "no parent missing or in
  progress"): no ancestor, however far up, is requested this tick, in progress, or
  out of date with a newer parent. So the report adapter waits for the shards, the
  14 classifiers and their predictions a new manifest sets off, instead of training
  on the old ones and again on the new. "Out of date" is Dagster's stale status
  (data causes only: a changed code version shows as stale in the UI but is re-run
  by hand), and for shard partitions whether their manifest rows changed.

Both Python conditions read the instance, so the automation sensor runs in the code
location (``use_user_code_server``). ``test_automation.py`` covers each part on
``evaluate_automation_conditions``; ``test_automation_daemon.py`` runs the real
daemon over a whole data change.
"""

import threading

import dagster as dg

from cxr_pipeline.defs.history import latest_metadata
from cxr_pipeline.defs.keys import IMAGE_SHARDS, MANIFEST, RAW, SHARD_REJECTS
from cxr_pipeline.settings import env, observe_cron

# built by one step from the same rows: their slices are checked once, on image_shards
_SHARD_KEYS = (dg.AssetKey(IMAGE_SHARDS), dg.AssetKey(SHARD_REJECTS))


def changed_slices(instance: dg.DagsterInstance, partitions) -> set[str]:
    """The shard partitions never built, or built from other manifest rows than the latest manifest has.

    Compares the latest manifest's ``partition_fingerprints`` metadata with each
    partition's ``manifest_fingerprint``. Both digest ``(dicom_id, path)``: an image
    replaced in place under the same name is picked up by the shard builder's content
    hash when the partition next runs, not here.
    """
    wanted = latest_metadata(instance, MANIFEST, None, "partition_fingerprints") or {}
    # both keys of the multi-asset are built by one step; image_shards carries the record
    return {p for p in partitions if latest_metadata(instance, IMAGE_SHARDS, p, "manifest_fingerprint") != wanted.get(p)}


class ManifestSliceChanged(dg.AutomationCondition):
    """True for the shard partitions whose rows of the manifest differ from those they were built from."""

    @property
    def name(self) -> str:
        return "manifest_slice_changed"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        instance = context.asset_graph_view.instance
        changed = changed_slices(instance, context.candidate_subset.expensively_compute_partition_keys())
        return dg.AutomationResult(context, context.candidate_subset.compute_intersection_with_partition_keys(changed))


class InputsPending(dg.AutomationCondition):
    """True while any ancestor is requested this tick, in progress, or out of date with a newer parent."""

    @property
    def name(self) -> str:
        return "inputs_pending"

    async def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        pending = await self._pending_ancestor(context)
        if pending:
            context.log.debug(f"{context.key.to_user_string()} waits: {pending}")
        return dg.AutomationResult(context, context.candidate_subset if pending else context.get_empty_subset())

    async def _pending_ancestor(self, context: dg.AutomationContext) -> str | None:
        graph, view = context.asset_graph, context.asset_graph_view
        tick = _tick(view)
        ancestors = [k for k in graph.get_ancestor_asset_keys(context.key) if graph.get(k).is_materializable]
        for key in ancestors:
            requested = context.request_subsets_by_key.get(key)  # live: earlier assets of this tick add to it
            if requested is not None and not requested.is_empty:
                return f"{key.to_user_string()} requested"
            if key not in tick.running:
                running = await view.compute_run_in_progress_subset(key=key, from_subset=view.get_full_subset(key=key))
                tick.running[key] = not running.is_empty
            if tick.running[key]:
                return f"{key.to_user_string()} in progress"
        for key in ancestors:
            if key == _SHARD_KEYS[1] and _SHARD_KEYS[0] in ancestors:
                continue  # built by the same step from the same rows: checked once, on image_shards
            if key not in tick.out_of_date:
                tick.out_of_date[key] = _out_of_date(key, tick, graph, view)  # the same for every asset that asks
            if tick.out_of_date[key]:
                return tick.out_of_date[key]
        return None


class _Tick:
    """What one evaluation of the graph learns about an asset once and every descendant's condition asks again: a
    run in progress, out of date with a newer parent (the stale-status resolver, built once).

    Valid while the instance has written no event since it was filled (``event_id``): Dagster's reads are not
    pinned to the evaluation's start, so an observation written mid-evaluation is seen by the later assets'
    triggers; answers cached before it would let such an asset start before its parents (seen: subgroup_metrics,
    which reads the raw source directly, ran before the manifest). A new event empties the cache.
    """

    def __init__(self, view, event_id: int | None) -> None:
        from dagster._core.definitions.data_version import CachingStaleStatusResolver

        self.view = view  # held: the cache is found by the view's identity
        self.event_id = event_id
        self.running: dict[dg.AssetKey, bool] = {}
        self.out_of_date: dict[dg.AssetKey, str | None] = {}
        self.resolver = CachingStaleStatusResolver(view.instance, view.asset_graph, view)


_TICKS: dict[tuple, _Tick] = {}
_TICKS_LOCK = threading.Lock()  # the code server answers evaluations on threads


def _serial_ids(storage) -> bool:
    """Whether the event log's newest id says that nothing was written since: SQLite (one writer at a time, ids
    given in commit order, and every event the gate reads mirrored into the index shard). Not Postgres or MySQL:
    concurrent inserts commit out of id order, so a newest id can be visible before an older event is, and a
    cache checked by the newest id could miss the older one."""
    from dagster._core.storage.event_log import ConsolidatedSqliteEventLogStorage, InMemoryEventLogStorage, SqliteEventLogStorage

    return isinstance(storage, (SqliteEventLogStorage, ConsolidatedSqliteEventLogStorage, InMemoryEventLogStorage))


def _tick(view) -> _Tick:
    """The cache of the evaluation ``view`` belongs to (one ``AssetGraphView`` per evaluation), emptied when the
    instance has a newer event than the cache has seen; the few most recent are kept, so evaluations that
    interleave keep their own. On a storage whose newest id does not say that (``_serial_ids``), every condition
    gets a fresh one: the gate reads the instance afresh, as it did before the cache."""
    storage = view.instance.event_log_storage
    if not _serial_ids(storage):
        return _Tick(view, None)
    key = (id(view), view.effective_dt, view.last_event_id)
    event_id = storage.get_maximum_record_id()  # one indexed query, vs ~20 per stale status
    with _TICKS_LOCK:
        tick = _TICKS.get(key)
        if tick is None or tick.event_id != event_id:
            _TICKS.pop(key, None)
            while len(_TICKS) >= 4:  # the oldest first (dicts keep insertion order); each holds its view alive
                _TICKS.pop(next(iter(_TICKS)))
            tick = _TICKS[key] = _Tick(view, event_id)
        return tick


def _out_of_date(key: dg.AssetKey, tick: _Tick, graph, view) -> str | None:
    """Why ``key`` is out of date with a newer parent (data causes only), or None."""
    from dagster._core.definitions.data_version import StaleCauseCategory, StaleStatus

    node = graph.get(key)
    if key in _SHARD_KEYS:
        changed = changed_slices(view.instance, node.partitions_def.get_partition_keys())
        return f"{key.to_user_string()} {sorted(changed)} out of date" if changed else None
    for part in node.partitions_def.get_partition_keys() if node.partitions_def else [None]:
        if tick.resolver.get_status(key, part) != StaleStatus.STALE:
            continue
        if any(c.category == StaleCauseCategory.DATA for c in tick.resolver.get_stale_causes(key, part)):
            return f"{key.to_user_string()}{f'[{part}]' if part else ''} out of date"
    return None


# "Updated" for the content-versioned parents means "updated with other content"; other parents
# count any new materialization (their data versions derive from code version and inputs, which
# would hide a change of run config). A parent only requested this tick does not count.
_CONTENT_VERSIONED = dg.AssetSelection.assets(MANIFEST, IMAGE_SHARDS)
_newly_updated = dg.AutomationCondition.newly_updated() & ~dg.AutomationCondition.executed_with_root_target()
_any_deps_updated = (
    dg.AutomationCondition.any_deps_match(_newly_updated).ignore(_CONTENT_VERSIONED)
    | dg.AutomationCondition.any_deps_match(_newly_updated & dg.AutomationCondition.data_version_changed()).allow(_CONTENT_VERSIONED)
).with_label("any_deps_updated")
EAGER = dg.AutomationCondition.eager().replace("any_deps_updated", _any_deps_updated)

# EAGER first: its "since last handled" trigger must see every tick's updates, also those of ticks
# on which the gate holds the asset back (an AND evaluates later operands only where earlier ones hold).
AUTOMATION = EAGER & ~InputsPending() & dg.AutomationCondition.all_deps_blocking_checks_passed()
SHARD_AUTOMATION = AUTOMATION & ManifestSliceChanged()
_BY_KEY = {IMAGE_SHARDS: SHARD_AUTOMATION, SHARD_REJECTS: SHARD_AUTOMATION}


def with_automation(assets: list) -> list:
    """The same assets with ``AUTOMATION`` on every spec (the raw source keeps none)."""
    return list(
        dg.map_asset_specs(
            lambda spec: spec.replace_attributes(automation_condition=_BY_KEY.get(spec.key.to_user_string(), AUTOMATION)), assets
        )
    )


def automation_interval() -> int:
    """Seconds between automation sensor evaluations (``CXR_AUTOMATION_INTERVAL``, 60 by default)."""
    return int(env("CXR_AUTOMATION_INTERVAL"))


def observe_external_schedule(observe_external_job) -> dg.ScheduleDefinition:
    """Observe the external validation sets on the raw dataset's cron; a changed set re-runs its own partition."""

    @dg.schedule(
        name="observe_external_schedule",
        job=observe_external_job,
        cron_schedule=observe_cron(),
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="Observe the external validation sets with the raw dataset; a changed set re-runs its own external validation.",
    )
    def observe_external(context: dg.ScheduleEvaluationContext) -> dg.RunRequest:
        # one observation versions every dataset (the observe function returns a version per partition); the
        # run needs a partition key of the job's partitions, any one
        return dg.RunRequest(run_key=None, partition_key=observe_external_job.partitions_def.get_partition_keys()[0])

    return observe_external


def schedules_and_sensors(observe_job, manifest_job, observe_external_job=None) -> tuple[list, list]:
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
        minimum_interval_seconds=automation_interval(),
        use_user_code_server=True,  # InputsPending and ManifestSliceChanged are Python, evaluated where the code is
        # one run per requested partition, visible in the runs list at once; a backfill would re-check the
        # parents itself and hold partitioned requests back (seen: 14 classifier partitions never started)
        emit_backfills=False,
        description="Evaluates the assets' automation conditions (every 60 s by default, CXR_AUTOMATION_INTERVAL; running by default).",
    )
    schedules = [observe, weekly] + ([observe_external_schedule(observe_external_job)] if observe_external_job is not None else [])
    return schedules, [sensor]
