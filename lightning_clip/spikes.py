"""Spike skipping: a step whose global gradient norm jumps far above the run's recent level changes nothing.

As OLMo-core's ``SkipStepOptimizer`` (``src/olmo_core/optim/skip_step_optimizer.py``) does for the loss and the
gradient norm, a step is judged against a rolling window of the last ``window`` finite norms (0 excepted), on the
device. The choices here, and why:

- one-sided: a step is a spike when its norm exceeds ``mean + k * std`` of the window (OLMo-core tests the absolute
  z-score); a sudden drop of the gradient norm does not make a harmful update;
- no decision before ``max(20, window // 2)`` norms are in the window, as OLMo-core;
- every finite norm enters the window, the skipped ones too (as OLMo-core): a spike inflates the spread for a
  while, but a genuine level shift is then admitted within a bounded number of steps. After a jump from a steady
  level to ``r`` times it, the ``n`` new norms among ``window`` give a z-score of about ``sqrt((window - n) / n)``,
  below ``k`` once ``n > window / (k**2 + 1)``: 4 steps for the default ``window=128``, ``k=6``, whatever the
  scale, far below ``max_consecutive_skips``.

Per tensor, an EMA of its norm over the steps before (``LEVEL_BETA``) tells which tensor grew most against its own
recent level: the warning of a skipped spike names it. The levels are kept per tensor of the param set, so that a
tensor keeps its own level when others have no gradient on a step (until 0.8.1 they were kept per tensor of the
step's layout, and a spike on a step whose layout had changed raised instead of being skipped).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from lightning_clip import threshold_kernels
from lightning_clip.params import Layout
from lightning_clip.thresholds import per_tensor_state, resized_ring, saved_copy, usable_step

#: EMA smoothing of each tensor's norm level, for naming the tensor behind a spike.
LEVEL_BETA = 0.9


class SpikeSkipper:
    """Decides, on the device, whether a step's global norm is a spike (see the module docstring). On CUDA one
    Triton program takes the whole step (:func:`threshold_kernels.spike_step`); :meth:`is_spike` and :meth:`observe`
    are the definition, and the path elsewhere."""

    level_beta = LEVEL_BETA

    def __init__(self, k: float, window: int = 128) -> None:
        self.k, self.window = k, window
        self.min_samples = min(max(20, window // 2), window)
        self.history = torch.full((window,), math.nan)
        self.count = torch.zeros((), dtype=torch.long)
        self.levels: Tensor | None = None  # per tensor of the param set, NaN until seen

    def _on(self, like: Tensor) -> None:
        self.history = self.history.to(like.device, like.dtype)
        self.count = self.count.to(like.device)

    def judge(self, layout: Layout, total: Tensor, norms: Tensor, finite: Tensor) -> tuple[Tensor, Tensor]:
        """One step: whether ``total`` is a spike (:meth:`is_spike`), and the levels of the layout's tensors from
        before this step (NaN where not seen yet), then the step observed (:meth:`observe`)."""
        self._on(total)
        self.levels, index = per_tensor_state(self.levels, layout, norms, math.nan)
        levels = self.levels if index is None else self.levels[index]
        done = None
        if threshold_kernels.applies(self.history, self.window) and norms.dtype == torch.float32:
            done = threshold_kernels.spike_step(self, total, norms, finite, levels)
        if done is not None:
            spike, updated = done
        else:
            spike = self.is_spike(total)
            updated = self.observe(total, norms, finite, levels)
        self.levels = updated if index is None else self.levels.index_put((index,), updated)
        return spike, levels

    def is_spike(self, total: Tensor) -> Tensor:
        """A 0-d bool tensor: ``total`` exceeds ``mean + k * std`` of the window (once it holds enough norms)."""
        self._on(total)
        filled = ~torch.isnan(self.history)
        n = filled.sum()
        values = torch.where(filled, self.history, 0.0)
        mean = values.sum() / n.clamp(min=1)
        var = torch.where(filled, (self.history - mean) ** 2, 0.0).sum() / n.clamp(min=1)
        return (n >= self.min_samples) & (total > mean + self.k * var.sqrt())

    def observe(self, total: Tensor, norms: Tensor, finite: Tensor, levels: Tensor) -> Tensor:
        """Enter a finite step's norm into the window, unless it is 0 (gradients all 0 say nothing of the norms'
        level, and a window of zeros would skip the first steps that learn); the new levels of its tensors
        (``levels``: from before, NaN where not seen yet), each an EMA of the tensor's norm."""
        self._on(total)
        slot = (self.count % self.window).reshape(1)
        enters = usable_step(total, finite)
        self.history = torch.where(enters, self.history.index_put((slot,), total.reshape(1)), self.history)
        self.count = self.count + enters.long()
        updated = torch.where(torch.isnan(levels), norms, self.level_beta * levels + (1 - self.level_beta) * norms)
        return torch.where(finite, updated, levels)

    def state_dict(self) -> dict[str, Any]:
        """Copies (the kernel updates ``history`` and ``count`` in place)."""
        levels = saved_copy(self.levels) if self.levels is not None else torch.empty(0)
        return {"history": saved_copy(self.history), "count": saved_copy(self.count), "levels": levels}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = resized_ring(state["history"], int(state["count"]), self.window)  # the latest that fit
        self.count = state["count"].clone()
        self.levels = state["levels"].clone() if state["levels"].numel() else None
