"""Threshold policies: what limit a clip operator enforces on a given step.

A policy is the other half of a clipping method (``operators.py`` holds the first). It reads what the operator
measured, returns the threshold in force, and after the step observes the outcome to update its own state.

Adaptive state lives in device tensors and is updated with tensor ops (``torch.where``), never read back to the
host, and never from a non-finite step: every update is masked with ``isfinite`` of the measured norm, so an fp16
overflow step that a GradScaler skips (or a NaN step under ``nonfinite="ignore"``) leaves the state as it was. Nor
from a step whose gradients are all 0 (a tensor's, for AdaGC's per-tensor state), which says nothing of the norms'
scale: the state would fall to 0 and clip every step after to nothing.

On CUDA the adaptive policies (AutoClip, ZClip, AdaGC) take their whole step, threshold and state update, in one
kernel (``threshold_kernels.py``), from ``threshold``; their ``observe`` then has nothing left to do. The PyTorch
code below defines them and runs everywhere else.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_clip import threshold_kernels
from lightning_clip.operators import NORM_EPS, Applied, Measured, Threshold, tensor_norms
from lightning_clip.params import Layout


class ThresholdPolicy:
    """Base policy: a threshold per step, optional state."""

    def threshold(self, layout: Layout, measured: Measured | None, finite: Tensor | None = None) -> Threshold:
        """This step's threshold. ``finite`` is what ``observe`` will be given: a policy that updates its state
        here, in the same kernel (``threshold_kernels.py``), masks the update with it."""
        raise NotImplementedError

    def observe(self, layout: Layout, measured: Measured | None, applied: Applied, finite: Tensor | None) -> None:
        """Update state after clipping; ``finite`` is a 0-d bool tensor when the clipper checked for NaN/Inf."""

    def skipped(self) -> None:
        """A step the clipper skipped on the host, before its threshold was set (nothing is observed from it)."""

    def reported(self, threshold: Threshold) -> Threshold:
        """The threshold to record as ``clip/threshold`` (by default the one clipping used)."""
        return threshold

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


def resized_ring(history: Tensor, count: int, window: int) -> Tensor:
    """A ring buffer of the last ``count`` values (slot ``i % len``) moved to one of ``window`` slots, keeping the
    most recent values that fit; unfilled slots are NaN."""
    if history.numel() == window:
        return history.clone()
    kept = min(count, history.numel(), window)
    order = torch.arange(count - kept, count)
    empty = torch.full((window,), math.nan, dtype=history.dtype)
    return empty.index_put((order % window,), history[order % history.numel()])


#: Floor on the parameter norm in :func:`update_guard` (AGC's default ``eps``).
PARAMETER_FLOOR = 1e-3


def warming_up(steps: int, warmup_steps: int) -> bool:
    """Whether the warmup guard is computed this step, from the steps taken (a host count: no read). The device
    counts only finite steps, so the guard is computed for twice the warmup; past that a warmup still unfinished
    (more non-finite steps than warmup steps) goes unguarded."""
    return steps < 2 * warmup_steps


def learning_rate(optimizer: torch.optim.Optimizer) -> float | Tensor:
    """The largest learning rate among the optimizer's parameter groups, read as it is now (a scheduler changes it
    between steps); a tensor when a group holds its rate as one (no host read)."""
    rates = [group["lr"] for group in optimizer.param_groups]
    held = [rate for rate in rates if isinstance(rate, Tensor)]
    if held:
        return torch.stack([_device_scalar(rate, held[0].device) for rate in rates]).max()
    return max(rates)


def _device_scalar(value: float | Tensor, device: torch.device) -> Tensor:
    """A 0-d float32 tensor on ``device``; a host float is filled in there, not copied (a copy may synchronise)."""
    if isinstance(value, Tensor):
        return value.to(device, torch.float32).reshape(())
    return torch.full((), float(value), dtype=torch.float32, device=device)


def update_guard(layout: Layout, like: Tensor, update_ratio: float, lr: float | Tensor) -> Tensor:
    """``update_ratio`` times the global L2 norm of the parameters that are clipped, divided by the learning rate
    ``lr``: the largest global gradient norm with which a plain SGD step ``lr * g`` moves the parameters by at most
    ``update_ratio`` of their norm. The adaptive methods apply it while their own statistics are collected. It
    follows the model's scale, as AGC's unit-wise limit does (Brock et al. 2021, who state it as the relative
    update ``||dW|| / ||W||``), and the learning rate, as LARS's trust ratio does (You et al. 2017, "Large Batch
    Training of Convolutional Networks"), so it needs no threshold in gradient units; 1e-3 is the relative update
    both name as typical. One more read of the parameters (and, sharded, one more collective) per step, during warmup
    only. As AGC's ``eps``, a floor of 1e-3 on the parameter norm keeps zero-initialised parameters learning; a rate
    of 0 gives no limit (nothing moves)."""
    norms = tensor_norms(layout, layout.local_params(), 2.0).to(like)
    if layout.clip_mask is not None:
        norms = torch.where(layout.clip_mask.to(norms.device), norms, 0.0)
    limit = update_ratio * torch.linalg.vector_norm(norms).clamp(min=PARAMETER_FLOOR)
    return limit / (lr.to(like) if isinstance(lr, Tensor) else lr)  # a host float: no copy to the device


class ReadsLearningRate:
    """Mixed into the policies that bound a relative update ``lr * ||g|| / ||W||`` by ``update_ratio``: they read
    the learning rate from the optimizer the clipper binds (``optimizer``) when ``update_ratio`` is set.
    ``ratio_parameter`` names the method parameter that sets it, for messages."""

    update_ratio: float = 0.0
    ratio_parameter: str = "warmup_update_ratio"
    optimizer: torch.optim.Optimizer | None = None

    @property
    def reads_learning_rate(self) -> bool:
        return bool(self.update_ratio)

    def _learning_rate(self) -> float | Tensor:
        if self.optimizer is None:
            raise RuntimeError(f"{self.ratio_parameter} reads the learning rate: bind the policy's optimizer first")
        return learning_rate(self.optimizer)

    def _guard(self, layout: Layout, like: Tensor) -> Tensor:
        return update_guard(layout, like, self.update_ratio, self._learning_rate())


class UnitUpdateCap(ReadsLearningRate, ThresholdPolicy):
    """AGC's clip factor capped at ``update_ratio / lr``: each unit's gradient norm is at most ``update_ratio`` times
    its parameter norm divided by the learning rate, so that a plain SGD step changes a unit by at most that
    fraction of its norm. Brock et al. 2021 (section 4.1) motivate AGC by this relative update, ``||dW_i|| /
    ||W_i|| = lr * ||G_i|| / ||W_i||``, and note that the best clip factor depends on the learning rate; the cap
    makes the bound follow it. ``inner`` is the clip factor's own policy (fixed or scheduled)."""

    ratio_parameter = "max_update_ratio"

    def __init__(self, inner: ThresholdPolicy, update_ratio: float) -> None:
        self.inner, self.update_ratio = inner, update_ratio

    def threshold(self, layout: Layout, measured: Measured | None, finite: Tensor | None = None) -> Threshold:
        factor = self.inner.threshold(layout, measured, finite)
        lr = self._learning_rate()
        if isinstance(lr, Tensor) or isinstance(factor, Tensor):
            device = (lr if isinstance(lr, Tensor) else factor).device
            return torch.minimum(_device_scalar(factor, device), self.update_ratio / _device_scalar(lr, device))
        return min(factor, self.update_ratio / lr) if lr > 0 else factor

    def observe(self, layout, measured, applied, finite) -> None:
        self.inner.observe(layout, measured, applied, finite)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state)


