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
from lightning_clip.thresholds import (
    AdaGCThreshold,
    AutoClipThreshold,
    FixedThreshold,
    ScheduledThreshold,
    ThresholdPolicy,
    ZClipThreshold,
)

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


def _fraction(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value < 1:
        raise ValueError("a number in (0, 1)")
    return float(value)


def _percentile(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not 0 < value <= 100:
        raise ValueError("a number in (0, 100]")
    return float(value)


def _count(value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError("an integer >= 1")
    return value


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("True or False")
    return value


def _optional_positive(value: Any) -> float | None:
    return None if value is None else _positive(value)


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        if value not in options:
            raise ValueError("one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def _patterns(value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("a glob pattern or a list of glob patterns, e.g. ['head.*', 'fc']")


_MAX_NORM = Param(1.0, _positive, "largest norm allowed")
_NORM_TYPE = Param(2.0, _norm_type, "p of the p-norm: 1, 2, ... or inf", Any)
_SCHEDULE = {
    "schedule": Param(
        "constant", _choice(*ScheduledThreshold.SCHEDULES), "the threshold over steps: constant, linear, cosine", str
    ),
    "schedule_steps": Param(1000, _count, "optimizer steps the linear warmup or cosine decay takes", int),
    "schedule_factor": Param(0.1, _positive, "start (linear) or end (cosine) of the schedule, times the threshold"),
}


def _scheduled(value: float, p: dict[str, Any]) -> ThresholdPolicy:
    if p["schedule"] == "constant":
        return FixedThreshold(value)
    return ScheduledThreshold(value, p["schedule"], p["schedule_steps"], p["schedule_factor"])


@dataclass(frozen=True)
class Method:
    """A clipping method: its parameter table and how to build (policy, operator) from checked parameters."""

    doc: str
    params: Mapping[str, Param]
    build: Callable[[dict[str, Any]], tuple[ThresholdPolicy, ClipOperator]]


METHODS: dict[str, Method] = {
    "none": Method(
        doc="Measure and record only; no gradient is changed.",
        params={},
        build=lambda p: (FixedThreshold(math.inf), NoClip()),
    ),
    "norm": Method(
        doc="Global norm clipping (Pascanu et al. 2013), as torch.nn.utils.clip_grad_norm_.",
        params={"max_norm": _MAX_NORM, "norm_type": _NORM_TYPE, **_SCHEDULE},
        build=lambda p: (_scheduled(p["max_norm"], p), GlobalNormClip(p["norm_type"])),
    ),
    "value": Method(
        doc="Element-wise clipping to [-clip_value, clip_value], as torch.nn.utils.clip_grad_value_.",
        params={"clip_value": Param(REQUIRED, _positive, "largest absolute value allowed (required)")},
        build=lambda p: (FixedThreshold(p["clip_value"]), ValueClip()),
    ),
    "tensor_norm": Method(
        doc="Each parameter tensor clipped to its own max_norm (Keras clipnorm).",
        params={"max_norm": _MAX_NORM, "norm_type": _NORM_TYPE, **_SCHEDULE},
        build=lambda p: (_scheduled(p["max_norm"], p), TensorNormClip(p["norm_type"])),
    ),
    "agc": Method(
        doc="Unit-wise adaptive gradient clipping (Brock et al. 2021).",
        params={
            "clip_factor": Param(0.01, _positive, "largest ratio of unit gradient norm to unit parameter norm"),
            "eps": Param(1e-3, _positive, "floor on the unit parameter norm (zero-initialised parameters)"),
            "exclude": Param((), _patterns, "glob patterns of parameter or module names left unclipped", list[str]),
            **_SCHEDULE,
        },
        build=lambda p: (_scheduled(p["clip_factor"], p), UnitwiseClip(p["eps"], p["exclude"])),
    ),
    "autoclip": Method(
        doc="Global norm clipped to a percentile of the history of norms (Seetharaman et al. 2020).",
        params={
            "percentile": Param(10.0, _percentile, "percentile of past global norms used as the threshold"),
            "window": Param(1000, _count, "how many past norms are kept (the paper keeps all)", int),
        },
        build=lambda p: (AutoClipThreshold(p["percentile"], p["window"]), GlobalNormClip(2.0)),
    ),
    "zclip": Method(
        doc="Global norm spikes found by a z-score over EMA statistics (Kumar et al. 2025).",
        params={
            "alpha": Param(0.97, _fraction, "EMA smoothing of the mean and variance of the norm"),
            "z_thresh": Param(2.5, _positive, "z-score above which a norm is a spike"),
            "warmup_steps": Param(25, _count, "steps whose norms start the EMA (no adaptive clipping before)", int),
            "mode": Param("zscore", _choice("zscore", "percentile"), "zscore or percentile", str),
            "clip_option": Param(
                "adaptive_scaling", _choice("adaptive_scaling", "mean"), "zscore mode: clip spikes to", str
            ),
            "clip_factor": Param(1.0, _positive, "scales the adaptive threshold (adaptive_scaling)"),
            "max_norm": Param(None, _optional_positive, "optional absolute cap, warmup included", float | None),
            "skip_update_on_spike": Param(False, _flag, "leave the EMA alone on spikes", bool),
            "eps": Param(1e-6, _positive, "added to the standard deviation in the z-score"),
        },
        build=lambda p: (ZClipThreshold(**p), GlobalNormClip(2.0)),
    ),
    "adagc": Method(
        doc="Per-tensor thresholds from an EMA of each tensor's clipped norm (Wang et al. 2025).",
        params={
            "beta": Param(0.98, _fraction, "EMA smoothing of each tensor's clipped norm"),
            "lambda_rel": Param(1.05, _positive, "threshold = lambda_rel x the tensor's EMA"),
            "lambda_abs": Param(1.0, _positive, "global norm limit during warmup"),
            "warmup_steps": Param(100, _count, "steps of global clipping that start each tensor's threshold", int),
        },
        build=lambda p: (AdaGCThreshold(**p), TensorNormClip(2.0)),
    ),
}

#: Every parameter name of every method (the callback's keyword arguments besides its shared options).
PARAMETER_NAMES: tuple[str, ...] = tuple(dict.fromkeys(name for m in METHODS.values() for name in m.params))


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
