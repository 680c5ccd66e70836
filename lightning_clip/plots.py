"""Plots of what was recorded (matplotlib, headless): the per-layer gradient-norm heatmap."""

from __future__ import annotations

import math
from collections.abc import Mapping

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402


def grad_norm_heatmap(history: Mapping[str, Mapping[int, float]], title: str = "gradient norm per layer") -> Figure:
    """Layers (rows, in model order) x recorded steps (columns), coloured by log10 of the gradient norm; NaN/Inf
    cells are white. ``history`` maps each layer to ``{step: grad_norm}``."""
    layers = list(history)
    steps = sorted({step for values in history.values() for step in values})
    grid = np.full((len(layers), len(steps)), np.nan)
    column = {step: j for j, step in enumerate(steps)}
    for i, layer in enumerate(layers):
        for step, value in history[layer].items():
            if value > 0 and math.isfinite(value):
                grid[i, column[step]] = math.log10(value)
    height = min(2 + 0.25 * len(layers), 40)
    fig, ax = plt.subplots(figsize=(10, height), layout="constrained")
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 30 else 9)
    ticks = np.linspace(0, len(steps) - 1, num=min(len(steps), 8)).astype(int) if steps else []
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 grad norm")
    return fig


def close(fig: Figure) -> None:
    plt.close(fig)
