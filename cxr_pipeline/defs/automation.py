"""Re-runs on data change: observe the raw dataset on a schedule, let automation carry updates downstream.

Every asset below the raw dataset carries ``AUTOMATION``: Dagster's ``eager``
condition (requested when a parent's data version changes, or when a parent will
be requested in the same tick; never while a parent is missing or running)
and-ed with "every blocking check of the parents passed", so a manifest that
fails its checks stops there. The raw source's data version is a content
fingerprint, so an observation of unchanged data requests nothing.
"""

import dagster as dg

from cxr_pipeline.defs.raw import RAW
from cxr_pipeline.settings import observe_cron

AUTOMATION = dg.AutomationCondition.eager() & dg.AutomationCondition.all_deps_blocking_checks_passed()


def with_automation(assets: list) -> list:
    """The same assets with ``AUTOMATION`` on every spec (the raw source keeps none)."""
    return list(dg.map_asset_specs(lambda spec: spec.replace_attributes(automation_condition=AUTOMATION), assets))


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
        description="Evaluates the assets' automation conditions every minute (running by default).",
    )
    return [observe, weekly], [sensor]
