"""The Lightning glue: ``GradientClipping``, a callback that clips in ``on_before_optimizer_step``.

Lightning calls that hook after backward, after gradient accumulation, after a GradScaler has unscaled fp16
gradients, and before the optimizer steps (and before its own ``gradient_clip_val`` clipping). The engine
(``Clipper``) knows nothing of Lightning; this module picks the optimizer's parameters and names, checks the
trainer before training starts, and hands what was recorded to the loggers.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lightning_clip import methods
from lightning_clip.clipper import NONFINITE_MODES, Clipper, StepRecord
from lightning_clip.operators import TensorNormClip, UnitwiseClip
from lightning_clip.params import ParamSet, name_params, optimizer_params
from lightning_clip.sharding import fsdp1_shards
from lightning_clip.stats import LayerGrouping, LayerStats

log = logging.getLogger("lightning_clip")

#: Summaries W&B keeps for each key (exact names: W&B ignores later globs, see README "W&B").
WANDB_SUMMARIES = {
    "grad/norm": "max",
    "grad/norm_clipped": "max",
    "clip/coef": "min",
    "clip/rate": "mean",
    "clip/nonfinite_steps": "last",
    "clip/skipped_steps": "last",
}


class ClippingConfigError(MisconfigurationException, ValueError):
    """A ``GradientClipping`` argument, or the trainer it is used with, is misconfigured."""


class GradientClipping(Callback):
    """Clip the gradients of the optimizer about to step, and record what was done.

    ``GradientClipping(method="agc", clip_factor=0.02)``: ``method`` is one of ``none``, ``norm``, ``value``,
    ``tensor_norm``, ``agc``, ``autoclip``, ``zclip``, ``adagc``; the method's parameters are keyword arguments
    (the README has a table per method; ``lightning_clip.METHODS`` holds them with defaults and meanings). Setting
    a parameter the method does not take is an error that lists the ones it does.

    Args:
        method: the clipping method.
        max_norm: ``norm`` / ``tensor_norm``: largest norm allowed (default 1.0).
        norm_type: ``norm`` / ``tensor_norm``: p of the p-norm, 1, 2, ... or ``inf`` (default 2).
        clip_value: ``value``: largest absolute gradient value allowed (required).
        clip_factor: ``agc``: largest ratio of unit gradient norm to unit parameter norm (default 0.01).
        eps: ``agc``: floor on unit parameter norms (default 1e-3).
        exclude: ``agc``: glob patterns of parameter or module names left unclipped, e.g. ``["head"]``.
        schedule, schedule_steps, schedule_factor: ``norm`` / ``tensor_norm`` / ``agc``: the threshold over
            optimizer steps, ``constant`` (default), ``linear`` warmup or ``cosine`` decay.
        percentile, window: ``autoclip``.
        alpha, z_thresh, warmup_steps, mode, clip_option, clip_factor, max_norm, skip_update_on_spike, eps:
            ``zclip``.
        beta, lambda_rel, lambda_abs, warmup_steps: ``adagc``.
        nonfinite: on NaN/Inf gradients, ``skip`` the optimizer step (parameters and optimizer state unchanged),
            ``raise`` an error naming the tensors, or ``ignore``. Under fp16 with a GradScaler the scaler already
            skips such steps, so only their count is kept.
        max_consecutive_skips: with ``skip``, raise after this many skipped steps in a row.
        log_every_n_steps: record every this many optimizer steps (default: the trainer's ``log_every_n_steps``).
        layer_stats: record per-layer statistics (``grad_norm/<layer>``, ``param_norm/<layer>``,
            ``grad_ratio/<layer>``, ``grad_nonfinite/<layer>``) on recording steps.
        layer_depth: report layers aggregated to this many components of the module path (default: the module
            that owns the parameters).
        per_parameter: report each parameter tensor on its own instead of per module.
        layer_include / layer_exclude: glob patterns on layer names to report / leave out.
        log_grad_max: also record ``grad_max/<layer>``, the largest absolute gradient value before clipping.
        histogram_every: every this many recording steps, per-layer gradient histograms (W&B only; off by default).
        histogram_bins: bins per histogram.
        heatmap_every: every this many recording steps, and at the end of training, a layers x steps image of the
            per-layer gradient norms (W&B only; default: at the end only).
        progress_bar: show the latest ``grad_norm`` and ``clip_rate`` in Lightning's progress bar.
    """

    def __init__(
        self,
        method: str = "norm",
        *,
        max_norm: float | None = None,
        norm_type: float | str | None = None,
        clip_value: float | None = None,
        clip_factor: float | None = None,
        eps: float | None = None,
        exclude: str | list[str] | None = None,
        schedule: Literal["constant", "linear", "cosine"] | None = None,
        schedule_steps: int | None = None,
        schedule_factor: float | None = None,
        percentile: float | None = None,
        window: int | None = None,
        alpha: float | None = None,
        z_thresh: float | None = None,
        warmup_steps: int | None = None,
        mode: Literal["zscore", "percentile"] | None = None,
        clip_option: Literal["adaptive_scaling", "mean"] | None = None,
        skip_update_on_spike: bool | None = None,
        beta: float | None = None,
        lambda_rel: float | None = None,
        lambda_abs: float | None = None,
        nonfinite: Literal["skip", "raise", "ignore"] = "skip",
        max_consecutive_skips: int = 20,
        log_every_n_steps: int | None = None,
        layer_stats: bool = True,
        layer_depth: int | None = None,
        per_parameter: bool = False,
        layer_include: str | list[str] | None = None,
        layer_exclude: str | list[str] | None = None,
        log_grad_max: bool = False,
        histogram_every: int | None = None,
        histogram_bins: int = 64,
        heatmap_every: int | None = None,
        progress_bar: bool = True,
    ) -> None:
        arguments = locals()
        given = {name: arguments[name] for name in methods.PARAMETER_NAMES}
        try:
            self.params = methods.resolve(method, given)
        except ValueError as error:
            raise ClippingConfigError(f"GradientClipping: {error}") from None
        nonfinite = getattr(nonfinite, "value", nonfinite)  # a str Enum from a Hydra schema
        if nonfinite not in NONFINITE_MODES:
            raise ClippingConfigError(
                f"GradientClipping: nonfinite={nonfinite!r} is invalid: expected one of {', '.join(NONFINITE_MODES)}"
            )
        _check_count("max_consecutive_skips", max_consecutive_skips)
        if log_every_n_steps is not None:
            _check_count("log_every_n_steps", log_every_n_steps)
        if layer_depth is not None:
            _check_count("layer_depth", layer_depth)
        if layer_depth is not None and per_parameter:
            raise ClippingConfigError("GradientClipping: layer_depth and per_parameter=True exclude each other")
        self.grouping = LayerGrouping(
            layer_depth, per_parameter, _globs("layer_include", layer_include), _globs("layer_exclude", layer_exclude)
        )
        for name, value in (("histogram_every", histogram_every), ("heatmap_every", heatmap_every)):
            if value is not None:
                _check_count(name, value)
        _check_count("histogram_bins", histogram_bins)
        self.layer_stats = layer_stats
        self.log_grad_max = log_grad_max
        self.histogram_every = histogram_every
        self.histogram_bins = histogram_bins
        self.heatmap_every = heatmap_every
        self.progress_bar = progress_bar
        self.method = method
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.log_every_n_steps = log_every_n_steps
        self.last_metrics: dict[str, float] = {}
        self.largest_grad_norm = 0.0  # over recorded steps
        self.clipped_steps = 0.0  # steps on which clipping changed a gradient, among ...
        self.judged_steps = 0  # ... the steps on which that was known (over the run)
        self._clippers: dict[int, Clipper] = {}
        self._indices: dict[int, int] = {}
        self._restored: dict[int, dict[str, Any]] = {}
        self._wandb_defined: set[str] = set()
        self._records: dict[int, int] = {}
        self._heatmap: dict[str, dict[int, float]] = {}

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps this callback skipped for NaN/Inf gradients, over all optimizers."""
        return sum(clipper.skipped_steps for clipper in self._clippers.values())

    @property
    def state_key(self) -> str:
        return self._generate_state_key(method=self.method, **self.params)

    # ----------------------------------------------------------------------------------------- checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if trainer.gradient_clip_val:
            raise ClippingConfigError(
                f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) and GradientClipping would both clip "
                "(double clipping): remove gradient_clip_val from the Trainer and set the limit on "
                "GradientClipping instead, e.g. GradientClipping(method='norm', max_norm=...)."
            )
        if isinstance(trainer.strategy, FSDPStrategy):
            self._check_fsdp1(trainer.strategy)
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            raise ClippingConfigError(
                "GradientClipping does not support DeepSpeed, which clips inside its engine: use DeepSpeed's own "
                "`gradient_clipping` setting instead of this callback."
            )

    def _check_fsdp1(self, strategy: FSDPStrategy) -> None:
        """FSDP1 flattens each unit's parameters into one flat parameter and splits it into equal shards. Norms of
        whole tensors reduce exactly (one collective); what needs a tensor's shape on one rank does not."""
        _, operator = methods.build(self.method, self.params)
        if isinstance(operator, UnitwiseClip):
            raise ClippingConfigError(
                f"GradientClipping(method={self.method!r}) does not support FSDPStrategy (FSDP1): its flat shards "
                "split AGC's units (rows) across ranks at arbitrary offsets. Use ModelParallelStrategy with "
                "fully_shard (FSDP2), whose dim-0 shards keep every unit on one rank, or a norm-based method."
            )
        if isinstance(operator, TensorNormClip) and not strategy.kwargs.get("use_orig_params", True):
            raise ClippingConfigError(
                f"GradientClipping(method={self.method!r}) clips each parameter tensor on its own, but "
                "FSDPStrategy(use_orig_params=False) hands the optimizer one flat parameter per FSDP unit: use "
                "FSDPStrategy(use_orig_params=True) (Lightning's default) or a global-norm method."
            )

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for optimizer in trainer.optimizers:
            if _scaler(trainer) is not None and getattr(optimizer, "_step_supports_amp_scaling", False):
                raise ClippingConfigError(
                    f"{type(optimizer).__name__} unscales fp16 gradients inside its own step (a fused optimizer), "
                    "so they are still scaled when GradientClipping sees them: use the optimizer without "
                    "fused=True, or train in bf16-mixed."
                )
            self._clipper(trainer, pl_module, optimizer)
        patterns = self.params.get("exclude", ())
        if patterns:
            unmatched = [p for p in patterns if all(c.params.unmatched([p]) for c in self._clippers.values())]
            if unmatched:
                rank_zero_warn(
                    f"GradientClipping: exclude pattern(s) {unmatched} match no parameter of any optimizer; "
                    "patterns are globs on parameter names (e.g. 'head.weight') or module names (e.g. 'head')."
                )

        for logger in _wandb_loggers(trainer):
            logger.experiment.config.update({"clipping": self.config()}, allow_val_change=True)

    def config(self) -> dict[str, Any]:
        """The clipping configuration, as recorded in the W&B run config."""
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.params.items()}
        return {"method": self.method, **params, "nonfinite": self.nonfinite}

    # ----------------------------------------------------------------------------------------- the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        clipper = self._clipper(trainer, pl_module, optimizer)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        recording = (clipper.steps + 1) % every == 0
        records = self._records.get(id(optimizer), 0) + recording
        self._records[id(optimizer)] = records
        histogram = recording and self.histogram_every is not None and records % self.histogram_every == 0
        record = clipper.step(record=recording, histogram=histogram)
        if clipper.last_nonfinite:
            self._log_nonfinite(trainer, clipper.last_nonfinite, record is not None)
        if record is not None:
            suffix = self._suffix(trainer, optimizer)
            self._log(trainer, record, suffix)
            if self.progress_bar:
                shown = {"grad_norm": self.last_metrics[f"grad/norm{suffix}"]}
                if f"clip/rate{suffix}" in self.last_metrics:
                    shown["clip_rate"] = self.last_metrics[f"clip/rate{suffix}"]
                pl_module.log_dict(
                    {key + suffix: value for key, value in shown.items()},
                    prog_bar=True,
                    logger=False,
                    on_step=True,
                    on_epoch=False,
                )
            if self.heatmap_every is not None and records % self.heatmap_every == 0:
                self._log_heatmap(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log_heatmap(trainer)

    def _log_heatmap(self, trainer: pl.Trainer) -> None:
        loggers = _wandb_loggers(trainer)
        if not loggers or not self._heatmap:
            return
        import wandb

        from lightning_clip import plots

        fig = plots.grad_norm_heatmap(self._heatmap)
        image = wandb.Image(fig)
        plots.close(fig)
        for logger in loggers:
            logger.experiment.log({"grad_norm_heatmap": image, "trainer/global_step": trainer.global_step})

    def _log_nonfinite(self, trainer: pl.Trainer, names: list[str], recorded: bool) -> None:
        """A skipped step: say which layers held NaN/Inf, first one first, even off the logging cadence."""
        layers = list(dict.fromkeys(self.grouping.layer(n) or n for n in names))
        if trainer.is_global_zero:
            log.warning(
                "GradientClipping: non-finite gradients at global step %d, first in layer %r (all: %s); step skipped",
                trainer.global_step,
                layers[0],
                ", ".join(layers),
            )
        if not recorded and self.layer_stats:
            for logger in trainer.loggers:
                logger.log_metrics({f"grad_nonfinite/{layer}": 1.0 for layer in layers}, step=trainer.global_step)

    def _clipper(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> Clipper:
        clipper = self._clippers.get(id(optimizer))
        if clipper is None:
            params = optimizer_params(optimizer)
            policy, operator = methods.build(self.method, self.params)
            if isinstance(trainer.strategy, FSDPStrategy):  # FSDP1: the root unit wraps pl_module
                root = trainer.strategy.model
                param_set = ParamSet(name_params(params, root), params, fsdp1_shards(root))
            else:
                param_set = ParamSet(name_params(params, pl_module), params)
            clipper = Clipper(
                policy,
                operator,
                param_set,
                nonfinite=self.nonfinite,
                max_consecutive_skips=self.max_consecutive_skips,
                scaler_checks_nonfinite=_scaler(trainer) is not None,
                stats=LayerStats(self.grouping, self.log_grad_max, self.histogram_bins) if self.layer_stats else None,
            )
            index = _index(trainer, optimizer)
            if index in self._restored:
                clipper.load_state_dict(self._restored.pop(index))
            self._clippers[id(optimizer)] = clipper
            self._indices[id(optimizer)] = index
        return clipper

    @staticmethod
    def _suffix(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> str:
        return "" if len(trainer.optimizers) <= 1 else f"_opt{_index(trainer, optimizer)}"

    def _log(self, trainer: pl.Trainer, record: StepRecord, suffix: str) -> None:
        grad_norm = torch.linalg.vector_norm(record.grad_norms)
        clipped_norm = torch.linalg.vector_norm(record.clipped_norms)
        threshold = record.threshold
        on_device = [grad_norm, clipped_norm, record.clipped_steps, record.nonfinite_steps]
        if isinstance(threshold, torch.Tensor):
            on_device.append(threshold.mean())
        layer_stats = dict(record.layer_stats)
        hist = layer_stats.pop("grad_hist", None)
        on_device = [v.reshape(1).to(grad_norm) for v in on_device]
        on_device += [v.to(grad_norm) for v in layer_stats.values()]
        if hist is not None:
            on_device.append(hist.reshape(-1).to(grad_norm))
        values = torch.cat(on_device).tolist()  # the one transfer to the host of a recording step
        norm, clipped, clipped_steps, nonfinite_steps = values[:4]
        position = 4
        if isinstance(threshold, torch.Tensor):
            threshold_value, position = values[4], 5
        else:
            threshold_value = float(threshold)
        metrics = {
            "grad/norm": norm,
            "grad/norm_clipped": clipped,
            "clip/coef": clipped / norm if norm > 0 else 1.0,
            "clip/nonfinite_steps": nonfinite_steps,
            "clip/skipped_steps": float(record.skipped_steps),
        }
        if math.isfinite(threshold_value):
            metrics["clip/threshold"] = threshold_value
        if record.judged_steps:
            metrics["clip/rate"] = clipped_steps / record.judged_steps
        self.largest_grad_norm = max(self.largest_grad_norm, norm) if math.isfinite(norm) else math.inf
        self.clipped_steps += clipped_steps
        self.judged_steps += record.judged_steps
        metrics = {key + suffix: value for key, value in metrics.items()}
        count = len(record.layers)
        for stat in layer_stats:
            for layer, value in zip(record.layers, values[position : position + count]):
                metrics[f"{stat}/{layer}"] = value
            position += count
        for layer in record.layers:
            self._heatmap.setdefault(layer, {})[trainer.global_step] = metrics[f"grad_norm/{layer}"]
        self.last_metrics.update(metrics)
        self._define_wandb_summaries(trainer, metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)
        if hist is not None:
            counts = values[position:]
            self._log_histograms(trainer, record.layers, counts, metrics)

    def _log_histograms(self, trainer: pl.Trainer, layers: list[str], counts: list[float], metrics) -> None:
        loggers = _wandb_loggers(trainer)
        if not loggers:
            return
        import numpy as np
        import wandb

        bins = self.histogram_bins
        histograms = {}
        for k, layer in enumerate(layers):
            limit = metrics[f"grad_max/{layer}"]
            if not math.isfinite(limit):
                continue
            edges = np.linspace(-limit, limit, bins + 1) if limit > 0 else np.linspace(-1.0, 1.0, bins + 1)
            histograms[f"grad_hist/{layer}"] = wandb.Histogram(np_histogram=(counts[k * bins : (k + 1) * bins], edges))
        for logger in loggers:
            logger.experiment.log({**histograms, "trainer/global_step": trainer.global_step})

    def _define_wandb_summaries(self, trainer: pl.Trainer, metrics: dict[str, float]) -> None:
        """Exact-name ``define_metric`` calls for new keys (W&B ignores globs after WandbLogger's own ``*``)."""
        new = [key for key in metrics if key not in self._wandb_defined]
        if not new:
            return
        self._wandb_defined.update(new)
        for logger in _wandb_loggers(trainer):
            for key in new:
                summary = WANDB_SUMMARIES.get(key.split("_opt")[0]) or ("max" if key.startswith("grad_") else None)
                if summary:
                    escaped = key.replace(".", "\\.")
                    logger.experiment.define_metric(escaped, summary=summary, step_metric="trainer/global_step")

    # ----------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "optimizers": {self._indices[key]: c.state_dict() for key, c in self._clippers.items()},
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict.get("method") != self.method:
            raise ClippingConfigError(
                f"GradientClipping(method={self.method!r}) cannot restore state saved by "
                f"method={state_dict.get('method')!r}"
            )
        restored = dict(state_dict["optimizers"])
        for key, clipper in self._clippers.items():
            if self._indices[key] in restored:
                clipper.load_state_dict(restored.pop(self._indices[key]))
        self._restored = restored


def _check_count(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ClippingConfigError(f"GradientClipping: {name}={value!r} is invalid: expected an integer >= 1")


def _globs(name: str, value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list | tuple) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise ClippingConfigError(f"GradientClipping: {name}={value!r} is invalid: expected a glob or a list of globs")


def _wandb_loggers(trainer: pl.Trainer) -> list[Any]:
    """The trainer's WandbLoggers on rank zero (W&B is optional: without it installed there are none)."""
    if not trainer.is_global_zero:
        return []
    return [logger for logger in trainer.loggers if type(logger).__name__ == "WandbLogger"]


def _scaler(trainer: pl.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    for i, candidate in enumerate(trainer.optimizers):
        if candidate is optimizer:
            return i
    return len(trainer.optimizers)
