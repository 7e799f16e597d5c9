"""Every setting, defined once and resolved once per run.

Each setting is a field of a domain dataclass, declared with :func:`setting` (default, one line
of documentation, and what ``null`` means): ``ManifestPolicy``, ``ShardSettings``, ``TrainConfig``
(the classifiers), ``MultilabelConfig``, ``PairsConfig``, ``AdapterConfig``, ``GenerateConfig`` and
:class:`ComputeSettings`. ``$CXR_HOME/pipeline.yaml`` has one section per asset (:func:`sections`),
whose fields are exactly those of the section's dataclass. Everything else is derived from these
dataclasses: the Dagster run configs (``defs.run_config.dagster_config``), the ``cxr-pipeline config``
output, the MLflow params and the generated reference page. A field added to a dataclass is
settable from ``pipeline.yaml``, the launchpad and ``dagster asset materialize --config`` at once.

A value that means "work it out" is ``null`` on a field declared ``auto=...``; :func:`resolve`
works all of them out when a run starts (the report model's image size from its base's tile, the base
path, shard sizes from their consumers, worker and thread counts, the generation
budget), and the run uses and records that resolved configuration. ``null`` on a field declared
``null=...`` is a value with a meaning of its own ("no limit", "random initialisation") and is
recorded as that meaning. A real zero (``seed: 0``, ``dropout: 0.0``) is a zero.

Domain code: no Dagster here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import types
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cxr_pipeline.data.external import ExternalSettings
from cxr_pipeline.data.mimic import ManifestPolicy
from cxr_pipeline.data.shards import ShardSettings
from cxr_pipeline.fields import MISSING, ConfigError, setting
from cxr_pipeline.reports.pairs import PairsConfig
from cxr_pipeline.reports.tiny_base import base_tile_size
from cxr_pipeline.reports.vlm import AdapterConfig, GenerateConfig
from cxr_pipeline.settings import Paths, env, read_pipeline_config, usable_cpus
from cxr_pipeline.vision.drift import DriftSettings
from cxr_pipeline.vision.images import default_workers
from cxr_pipeline.vision.localization_data import LocalizationSettings
from cxr_pipeline.vision.multilabel import MultilabelConfig
from cxr_pipeline.vision.subgroups import AuditSettings
from cxr_pipeline.vision.train import TrainConfig, resolve_precision


@dataclass(frozen=True)
class ComputeSettings:
    """Where training and inference run (the ``compute`` section; the Dagster ``Compute`` resource)."""

    device: str = setting("auto", "torch device: cpu, cuda, cuda:N, or auto (CUDA when present, else the CPU)")
    threads: int | None = setting(None, "CPU threads torch uses", auto="every CPU core this process may use (its affinity)")


def sections() -> dict[str, type]:
    """``pipeline.yaml`` section -> the dataclass its fields come from (the domain declares them; this floor reads them)."""

    return {
        "manifest": ManifestPolicy,
        "image_shards": ShardSettings,
        "classifier": TrainConfig,
        "multilabel_classifier": MultilabelConfig,
        "subgroup_metrics": AuditSettings,
        "external_validation": ExternalSettings,
        "localization_metrics": LocalizationSettings,
        "image_drift": DriftSettings,
        "report_pairs": PairsConfig,
        "report_adapter": AdapterConfig,
        "generated_reports": GenerateConfig,
        "compute": ComputeSettings,
    }


# A section read on top of another: the multi-label model follows the per-pathology recipe.
INHERITS = {"multilabel_classifier": "classifier"}


@dataclass(frozen=True)
class FieldDoc:
    """One field as the reference page and ``cxr-pipeline config --fields`` show it."""

    section: str
    name: str
    type: str
    default: Any
    doc: str
    auto: str | None
    null: str | None


def _type_name(t: Any) -> str:
    if isinstance(t, type) and not typing.get_args(t):
        return t.__name__
    origin, args = typing.get_origin(t), typing.get_args(t)
    if origin in (types.UnionType, typing.Union):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin in (tuple, list):
        return f"list[{_type_name(args[0])}]"
    return str(t)


def field_docs(section: str) -> list[FieldDoc]:
    """Every field of a section, with its type, default and meaning."""
    cls = sections()[section]
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        default = f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]
        if isinstance(default, tuple):
            default = list(default)
        m = f.metadata
        out.append(FieldDoc(section, f.name, _type_name(hints[f.name]), default, m.get("doc", ""), m.get("auto"), m.get("null")))
    return out


def _validate(cls: type, values: Mapping[str, Any], where: str) -> Any:
    """``cls(**values)`` with type checking (pydantic validates stdlib dataclasses), errors naming the field."""
    import pydantic

    try:
        return pydantic.TypeAdapter(cls).validate_python(dict(values))
    except pydantic.ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, err['loc'])) or '(section)'}: {err['msg']}" for err in e.errors())
        raise ConfigError(f"{where}: {problems}") from None
    except ValueError as e:  # a dataclass's own __post_init__ check
        raise ConfigError(f"{where}: {e}") from None


def file_values(paths: Paths, section: str) -> dict[str, Any]:
    """The section's fields as ``pipeline.yaml`` sets them (with its parent section's first); unknown fields fail."""
    data = read_pipeline_config(paths)
    cls = sections()[section]
    names = {f.name for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for name in (INHERITS.get(section), section):
        if name is None:
            continue
        given = data.get(name, {})
        allowed = {f.name for f in dataclasses.fields(sections()[name])}
        unknown = sorted(set(given) - allowed)
        if unknown:
            raise ConfigError(f"{paths.pipeline_config}: {name}: unknown field(s) {', '.join(unknown)}")
        values.update({k: v for k, v in given.items() if k in names})
    return values


def load(paths: Paths, section: str, explicit: Mapping[str, Any] | None = None) -> Any:
    """The section's dataclass: defaults, under ``pipeline.yaml``, under this run's own ``explicit`` fields."""
    if section not in sections():
        raise ConfigError(f"no configuration section {section!r} (sections: {', '.join(sections())})")
    values = {**file_values(paths, section), **(explicit or {})}
    return _validate(sections()[section], values, f"{paths.pipeline_config}: {section}")


# ------------------------------------------------------------------ resolution


def _adapter_base(cfg) -> tuple[str | None, bool]:
    """The report base directory the config names (its own, else ``CXR_VLM_BASE``); None: the tiny base."""
    base = cfg.base or env("CXR_VLM_BASE")
    return (base or None), not base


def _resolve_train(cfg, paths: Paths, derived):
    import torch

    device = torch.device(resolve(paths, "compute").device)
    precision = resolve_precision(cfg.precision, device)
    workers = default_workers(device) if cfg.loader_workers is None else cfg.loader_workers
    return dataclasses.replace(cfg, precision=precision, loader_workers=workers)


def _resolve_adapter(cfg, paths: Paths, derived):

    base, tiny = _adapter_base(cfg)
    if tiny:
        base = str(paths.tiny_base_dir(cfg.tiny_width, cfg.tiny_pretrain_steps, cfg.tiny_vision_pretrain_steps, cfg.tiny_instruct_steps))
    size = cfg.size or base_tile_size(None if tiny else base)
    return dataclasses.replace(cfg, base=base, size=size)


# the sections whose runs read the shards, and how each works out its size (the same code its own run uses;
# no device is resolved for it: no torch import here)
SHARD_CONSUMERS: dict[str, Callable] = {
    "classifier": lambda cfg, paths: cfg.size,
    "multilabel_classifier": lambda cfg, paths: cfg.size,
    "report_adapter": lambda cfg, paths: _resolve_adapter(cfg, paths, {}).size,
}


def shard_sizes(paths: Paths) -> list[int]:
    """Every size a shard consumer reads, as its run will resolve it: what ``image_shards`` builds when its
    ``sizes`` is null."""
    return sorted({size_of(load(paths, section), paths) for section, size_of in SHARD_CONSUMERS.items()})


def _resolve_shards(cfg, paths: Paths, derived):
    sizes = cfg.sizes or shard_sizes(paths)
    return dataclasses.replace(_shard_workers(cfg), sizes=sorted(set(sizes)))


def _shard_workers(cfg):
    return dataclasses.replace(cfg, workers=cfg.workers or usable_cpus())


def _resolve_compute(cfg, paths: Paths, derived):
    device = cfg.device
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    return dataclasses.replace(cfg, device=device, threads=cfg.threads or usable_cpus())


def _resolve_derived(cfg, paths: Paths, derived):
    """Auto fields that depend on the run's inputs, worked out by the caller (``derived``: field -> function)."""
    fill = {k: fn() for k, fn in derived.items() if getattr(cfg, k) is None}
    return dataclasses.replace(cfg, **fill)


