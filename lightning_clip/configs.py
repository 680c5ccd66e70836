"""Hydra: typed schemas for the ``clipping`` config group, and the group itself shipped inside the package.

Each method's schema (a dataclass registered as ``clipping/<method>_schema`` in Hydra's ConfigStore) is built from
the method's definition (``methods.py``) and ``GradientClipping``'s own options, so a misspelled key or a value of
the wrong type fails when Hydra composes the config; the packaged YAML files (``lightning_clip/conf/clipping/``) are
written from the same definitions (:func:`packaged_yaml`, checked by the tests). A Hydra app reaches the group
without copying files by adding the package to its search path; Hydra then imports ``lightning_clip.conf``, which
registers the schemas (``import lightning_clip`` alone imports no Hydra)::

    hydra:
      searchpath: [pkg://lightning_clip.conf]
    defaults:
      - clipping: agc

``hydra.utils.instantiate(cfg.clipping)`` then gives the callback; its own checks run there, before training.
"""

from __future__ import annotations

import dataclasses
import enum
import inspect
import math
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lightning_clip.callback import GradientClipping
from lightning_clip.methods import METHODS

NonFiniteMode = enum.Enum("NonFiniteMode", {"skip": "skip", "raise": "raise", "ignore": "ignore"}, type=str)

#: Types of GradientClipping's options that every method shares (defaults come from its signature).
OPTION_TYPES: dict[str, Any] = {
    "nonfinite": NonFiniteMode,
    "max_consecutive_skips": int,
    "skip_spikes": float | None,
    "spike_window": int,
    "track_max": bool | None,
    "log_every_n_steps": int | None,
    "layer_stats": bool,
    "layer_depth": int | None,
    "per_parameter": bool,
    "layer_include": list[str] | None,
    "layer_exclude": list[str] | None,
    "log_grad_max": bool,
    "log_updates": bool,
    "histogram_every": int | None,
    "histogram_bins": int,
    "heatmap_every": int | None,
    "progress_bar": bool,
    "name": str | None,
    "optimizers": list[int] | None,
}


def _option_defaults() -> dict[str, Any]:
    signature = inspect.signature(GradientClipping.__init__)
    return {name: signature.parameters[name].default for name in OPTION_TYPES}


def schema(method: str) -> type:
    """The structured config (a dataclass) of one method: target, method name, its parameters, shared options."""
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, dataclasses.field(default="lightning_clip.GradientClipping")),
        ("_convert_", str, dataclasses.field(default="all")),
        ("method", str, dataclasses.field(default=method)),
    ]
    for spec in METHODS[method].specs():
        default = MISSING if spec.default is dataclasses.MISSING else spec.default
        if isinstance(default, tuple):
            fields.append((spec.name, spec.metadata["annotation"], dataclasses.field(default_factory=list)))
        else:
            fields.append((spec.name, spec.metadata["annotation"], dataclasses.field(default=default)))
    for name, value in _option_defaults().items():
        annotation = OPTION_TYPES[name]
        default = NonFiniteMode(value) if annotation is NonFiniteMode else value
        fields.append((name, annotation, dataclasses.field(default=default)))
    return dataclasses.make_dataclass(f"{method.title().replace('_', '')}Clipping", fields)


def register_configs() -> None:
    """Register ``clipping/<method>_schema`` for every method in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    for method in METHODS:
        store.store(group="clipping", name=f"{method}_schema", node=schema(method))


def _yaml_value(value: Any) -> str:
    if value is None or value is dataclasses.MISSING:
        return "null" if value is None else "???"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, tuple):
        return "[" + ", ".join(value) + "]"
    if isinstance(value, float):  # YAML 1.1 reads 1e-06 as a string: give the mantissa a dot
        mantissa, e, exponent = repr(value).partition("e")
        return ".inf" if value == math.inf else mantissa + ("" if "." in mantissa or not e else ".0") + e + exponent
    return str(value)


def packaged_yaml(method: str) -> str:
    """The text of ``lightning_clip/conf/clipping/<method>.yaml``: the method's summary, its schema, and each
    parameter with its default and meaning."""
    cls = METHODS[method]
    lines = [
        f"# {cls.summary()}",
        "# Generated from lightning_clip/methods.py by lightning_clip.configs.packaged_yaml.",
    ]
    lines += ["defaults:", f"  - {method}_schema", "  - _self_"]
    for spec in cls.specs():
        value = _yaml_value(cls.preset.get(spec.name, spec.default))
        lines.append(f"{spec.name}: {value}  # {spec.metadata['doc']}")
    return "\n".join(lines) + "\n"
