"""The clipping methods: one frozen dataclass per method, the one definition everything else follows.

A method is a threshold policy (``thresholds.py``: what limit applies) times a clip operator (``operators.py``: how
gradients are measured and scaled). Its dataclass holds its parameters with their defaults, meanings and checks,
and builds the (policy, operator) pair the engine runs. The callback's keyword arguments, its error messages, the
Hydra schemas (``configs.py``) and the README's parameter tables all come from these classes::

    from lightning_clip import AGC, GradientClipping
    GradientClipping(AGC(clip_factor=0.02))            # a method object
    GradientClipping("agc", clip_factor=0.02)          # the same, by name (Hydra, LightningCLI)

A value out of range raises ``ValueError`` naming the parameter, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from collections.abc import Callable, Mapping
from typing import Any, ClassVar

import torch

from lightning_clip.operators import (
    ClipOperator,
    GlobalNormClip,
    NoClip,
    SpikeAwareClip,
    TensorNormClip,
    UnitwiseClip,
    ValueClip,
)
from lightning_clip.thresholds import (
    AdaGCThreshold,
    AutoClipThreshold,
    DelayedThreshold,
    FixedThreshold,
    ScheduledThreshold,
    ThresholdPolicy,
    UnitUpdateCap,
    ZClipThreshold,
)


# ------------------------------------------------------------------------------------------------- checks
def is_number(value: Any) -> bool:
    """A real number that is not a bool: Python's ``int`` and ``float``, and NumPy's scalars (``np.float32``)."""
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def is_count(value: Any) -> bool:
    """An integer >= 1 that is not a bool (NumPy's integers too)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= 1


def _positive(value: Any) -> float:
    if not is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError("a finite number > 0")
    return float(value)


def _norm_type(value: Any) -> float:
    if isinstance(value, str) and value.lower() in ("inf", "infinity"):
        return math.inf
    if not is_number(value) or not (value >= 1):
        raise ValueError("a number >= 1, or 'inf'")
    return float(value)


def _fraction(value: Any) -> float:
    if not is_number(value) or not 0 < value < 1:
        raise ValueError("a number in (0, 1)")
    return float(value)


def _percentile(value: Any) -> float:
    if not is_number(value) or not 0 < value <= 100:
        raise ValueError("a number in (0, 100]")
    return float(value)


def _count(value: Any) -> int:
    if not is_count(value):
        raise ValueError("an integer >= 1")
    return int(value)


def _flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError("True or False")
    return value


def _non_negative(value: Any) -> float:
    if not is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError("a finite number >= 0")
    return float(value)


def _optional_positive(value: Any) -> float | None:
    return None if value is None else _positive(value)


def _choice(*options: str) -> Callable[[Any], str]:
    def check(value: Any) -> str:
        value = getattr(value, "value", value)  # a str Enum from a Hydra schema
        if value not in options:
            raise ValueError("one of " + ", ".join(repr(o) for o in options))
        return value

    return check


def patterns(value: Any) -> tuple[str, ...]:
    """A glob or a list of globs, as a tuple."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ValueError("a glob pattern or a list of glob patterns, e.g. ['head.*', 'fc']")


def parameter(default: Any, check: Callable[[Any], Any], doc: str, annotation: Any = float) -> Any:
    """A method parameter: its default (``dataclasses.MISSING`` when required), the check that normalises it or
    raises ``ValueError`` with what is allowed, its meaning (docs, README, errors) and its Hydra type."""
    metadata = {"check": check, "doc": doc, "annotation": annotation}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


_SCHEDULES = ScheduledThreshold.SCHEDULES


def _warmup_update_ratio(off: str = "the paper's warmup") -> Any:
    return parameter(
        1e-3,
        _non_negative,
        "while the method's statistics are collected (warmup), the global gradient norm is at most this times the "
        "global parameter norm divided by the learning rate (the optimizer's largest), so that a plain SGD step "
        f"moves the parameters by at most this fraction of their norm; 0: {off}",
    )


# ------------------------------------------------------------------------------------------------- methods
@dataclasses.dataclass(frozen=True, kw_only=True)
class Method:
    """Base of every clipping method: checks its fields on construction; ``build()`` gives a fresh (policy,
    operator) pair. ``name`` is the method's name in configs; ``renamed`` maps former keyword names to current
    ones; ``preset`` gives required parameters the value the packaged Hydra config starts from."""

    name: ClassVar[str]
    renamed: ClassVar[Mapping[str, str]] = {}
    preset: ClassVar[Mapping[str, Any]] = {}

    exclude: tuple[str, ...] = parameter(
        (),
        patterns,
        "glob patterns of parameter names (`head.weight`) or module names (`head`) left unclipped: not scaled and "
        "not counted in the norm the method acts on, still measured, guarded and recorded",
        list[str],
    )

    def __post_init__(self) -> None:
        for spec in dataclasses.fields(self):
            value = getattr(self, spec.name)
            try:
                checked = spec.metadata["check"](value)
            except ValueError as allowed:
                raise ValueError(
                    f"{spec.name}={value!r} is invalid for method={self.name!r}: expected {allowed}"
                ) from None
            object.__setattr__(self, spec.name, checked)

    def build(self) -> tuple[ThresholdPolicy, ClipOperator]:
        raise NotImplementedError

    def params(self) -> dict[str, Any]:
        """The parameters and their values (tuples as lists, as configs and loggers hold them)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def specs(cls) -> list[dataclasses.Field]:
        """The parameters' fields (name, default, ``metadata['doc']`` ...), in declaration order."""
        return list(dataclasses.fields(cls))

    @classmethod
    def summary(cls) -> str:
        return " ".join((cls.__doc__ or "").split("\n\n")[0].split())


@dataclasses.dataclass(frozen=True, kw_only=True)
class _Scheduled(Method):
    """A fixed threshold, or one that follows a schedule over optimizer steps."""

    schedule: str = parameter(
        "constant",
        _choice(*_SCHEDULES),
        "the threshold over optimizer steps: `constant`, `linear` (warmup from `schedule_factor` x the threshold "
        "to it), `cosine` (decay from the threshold to `schedule_factor` x it)",
        str,
    )
    schedule_steps: int = parameter(
        1000, _count, "optimizer steps the warmup or decay takes (skipped ones count); the end value holds after", int
    )
    schedule_factor: float = parameter(
        0.1, _positive, "start (linear) or end (cosine) of the schedule, as a fraction of the threshold (> 0)"
    )

    def _threshold(self, value: float) -> ThresholdPolicy:
        if self.schedule == "constant":
            return FixedThreshold(value)
        return ScheduledThreshold(value, self.schedule, self.schedule_steps, self.schedule_factor)


@dataclasses.dataclass(frozen=True, kw_only=True)
class NoClipping(Method):
    """Measure and record only; no gradient is changed."""

    name = "none"

    def build(self):
        return FixedThreshold(math.inf), NoClip()


@dataclasses.dataclass(frozen=True, kw_only=True)
class Norm(_Scheduled):
    """Global norm clipping (Pascanu et al. 2013, "On the difficulty of training recurrent neural networks"): all
    gradients scaled so that their global norm is at most ``max_norm``, as ``torch.nn.utils.clip_grad_norm_``."""

    name = "norm"
    max_norm: float = parameter(1.0, _positive, "largest global norm allowed (> 0)")
    norm_type: float = parameter(2.0, _norm_type, "p of the p-norm: 1, 2, ... or `inf`", Any)

    def build(self):
        return self._threshold(self.max_norm), GlobalNormClip(self.norm_type)


@dataclasses.dataclass(frozen=True, kw_only=True)
class Value(Method):
    """Element-wise clipping to ``[-clip_value, clip_value]``, as ``torch.nn.utils.clip_grad_value_``."""

    name = "value"
    preset = {"clip_value": 1.0}
    clip_value: float = parameter(dataclasses.MISSING, _positive, "largest absolute value allowed (> 0; required)")

    def build(self):
        return FixedThreshold(self.clip_value), ValueClip()


@dataclasses.dataclass(frozen=True, kw_only=True)
class TensorNorm(_Scheduled):
    """Each parameter tensor clipped to its own ``max_norm`` (Keras ``clipnorm``, as opposed to
    ``global_clipnorm``)."""

    name = "tensor_norm"
    max_norm: float = parameter(1.0, _positive, "largest norm allowed per tensor (> 0)")
    norm_type: float = parameter(2.0, _norm_type, "p of the p-norm: 1, 2, ... or `inf`", Any)

    def build(self):
        return self._threshold(self.max_norm), TensorNormClip(self.norm_type)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AGC(_Scheduled):
    """Unit-wise adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition
    Without Normalization", section 4.1): each unit's gradient norm (a row of a weight, an output channel of a conv
    kernel, a whole 1-D tensor) is at most ``clip_factor`` times its parameter norm; the schedule applies to
    ``clip_factor``. The paper leaves the final classifier unclipped: ``exclude=["head"]``."""

    name = "agc"
    clip_factor: float = parameter(
        0.01,
        _positive,
        "largest ratio of a unit's gradient norm to its parameter norm (> 0); the schedule applies to it",
    )
    eps: float = parameter(
        1e-3, _positive, "floor on the unit parameter norm, so zero-initialised parameters can still learn (> 0)"
    )
    max_update_ratio: float = parameter(
        1e-3,
        _non_negative,
        "the clip factor is also at most this divided by the learning rate (the optimizer's largest), so that a plain "
        "SGD step changes a unit by at most this fraction of its norm at any rate; 0: the paper's AGC",
    )

    def build(self):
        policy = self._threshold(self.clip_factor)
        if self.max_update_ratio:
            policy = UnitUpdateCap(policy, self.max_update_ratio)
        return policy, UnitwiseClip(self.eps)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AutoClip(Method):
    """AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks"):
    global norm clipping at the ``percentile``-th percentile of the global norms seen so far (current included)."""

    name = "autoclip"
    renamed = {"warmup_clip_factor": "warmup_update_ratio"}
    percentile: float = parameter(
        10.0, _percentile, "percentile of past global norms used as the threshold, in (0, 100]"
    )
    window: int = parameter(
        1000, _count, "how many past norms are kept (the paper keeps all; a ring buffer on the device)", int
    )
    warmup_steps: int = parameter(25, _count, "finite steps on which `warmup_update_ratio` also caps the norm", int)
    warmup_update_ratio: float = _warmup_update_ratio()
    clipped_history: bool = parameter(
        True,
        _flag,
        "the history holds each step's norm after clipping, so exploding raw norms never set the threshold (False: "
        "the raw norms, as the paper)",
        bool,
    )

    def build(self):
        policy = AutoClipThreshold(
            self.percentile, self.window, self.warmup_steps, self.warmup_update_ratio, self.clipped_history
        )
        return policy, GlobalNormClip(2.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class ZClip(Method):
    """ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"): a global norm whose
    z-score over EMA statistics of past norms exceeds ``z_thresh`` is a spike, and is clipped."""

    name = "zclip"
    renamed = {
        "clip_factor": "threshold_scale",
        "max_norm": "threshold_cap",
        "skip_update_on_spike": "freeze_on_spike",
        "eps": "std_eps",
        "warmup_clip_factor": "warmup_update_ratio",
    }
    alpha: float = parameter(0.97, _fraction, "EMA smoothing of the norm's mean and variance, in (0, 1)")
    z_thresh: float = parameter(2.5, _positive, "z-score above which a norm is a spike (> 0)")
    warmup_steps: int = parameter(
        25, _count, "finite steps whose norms start the EMA; no adaptive clipping before", int
    )
    mode: str = parameter(
        "zscore",
        _choice("zscore", "percentile"),
        "`zscore`: spikes are clipped as `clip_option` says; `percentile`: norms above `mean + z_thresh * std` are "
        "clipped to it",
        str,
    )
    clip_option: str = parameter(
        "adaptive_scaling",
        _choice("adaptive_scaling", "mean"),
        "`zscore` mode: `adaptive_scaling` clips a spike with z-score z to `mean + z_thresh * std / (z / "
        "z_thresh)`, `mean` clips it to the mean",
        str,
    )
    threshold_scale: float = parameter(
        1.0, _positive, "scales the `adaptive_scaling` threshold (< 1 clips harder; the reference code's `clip_factor`)"
    )
    threshold_cap: float | None = parameter(
        None,
        _optional_positive,
        "optional absolute cap on the threshold, warmup included (the reference code's `max_norm`, 1.0 there; none "
        "here, so nothing needs tuning)",
        float | None,
    )
    freeze_on_spike: bool = parameter(
        False,
        _flag,
        "leave the EMA unchanged on spikes (by default it takes the clipped value; the reference code's "
        "`skip_update_on_spike`)",
        bool,
    )
    std_eps: float = parameter(1e-6, _positive, "added to the standard deviation in the z-score (> 0)")
    warmup_update_ratio: float = _warmup_update_ratio()
    clipped_warmup: bool = parameter(
        True,
        _flag,
        "the warmup collects each norm after its clip, so exploding raw norms never start the EMA (False: the raw "
        "norms, as the reference code)",
        bool,
    )

    def build(self):
        policy = ZClipThreshold(
            alpha=self.alpha,
            z_thresh=self.z_thresh,
            warmup_steps=self.warmup_steps,
            mode=self.mode,
            clip_option=self.clip_option,
            clip_factor=self.threshold_scale,
            max_norm=self.threshold_cap,
            skip_update_on_spike=self.freeze_on_spike,
            eps=self.std_eps,
            update_ratio=self.warmup_update_ratio,
            clipped_warmup=self.clipped_warmup,
        )
        return policy, GlobalNormClip(2.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class AdaGC(Method):
    """AdaGC (Wang et al. 2025, "AdaGC: Improving Training Stability for Large Language Model Pretraining"):
    per-tensor clipping at ``lambda_rel`` times an EMA of each tensor's clipped norm, after a global-norm warmup."""

    name = "adagc"
    renamed = {"warmup_clip_factor": "warmup_update_ratio"}
    beta: float = parameter(0.98, _fraction, "EMA smoothing of each tensor's clipped norm, in (0, 1)")
    lambda_rel: float = parameter(1.05, _positive, "each tensor is clipped to `lambda_rel` x its EMA (> 0)")
    lambda_abs: float | None = parameter(
        None,
        _optional_positive,
        "the paper's global norm limit during warmup, in gradient units (> 0); None: `warmup_update_ratio` instead",
        float | None,
    )
    warmup_steps: int = parameter(
        100,
        _count,
        "finite steps of global clipping, after which each tensor's threshold starts as `warmup_threshold` says",
        int,
    )
    warmup_update_ratio: float = _warmup_update_ratio("no global clip during warmup (with `lambda_abs=None`)")
    warmup_threshold: str = parameter(
        "ema",
        _choice("ema", "min"),
        "what each tensor's threshold starts from after warmup: `ema` of its clipped norms during warmup (the scale "
        "the run has reached), `min` the smallest it had (the paper's; a quiet stretch early in warmup then clips "
        "every later step to it)",
        str,
    )

    def build(self):
        ratio = self.warmup_update_ratio
        policy = AdaGCThreshold(
            self.beta, self.lambda_rel, self.lambda_abs, self.warmup_steps, ratio, self.warmup_threshold
        )
        return policy, TensorNormClip(2.0)


@dataclasses.dataclass(frozen=True, kw_only=True)
class SPAM(Method):
    """SPAM's spike-aware clipping (Huang et al. 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable LLM
    Training"): each gradient element whose square exceeds ``theta`` times the optimizer's second moment becomes
    ``sign(g) * sqrt(theta * v)``. Needs an Adam-family optimizer (Adam, AdamW, NAdam, RAdam)."""

    name = "spam"
    #: Optimizers whose state holds Adam's second moment ``exp_avg_sq`` (their fused and foreach variants too).
    optimizers: ClassVar[tuple[type, ...]] = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam)
    theta: float = parameter(5000.0, _positive, "an element is a spike when g**2 > theta x its second moment (> 0)")
    warmup_steps: int = parameter(
        20, _count, "clipping starts at this optimizer step, once the second moment has history", int
    )

    def build(self):
        return DelayedThreshold(self.theta, self.warmup_steps), SpikeAwareClip()


#: The methods by name, in the order the docs list them.
METHODS: dict[str, type[Method]] = {
    cls.name: cls for cls in (NoClipping, Norm, Value, TensorNorm, AGC, AutoClip, ZClip, AdaGC, SPAM)
}

#: Every parameter name of every method: the callback's keyword arguments besides its own options.
PARAMETER_NAMES: tuple[str, ...] = tuple(dict.fromkeys(f.name for m in METHODS.values() for f in m.specs()))


def from_arguments(method: str, given: Mapping[str, Any]) -> Method:
    """The method named ``method`` from keyword arguments (``None`` meaning unset), as the callback receives them.
    Raises ``ValueError`` for an unknown method, a parameter it does not take (naming the new name of a renamed
    one), a missing required parameter, or a value out of range."""
    cls = METHODS.get(method)
    if cls is None:
        raise ValueError(f"method={method!r} is not a clipping method; choose one of: {', '.join(METHODS)}")
    given = {k: v for k, v in given.items() if v is not None}
    takes = [f.name for f in cls.specs()]
    foreign = sorted(set(given) - set(takes))
    if foreign:
        renames = [f"{old} is now {cls.renamed[old]}" for old in foreign if old in cls.renamed]
        hint = f" ({'; '.join(renames)})" if renames else ""
        raise ValueError(
            f"method={method!r} does not take {', '.join(foreign)}{hint}; {method!r} takes: {', '.join(takes)}"
        )
    for spec in cls.specs():
        if spec.default is dataclasses.MISSING and spec.name not in given:
            raise ValueError(f"method={method!r} requires {spec.name} ({spec.metadata['doc']})")
    return cls(**given)


def parameter_table() -> str:
    """The README's table of each method's own parameters (``| method | parameter | default | meaning |``)."""
    shared = {spec.name for spec in Method.specs()}  # every method's (``exclude``): in the options table
    rows = ["| method | parameter | default | meaning |", "|---|---|---|---|"]
    for name, cls in METHODS.items():
        for spec in cls.specs():
            if spec.name in shared:
                continue
            default = "required" if spec.default is dataclasses.MISSING else f"`{spec.default}`"
            rows.append(f"| `{name}` | `{spec.name}` | {default} | {spec.metadata['doc']} |")
    return "\n".join(rows)
