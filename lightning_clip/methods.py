"""The named clipping methods: each one a threshold policy x a clip operator, with its parameter table.

``METHODS`` is the single source of truth for names, defaults, allowed values and docs; the callback, the Hydra
configs and the README table all follow it. ``resolve`` checks a user's arguments and fills in defaults, so a
wrong value fails when the callback is constructed, naming the parameter, the value and what is allowed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from lightning_clip.operators import (
    ClipOperator,
    GlobalNormClip,
    NoClip,
    TensorNormClip,
    UnitwiseClip,
    ValueClip,
)
from lightning_clip.thresholds import FixedThreshold, ThresholdPolicy

REQUIRED = object()


@dataclass(frozen=True)
class Param:
    """One parameter of a method: its default (or ``REQUIRED``), a normaliser that returns the checked value or
    raises ``ValueError`` with what is allowed, its meaning for the docs, and its type in Hydra schemas."""

    default: Any
    check: Callable[[Any], Any]
    doc: str
    annotation: Any = float


def _positive(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) or value <= 0:
        raise ValueError("a finite number > 0")
    return float(value)


def _norm_type(value: Any) -> float:
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or not (value >= 1):
        raise ValueError("a number >= 1, or 'inf'")
    return float(value)


def _patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("a glob pattern or a list of glob patterns, e.g. ['head.*', 'fc']")


_MAX_NORM = Param(1.0, _positive, "largest norm allowed")
_NORM_TYPE = Param(2.0, _norm_type, "p of the p-norm: 1, 2, ... or inf", Any)


@dataclass(frozen=True)
class Method:
    """A clipping method: its parameter table and how to build (policy, operator) from checked parameters."""

    doc: str
    params: Mapping[str, Param]
    build: Callable[[dict[str, Any]], tuple[ThresholdPolicy, ClipOperator]]
    threshold_param: str | None


METHODS: dict[str, Method] = {
    "none": Method(
        doc="Measure and record only; no gradient is changed.",
        params={},
        build=lambda p: (FixedThreshold(math.inf), NoClip()),
        threshold_param=None,
    ),
    "norm": Method(
        doc="Global norm clipping (Pascanu et al. 2013), as torch.nn.utils.clip_grad_norm_.",
        params={"max_norm": _MAX_NORM, "norm_type": _NORM_TYPE},
        build=lambda p: (FixedThreshold(p["max_norm"]), GlobalNormClip(p["norm_type"])),
        threshold_param="max_norm",
    ),
    "value": Method(
        doc="Element-wise clipping to [-clip_value, clip_value], as torch.nn.utils.clip_grad_value_.",
        params={"clip_value": Param(REQUIRED, _positive, "largest absolute value allowed (required)")},
        build=lambda p: (FixedThreshold(p["clip_value"]), ValueClip()),
        threshold_param="clip_value",
    ),
    "tensor_norm": Method(
        doc="Each parameter tensor clipped to its own max_norm (Keras clipnorm).",
        params={"max_norm": _MAX_NORM, "norm_type": _NORM_TYPE},
        build=lambda p: (FixedThreshold(p["max_norm"]), TensorNormClip(p["norm_type"])),
        threshold_param="max_norm",
    ),
    "agc": Method(
        doc="Unit-wise adaptive gradient clipping (Brock et al. 2021).",
        params={
            "clip_factor": Param(0.01, _positive, "largest ratio of unit gradient norm to unit parameter norm"),
            "eps": Param(1e-3, _positive, "floor on the unit parameter norm (zero-initialised parameters)"),
            "exclude": Param((), _patterns, "glob patterns of parameter or module names left unclipped", list[str]),
        },
        build=lambda p: (FixedThreshold(p["clip_factor"]), UnitwiseClip(p["eps"], p["exclude"])),
        threshold_param="clip_factor",
    ),
}


def resolve(method: str, given: Mapping[str, Any]) -> dict[str, Any]:
    """Check ``given`` (the parameters the user set, ``None`` meaning unset) against ``method``'s table and return
    all its parameters with defaults filled in. Raises ``ValueError`` naming the parameter, value and what is
    allowed."""
    if method not in METHODS:
        raise ValueError(f"method={method!r} is not a clipping method; choose one of: {', '.join(METHODS)}")
    table = METHODS[method].params
    set_params = {k: v for k, v in given.items() if v is not None}
    foreign = sorted(set(set_params) - set(table))
    if foreign:
        takes = ", ".join(table) if table else "no parameters"
        raise ValueError(f"method={method!r} does not take {', '.join(foreign)}; {method!r} takes: {takes}")
    resolved: dict[str, Any] = {}
    for name, spec in table.items():
        value = set_params.get(name, spec.default)
        if value is REQUIRED:
            raise ValueError(f"method={method!r} requires {name} ({spec.doc})")
        try:
            resolved[name] = spec.check(value)
        except ValueError as allowed:
            raise ValueError(f"{name}={value!r} is invalid for method={method!r}: expected {allowed}") from None
    return resolved


def build(method: str, params: Mapping[str, Any]) -> tuple[ThresholdPolicy, ClipOperator]:
    """A fresh (policy, operator) pair for resolved ``params``."""
    return METHODS[method].build(dict(params))
