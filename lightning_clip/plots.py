"""Plots of what was recorded, and the bounded history behind the per-layer gradient-norm heatmap.

Figures are built with ``matplotlib.figure.Figure`` and never through pyplot: nothing here switches a notebook's
backend or registers figures globally, and a figure is freed when it is no longer referenced.
"""

from __future__ import annotations

import io
from collections.abc import Mapping

import numpy as np


class HeatmapHistory:
    """Per-layer gradient norms over recorded steps, in at most ``columns`` columns: the host-side memory stays
    bounded however long the run. When the columns are full, neighbouring pairs merge (by max, NaN ignored, so a
    spike is never averaged away) and each column then spans twice as many records; ``steps`` holds the first step
    of each column."""

    def __init__(self, columns: int = 256) -> None:
        if columns < 2:
            raise ValueError(f"columns={columns} is invalid: expected an integer >= 2")
        self.columns = columns
        self.layers: list[str] = []
        self.steps: list[int] = []
        self._row: dict[str, int] = {}
        self._grid = np.full((0, columns + 1), np.nan)
        self._counts: list[int] = []  # records merged into each column
        self._span = 1  # records a column holds before a new one starts

    def add(self, step: int, norms: Mapping[str, float]) -> None:
        for layer in norms:
            if layer not in self._row:
                self._row[layer] = len(self.layers)
                self.layers.append(layer)
        if len(self.layers) > self._grid.shape[0]:
            grown = np.full((len(self.layers), self.columns + 1), np.nan)
            grown[: self._grid.shape[0]] = self._grid
            self._grid = grown
        column = np.full(len(self.layers), np.nan)
        for layer, value in norms.items():
            column[self._row[layer]] = value
        if self._counts and self._counts[-1] < self._span:
            last = len(self._counts) - 1
            self._grid[:, last] = np.fmax(self._grid[:, last], column)
            self._counts[-1] += 1
        else:
            self._grid[:, len(self._counts)] = column
            self._counts.append(1)
            self.steps.append(step)
        if len(self._counts) > self.columns:
            self._halve()

    def _halve(self) -> None:
        n = len(self._counts)
        pairs = n // 2
        merged = np.fmax(self._grid[:, 0 : 2 * pairs : 2], self._grid[:, 1 : 2 * pairs : 2])
        counts = [self._counts[2 * k] + self._counts[2 * k + 1] for k in range(pairs)]
        steps = self.steps[0 : 2 * pairs : 2]
        if n % 2:
            merged = np.concatenate([merged, self._grid[:, n - 1 : n]], axis=1)
            counts.append(self._counts[-1])
            steps.append(self.steps[-1])
        self._grid[:] = np.nan
        self._grid[:, : merged.shape[1]] = merged
        self._counts, self.steps = counts, steps
        self._span *= 2

    def grid(self) -> np.ndarray:
        """Layers x columns."""
        return self._grid[: len(self.layers), : len(self._counts)].copy()

    @classmethod
    def of(cls, history: Mapping[str, Mapping[int, float]], columns: int = 256) -> HeatmapHistory:
        """From ``{layer: {step: norm}}`` (a run's log read back)."""
        heatmap = cls(columns)
        steps = sorted({step for values in history.values() for step in values})
        for step in steps:
            heatmap.add(step, {layer: values[step] for layer, values in history.items() if step in values})
        return heatmap


def grad_norm_heatmap(history: HeatmapHistory, title: str = "gradient norm per layer"):
    """Layers (rows, in model order) x recorded steps (columns), coloured by log10 of the gradient norm; NaN/Inf
    cells are white."""
    from matplotlib.figure import Figure

    layers, steps = history.layers, history.steps
    with np.errstate(divide="ignore", invalid="ignore"):
        grid = np.log10(history.grid())
    grid[~np.isfinite(grid)] = np.nan
    height = min(2 + 0.25 * len(layers), 40)
    fig = Figure(figsize=(10, height), layout="constrained")
    ax = fig.subplots()
    image = ax.imshow(grid, aspect="auto", interpolation="nearest", cmap="magma")
    ax.set_yticks(range(len(layers)), layers, fontsize=7 if len(layers) > 30 else 9)
    ticks = np.linspace(0, len(steps) - 1, num=min(len(steps), 8)).astype(int) if steps else []
    ax.set_xticks(ticks, [str(steps[t]) for t in ticks])
    ax.set_xlabel("step")
    ax.set_title(title)
    fig.colorbar(image, ax=ax, label="log10 grad norm")
    return fig


def figure(width: float, height: float):
    """A new figure with one axes (no pyplot): ``fig, ax = figure(9, 4.5)``."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    return fig, fig.subplots()


def png_bytes(fig) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()
