"""How assets are declared: one decorator per group, the specs of multi-assets computed together, the
dependency on every partition, the selected keys of a subset run, and what a GPU step asks for."""

from collections.abc import Mapping
from typing import Any

import dagster as dg


def asset_specs(
    keys: Mapping[str, tuple[str, set[str]]],
    *,
    deps: list[str],
    group: str,
    code_version: str,
    partitions_def: dg.PartitionsDefinition | None = None,
) -> list[dg.AssetSpec]:
    """The specs of a multi-asset whose keys are computed together: ``{key: (description, kinds)}``."""
    return [
        dg.AssetSpec(
            key,
            deps=deps,
            group_name=group,
            code_version=code_version,
            partitions_def=partitions_def,
            description=description,
            kinds=kinds,
        )
        for key, (description, kinds) in keys.items()
    ]


def asset_factory(group: str, code_version: str):
    """``@asset(name, deps, description, kinds, **more)`` for the assets of one group (same group, same code version)."""

    def asset(name: str, deps: list, description: str, kinds: set[str], **more: Any):
        return dg.asset(name=name, deps=deps, group_name=group, code_version=code_version, kinds=kinds, description=description, **more)

    return asset


def every_partition_of(key: str) -> dg.AssetDep:
    """A dependency on all partitions of ``key`` (a classifier reads every shard partition)."""
    return dg.AssetDep(key, partition_mapping=dg.AllPartitionMapping())


def selected_keys(context: dg.AssetExecutionContext) -> set[str]:
    """The asset keys this step was asked for (a multi-asset may be subset)."""
    return {k.to_user_string() for k in context.selected_asset_keys}


# On Kubernetes (docker/helm/values.yaml) the step pod of a GPU asset asks for one GPU.
GPU_TAGS = {"dagster-k8s/config": {"container_config": {"resources": {"limits": {"nvidia.com/gpu": "1"}}}}}


def gpu_asset() -> dict[str, Any]:
    """Decorator arguments of every GPU asset: the ``gpu`` pool, the GPU request on Kubernetes, one retry."""
    return {"pool": "gpu", "op_tags": GPU_TAGS, "retry_policy": dg.RetryPolicy(max_retries=1, delay=10)}
