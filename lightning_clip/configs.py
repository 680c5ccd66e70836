"""Hydra: typed schemas for the ``clipping`` config group, and the group itself shipped inside the package.

Importing ``lightning_clip`` registers one schema per method in Hydra's ConfigStore (``clipping/<method>_schema``),
built from the method's parameter table and ``GradientClipping``'s own options, so a misspelled key or a value of
the wrong type fails when Hydra composes the config. The YAML files of the group live in
``lightning_clip/conf/clipping/``; a Hydra app reaches them without copying files by adding the package to its
search path::

    hydra:
      searchpath: [pkg://lightning_clip.conf]
    defaults:
      - clipping: agc

``hydra.utils.instantiate(cfg.clipping)`` then gives the callback; its own checks run there, before training.
"""

from __future__ import annotations

import enum
import inspect
from dataclasses import field, make_dataclass
from typing import Any

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lightning_clip.methods import METHODS, REQUIRED

NonFiniteMode = enum.Enum("NonFiniteMode", {"skip": "skip", "raise": "raise", "ignore": "ignore"}, type=str)

#: Types of GradientClipping's options that every method shares (defaults come from its signature).
OPTION_TYPES: dict[str, Any] = {
    "nonfinite": NonFiniteMode,
    "max_consecutive_skips": int,
    "log_every_n_steps": int | None,
    "layer_stats": bool,
    "layer_depth": int | None,
    "per_parameter": bool,
    "layer_include": list[str] | None,
    "layer_exclude": list[str] | None,
    "log_grad_max": bool,
    "histogram_every": int | None,
    "histogram_bins": int,
    "heatmap_every": int | None,
    "progress_bar": bool,
}


def _option_defaults() -> dict[str, Any]:
    from lightning_clip.callback import GradientClipping

    signature = inspect.signature(GradientClipping.__init__)
    return {name: signature.parameters[name].default for name in OPTION_TYPES}


def schema(method: str) -> type:
    """The structured config (a dataclass) of one method: target, method name, its parameters, shared options."""
    fields: list[tuple[str, Any, Any]] = [
        ("_target_", str, field(default="lightning_clip.GradientClipping")),
        ("_convert_", str, field(default="all")),
        ("method", str, field(default=method)),
    ]
    for name, param in METHODS[method].params.items():
        default = MISSING if param.default is REQUIRED else param.default
        if isinstance(default, tuple):
            fields.append((name, param.annotation, field(default_factory=lambda d=default: list(d))))
        else:
            fields.append((name, param.annotation, field(default=default)))
    defaults = _option_defaults()
    for name, annotation in OPTION_TYPES.items():
        default = defaults[name]
        if annotation is NonFiniteMode:
            default = NonFiniteMode(default)
        fields.append((name, annotation, field(default=default)))
    return make_dataclass(f"{method.title().replace('_', '')}Clipping", fields)


def register_configs() -> None:
    """Register ``clipping/<method>_schema`` for every method in Hydra's ConfigStore."""
    store = ConfigStore.instance()
    for method in METHODS:
        store.store(group="clipping", name=f"{method}_schema", node=schema(method))