def per_tensor_state(state: Tensor | None, layout: Layout, like: Tensor, fill: float) -> tuple[Tensor, Tensor | None]:
    """State kept per tensor of the param set (not per tensor of a step's layout, which holds only the tensors
    with gradients, in device/dtype runs): ``state`` grown with ``fill`` to cover the layout's tensors and put on
    ``like``'s device and dtype, and the positions of the layout's tensors in it (``None`` when the layout holds all
    of it in order: then no gather and no scatter). The positions are cached in ``layout.state_index``."""
    if layout.state_index is None:
        size = max(layout.indices) + 1
        in_order = size == len(layout) and layout.indices == list(range(size))
        layout.state_index = (None if in_order else torch.tensor(layout.indices, device=like.device), size)
    index, size = layout.state_index
    if state is None or state.numel() < size:
        grown = torch.full((size,), fill, device=like.device, dtype=like.dtype)
        if state is not None:
            grown[: state.numel()] = state.to(grown)
        state = grown
    if state.device != like.device or state.dtype != like.dtype:
        state = state.to(like.device, like.dtype)
    if index is None and state.numel() > size:  # more tensors in the state than this layout has
        index = torch.arange(size, device=like.device)
        layout.state_index = (index, size)
    return state, index


def saved_copy(state: Tensor) -> Tensor:
    """A copy of a state tensor on the host for a checkpoint (the kernels update the state in place)."""
    return state.detach().to("cpu", copy=True)