RESOLVERS: dict[str, Callable] = {
    "classifier": _resolve_train,
    "multilabel_classifier": _resolve_train,
    "report_adapter": _resolve_adapter,
    "image_shards": _resolve_shards,
    "compute": _resolve_compute,
}


def resolve(
    paths: Paths,
    section: str,
    explicit: Mapping[str, Any] | None = None,
    derived: Mapping[str, Callable[[], Any]] | None = None,
    *,
    partial: bool = False,
) -> Any:
    """The configuration a run of ``section`` uses: ``pipeline.yaml`` + run config + environment, every auto worked out.

    ``derived`` works out the auto fields that need the run's inputs (the generation budget needs the
    training reports and the base's tokenizer). An auto field left null fails (``ConfigError``), unless
    ``partial`` (``cxr-pipeline config`` before those inputs exist), which leaves it null.
    """
    cfg = load(paths, section, explicit)
    cfg = RESOLVERS.get(section, lambda c, p, d: c)(cfg, paths, derived or {})
    cfg = _resolve_derived(cfg, paths, derived or {})
    left = unresolved(cfg)
    if left and not partial:
        raise ConfigError(f"{section}: {', '.join(left)} still auto after resolution")
    return cfg


def section_digest(paths: Paths, section: str) -> str:
    """A short digest of what ``pipeline.yaml`` sets for a section (and the section it inherits; for the shards,
    the sizes their consumers read): part of the asset's code version, so the UI shows which assets'
    configuration changed since they last ran. An unreadable file digests as ``invalid`` (the run will say why)."""
    try:
        data = read_pipeline_config(paths)
        chosen: dict[str, Any] = {name: data.get(name, {}) for name in (INHERITS.get(section), section) if name}
        if section == "image_shards":
            chosen["sizes"] = resolve(paths, section).sizes
    except (ValueError, OSError):
        return "invalid"
    return hashlib.sha256(json.dumps(chosen, sort_keys=True, default=str).encode()).hexdigest()[:8]


def resolved_all(paths: Paths, derived: Mapping[str, Mapping[str, Callable[[], Any]]] | None = None) -> dict[str, dict]:
    """Every section resolved as a run would resolve it now (``cxr-pipeline config``); auto fields that need
    inputs not built yet are shown as ``auto: <rule> (needs its inputs)``."""
    out = {}
    for section in sections():
        cfg = resolve(paths, section, derived=(derived or {}).get(section), partial=True)
        shown = {}
        for d in field_docs(section):
            v = getattr(cfg, d.name)
            if v is None:
                v = f"auto: {d.auto} (worked out when the run starts, from its inputs)" if d.auto else (d.null or "none")
            shown[d.name] = list(v) if isinstance(v, tuple) else v
        out[section] = shown
    return out


def unresolved(cfg: Any) -> list[str]:
    """Auto fields still null (a run must not start with any)."""
    return [f.name for f in dataclasses.fields(cfg) if f.metadata.get("auto") and getattr(cfg, f.name) is None]
