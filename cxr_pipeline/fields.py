"""Configuration fields: how a setting is declared, checked and recorded.

The ground floor of the configuration. Domain dataclasses (``ManifestPolicy``, ``TrainConfig``,
``AdapterConfig`` ...) declare their fields with :func:`setting` and check them with
:func:`at_least_one`; :func:`record` and :func:`params` write a resolved configuration as runs record
it. Assembling the sections and resolving them for a run is ``cxr_pipeline.config``, a floor above
the domain: the domain imports this module, never that one.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

MISSING = dataclasses.MISSING


def setting(default: Any, doc: str, *, auto: str | None = None, null: str | None = None) -> Any:
    """A configuration field: its default and documentation, and what ``null`` means.

    ``auto``: null is worked out at run start by :func:`resolve` (the text says how).
    ``null``: null is a value with this meaning (for example "no limit"), kept as it is.
    """
    meta = {"doc": doc, "auto": auto, "null": null}
    if isinstance(default, list | dict | set):
        return dataclasses.field(default_factory=lambda d=default: type(d)(d), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


def at_least_one(obj: Any, *names: str) -> None:
    """Refuse 0 (or less) on limit and count fields: "no limit" and "work it out" are null, never a magic 0."""
    for name in names:
        v = getattr(obj, name)
        if v is not None and v < 1:
            raise ValueError(f"{name} must be at least 1, or null ({_null_meaning(obj, name)}), not {v}")


def _null_meaning(obj: Any, name: str) -> str:
    f = next(f for f in dataclasses.fields(obj) if f.name == name)
    return f.metadata.get("null") or f"auto: {f.metadata.get('auto')}"


class ConfigError(ValueError):
    """A configuration that cannot be used; the message names the file, section and field."""


def record(cfg: Any) -> dict[str, Any]:
    """A resolved configuration as it is recorded (MLflow params, Dagster metadata, cards): every field, and a
    null that means something (``null=``) written as its meaning. An auto field still null is an error."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cfg):
        v = getattr(cfg, f.name)
        if v is None:
            if f.metadata.get("auto"):
                raise ConfigError(f"{type(cfg).__name__}.{f.name}: not resolved (auto: {f.metadata['auto']})")
            v = f.metadata.get("null") or "none"
        out[f.name] = list(v) if isinstance(v, tuple) else v
    return out


def params(cfg: Any, prefix: str = "") -> dict[str, str]:
    """``record(cfg)`` as MLflow params (strings; lists as JSON)."""
    return {prefix + k: json.dumps(v) if isinstance(v, list | dict) else str(v) for k, v in record(cfg).items()}
