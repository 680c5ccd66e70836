"""Threshold policies: what limit a clip operator enforces on a given step.

A policy is the other half of a clipping method (``operators.py`` holds the first). It reads what the operator
measured, returns the threshold in force, and after the step observes the outcome to update its own state. A
policy's state lives in device tensors and is only ever updated from finite steps.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightning_clip.operators import Applied, Measured, Threshold


class ThresholdPolicy:
    """Base policy: a threshold per step, optional state."""

    def threshold(self, measured: Measured | None) -> Threshold:
        raise NotImplementedError

    def observe(self, measured: Measured | None, applied: Applied, finite: Tensor | None) -> None:
        """Update state after clipping; ``finite`` is a 0-d bool tensor, False on a step whose gradients held
        NaN/Inf (state must then stay as it was)."""

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass


class FixedThreshold(ThresholdPolicy):
    """The same threshold on every step."""

    def __init__(self, value: float) -> None:
        self.value = float(value)

    def threshold(self, measured: Measured | None) -> float:
        return self.value
