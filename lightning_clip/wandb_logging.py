"""What only W&B gets: the clipping entry of the run config, summaries per key, per-layer histograms and the
heatmap image. Every function takes the trainer's W&B loggers (on rank zero; none where W&B is absent or not the
logger), so the callback calls them unconditionally and ``wandb`` is imported only when there is a run to log to.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import lightning.pytorch as pl
from lightning.pytorch.loggers import WandbLogger

from lightning_clip.clipper import HostRecord
from lightning_clip.plots import HeatmapHistory, grad_norm_heatmap, png_bytes

STEP = "trainer/global_step"

#: Summaries W&B keeps for each key, by base name (exact names: W&B ignores later globs, see README "W&B"); the
#: per-layer keys (``grad_norm/<layer>`` ...) keep their max.
SUMMARIES = {
    "grad/norm": "max",
    "grad/norm_clipped": "max",
    "grad/norm_max": "max",
    "clip/coef": "min",
    "clip/rate": "mean",
    "clip/nonfinite_steps": "last",
    "clip/skipped_steps": "last",
    "clip/spike_skipped_steps": "last",
}


def wandb_loggers(trainer: pl.Trainer) -> list[WandbLogger]:
    """The trainer's W&B loggers (subclasses included) on rank zero."""
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if isinstance(logger, WandbLogger)]


def log_config(loggers: Sequence[WandbLogger], config: Mapping[str, Any]) -> None:
    for logger in loggers:
        logger.experiment.config.update({"clipping": dict(config)}, allow_val_change=True)


def define_summaries(loggers: Sequence[WandbLogger], keys: Iterable[tuple[str, str]]) -> None:
    """``define_metric`` for each new ``(base, key)`` pair, ``key`` being ``base`` plus the optimizer's suffix."""
    for logger in loggers:
        for base, key in keys:
            summary = SUMMARIES.get(base) or ("max" if base.startswith("grad_") else None)
            if summary:
                escaped = key.replace(".", "\\.")  # W&B reads dots in keys as nesting
                logger.experiment.define_metric(escaped, summary=summary, step_metric=STEP)


def log_histograms(
    loggers: Sequence[WandbLogger],
    step: int,
    layers: Sequence[str],
    counts: Sequence[float],
    maxima,
    bins: int,
    suffix: str,
) -> None:
    """Per-layer histograms of the pre-clip gradient values over ``[-max, max]`` of each layer, keyed as the other
    per-layer values (``suffix``: the optimizer's, when there are several)."""
    if not loggers:
        return
    import numpy as np
    import wandb

    histograms = {}
    for k, layer in enumerate(layers):
        limit = maxima[k]
        if not math.isfinite(limit):
            continue
        edges = np.linspace(-limit, limit, bins + 1) if limit > 0 else np.linspace(-1.0, 1.0, bins + 1)
        layer_counts = counts[k * bins : (k + 1) * bins]
        histograms[f"grad_hist/{layer}{suffix}"] = wandb.Histogram(np_histogram=(layer_counts, edges))
    for logger in loggers:
        logger.experiment.log({**histograms, STEP: step})


def log_heatmap(loggers: Sequence[WandbLogger], step: int, history: HeatmapHistory) -> None:
    if not loggers or not history.layers:
        return
    import io

    import wandb
    from PIL import Image

    image = wandb.Image(Image.open(io.BytesIO(png_bytes(grad_norm_heatmap(history)))))
    for logger in loggers:
        logger.experiment.log({"grad_norm_heatmap": image, STEP: step})


class WandbExtras:
    """The W&B extras of one fit: summaries defined once per key, per-layer histograms on the records that carry
    them, and the heatmap of per-layer gradient norms (its bounded history kept only when W&B logs), as an image
    every ``heatmap_every`` records and at the end."""

    def __init__(self, bins: int, heatmap_every: int | None) -> None:
        self.bins, self.heatmap_every = bins, heatmap_every
        self.defined: set[str] = set()
        self.heatmap = HeatmapHistory()

    def record(self, trainer: pl.Trainer, record: HostRecord, metrics: Mapping[str, float], suffix: str, count: int):
        loggers = wandb_loggers(trainer)
        if not loggers:
            return
        new = [(base, base + suffix) for base in metrics if base + suffix not in self.defined]
        self.defined.update(key for _, key in new)
        define_summaries(loggers, new)
        step = trainer.global_step
        if record.histograms is not None:
            maxima = record.layer_stats["grad_max"]
            log_histograms(loggers, step, record.layers, record.histograms, maxima, self.bins, suffix)
        if "grad_norm" in record.layer_stats:
            self.heatmap.add(step, dict(zip(record.layers, record.layer_stats["grad_norm"])))
            if self.heatmap_every is not None and count % self.heatmap_every == 0:
                log_heatmap(loggers, step, self.heatmap)

    def finish(self, trainer: pl.Trainer) -> None:
        log_heatmap(wandb_loggers(trainer), trainer.global_step, self.heatmap)
