"""The adaptive threshold policies' step, one CUDA kernel (Triton) each: AutoClip, ZClip and AdaGC; and the spike
skipper's (``spikes.py``).

In PyTorch ops a policy's step is 27 to 46 tensor ops on scalars and short vectors (the threshold, then the masked
state update), each a kernel launch that costs more than its work: on an H100 they took these methods to 1.5-1.7x of
fixed ``norm`` clipping's time on 200 tensors of 25M parameters (1.0-1.2x with these kernels; README, Speed). Here
one program does the whole step: it reads the measured norm(s) and the state, writes the threshold, and updates the
state in place, masked exactly as the policies' ``observe`` masks it (a finite norm, and the clipper's ``finite``).
Each kernel follows its policy's PyTorch code line by line (``thresholds.py``, the definition and the path
everywhere else: CPU, float64, and ``LIGHTNING_CLIP_TRITON=0``); the tests run both on the same steps and compare
every output and every state.

The policies call :func:`autoclip_step`, :func:`zclip_step` and :func:`adagc_step` when :func:`applies` and use
their PyTorch code when these return ``None`` (the kernel could not be compiled: see :func:`kernels.launch`); the spike
skipper calls :func:`spike_step` the same way.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightning_clip import kernels
from lightning_clip.operators import NORM_EPS

#: The longest history (AutoClip's window, ZClip's warmup) a program holds in registers; longer ones use PyTorch.
MAX_BLOCK = 8192

try:
    import triton
    import triton.language as tl
except ImportError:  # the policies' PyTorch code runs instead
    triton = None


def applies(state: Tensor, length: int = 1) -> bool:
    """Whether the kernels run for a policy whose norms and state are float32 tensors like ``state``, with a
    history of ``length`` values."""
    return (
        triton is not None
        and kernels.runs_on(state)
        and state.dtype == torch.float32
        and triton.next_power_of_2(length) <= MAX_BLOCK
    )


def _launch(kernel, like: Tensor, what: str, *args, **constants) -> bool:
    return kernels.launch(kernel, 1, like.device, what, *args, **constants)


def _flag(finite: Tensor | None, like: Tensor) -> tuple[Tensor, bool]:
    """The clipper's ``finite`` as a pointer the kernel may read, and whether it should."""
    return (like, False) if finite is None else (finite.to(like.device), True)


def _guard(guard: Tensor | None, like: Tensor) -> tuple[Tensor, bool]:
    return (like, False) if guard is None else (guard.to(like).reshape(()), True)


def autoclip_step(
    total: Tensor,
    finite: Tensor | None,
    guard: Tensor | None,
    history: Tensor,
    count: Tensor,
    percentile: float,
    warmup_steps: int,
    clipped_history: bool,
) -> Tensor | None:
    """AutoClip's threshold (the percentile of the history with ``total`` in it, capped by ``guard`` while warming
    up) as a 0-d tensor, with ``history`` and ``count`` updated in place; ``None`` if the kernel could not run."""
    threshold = torch.empty((), dtype=total.dtype, device=total.device)
    finite_flag, has_finite = _flag(finite, total)
    guard_value, has_guard = _guard(guard, total)
    window = history.numel()
    ran = _launch(
        _autoclip, total, "AutoClip",
        total, finite_flag, guard_value, history, count, threshold, percentile / 100.0, window, warmup_steps,
        HAS_FINITE=has_finite, HAS_GUARD=has_guard, CLIPPED_HISTORY=clipped_history,
        BLOCK=triton.next_power_of_2(window),
    )  # fmt: skip
    return threshold if ran else None


def zclip_step(policy, total: Tensor, finite: Tensor | None, guard: Tensor | None) -> Tensor | None:
    """ZClip's threshold and the spike threshold it reports (``mean + z_thresh * std`` before the update), as a
    2-vector, with ``policy``'s ``warmup``, ``count``, ``mean`` and ``var`` updated in place; ``None`` if the kernel
    could not run."""
    out = torch.empty(2, dtype=total.dtype, device=total.device)
    finite_flag, has_finite = _flag(finite, total)
    guard_value, has_guard = _guard(guard, total)
    p = policy
    ran = _launch(
        _zclip, total, "ZClip",
        total, finite_flag, guard_value, p.warmup, p.count, p.mean, p.var, out,
        p.alpha, 1 - p.alpha, p.z_thresh, p.clip_factor, math.inf if p.max_norm is None else p.max_norm, p.eps,
        p.warmup_steps, float(p.warmup_steps),
        HAS_FINITE=has_finite, HAS_GUARD=has_guard, HAS_MAX=p.max_norm is not None,
        PERCENTILE=p.mode == "percentile", CLIP_TO_MEAN=p.clip_option == "mean",
        SKIP_ON_SPIKE=p.skip_update_on_spike, CLIPPED_WARMUP=p.clipped_warmup,
        BLOCK=triton.next_power_of_2(p.warmup_steps),
    )  # fmt: skip
    return out if ran else None


