"""The clipping engine for one optimizer: measure, threshold, clip, guard, record. Plain PyTorch, no Lightning.

    clipper = Clipper(AGC(clip_factor=0.02), model.named_parameters(), optimizer=optimizer)
    loss.backward()
    clipper.step()
    optimizer.step()

One call of :meth:`Clipper.step` is one optimizer step::

    measure    per-tensor norms (foreach kernels), when the operator, the NaN/Inf guard or the record needs them
    guard      NaN/Inf anywhere: skip the step (grads set to None), raise, or leave it to a GradScaler
    threshold  the policy's limit for this step
    clip       the operator scales the gradients in place
    observe    the policy updates its state, masked so that a non-finite step never enters it
    record     on recording steps only: per-tensor L2 norms before and after, as device tensors

The only device-to-host read outside recording steps is the guard's one scalar (``nonfinite="skip"`` or
``"raise"``), the same read a GradScaler pays to skip a step. With ``nonfinite="ignore"``, or when a GradScaler
already checks, there is none.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_clip.methods import Method
from lightning_clip.operators import NORM_EPS, Applied, GlobalNormClip, Measured, NoClip, Threshold, tensor_norms
from lightning_clip.params import Layout, ParamSet, matches_any
from lightning_clip.sharding import FlatShard
from lightning_clip.spikes import SpikeSkipper
from lightning_clip.stats import LayerMaxima, LayerStats, parameter_norms
from lightning_clip.thresholds import ReadsLearningRate, per_tensor_state

NonFinite = Literal["skip", "raise", "ignore"]
NONFINITE_MODES: tuple[str, ...] = ("skip", "raise", "ignore")


def _clear_folded(optimizer: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
    """After a fused optimizer's step: drop the clip coefficient and skip flag handed to it for that step."""
    for name in ("grad_scale", "found_inf"):
        if hasattr(optimizer, name):
            delattr(optimizer, name)


class NonFiniteGradientError(RuntimeError):
    """Gradients held NaN/Inf and the clipper was told to raise (or skipped too many steps in a row)."""


@dataclass
class SpikeReport:
    """A step skipped as a gradient-norm spike: its global norm, and the tensor whose norm grew most against its own
    recent level (``ratio`` times it)."""

    tensor: str
    ratio: float
    norm: float


@dataclass
class StepRecord:
    """What one recorded step measured, as device tensors (read to the host in one transfer by the caller).

    ``grad_norms`` / ``clipped_norms`` are the per-tensor L2 norms before / after clipping, in the order of
    ``names``; ``clipped_steps`` / ``judged_steps`` count, since the previous record, the steps on which clipping
    changed a gradient and the steps on which that was known. ``layers`` / ``layer_stats`` hold the per-layer
    statistics (see ``stats.py``) when the clipper has a :class:`LayerStats`; ``param_norms`` then the per-tensor
    parameter norms they came from (kept on the device, for the update statistics)."""

    names: list[str]
    grad_norms: Tensor
    clipped_norms: Tensor
    threshold: Threshold
    clipped_steps: Tensor
    judged_steps: int
    nonfinite_steps: Tensor
    skipped_steps: int
    spike_skipped_steps: int | None = None
    norm_max: Tensor | None = None
    layers: list[str] = field(default_factory=list)
    layer_stats: dict[str, Tensor] = field(default_factory=dict)
    param_norms: Tensor | None = None

    def read(self) -> HostRecord:
        """Everything recorded, read to the host in ONE transfer: one ``cat`` on the device, one ``tolist``."""
        stats = dict(self.layer_stats)
        histogram = stats.pop("grad_hist", None)
        grad_norm = torch.linalg.vector_norm(self.grad_norms)
        on_device = isinstance(self.threshold, Tensor)
        threshold = self.threshold.mean() if on_device else torch.tensor(math.nan)
        norm_max = self.norm_max if self.norm_max is not None else torch.tensor(math.nan)
        scalars = [grad_norm, torch.linalg.vector_norm(self.clipped_norms), self.clipped_steps, self.nonfinite_steps]
        parts = [torch.stack([t.reshape(()).to(grad_norm) for t in [*scalars, threshold, norm_max]])]
        parts += [v.reshape(-1).to(grad_norm) for v in stats.values()]
        if histogram is not None:
            parts.append(histogram.reshape(-1).to(grad_norm))
        values = torch.cat(parts).tolist()  # the one transfer of a recording step
        norm, clipped, clipped_steps, nonfinite_steps, threshold_value, norm_max_value = values[:6]
        if not on_device:  # a host-side threshold stays exact
            threshold_value = float(self.threshold)
        layer_stats, start = {}, 6
        for name in stats:
            layer_stats[name] = values[start : start + len(self.layers)]
            start += len(self.layers)
        return HostRecord(
            grad_norm=norm,
            clipped_norm=clipped,
            threshold=threshold_value,
            clipped_steps=clipped_steps,
            judged_steps=self.judged_steps,
            nonfinite_steps=nonfinite_steps,
            skipped_steps=self.skipped_steps,
            spike_skipped_steps=self.spike_skipped_steps,
            norm_max=norm_max_value if self.norm_max is not None else None,
            layers=self.layers,
            layer_stats=layer_stats,
            histograms=values[start:] if histogram is not None else None,
        )