def usable_step(total: Tensor, finite: Tensor | None) -> Tensor:
    """Whether a step with global norm ``total`` may update adaptive state (the policies' and the spike window's):
    the norm is finite (and the clipper's ``finite`` agrees) and not 0. Gradients that are all exactly 0 (a loss
    that does not yet depend on the parameters, a masked batch) say nothing of the norms' scale; entered, they
    would set thresholds of 0, and every later step would be clipped to nothing, since the statistics hold norms
    after clipping."""
    entered = torch.isfinite(total) & (total > 0)
    return entered if finite is None else entered & finite.to(entered.device)


class FixedThreshold(ThresholdPolicy):
    """The same threshold on every step."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def threshold(self, layout: Layout, measured: Measured | None, finite: Tensor | None = None) -> float:
        return self.value


class ScheduledThreshold(ThresholdPolicy):
    """A threshold that follows a schedule over optimizer steps (skipped ones included), computed on the host from
    the step count (no device read): ``constant``; ``linear`` warmup from ``factor * value`` to ``value`` over
    ``steps``; ``cosine`` decay from ``value`` to ``factor * value`` over ``steps`` (Loshchilov & Hutter 2017's
    shape). After ``steps`` the end value holds."""

    SCHEDULES = ("constant", "linear", "cosine")

    def __init__(self, value: float, schedule: str = "constant", steps: int = 1000, factor: float = 0.1) -> None:
        self.value, self.schedule, self.steps, self.factor = float(value), schedule, steps, factor
        self.step = 0

    def at(self, step: int) -> float:
        progress = min(step / self.steps, 1.0)
        if self.schedule == "linear":
            return self.value * (self.factor + (1.0 - self.factor) * progress)
        if self.schedule == "cosine":
            return self.value * (self.factor + (1.0 - self.factor) * 0.5 * (1.0 + math.cos(math.pi * progress)))
        return self.value

    def threshold(self, layout: Layout, measured: Measured | None, finite: Tensor | None = None) -> float:
        return self.at(self.step)

    def observe(self, layout, measured, applied, finite) -> None:
        self.step += 1

    def skipped(self) -> None:
        """A skipped step counts as any other, as a learning-rate scheduler counts it, and as the fused path counts
        it (it skips on the device, where the host does not see it)."""
        self.step += 1

    def state_dict(self) -> dict[str, Any]:
        return {"step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


class DelayedThreshold(ScheduledThreshold):
    """No clipping (an infinite threshold) on the first ``delay - 1`` steps, then ``value``: clipping starts at step
    ``delay`` (1-based), as SPAM's reference code starts at ``current_step >= grad_accu_steps``. Counted on the host,
    as :class:`ScheduledThreshold` counts (and saves) steps."""

    def __init__(self, value: float, delay: int) -> None:
        super().__init__(value)
        self.delay = delay

    def threshold(self, layout: Layout, measured: Measured | None, finite: Tensor | None = None) -> float:
        return self.value if self.step + 1 >= self.delay else math.inf


class AutoClipThreshold(ReadsLearningRate, ThresholdPolicy):
    """AutoClip (Seetharaman et al. 2020, "AutoClip: Adaptive Gradient Clipping for Source Separation Networks"):
    the threshold is the ``percentile``-th percentile of the history of global gradient norms, the current step's
    included. The paper keeps the whole history; here it is a ring buffer of the last ``window`` finite norms on the
    device (unfilled slots are NaN and ignored by ``nanquantile``; linear interpolation, as ``numpy.percentile``).

    The paper's history starts empty, so the first steps are clipped at the scale of whatever they measure, an
    exploding one included. With ``update_ratio`` set, the first ``warmup_steps`` finite steps are also capped by
    :func:`update_guard` (0: the paper's behaviour).

    The paper records the raw norms. Where they explode from the first step (a tanh RNN at a high learning rate),
    the percentile of raw norms is itself an exploding scale, and training diverges as soon as the warmup ends. With
    ``clipped_history`` (the default) the history records each step's norm after clipping, the norm the optimizer
    used, as ZClip's and AdaGC's papers feed their statistics. The threshold then never rises while every step is
    clipped, and falls with the norms: it follows them down, not up. ``clipped_history=False`` is the paper's
    behaviour."""

    def __init__(
        self,
        percentile: float = 10.0,
        window: int = 1000,
        warmup_steps: int = 25,
        update_ratio: float = 0.0,
        clipped_history: bool = False,
    ) -> None:
        self.percentile, self.window = percentile, window
        self.warmup_steps, self.update_ratio = warmup_steps, update_ratio
        self.clipped_history = clipped_history
        self.steps = 0  # steps taken, on the host
        self.history = torch.full((window,), math.nan)
        self.count = torch.zeros((), dtype=torch.long)
        self._threshold: Tensor | None = None  # this step's, for observe()
        self._updated = False  # the kernel took this step's update with the threshold
        self._placed: tuple | None = None  # the device and dtype the kernel last found the state on

    def _with_current(self, total: Tensor) -> Tensor:
        history = self.history.to(total.device, total.dtype)
        slot = (self.count.to(total.device) % self.window).reshape(1)
        return history.index_put((slot,), total.reshape(1))

    def threshold(self, layout: Layout, measured: Measured | None, finite: Tensor | None = None) -> Tensor:
        assert measured is not None
        total = measured.total
        self.steps += 1
        guarded = self.update_ratio and warming_up(self.steps - 1, self.warmup_steps)
        guard = self._guard(layout, total) if guarded else None
        self._updated = False
        if threshold_kernels.applies(total, self.window):
            if self._placed != (total.device, total.dtype):
                self.history, self.count = self.history.to(total.device, total.dtype), self.count.to(total.device)
                self._placed = (total.device, total.dtype)
            threshold = threshold_kernels.autoclip_step(
                total, finite, guard, self.history, self.count, self.percentile, self.warmup_steps, self.clipped_history
            )
            if threshold is not None:
                self._updated = True
                return threshold
        candidate = self._with_current(total)
        threshold = torch.nanquantile(candidate, self.percentile / 100.0)
        if guard is not None:
            warming = self.count.to(threshold.device) < self.warmup_steps
            threshold = torch.where(warming, torch.minimum(threshold, guard), threshold)
        self._threshold = threshold
        return threshold

    def observe(self, layout, measured, applied, finite) -> None:
        if self._updated:
            return
        usable = usable_step(measured.total, finite)
        norm = measured.total
        if self.clipped_history and self._threshold is not None:
            norm = torch.minimum(norm, self._threshold.to(norm))
        self._threshold = None
        candidate = self._with_current(norm)
        self.history = torch.where(usable, candidate, self.history.to(candidate))
        self.count = self.count.to(usable.device) + usable.long()

    def state_dict(self) -> dict[str, Any]:
        return {"history": saved_copy(self.history), "count": saved_copy(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the history; saved with another ``window``, the most recent norms that fit are kept."""
        self.history = resized_ring(state["history"], int(state["count"]), self.window)
        self.count = state["count"].clone()
        self._placed = None


class ZClipThreshold(ReadsLearningRate, ThresholdPolicy):
    """ZClip (Kumar et al. 2025, "ZClip: Adaptive Spike Mitigation for LLM Pre-Training"): EMA estimates of the
    mean and variance of the global gradient norm; a norm whose z-score exceeds ``z_thresh`` is a spike and is
    clipped. As in the paper's reference code:

    - the first ``warmup_steps`` norms are collected; their mean and (population) variance start the EMA;
    - ``mode="zscore"``: on a spike with z-score ``z``, clip to ``mean + z_thresh * std / (z / z_thresh)`` times
      ``clip_factor`` (``clip_option="adaptive_scaling"``), or to ``mean`` (``clip_option="mean"``);
      ``mode="percentile"``: clip any norm above ``mean + z_thresh * std`` to that value;
    - the EMA is then updated with the clipped value on a spike (with the raw norm otherwise), the variance with the
      already-updated mean; ``skip_update_on_spike`` leaves the EMA alone on spikes;
    - ``max_norm``, when set, caps the threshold on every step, warmup included (the reference defaults it to 1.0).

    The reference leaves the warmup unclipped unless ``max_norm`` is set, an absolute threshold to tune. With
    ``update_ratio`` set (the default of the ``zclip`` method), warmup steps are clipped by :func:`update_guard`
    instead, which follows the model's scale and the learning rate; 0 gives the reference's behaviour.

    The reference starts the EMA from the raw warmup norms. Where those explode (a tanh RNN at a high learning rate),
    the EMA starts at an exploding scale and training diverges as soon as the warmup ends, guard or not. With
    ``clipped_warmup`` (the default of the ``zclip`` method) the warmup collects each norm after clipping, the norm
    the optimizer used: the rule the reference already applies after warmup, where a spike enters the EMA clipped.

    ``clip/threshold`` records ``mean + z_thresh * std``, the norm above which a step counts as a spike.
    """

    def __init__(
        self,
        alpha: float = 0.97,
        z_thresh: float = 2.5,
        warmup_steps: int = 25,
        mode: str = "zscore",
        clip_option: str = "adaptive_scaling",
        clip_factor: float = 1.0,
        max_norm: float | None = None,
        skip_update_on_spike: bool = False,
        eps: float = 1e-6,
        update_ratio: float = 0.0,
        clipped_warmup: bool = False,
    ) -> None:
        self.alpha, self.z_thresh, self.warmup_steps = alpha, z_thresh, warmup_steps
        self.update_ratio, self.clipped_warmup = update_ratio, clipped_warmup
        self.mode, self.clip_option, self.clip_factor = mode, clip_option, clip_factor
        self.max_norm, self.skip_update_on_spike, self.eps = max_norm, skip_update_on_spike, eps
        self.steps = 0  # steps taken, on the host
        self.warmup = torch.zeros(warmup_steps)
        self.count = torch.zeros((), dtype=torch.long)
        self.mean = torch.zeros(())
        self.var = torch.zeros(())
        self._spike: tuple[Tensor, Tensor] | None = None
        self._threshold: Tensor | None = None  # this step's, for observe()
        self._reported: Tensor | None = None  # this step's spike threshold, where the kernel took the step
        self._updated = False  # the kernel took this step's update with the threshold
        self._placed: tuple | None = None  # the device and dtype the state is on

    def _state_on(self, like: Tensor) -> None:
        if self._placed == (like.device, like.dtype):  # the usual step: nothing to move (host time)
            return
        self.warmup, self.mean, self.var = (t.to(like.device, like.dtype) for t in (self.warmup, self.mean, self.var))
        self.count = self.count.to(like.device)
        self._placed = (like.device, like.dtype)

    def _spike_and_limit(self, norm: Tensor) -> tuple[Tensor, Tensor]:
        """Whether ``norm`` is a spike under the current EMA, and the value to clip it to if so."""
        std = self.var.sqrt()
        if self.mode == "percentile":
            limit = self.mean + self.z_thresh * std
            return norm > limit, limit
        z = (norm - self.mean) / (std + self.eps)
        if self.clip_option == "mean":
            limit = self.mean
        else:
            eta = z / self.z_thresh
            limit = (self.mean + self.z_thresh * std / eta) * self.clip_factor
        return z > self.z_thresh, limit

    def threshold(self, layout: Layout, measured: Measured | None, finite: Tensor | None = None) -> Tensor:
        assert measured is not None
        norm = measured.total
        self._state_on(norm)
        self.steps += 1
        guarded = self.update_ratio and warming_up(self.steps - 1, self.warmup_steps)
        guard = self._guard(layout, norm) if guarded else None
        self._reported, self._updated = None, False
        if threshold_kernels.applies(norm, self.warmup_steps):
            out = threshold_kernels.zclip_step(self, norm, finite, guard)
            if out is not None:
                threshold, self._reported = out.unbind()
                self._updated = True
                return threshold
        initialized = self.count >= self.warmup_steps
        spike, limit = self._spike_and_limit(norm)
        spike = spike & initialized
        self._spike = (spike, limit)
        threshold = torch.where(spike, limit, torch.full_like(norm, math.inf))
        if guard is not None:
            threshold = torch.where(initialized, threshold, guard)
        if self.max_norm is not None:
            threshold = threshold.clamp(max=self.max_norm)
        self._threshold = threshold
        return threshold

    def reported(self, threshold: Threshold) -> Tensor:
        if self._reported is not None:  # the state has moved on: the kernel kept the value from before
            return self._reported
        return self.mean + self.z_thresh * self.var.sqrt()

    def observe(self, layout, measured, applied, finite) -> None:
        if self._updated:
            return
        norm = measured.total
        usable = usable_step(measured.total, finite)
        spike, limit = self._spike if self._spike is not None else self._spike_and_limit(norm)
        initialized = self.count >= self.warmup_steps
        # warmup: collect the raw norm; when the buffer is full, start the EMA from its mean and variance
        collect = usable & ~initialized
        slot = self.count.clamp(max=self.warmup_steps - 1).reshape(1)
        collected = norm
        if self.clipped_warmup and self._threshold is not None:
            collected = torch.minimum(norm, self._threshold.to(norm))
        self.warmup = torch.where(collect, self.warmup.index_put((slot,), collected.reshape(1)), self.warmup)
        count = self.count + collect.long()
        starts = collect & (count == self.warmup_steps)
        mean = torch.where(starts, self.warmup.mean(), self.mean)
        var = torch.where(starts, self.warmup.var(unbiased=False), self.var)
        # after warmup: the EMA, fed the clipped value on a spike
        value = torch.where(spike, limit, norm)
        updated_mean = self.alpha * mean + (1 - self.alpha) * value
        updated_var = self.alpha * var + (1 - self.alpha) * (value - updated_mean) ** 2
        update = usable & initialized
        if self.skip_update_on_spike:
            update = update & ~spike
        self.mean = torch.where(update, updated_mean, mean)
        self.var = torch.where(update, updated_var, var)
        self.count = count
        self._spike = self._threshold = None

    def state_dict(self) -> dict[str, Any]:
        tensors = {"warmup": self.warmup, "count": self.count, "mean": self.mean, "var": self.var}
        return {name: saved_copy(t) for name, t in tensors.items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restores the EMA; saved with another ``warmup_steps``, a finished warmup stays finished and an unfinished
        one keeps the norms it collected (up to the new length; the next finite step then starts the EMA)."""
        warmup, count = state["warmup"], state["count"].clone()
        saved = warmup.numel()
        if saved != self.warmup_steps:
            if int(count) >= saved:
                count = torch.tensor(max(int(count), self.warmup_steps))
            else:
                count = torch.tensor(min(int(count), self.warmup_steps - 1))
            resized = torch.zeros(self.warmup_steps, dtype=warmup.dtype)
            kept = min(saved, self.warmup_steps)
            resized[:kept] = warmup[:kept]
            warmup = resized
        self.warmup, self.count = warmup.clone(), count
        self.mean, self.var = state["mean"].clone(), state["var"].clone()
        self._placed = None


class AdaGCThreshold(ReadsLearningRate, ThresholdPolicy):
    """AdaGC (Wang et al. 2025, "AdaGC: Improving Training Stability for Large Language Model Pretraining"): one
    threshold per parameter tensor, an EMA of that tensor's clipped gradient norm (to be used with per-tensor
    clipping):

    - warmup, the first ``warmup_steps`` finite steps: global-norm clipping at ``lambda_abs``; each tensor's
      threshold ``gamma_i`` is the smallest clipped norm it has seen (``gamma_i = min(gamma_i, ||g_i||)``,
      ``warmup_threshold="min"``, the paper's Algorithm 1) or, by default (``"ema"``), the same EMA as after warmup;
    - then: clip each tensor to ``lambda_rel * gamma_i`` and update ``gamma_i <- beta * gamma_i + (1 - beta) *
      ||clipped g_i||``.

    Why not the minimum by default: a threshold can grow by at most ``beta + (1 - beta) * lambda_rel`` per step
    (1.001 at the defaults), so a tensor whose norms were small at some point of the warmup (a plateau before the
    model starts to learn) is clipped to that scale for hundreds of steps after it, whatever its norms have grown
    to. Seen on the study's AdamW CNN: the clipped global norm at the end of the warmup was about 20x its minimum,
    fell about 100x at the first step after it, and the loss diverged from there; the EMA starts the thresholds
    where the norms are.

    Choices where the paper is silent: thresholds are kept per tensor of the optimizer (its ``Theta_i``), in the
    order of the optimizer's parameters; a tensor first seen after warmup (no gradient before) starts its EMA from
    its first norm, unclipped; the global warmup clip is expressed as per-tensor limits ``coef * (||g_i|| + 1e-6)``
    so that one per-tensor operator serves both phases.

    ``lambda_abs`` is an absolute threshold in gradient units, to be tuned; with ``lambda_abs=None`` the warmup's
    global limit is :func:`update_guard` with ``update_ratio``, which follows the model's scale and the learning
    rate.

    ``clip/threshold`` records the mean of the per-tensor thresholds in force.
    """

    def __init__(
        self,
        beta: float = 0.98,
        lambda_rel: float = 1.05,
        lambda_abs: float | None = 1.0,
        warmup_steps: int = 100,
        update_ratio: float = 1e-3,
        warmup_threshold: str = "ema",
    ) -> None:
        self.beta, self.lambda_rel, self.lambda_abs, self.warmup_steps = beta, lambda_rel, lambda_abs, warmup_steps
        self.warmup_minimum = warmup_threshold == "min"
        self.update_ratio = update_ratio if lambda_abs is None else 0.0
        self.steps = 0  # steps taken, on the host
        self.gamma: Tensor | None = None  # per tensor of the param set, +inf until seen
        self.count = torch.zeros((), dtype=torch.long)
        self._updated = False  # the kernel took this step's update with the thresholds
        self._placed: tuple | None = None  # the device and dtype the state is on

    def _gamma(self, layout: Layout, like: Tensor) -> tuple[Tensor, Tensor | None]:
        """The thresholds, on ``like``'s device, and the positions of the layout's tensors in them
        (:func:`per_tensor_state`)."""
        self.gamma, index = per_tensor_state(self.gamma, layout, like, math.inf)
        if self._placed != (like.device, like.dtype):  # the usual step: nothing to move (host time)
            self.count = self.count.to(like.device)
            self._placed = (like.device, like.dtype)
        return self.gamma, index

    def threshold(self, layout: Layout, measured: Measured | None, finite: Tensor | None = None) -> Tensor:
        assert measured is not None
        norms = measured.norms
        gamma, index = self._gamma(layout, norms)
        self.steps += 1
        if self.lambda_abs is not None:
            limit = self.lambda_abs
        elif self.update_ratio and warming_up(self.steps - 1, self.warmup_steps):
            limit = self._guard(layout, norms)
        else:
            limit = math.inf
        self._updated = False
        if threshold_kernels.applies(norms):
            thresholds = threshold_kernels.adagc_step(
                self, norms, measured.total, finite, limit, index, layout.clip_mask
            )
            if thresholds is not None:
                self._updated = True
                return thresholds
        warming = self.count < self.warmup_steps
        coef = torch.clamp(limit / (measured.total + NORM_EPS), max=1.0)
        global_limits = coef * (norms + NORM_EPS)
        relative = self.lambda_rel * (gamma if index is None else gamma[index])  # +inf never seen: not clipped
        return torch.where(warming, global_limits, relative)

    def reported(self, threshold: Threshold) -> Tensor:
        assert isinstance(threshold, Tensor)
        finite = torch.isfinite(threshold)
        return torch.where(finite, threshold, 0.0).sum() / finite.sum().clamp(min=1)

    def observe(self, layout, measured, applied, finite) -> None:
        if self._updated:
            return
        usable = usable_step(measured.total, finite)
        gamma, index = self._gamma(layout, measured.norms)
        clipped = measured.norms * applied.scale.to(measured.norms)
        previous = gamma if index is None else gamma[index]
        warming = self.count < self.warmup_steps
        ema = torch.where(torch.isinf(previous), clipped, self.beta * previous + (1 - self.beta) * clipped)
        new = torch.where(warming, torch.minimum(previous, clipped), ema) if self.warmup_minimum else ema
        kept = torch.where(usable & (measured.norms > 0), new, previous)  # a tensor's 0 as the global 0: no scale
        self.gamma = kept if index is None else gamma.index_put((index,), kept)
        self.count = self.count + usable.long()

    def state_dict(self) -> dict[str, Any]:
        gamma = saved_copy(self.gamma) if self.gamma is not None else torch.empty(0)
        return {"gamma": gamma, "count": saved_copy(self.count)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gamma = state["gamma"].clone() if state["gamma"].numel() else None
        self.count = state["count"].clone()
        self._placed = None