def adagc_step(
    policy,
    norms: Tensor,
    total: Tensor,
    finite: Tensor | None,
    limit: float | Tensor,
    index: Tensor | None,
    clip_mask: Tensor | None,
) -> Tensor | None:
    """AdaGC's per-tensor thresholds (global clipping at ``limit`` while warming up, ``lambda_rel * gamma_i``
    after), with ``policy.gamma`` and ``policy.count`` updated in place from the norms the per-tensor clip leaves
    (``TensorNormClip``'s factors; 1 for the tensors ``clip_mask`` excludes); ``None`` if the kernel could not
    run."""
    thresholds = torch.empty_like(norms)
    finite_flag, has_finite = _flag(finite, norms)
    guard_value, has_guard = _guard(limit if isinstance(limit, Tensor) else None, norms)
    p = policy
    ran = _launch(
        _adagc, norms, "AdaGC",
        norms, total, finite_flag, guard_value, p.gamma, norms if index is None else index,
        norms if clip_mask is None else clip_mask.to(norms.device), p.count, thresholds, len(norms),
        limit if not has_guard else 0.0, p.beta, 1 - p.beta, p.lambda_rel, NORM_EPS, p.warmup_steps,
        HAS_FINITE=has_finite, HAS_GUARD=has_guard, HAS_INDEX=index is not None, HAS_MASK=clip_mask is not None,
        WARMUP_MINIMUM=p.warmup_minimum, BLOCK=1024,
    )  # fmt: skip
    return thresholds if ran else None


def spike_step(skipper, total: Tensor, norms: Tensor, finite: Tensor, levels: Tensor) -> tuple[Tensor, Tensor] | None:
    """The spike skipper's decision (a 0-d bool) and the new levels of the step's tensors (a new tensor: ``levels``,
    from before, stays, for naming the tensor behind a spike), with ``skipper.history`` and ``skipper.count`` updated
    in place; ``None`` if the kernel could not run."""
    spike = torch.empty((), dtype=torch.bool, device=total.device)
    updated = torch.empty_like(norms)
    ran = _launch(
        _spikes, total, "spike-skipping",
        total, norms, finite.to(total.device), skipper.history, skipper.count, levels, updated, spike, len(norms),
        skipper.window, skipper.min_samples, skipper.k, skipper.level_beta, 1 - skipper.level_beta,
        BLOCK=triton.next_power_of_2(skipper.window), LEVEL_BLOCK=1024,
    )  # fmt: skip
    return (spike, updated) if ran else None