@dataclass
class HostRecord:
    """A :class:`StepRecord` read to the host: global norms before / after clipping, the threshold (its mean when
    per tensor; inf when none applies), step counts since the previous record (``skipped_steps`` over the run), and
    per-layer statistics as lists in the order of ``layers``; ``histograms`` holds layers x bins counts."""

    grad_norm: float
    clipped_norm: float
    threshold: float
    clipped_steps: float
    judged_steps: int
    nonfinite_steps: float
    skipped_steps: int
    spike_skipped_steps: int | None
    norm_max: float | None
    layers: list[str]
    layer_stats: dict[str, list[float]]
    histograms: list[float] | None

    def metrics(self) -> dict[str, float]:
        """The logged scalars: ``grad/norm``, ``grad/norm_clipped``, ``clip/coef``, ``clip/nonfinite_steps``,
        ``clip/skipped_steps``, ``clip/threshold`` (when finite), ``clip/rate`` (when known), ``<stat>/<layer>``."""
        norm, clipped = self.grad_norm, self.clipped_norm
        metrics = {
            "grad/norm": norm,
            "grad/norm_clipped": clipped,
            "clip/coef": clipped / norm if norm > 0 else 1.0,
            "clip/nonfinite_steps": self.nonfinite_steps,
            "clip/skipped_steps": float(self.skipped_steps),
        }
        if self.spike_skipped_steps is not None:
            metrics["clip/spike_skipped_steps"] = float(self.spike_skipped_steps)
        if self.norm_max is not None:
            metrics["grad/norm_max"] = self.norm_max
        if math.isfinite(self.threshold):
            metrics["clip/threshold"] = self.threshold
        if self.judged_steps:
            metrics["clip/rate"] = self.clipped_steps / self.judged_steps
        for stat, values in self.layer_stats.items():
            metrics.update({f"{stat}/{layer}": value for layer, value in zip(self.layers, values)})
        return metrics


def _listed(names: list[str]) -> str:
    """The first ten names, and how many more."""
    return ", ".join(names[:10]) + (f" and {len(names) - 10} more" if len(names) > 10 else "")


def _named(params: Any) -> list[tuple[str, Tensor]]:
    """``(name, tensor)`` pairs from named parameters (pairs or a mapping) or from bare tensors (``param_<i>``)."""
    if isinstance(params, Tensor):
        params = [params]
    items = list(params.items() if isinstance(params, Mapping) else params)
    pairs = []
    for i, item in enumerate(items):
        if isinstance(item, Tensor):
            item = (f"param_{i}", item)
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
            raise TypeError(f"Clipper takes (name, parameter) pairs or parameters; item {i} is {type(item).__name__}")
        pairs.append(item)
    return pairs


