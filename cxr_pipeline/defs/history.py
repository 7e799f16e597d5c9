"""What the instance remembers of other assets: an upstream data version, a field of the latest
materialization's metadata (the shard check and automation read them)."""

import dagster as dg


def upstream_data_version(context: dg.AssetExecutionContext, key: str, *, is_source: bool) -> str:
    """The latest recorded data version of an upstream asset, or 'unobserved'."""
    from dagster._core.definitions.data_version import extract_data_version_from_entry

    rec = context.instance.get_latest_data_version_record(dg.AssetKey(key), is_source=is_source)
    if rec is None:
        return "unobserved"
    dv = extract_data_version_from_entry(rec.event_log_entry)
    return dv.value if dv else "unobserved"


def latest_metadata(instance: dg.DagsterInstance, key: str, partition: str | None, field: str):
    """A field of the latest materialization's metadata of ``key`` (one partition, or unpartitioned), or None."""
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(key), asset_partitions=[partition] if partition else None), limit=1
    ).records
    if not records or records[0].asset_materialization is None:
        return None
    value = records[0].asset_materialization.metadata.get(field)
    return None if value is None else value.value
