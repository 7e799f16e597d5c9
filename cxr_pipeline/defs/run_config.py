"""Run configuration: each configured asset's Dagster config class generated from its ``pipeline.yaml``
section, the resolved settings a run uses, and code versions that show whose configuration changed."""

from collections.abc import Mapping
from typing import Any

import dagster as dg

from cxr_pipeline.config import field_docs, resolve, section_digest, sections
from cxr_pipeline.defs.needs import failure
from cxr_pipeline.fields import ConfigError
from cxr_pipeline.settings import Paths


def section_model(section: str, name: str, base: type, *, optional: bool = False, doc: str | None = None) -> type:
    """A pydantic model (a Dagster config class or a resource) with one field per field of a ``pipeline.yaml``
    section's dataclass (``cxr_pipeline.config``): same names, types, defaults and descriptions. ``optional``:
    every field defaults to null, meaning "as ``pipeline.yaml`` says" (a resource's overrides)."""
    import typing

    import pydantic

    hints = typing.get_type_hints(sections()[section])

    def field(d):
        t = hints[d.name]
        if typing.get_origin(t) is tuple:  # Dagster config has lists, not tuples
            t = list[typing.get_args(t)[0]]
        if optional:
            return t | None, pydantic.Field(default=None, description=d.doc)
        return t, pydantic.Field(default=d.default, description=_field_description(d))

    return pydantic.create_model(name, __base__=base, __doc__=doc or base.__doc__, **{d.name: field(d) for d in field_docs(section)})


def dagster_config(section: str, name: str) -> type[dg.Config]:
    """The Dagster run config of an asset, generated from its ``pipeline.yaml`` section's dataclass, so the
    launchpad and ``dagster asset materialize --config`` accept exactly what ``pipeline.yaml`` does, with no
    second list."""
    doc = f"``pipeline.yaml`` section ``{section}``: this run's own values override the file's, field by field."
    return section_model(section, name, dg.Config, doc=doc)


def _field_description(d) -> str:
    if d.auto:
        return f"{d.doc}. null: auto ({d.auto})"
    if d.null:
        return f"{d.doc}. null: {d.null}"
    return d.doc


def run_settings(
    context: dg.AssetExecutionContext, paths: Paths, section: str | None = None, derived: Mapping[str, Any] | None = None
) -> Any:
    """The resolved configuration this run uses (``config.resolve``): the section's defaults, under
    ``$CXR_HOME/pipeline.yaml``, under what this run's own run config sets (field by field), every auto
    worked out. ``section`` defaults to the asset's own name.

    Dagster hands an asset its defaults wherever the run config is silent (runs started by automation,
    a schedule, a plain Materialize click); reading the file here, when the run starts, makes all of
    those follow the user's configuration. A bad file or field fails the run, naming both.
    """

    op = context.op_def.name
    explicit = (context.run_config.get("ops", {}).get(op) or {}).get("config") or {}
    try:
        return resolve(paths, section or op, explicit, derived)
    except ConfigError as e:
        raise failure(str(e)) from None


# assets computed with another asset's section (built by the same step)
_SECTION_OF = {"manifest_rejects": "manifest", "shard_rejects": "image_shards", "report_hints": "multilabel_classifier"}


def with_config_versions(assets: list, paths: Paths) -> list:
    """Each configured asset's code version followed by its ``pipeline.yaml`` section's digest
    (``config.section_digest``), so the UI shows which assets' configuration changed since they were last
    materialized. Dagster treats a changed code version as stale but never as a reason to start a run
    (the automation conditions look at data versions only): a user re-runs them when they choose."""

    def versioned(spec: dg.AssetSpec) -> dg.AssetSpec:
        key = spec.key.to_user_string()
        section = _SECTION_OF.get(key, key)
        if section not in sections():
            return spec
        return spec.replace_attributes(code_version=f"{spec.code_version or '1'}+cfg.{section_digest(paths, section)}")

    return [a.map_asset_specs(versioned) if isinstance(a, dg.AssetsDefinition) else a for a in assets]
