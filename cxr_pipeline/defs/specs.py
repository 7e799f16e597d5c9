"""How assets are declared, and the declarations more than one asset module shares: one decorator per group,
the specs of multi-assets computed together, the dependency on every partition, the inputs several assets read
(the manifest, every shard partition, every classifier), the selected keys of a subset run (what a step asks for
is ``defs.needs``). Asset modules import from here and the other plumbing modules, never from each other."""

from collections.abc import Mapping
from typing import Any

import dagster as dg

from cxr_pipeline.defs.keys import CLASSIFIER, IMAGE_SHARDS, MANIFEST

CLASSIFIER_CODE_VERSION = "1"


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


def every_partition_handle(key: str) -> dg.AssetIn:
    """An input of every partition of a file asset, loaded as its handle (``defs.io.HandleLoader``), not its data."""
    return dg.AssetIn(key, partition_mapping=dg.AllPartitionMapping(), input_manager_key="handles")


def selected_keys(context: dg.AssetExecutionContext) -> set[str]:
    """The asset keys this step was asked for (a multi-asset may be subset)."""
    return {k.to_user_string() for k in context.selected_asset_keys}


# the manifest as a table (defs.io.TableIOManager)
MANIFEST_IN = dg.AssetIn(MANIFEST, input_manager_key="io_manager")
# how every consumer reads the shards (the classifiers, the report hints, the report adapter and generation):
# all partitions, as a ``defs.io.ShardSet`` whose ``at(size)`` opens the checked handle the readers take
ALL_SHARDS_IN = every_partition_handle(IMAGE_SHARDS)
# every classifier partition, as a handle to the folders (vision.checkpoint.ClassifierSet)
ALL_CLASSIFIERS_IN = every_partition_handle(CLASSIFIER)
# what a classifier trains on: the manifest, every shard partition
TRAINING_INPUTS = {"manifest": MANIFEST_IN, "image_shards": ALL_SHARDS_IN}

classifiers_asset = asset_factory("classifiers", CLASSIFIER_CODE_VERSION)