if triton is not None:

    @triton.jit
    def _min(a, b):
        """``torch.minimum``: NaN if either is."""
        return tl.minimum(a, b, propagate_nan=tl.PropagateNan.ALL)

    @triton.jit
    def _usable(total, finite, HAS_FINITE: tl.constexpr):
        """``thresholds.usable_step``: the norm is finite and not 0, and the clipper says finite."""
        usable = (tl.abs(total) < float("inf")) & (total > 0)  # False for NaN too
        if HAS_FINITE:
            usable = usable & (tl.load(finite) != 0)
        return usable

    @triton.jit
    def _autoclip(
        total_ptr, finite, guard, history, count_ptr, out, quantile, window, warmup_steps,
        HAS_FINITE: tl.constexpr, HAS_GUARD: tl.constexpr, CLIPPED_HISTORY: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        total = tl.load(total_ptr)
        usable = _usable(total, finite, HAS_FINITE)
        count = tl.load(count_ptr)
        slot = count % window
        offsets = tl.arange(0, BLOCK)
        inside = offsets < window
        past = tl.load(history + offsets, mask=inside, other=float("nan"))
        candidate = tl.where(offsets == slot, total, past)
        # torch.nanquantile, linear: sort (NaN last), rank q * (n - 1) among the n values that are not NaN
        present = candidate == candidate
        filled = tl.sum(present.to(tl.int32), axis=0)
        ordered = tl.sort(tl.where(present, candidate, float("inf")))
        rank = tl.maximum(quantile * (filled - 1).to(tl.float32), 0.0)
        below = rank.to(tl.int32)
        above = tl.ceil(rank).to(tl.int32)
        weight = rank - below.to(tl.float32)
        low = tl.sum(tl.where(offsets == below, ordered, 0.0), axis=0)
        high = tl.sum(tl.where(offsets == above, ordered, 0.0), axis=0)
        lerp = tl.where(weight < 0.5, low + weight * (high - low), high - (high - low) * (1 - weight))  # torch.lerp
        threshold = tl.where(filled > 0, lerp, float("nan"))
        if HAS_GUARD:
            threshold = tl.where(count < warmup_steps, _min(threshold, tl.load(guard)), threshold)
        tl.store(out, threshold)
        # observe: the step's norm (clipped, with CLIPPED_HISTORY) into its slot, if usable
        recorded = _min(total, threshold) if CLIPPED_HISTORY else total
        written = tl.where(usable, slot, -1)  # (a scalar condition and-ed with a block breaks Triton's interpreter)
        tl.store(history + offsets, tl.where(offsets == written, recorded, past), mask=inside)
        tl.store(count_ptr, count + usable.to(tl.int64))

    @triton.jit
    def _zclip(
        total_ptr, finite, guard, warmup, count_ptr, mean_ptr, var_ptr, out,
        alpha, one_minus_alpha, z_thresh, clip_factor, max_norm, eps, warmup_steps, warmup_length,
        HAS_FINITE: tl.constexpr, HAS_GUARD: tl.constexpr, HAS_MAX: tl.constexpr, PERCENTILE: tl.constexpr,
        CLIP_TO_MEAN: tl.constexpr, SKIP_ON_SPIKE: tl.constexpr, CLIPPED_WARMUP: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        total = tl.load(total_ptr)
        usable = _usable(total, finite, HAS_FINITE)
        count = tl.load(count_ptr)
        mean = tl.load(mean_ptr)
        var = tl.load(var_ptr)
        initialized = count >= warmup_steps
        std = tl.sqrt_rn(var)
        # ZClipThreshold._spike_and_limit
        if PERCENTILE:
            limit = mean + z_thresh * std
            spike = total > limit
        else:
            z = tl.div_rn(total - mean, std + eps)
            if CLIP_TO_MEAN:
                limit = mean
            else:
                limit = (mean + tl.div_rn(z_thresh * std, tl.div_rn(z, z_thresh))) * clip_factor
            spike = z > z_thresh
        spike = spike & initialized
        threshold = tl.where(spike, limit, float("inf"))
        if HAS_GUARD:
            threshold = tl.where(initialized, threshold, tl.load(guard))
        if HAS_MAX:
            threshold = _min(threshold, max_norm)
        tl.store(out, threshold)
        tl.store(out + 1, mean + z_thresh * std)
        # observe: collect during warmup, start the EMA when the buffer is full, then the EMA
        collect = usable & (count < warmup_steps)
        collected = _min(total, threshold) if CLIPPED_WARMUP else total
        offsets = tl.arange(0, BLOCK)
        inside = offsets < warmup_steps
        buffer = tl.load(warmup + offsets, mask=inside, other=0.0)
        written = tl.where(collect, tl.minimum(count, warmup_steps - 1), -1)
        buffer = tl.where(offsets == written, collected, buffer)
        tl.store(warmup + offsets, buffer, mask=inside)
        count = count + collect.to(tl.int64)
        starts = collect & (count == warmup_steps)
        buffer_mean = tl.div_rn(tl.sum(buffer, axis=0), warmup_length)
        centred = tl.where(inside, buffer - buffer_mean, 0.0)
        mean = tl.where(starts, buffer_mean, mean)
        var = tl.where(starts, tl.div_rn(tl.sum(centred * centred, axis=0), warmup_length), var)
        value = tl.where(spike, limit, total)
        updated_mean = alpha * mean + one_minus_alpha * value
        deviation = value - updated_mean
        updated_var = alpha * var + one_minus_alpha * (deviation * deviation)
        update = usable & initialized
        if SKIP_ON_SPIKE:
            update = update & (spike == 0)
        tl.store(mean_ptr, tl.where(update, updated_mean, mean))
        tl.store(var_ptr, tl.where(update, updated_var, var))
        tl.store(count_ptr, count)

    @triton.jit
    def _adagc(
        norms, total_ptr, finite, guard, gamma, index, clip_mask, count_ptr, out, size,
        limit, beta, one_minus_beta, lambda_rel, eps, warmup_steps,
        HAS_FINITE: tl.constexpr, HAS_GUARD: tl.constexpr, HAS_INDEX: tl.constexpr, HAS_MASK: tl.constexpr,
        WARMUP_MINIMUM: tl.constexpr, BLOCK: tl.constexpr,
    ):  # fmt: skip
        total = tl.load(total_ptr)
        usable = _usable(total, finite, HAS_FINITE)
        count = tl.load(count_ptr)
        warming = count < warmup_steps
        if HAS_GUARD:
            coef = _min(tl.div_rn(tl.load(guard), total + eps), 1.0)
        else:
            coef = _min(tl.div_rn(1.0, total + eps) * limit, 1.0)  # a float over a tensor: reciprocal, then product
        for start in range(0, size, BLOCK):
            offsets = start + tl.arange(0, BLOCK)
            inside = offsets < size
            norm = tl.load(norms + offsets, mask=inside, other=0.0)
            slot = tl.load(index + offsets, mask=inside, other=0) if HAS_INDEX else offsets
            previous = tl.load(gamma + slot, mask=inside, other=float("inf"))
            threshold = tl.where(warming, coef * (norm + eps), lambda_rel * previous)
            tl.store(out + offsets, threshold, mask=inside)
            # observe: the norm after TensorNormClip's factor, into the EMA (or the warmup's minimum)
            factor = _min(tl.div_rn(threshold, norm + eps), 1.0)
            if HAS_MASK:
                factor = tl.where(tl.load(clip_mask + offsets, mask=inside, other=0) != 0, factor, 1.0)
            clipped = norm * factor
            ema = tl.where(tl.abs(previous) == float("inf"), clipped, beta * previous + one_minus_beta * clipped)
            new = tl.where(warming, _min(previous, clipped), ema) if WARMUP_MINIMUM else ema
            tl.store(gamma + slot, tl.where(usable, tl.where(norm > 0, new, previous), previous), mask=inside)
        tl.store(count_ptr, count + usable.to(tl.int64))

    @triton.jit
    def _spikes(
        total_ptr, norms, finite_ptr, history, count_ptr, levels, new_levels, spike_ptr, size, window, min_samples,
        k, beta, one_minus_beta,
        BLOCK: tl.constexpr, LEVEL_BLOCK: tl.constexpr,
    ):  # fmt: skip
        total = tl.load(total_ptr)
        finite = tl.load(finite_ptr) != 0
        count = tl.load(count_ptr)
        # SpikeSkipper.is_spike: mean and population variance of the norms in the window (NaN: an empty slot)
        offsets = tl.arange(0, BLOCK)
        inside = offsets < window
        past = tl.load(history + offsets, mask=inside, other=float("nan"))
        filled = past == past
        n = tl.sum(filled.to(tl.int32), axis=0)
        held = tl.maximum(n, 1).to(tl.float32)
        mean = tl.div_rn(tl.sum(tl.where(filled, past, 0.0), axis=0), held)
        centred = tl.where(filled, past - mean, 0.0)
        var = tl.div_rn(tl.sum(centred * centred, axis=0), held)
        tl.store(spike_ptr, (n >= min_samples) & (total > mean + k * tl.sqrt_rn(var)))
        # SpikeSkipper.observe: a finite norm other than 0 into its slot; every tensor's level, an EMA of its norm
        enters = finite & (total > 0)
        written = tl.where(enters, count % window, -1)
        tl.store(history + offsets, tl.where(offsets == written, total, past), mask=inside)
        tl.store(count_ptr, count + enters.to(tl.int64))
        for start in range(0, size, LEVEL_BLOCK):
            index = start + tl.arange(0, LEVEL_BLOCK)
            present = index < size
            norm = tl.load(norms + index, mask=present, other=0.0)
            level = tl.load(levels + index, mask=present, other=0.0)  # NaN: not seen yet
            updated = tl.where(level != level, norm, beta * level + one_minus_beta * norm)
            tl.store(new_levels + index, tl.where(finite, updated, level), mask=present)