class Clipper:
    """Clips the gradients of one optimizer's parameters with a clipping method (``methods.py``), given as the
    ``(name, parameter)`` pairs of those parameters (``model.named_parameters()``, or the optimizer's tensors with
    their names), or the parameters alone as ``clip_grad_norm_`` takes them (a tensor or an iterable of tensors,
    named ``param_<i>`` in records and errors). ``flat_shards`` describes FSDP1's flat shards
    (:func:`lightning_clip.sharding.fsdp1_shards`).

    A step is non-finite when the measured norm is NaN/Inf: a NaN/Inf element, or gradients so large that their norm
    overflows float32 (stepping with them would make the parameters Inf).

    ``nonfinite``: ``"skip"`` sets the gradients to None so the optimizer step changes nothing (counted; after
    ``max_consecutive_skips`` skips in a row it raises), ``"raise"`` raises an error naming the tensors holding
    NaN/Inf, ``"ignore"`` does not look. ``scaler_checks_nonfinite=True`` (fp16 with a GradScaler, which skips
    such steps itself) replaces both by a device-side count, with no host read. After a step that ``skip`` skipped,
    ``last_nonfinite`` names the tensors whose full gradient held NaN/Inf, in optimizer order (an empty list when
    only the global norm overflowed); it is ``None`` after a step that was not skipped. The names come from the
    per-tensor norms after their collective, so under FSDP every rank names the tensors, whichever rank's shard
    held the NaN.

    ``stats`` adds per-layer statistics to each record; they are computed on recording steps only.
    """

    def __init__(
        self,
        method: Method,
        named_params: Iterable[tuple[str, Tensor]] | Mapping[str, Tensor] | Iterable[Tensor] | Tensor,
        *,
        flat_shards: Mapping[int, FlatShard] | None = None,
        optimizer: torch.optim.Optimizer | None = None,
        nonfinite: NonFinite = "skip",
        max_consecutive_skips: int = 20,
        scaler_checks_nonfinite: bool = False,
        stats: LayerStats | None = None,
        skip_spikes: float | None = None,
        spike_window: int = 128,
        track_max: bool | None = None,
        fused: bool | None = None,
        grad_scaler: torch.amp.GradScaler | None = None,
    ) -> None:
        if nonfinite not in NONFINITE_MODES:
            raise ValueError(f"nonfinite={nonfinite!r} is not one of {NONFINITE_MODES}")
        if skip_spikes is not None and (nonfinite != "skip" or scaler_checks_nonfinite):
            raise ValueError("skip_spikes needs nonfinite='skip' and no GradScaler (it owns the skip under fp16)")
        self.method = method
        self.policy, self.operator = method.build()
        self._hold(_named(named_params), flat_shards)
        measures = isinstance(self.operator, GlobalNormClip) or (
            isinstance(self.operator, NoClip) and nonfinite != "ignore"
        )
        foldable = measures and not method.exclude
        supports = optimizer is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        if grad_scaler is not None and not (supports and scaler_checks_nonfinite):
            raise ValueError("grad_scaler is for a fused optimizer under fp16: pass it with scaler_checks_nonfinite")
        # a GradScaler hands a fused optimizer its scale at the step: the gradients here still carry it
        self.grad_scaler, self._optimizer = grad_scaler, optimizer
        can_fold = foldable and supports and (not scaler_checks_nonfinite or grad_scaler is not None)
        self.fused = bool(can_fold) if fused is None else fused
        if self.fused:
            if not can_fold:
                raise ValueError(
                    "fused=True needs a fused optimizer, a global-coefficient method, and under fp16 the GradScaler"
                )
            if grad_scaler is None:  # a GradScaler deletes both attributes after the step itself
                optimizer.register_step_post_hook(_clear_folded)
            self._device_skips = torch.zeros((), dtype=torch.long)
            self._consecutive = torch.zeros((), dtype=torch.long)
            self._flags: Tensor | None = None  # per tensor of the param set: 1.0 if NaN/Inf since the report
        if isinstance(self.policy, ReadsLearningRate) and self.policy.reads_learning_rate:
            if optimizer is None:
                ratio = self.policy.ratio_parameter
                raise ValueError(
                    f"method={method.name!r} bounds a relative update by {ratio}, which reads the learning rate: "
                    f"pass Clipper(..., optimizer=...), or {ratio}=0 for the paper's method"
                )
            self.policy.optimizer = optimizer
        if self.operator.reads_optimizer:
            if optimizer is None:
                raise ValueError(
                    f"method={method.name!r} reads the optimizer's state: pass Clipper(..., optimizer=...)"
                )
            self.operator.bind(optimizer)
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.scaler_checks_nonfinite = scaler_checks_nonfinite
        self.stats = stats
        self.last_nonfinite: list[str] | None = None
        l2_every_step = (self.operator.measures_always or self.reads_host) and self.operator.norm_type == 2.0
        self.track_max = l2_every_step if track_max is None else track_max
        self._norm_max: Tensor | None = None  # since the last record: the global L2 norm's max, and each layer's
        self._layer_max = LayerMaxima()
        self.spikes = SpikeSkipper(skip_spikes, spike_window) if skip_spikes is not None else None
        self.last_spike: SpikeReport | None = None
        self.spike_skipped_steps = 0
        self.steps = 0
        self.skipped_steps = 0
        self.consecutive_skips = 0
        self._nonfinite_steps = torch.zeros(())
        self._clipped_steps = torch.zeros(())
        self._judged_steps = 0

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        """The optimizer this Clipper was built for (its learning rate, its state, the fused path)."""
        return self._optimizer

    @property
    def skipped_this_step(self) -> bool:
        """Whether the last step was skipped (its gradients set to None)."""
        return self.last_nonfinite is not None or self.last_spike is not None

    @property
    def reads_host(self) -> bool:
        """Whether each step reads one scalar to the host to act on NaN/Inf gradients."""
        return self.nonfinite != "ignore" and not self.scaler_checks_nonfinite

    @torch.no_grad()
    def step(self, record: bool = False, histogram: bool = False) -> StepRecord | None:
        """Clip the gradients in place; returns a :class:`StepRecord` when ``record`` is true, else None.
        ``histogram`` adds per-layer gradient histograms to a record (with ``stats``). Runs under ``no_grad``."""
        if self.params is None:
            raise RuntimeError("this Clipper was released (its fit ended); build a new one for new parameters")
        self.last_nonfinite, self.last_spike = None, None
        layout = self.params.layout()
        if layout is None:
            return None
        self.steps += 1
        if self.grad_scaler is not None and not self.fused:
            self.grad_scaler.unscale_(self._optimizer)  # the scaler's own pass, as it makes for unfused optimizers
        grads = layout.grads()
        watch = self.reads_host or self.scaler_checks_nonfinite
        measured = clipped = self._clip_while_measuring(layout, grads, record)
        if measured is None and (self.operator.measures_always or watch or record):
            measured = self.operator.measure(layout, grads)
        unscale = self._unscale_factor()
        if unscale is not None and measured is not None:
            measured = measured.scaled(unscale)
        finite = torch.isfinite(measured.overall) if watch and measured is not None else None
        if finite is not None:
            self._count(finite, measured.overall)
        l2 = self._l2_norms(layout, grads, measured, unscale) if self.track_max or record else None  # once a step
        if self.track_max:
            self._track_max(layout, l2)
        if self.fused:
            return self._folded_step(layout, grads, measured, l2 if record else None, histogram, unscale)
        if self.reads_host:
            proceed, levels = finite, None
            if self.spikes is not None:
                spike, levels = self.spikes.judge(layout, measured.overall, measured.norms, finite)
                proceed = finite & ~spike
            if not bool(proceed):  # the one host read of a non-recording step
                if not bool(finite):
                    return self._nonfinite_step(layout, grads, measured, record)
                return self._spike_step(layout, grads, measured, levels, record)
            self.consecutive_skips = 0

        grad_norms = l2 if record else None
        before = self.stats.before_clip(layout, grads, histogram) if record and self.stats else {}
        threshold = self.policy.threshold(layout, measured, finite)
        reported = self.policy.reported(threshold) if record else threshold
        if clipped is not None:
            applied = Applied(changed=measured.total > threshold, scale=None)
        else:
            applied = self.operator.apply(layout, grads, measured, threshold)
        self.policy.observe(layout, measured, applied, finite)
        if applied.changed is not None:
            self._judged(applied.changed, measured.total.device if measured else "cpu")
        if not record:
            return None
        if applied.scale is not None:
            clipped_norms = grad_norms * applied.scale.to(grad_norms)
        else:
            clipped_norms = tensor_norms(layout, grads, 2.0)
            if applied.changed is None:  # SPAM does not know without a measurement; a record has one per tensor
                self._judged((clipped_norms < grad_norms).any(), grad_norms.device)
        return self._record(layout, grad_norms, clipped_norms, reported, before)

    def _judged(self, changed: Tensor | bool, device: torch.device | str) -> None:
        """Count a step on which whether clipping changed a gradient is known (``clip/rate``)."""
        self._clipped_steps = self._clipped_steps.to(device) + changed
        self._judged_steps += 1

    def _clip_while_measuring(self, layout: Layout, grads: list[Tensor], record: bool) -> Measured | None:
        """With ``nonfinite="skip"``, on a step that records nothing: clip and measure together where the operator
        can (``value``: in one pass on CUDA, tensor by tensor on CPU), instead of measuring every tensor, reading the
        check, then clipping every tensor. The gradients are clipped before the check is read; a step found
        non-finite is skipped all the same (its gradients set to None), and its tensors are named from the
        measurement, taken before the clip. ``None``: nothing done."""
        if record or self.fused or not self.operator.clips_while_measuring or self.nonfinite != "skip":
            return None
        if self.scaler_checks_nonfinite or self.track_max or self.spikes is not None:
            return None
        return self.operator.clip_measuring(layout, grads, self.policy.threshold(layout, None))

    def _folded_step(
        self,
        layout: Layout,
        grads: list[Tensor],
        measured: Measured,
        grad_norms: Tensor | None,
        histogram: bool,
        unscale: Tensor | None,
    ) -> StepRecord | None:
        """The fused-optimizer path: the clip coefficient becomes the optimizer's ``grad_scale`` (its kernel divides
        the gradients by it as it reads them) and the skip decision its ``found_inf`` (the kernel then leaves
        parameters, moments and step counts unchanged). Nothing is read from the device: skips are counted there and
        reported (names, the ``max_consecutive_skips`` guard) with the next record, in one read."""
        finite = torch.isfinite(measured.overall)
        scaled = self.grad_scaler is not None  # the GradScaler sets found_inf and skips non-finite steps itself
        skip = ~finite if self.nonfinite == "skip" and not scaled else torch.zeros_like(finite)
        if self.spikes is not None and self.nonfinite == "skip":
            spike, _ = self.spikes.judge(layout, measured.overall, measured.norms, finite)
            skip = skip | (spike & finite)
        self._device_skips = self._device_skips.to(skip.device) + skip.long()
        self._consecutive = torch.where(skip, self._consecutive.to(skip.device) + 1, 0)
        flags = (~torch.isfinite(measured.norms)).to(measured.norms.dtype)
        held, index = per_tensor_state(self._flags, layout, flags, 0.0)
        self._flags = torch.maximum(held, flags) if index is None else held.index_put((index,), held[index].fmax(flags))
        record = grad_norms is not None
        before = self.stats.before_clip(layout, grads, histogram) if record and self.stats else {}
        if "grad_max" in before and unscale is not None:
            before["grad_max"] = before["grad_max"] * unscale.to(before["grad_max"])
        usable = finite & ~skip  # what the policy's state may learn from
        threshold = self.policy.threshold(layout, measured, usable)
        reported = self.policy.reported(threshold) if record else threshold
        coef = torch.clamp(threshold / (measured.total + NORM_EPS), max=1.0).float()
        # the kernel divides by grad_scale (a GradScaler multiplies in its own scale first, "the product of the scales")
        self._optimizer.grad_scale = torch.where(skip | ~finite, 1.0, 1.0 / coef)
        if not scaled:
            self._optimizer.found_inf = skip.float()
        applied = Applied(changed=coef < 1.0, scale=coef.expand(len(layout)))
        self.policy.observe(layout, measured, applied, usable)
        self._clipped_steps = self._clipped_steps.to(coef.device) + (applied.changed & ~skip)
        self._judged_steps += 1
        if not record:
            return None
        self._report_device_skips(layout)
        return self._record(layout, grad_norms, grad_norms * torch.where(skip, 0.0, coef), reported, before)

    def _report_device_skips(self, layout: Layout | None) -> None:
        """One read of the fused path's counters: skips since the last report, the streak, the tensors. Past
        ``max_consecutive_skips``, one more read names the parameters of ``layout`` that hold NaN/Inf, if any."""
        skips, streak, *flags = torch.cat([self._device_skips.reshape(1), self._consecutive.reshape(1),
                                           self._flags.long()]).tolist()  # fmt: skip
        new, self.skipped_steps, self.consecutive_skips = skips - self.skipped_steps, skips, streak
        self._flags = None
        self.last_nonfinite = [name for name, flag in zip(self.params.names, flags) if flag] if new else None
        if streak > self.max_consecutive_skips:
            if layout is not None:
                params_nonfinite = ~torch.isfinite(tensor_norms(layout, layout.local_params(), 2.0))
                broken = [name for name, flag in zip(layout.names, params_nonfinite.tolist()) if flag]
                if broken:
                    raise self._broken_parameters(broken)
            raise NonFiniteGradientError(
                f"{streak} optimizer steps in a row were skipped (non-finite gradients or spikes; "
                f"max_consecutive_skips={self.max_consecutive_skips}), seen at a record of the fused-optimizer path. "
                "Training is diverging or the data holds NaN/Inf: lower the learning rate or check the inputs."
            )

    def flush(self) -> None:
        """Bring the fused path's device counters to the host (at the end of a fit; the gradients may be gone)."""
        if self.fused and self._flags is not None and self.params is not None:
            self._report_device_skips(self.params.layout())

    def _track_max(self, layout: Layout, norms: Tensor) -> None:
        """Keep the running max since the last record of the global L2 norm and of each layer's (NaN ignored), on
        the device: a spike on a step that is not recorded still shows in the next record."""
        total = torch.linalg.vector_norm(norms)
        self._norm_max = total if self._norm_max is None else torch.fmax(self._norm_max.to(total), total)
        if self.stats is not None:
            index = self.stats.index(layout, norms.device)
            self._layer_max.add(index, index.l2(norms))

    def _count(self, finite: Tensor, like: Tensor) -> None:
        self._nonfinite_steps = self._nonfinite_steps.to(like.device) + (~finite).to(like.dtype)

    def _unscale_factor(self) -> Tensor | None:
        """On the fused path under fp16, ``1 / the GradScaler's scale`` that the gradients still carry, as a device
        tensor (``GradScaler.get_scale()`` would read it to the host); else None."""
        if self.grad_scaler is None or not self.fused:
            return None
        return self.grad_scaler._scale.double().reciprocal().float()

    @staticmethod
    def _l2_norms(layout: Layout, grads: list[Tensor], measured: Measured | None, unscale: Tensor | None) -> Tensor:
        if measured is not None and measured.norm_type == 2.0:
            return measured.norms  # already unscaled
        norms = tensor_norms(layout, grads, 2.0)
        return norms if unscale is None else norms * unscale.to(norms)

    def _record(
        self, layout: Layout, grad_norms: Tensor, clipped_norms: Tensor, threshold: Threshold, before: dict
    ) -> StepRecord:
        record = StepRecord(
            names=layout.names,
            grad_norms=grad_norms,
            clipped_norms=clipped_norms,
            threshold=threshold,
            clipped_steps=self._clipped_steps,
            judged_steps=self._judged_steps,
            nonfinite_steps=self._nonfinite_steps,
            skipped_steps=self.skipped_steps,
            spike_skipped_steps=self.spike_skipped_steps if self.spikes is not None else None,
        )
        if self.stats is not None:
            record.layers = self.stats.index(layout, grad_norms.device).layers
            record.param_norms = parameter_norms(layout, grad_norms)
            record.layer_stats = self.stats.compute(layout, grad_norms, record.param_norms, before)
            layer_max = self._layer_max.take(self.stats.index(layout, grad_norms.device))
            if layer_max is not None:
                record.layer_stats["grad_norm_max"] = layer_max
        record.norm_max = self._norm_max
        self._norm_max = None
        self._clipped_steps = torch.zeros_like(self._clipped_steps)
        self._judged_steps = 0
        return record

    def _nonfinite_step(
        self, layout: Layout, grads: list[Tensor], measured: Measured, record: bool
    ) -> StepRecord | None:
        """Name the tensors whose gradients, and those whose parameters, hold NaN/Inf (per full tensor, after the
        collective; one read, on this step only), then raise or skip. Non-finite parameters end training at once:
        every later gradient is non-finite too, so skipping steps would only wait for ``max_consecutive_skips``."""
        flags = (~torch.isfinite(torch.stack([measured.norms, parameter_norms(layout, measured.norms)]))).tolist()
        bad, broken = ([name for name, flag in zip(layout.names, row) if flag] for row in flags)
        if bad:
            listed = _listed(bad)
        else:
            listed = "no single tensor (every tensor's norm is finite; their global norm overflowed float32)"
        if broken:
            raise self._broken_parameters(broken)
        if self.nonfinite == "raise":
            raise NonFiniteGradientError(
                f"non-finite gradients (a NaN/Inf element, or a norm beyond float32) at optimizer step {self.steps} "
                f"in: {listed}. "
                "Use nonfinite='skip' to skip such steps instead."
            )
        self.last_nonfinite = bad
        return self._skip(layout, grads, record, f"had non-finite gradients (NaN/Inf); last in: {listed}")

    def _broken_parameters(self, names: list[str]) -> NonFiniteGradientError:
        return NonFiniteGradientError(
            f"non-finite parameters (NaN/Inf) at optimizer step {self.steps}: {_listed(names)}. The step's gradients "
            "are non-finite, and skipping steps cannot mend a parameter, so training stops here. Parameters are "
            "written by optimizer steps (or loaded from a checkpoint): an optimizer that overflows on finite "
            "gradients does this, e.g. Adam's eps=1e-8, which is 0 in float16 (precision='16-true'): use "
            "'bf16-mixed' or '16-mixed', or a larger eps."
        )

    def _spike_step(
        self, layout: Layout, grads: list[Tensor], measured: Measured, levels: Tensor, record: bool
    ) -> StepRecord | None:
        """A finite step whose global norm is a spike (``spikes.py``): skipped like a non-finite one, and the
        tensor whose norm grew most against its own level is named (one read, on this skipped step only; a tensor
        seen for the first time has no level, so no ratio)."""
        ratios = (measured.norms / levels.to(measured.norms)).nan_to_num(0.0)
        read = torch.stack([ratios.argmax().to(ratios), ratios.max(), measured.overall.to(ratios)])
        index, ratio, norm = read.tolist()
        self.last_spike = SpikeReport(layout.names[int(index)], ratio, norm)
        self.spike_skipped_steps += 1
        return self._skip(layout, grads, record, "were gradient-norm spikes (skip_spikes)")

    def _skip(self, layout: Layout, grads: list[Tensor], record: bool, why: str) -> StepRecord | None:
        """Set the gradients to None, so the optimizer step changes no parameter and no optimizer state."""
        grad_norms = tensor_norms(layout, grads, 2.0) if record else None
        before = self.stats.before_clip(layout, grads) if record and self.stats else {}
        for p in layout.params:
            p.grad = None
        self.policy.skipped()
        self.skipped_steps += 1
        self.consecutive_skips += 1
        if self.consecutive_skips > self.max_consecutive_skips:
            raise NonFiniteGradientError(
                f"{self.consecutive_skips} optimizer steps in a row {why} and were skipped "
                f"(max_consecutive_skips={self.max_consecutive_skips}). Training is diverging or the data holds "
                "NaN/Inf: lower the learning rate or check the inputs."
            )
        if grad_norms is None:
            return None
        return self._record(layout, grad_norms, torch.zeros_like(grad_norms), math.nan, before)

    def follow(
        self,
        named_params: Iterable[tuple[str, Tensor]] | Iterable[Tensor],
        flat_shards: Mapping[int, FlatShard] | None = None,
    ) -> None:
        """Take the parameters of an optimizer that gained some after this Clipper was built
        (``optimizer.add_param_group``, as Lightning's ``BackboneFinetuning`` does when it unfreezes a backbone):
        they are clipped from the next step on, with the others (the global norm covers them all). The parameters
        held so far keep their positions, so per-tensor state (AdaGC's thresholds) stays with its tensor, and a new
        tensor starts as one first seen (AdaGC: from its first norm). Parameters dropped or reordered would move
        that state onto other tensors: refused."""
        if self.params is None:
            raise RuntimeError("this Clipper was released (its fit ended); build a new one for new parameters")
        pairs = _named(named_params)
        held = self.params.params
        if len(pairs) < len(held) or any(p is not q for (_, p), q in zip(pairs, held)):
            raise ValueError(
                f"the optimizer's parameters changed from {len(held)} to {len(pairs)} other than by adding "
                "parameter groups after its own (optimizer.add_param_group): per-tensor clipping state would move "
                "onto other tensors"
            )
        self._hold(pairs, flat_shards)

    def _hold(self, pairs: list[tuple[str, Tensor]], flat_shards: Mapping[int, FlatShard] | None) -> None:
        """Take these ``(name, parameter)`` pairs, once the operator has checked those it clips: their names (kept
        after :meth:`release`) and their :class:`ParamSet`."""
        clipped = [(name, p) for name, p in pairs if not matches_any(name, self.method.exclude)]
        self.operator.check([name for name, _ in clipped], [p for _, p in clipped])
        self.names = [name for name, _ in pairs]
        self.params: ParamSet | None = ParamSet(self.names, [p for _, p in pairs], flat_shards, self.method.exclude)

    def release(self) -> None:
        """Drop every reference to the parameters (their layouts and gradients), keeping the counters and the
        policy's state: a callback reused over several fits keeps no model of an earlier fit alive."""
        self.params = self._optimizer = self.grad_scaler = None
        if isinstance(self.policy, ReadsLearningRate):
            self.policy.optimizer = None
        if self.operator.reads_optimizer:
            self.operator.bind(None)

    def state_dict(self) -> dict[str, Any]:
        return {
            "steps": self.steps,
            "skipped_steps": self.skipped_steps,
            "consecutive_skips": self.consecutive_skips,
            "nonfinite_steps": self._nonfinite_steps.detach().cpu(),
            "policy": self.policy.state_dict(),
            **(
                {"spikes": self.spikes.state_dict(), "spike_skipped_steps": self.spike_skipped_steps}
                if self.spikes
                else {}
            ),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.steps = state["steps"]
        self.skipped_steps = state["skipped_steps"]
        self.consecutive_skips = state["consecutive_skips"]
        self._nonfinite_steps = state["nonfinite_steps"].clone()
        self.policy.load_state_dict(state["policy"])
        if self.spikes is not None and "spikes" in state:
            self.spikes.load_state_dict(state["spikes"])
            self.spike_skipped_steps = state["spike_skipped_steps"]
