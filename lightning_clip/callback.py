"""The Lightning glue: ``GradientClipping``, a callback that clips in ``on_before_optimizer_step``.

Lightning calls that hook after backward, after gradient accumulation, after a GradScaler has unscaled fp16
gradients, and before the optimizer steps (and before its own ``gradient_clip_val`` clipping). The engine
(``Clipper``) knows nothing of Lightning; this module picks the optimizer's parameters and names, checks the
trainer before training starts, keeps what belongs to one fit, and hands what was recorded to the loggers
(``wandb_logging.py`` for what only W&B takes).
"""

from __future__ import annotations

import ast
import logging
import math
import numbers
from dataclasses import dataclass, field
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities import rank_zero_warn

from lightning_clip import methods, wandb_logging
from lightning_clip.clipper import NONFINITE_MODES, Clipper, HostRecord, SpikeReport
from lightning_clip.methods import SPAM, Method
from lightning_clip.operators import TensorNormClip, UnitwiseClip
from lightning_clip.params import name_params, optimizer_params
from lightning_clip.sharding import fsdp1_shards
from lightning_clip.stats import LayerGrouping, LayerStats
from lightning_clip.updates import UpdateMonitor
from lightning_clip.wandb_logging import WandbExtras

log = logging.getLogger("lightning_clip")

#: The version of the state this callback saves in checkpoints (1: lightning_clip 0.1.0, keyed by every parameter).
STATE_VERSION = 2
#: W&B histograms take at most this many bins.
MAX_HISTOGRAM_BINS = 512


class ClippingConfigError(MisconfigurationException, ValueError):
    """A ``GradientClipping`` argument, or the trainer it is used with, is misconfigured."""


@dataclass
class _Fit:
    """What one ``fit`` owns; a new one starts with every fit, so a reused callback carries nothing stale over.
    Clippers are keyed by the optimizer's index in ``trainer.optimizers``, as their state is in checkpoints."""

    wandb: WandbExtras
    updates: UpdateMonitor = field(default_factory=UpdateMonitor)
    clippers: dict[int, Clipper] = field(default_factory=dict)
    records: dict[int, int] = field(default_factory=dict)
    restored: dict[int, dict[str, Any]] = field(default_factory=dict)


class GradientClipping(Callback):
    """Clip the gradients of the optimizer about to step, and record what was done.

    ``GradientClipping("agc", clip_factor=0.02)``, or ``GradientClipping(AGC(clip_factor=0.02))``: each method's
    class in ``lightning_clip.methods`` documents its parameters. ``GradientClipping()`` is AGC with its defaults.

    Args:
        nonfinite: on NaN/Inf gradients, ``skip`` the optimizer step (parameters and optimizer state unchanged),
            ``raise`` an error naming the tensors, or ``ignore``. Under fp16 the GradScaler skips such steps itself.
        max_consecutive_skips: with ``skip``, raise after this many skipped steps in a row (spikes included).
        skip_spikes: skip a step whose global gradient norm exceeds the mean of the last ``spike_window`` norms by
            more than this many standard deviations (``spikes.py``; needs ``nonfinite="skip"``; off by default).
        log_every_n_steps: record every this many optimizer steps (default: the trainer's ``log_every_n_steps``;
            where that is 0, Lightning logs no step, and nothing is recorded; clipping goes on).
        layer_stats: record per-layer ``grad_norm``, ``param_norm``, ``grad_ratio``, ``grad_nonfinite``; layers
            are owning modules, or ``layer_depth`` components of the module path, or tensors (``per_parameter``),
            filtered by the globs ``layer_include`` / ``layer_exclude``.
        track_max: record ``grad/norm_max`` and ``grad_norm_max/<layer>``, the largest L2 norms since the last
            record (every step counts); default: where the method measures L2 norms every step anyway.
        log_grad_max: also record ``grad_max/<layer>``, the largest absolute gradient value before clipping.
        log_updates: on recording steps, record ``update_norm/<layer>``, ``update_ratio/<layer>`` and
            ``update/ratio``, the update the optimizer applied (``updates.py``; one copy of the parameters).
        histogram_every, histogram_bins: per-layer gradient histograms every this many records (W&B only).
        heatmap_every: a layers x steps image of per-layer gradient norms every this many records and at the end.
        progress_bar: show the latest ``grad_norm`` and ``clip_rate`` in Lightning's progress bar.
        name: tells apart callbacks of one method in checkpoints (thresholds are not part of the identity: a run
            resumed with a changed threshold keeps its adaptive state).
        optimizers: indices of the optimizers to clip (default: all), e.g. a GAN's generator and critic apart.
    """

    def __init__(
        self,
        method: str | Method = "agc",
        *,
        max_norm: float | None = None,
        norm_type: float | str | None = None,
        schedule: Literal["constant", "linear", "cosine"] | None = None,
        schedule_steps: int | None = None,
        schedule_factor: float | None = None,
        clip_value: float | None = None,
        clip_factor: float | None = None,
        eps: float | None = None,
        max_update_ratio: float | None = None,
        exclude: str | list[str] | None = None,
        percentile: float | None = None,
        window: int | None = None,
        alpha: float | None = None,
        z_thresh: float | None = None,
        warmup_steps: int | None = None,
        mode: Literal["zscore", "percentile"] | None = None,
        clip_option: Literal["adaptive_scaling", "mean"] | None = None,
        threshold_scale: float | None = None,
        threshold_cap: float | None = None,
        freeze_on_spike: bool | None = None,
        std_eps: float | None = None,
        beta: float | None = None,
        lambda_rel: float | None = None,
        lambda_abs: float | None = None,
        theta: float | None = None,
        warmup_update_ratio: float | None = None,
        clipped_history: bool | None = None,
        clipped_warmup: bool | None = None,
        warmup_threshold: Literal["ema", "min"] | None = None,
        nonfinite: Literal["skip", "raise", "ignore"] = "skip",
        max_consecutive_skips: int = 20,
        skip_spikes: float | None = None,
        spike_window: int = 128,
        track_max: bool | None = None,
        log_every_n_steps: int | None = None,
        layer_stats: bool = True,
        layer_depth: int | None = None,
        per_parameter: bool = False,
        layer_include: str | list[str] | None = None,
        layer_exclude: str | list[str] | None = None,
        log_grad_max: bool = False,
        log_updates: bool = False,
        histogram_every: int | None = None,
        histogram_bins: int = 64,
        heatmap_every: int | None = None,
        progress_bar: bool = True,
        name: str | None = None,
        optimizers: int | list[int] | None = None,
        **renamed: Any,
    ) -> None:
        arguments = locals()
        given = {key: arguments[key] for key in methods.PARAMETER_NAMES} | renamed
        self.method = _method(method, given)
        modes = "one of " + ", ".join(NONFINITE_MODES)
        self.nonfinite = _checked("nonfinite", nonfinite, lambda v: v in NONFINITE_MODES, modes)
        self.max_consecutive_skips = _count("max_consecutive_skips", max_consecutive_skips)
        self.spike_window = _count("spike_window", spike_window)
        self.track_max = _checked("track_max", track_max, lambda v: v in (None, True, False), "True, False or None")
        _checked("skip_spikes", skip_spikes, _positive_or_none, "a finite number > 0, or None")
        self.skip_spikes = None if skip_spikes is None else float(skip_spikes)
        _checked(
            "skip_spikes", skip_spikes, lambda v: v is None or nonfinite == "skip", "None with nonfinite != 'skip'"
        )
        self.log_every_n_steps = _count("log_every_n_steps", log_every_n_steps, optional=True)
        if layer_depth is not None and per_parameter:
            raise ClippingConfigError("GradientClipping: layer_depth and per_parameter=True exclude each other")
        self.grouping = LayerGrouping(
            _count("layer_depth", layer_depth, optional=True),
            per_parameter,
            _globs("layer_include", layer_include),
            _globs("layer_exclude", layer_exclude),
        )
        self.histogram_every = _count("histogram_every", histogram_every, optional=True)
        self.heatmap_every = _count("heatmap_every", heatmap_every, optional=True)
        self.histogram_bins = _count("histogram_bins", histogram_bins)
        if histogram_bins > MAX_HISTOGRAM_BINS:
            raise ClippingConfigError(
                f"GradientClipping: histogram_bins={histogram_bins} is invalid: expected an integer in [1, "
                f"{MAX_HISTOGRAM_BINS}] (W&B's largest histogram)"
            )
        self.layer_stats, self.log_grad_max, self.progress_bar = layer_stats, log_grad_max, progress_bar
        self.log_updates = log_updates
        self.name = _checked("name", name, lambda v: v is None or (isinstance(v, str) and v), "a non-empty string")
        self.optimizers = _indices(optimizers)
        self._fit = _Fit(WandbExtras(self.histogram_bins, self.heatmap_every))
        self._reset_summary()

    def _reset_summary(self) -> None:
        self.last_metrics: dict[str, float] = {}
        self.largest_grad_norm = 0.0  # over recorded steps
        self.clipped_steps = 0.0  # steps on which clipping changed a gradient, among ...
        self.judged_steps = 0  # ... the steps on which that was known (over the run)

    @property
    def clippers(self) -> dict[int, Clipper]:
        """The engines of the current (or last) fit, by optimizer index."""
        return self._fit.clippers

    @property
    def recorded_steps(self) -> int:
        """Steps recorded in the current (or last) fit, over all optimizers."""
        return sum(self._fit.records.values())

    @property
    def skipped_steps(self) -> int:
        """Optimizer steps this callback skipped for NaN/Inf gradients, over all optimizers."""
        return sum(clipper.skipped_steps for clipper in self.clippers.values())

    @property
    def state_key(self) -> str:
        identity = {"method": self.method.name} | ({"name": self.name} if self.name else {})
        return self._generate_state_key(**identity)

    def config(self) -> dict[str, Any]:
        """The clipping configuration, as recorded in the W&B run config."""
        return {"method": self.method.name, **self.method.params(), "nonfinite": self.nonfinite}

    # ----------------------------------------------------------------------------------------- checks
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self._fit = _Fit(WandbExtras(self.histogram_bins, self.heatmap_every))
        self._reset_summary()
        _check_trainer(self, trainer)
        _check_module(self, pl_module)

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for index, optimizer in _selected(trainer, self.optimizers, self.method):
            self._clipper(trainer, pl_module, index, optimizer)
        _warn_unmatched(self.method.exclude, self.clippers.values())
        unmatched, layers = self.grouping.unmatched([name for c in self.clippers.values() for name in c.names])
        if unmatched and self.layer_stats:
            rank_zero_warn(
                f"GradientClipping: layer_include/layer_exclude pattern(s) {unmatched} match no layer; patterns are "
                f"globs on layer names, which here look like {layers}."
            )
        wandb_logging.log_config(wandb_logging.wandb_loggers(trainer), self.config())

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage == "fit":
            for clipper in self.clippers.values():
                clipper.release()
            self._fit.updates.close()
            for attached in ("log", "log_dict"):  # Lightning binds the module's own onto every callback
                vars(self).pop(attached, None)

    # ----------------------------------------------------------------------------------------- the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        index = _index(trainer, optimizer)
        if self.optimizers is not None and index not in self.optimizers:
            return
        clipper = self._clipper(trainer, pl_module, index, optimizer)
        if clipper.optimizer is not optimizer:
            clipper = _replace_optimizer(self, trainer, pl_module, index, optimizer, clipper)
        elif sum(len(group["params"]) for group in optimizer.param_groups) != len(clipper.names):
            _follow(trainer, pl_module, index, optimizer, clipper)
        every = self.log_every_n_steps or trainer.log_every_n_steps  # the trainer's 0: no step is logged
        recording = every > 0 and (clipper.steps + 1) % every == 0
        records = self._fit.records[index] = self._fit.records.get(index, 0) + recording
        histogram = recording and self.histogram_every is not None and records % self.histogram_every == 0
        record = clipper.step(record=recording, histogram=histogram)
        if clipper.last_spike is not None:
            _report_spike(trainer, self.grouping.layer(clipper.last_spike.tensor), clipper.last_spike)
        if clipper.last_nonfinite is not None:
            _report_skip(
                trainer,
                [self.grouping.layer(n) or n for n in clipper.last_nonfinite],
                record is None and self.layer_stats,
            )
        if record is None:
            return
        suffix = "" if len(trainer.optimizers) <= 1 else f"_opt{index}"
        metrics = self._log(trainer, record.read(), suffix, records)
        if self.log_updates and not clipper.skipped_this_step:
            _watch_update(self, trainer, optimizer, clipper, suffix, record.param_norms)
        if self.progress_bar:
            shown = {"grad_norm": metrics["grad/norm"], "clip_rate": metrics.get("clip/rate")}
            pl_module.log_dict(
                {key + suffix: value for key, value in shown.items() if value is not None},
                prog_bar=True,
                logger=False,
                on_step=True,
                on_epoch=False,
            )

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        for clipper in self.clippers.values():
            clipper.flush()
        self._fit.wandb.finish(trainer)

    def _clipper(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, optimizer: torch.optim.Optimizer
    ) -> Clipper:
        clipper = self.clippers.get(index)
        if clipper is None:
            stats = LayerStats(self.grouping, self.log_grad_max, self.histogram_bins) if self.layer_stats else None
            clipper = _build_clipper(self, trainer, pl_module, optimizer, stats)
            if index in self._fit.restored:
                _restore(clipper, self._fit.restored.pop(index))
            self.clippers[index] = clipper
        return clipper

    def _log(self, trainer: pl.Trainer, record: HostRecord, suffix: str, count: int) -> dict[str, float]:
        metrics, norm = record.metrics(), record.grad_norm
        self.largest_grad_norm = max(self.largest_grad_norm, norm) if math.isfinite(norm) else math.inf
        self.clipped_steps += record.clipped_steps
        self.judged_steps += record.judged_steps
        keyed = {base + suffix: value for base, value in metrics.items()}
        self.last_metrics.update(keyed)
        for logger in trainer.loggers:
            logger.log_metrics(keyed, step=trainer.global_step)
        self._fit.wandb.record(trainer, record, metrics, suffix, count)
        return metrics

    # ----------------------------------------------------------------------------------------- checkpoint
    def state_dict(self) -> dict[str, Any]:
        optimizers = {**self._fit.restored, **{i: c.state_dict() for i, c in self.clippers.items()}}
        return {"version": STATE_VERSION, "method": self.method.name, "params": self.method.params(),
                "optimizers": optimizers}  # fmt: skip

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        _check_state(self.method, state_dict)
        self._fit.restored = dict(state_dict["optimizers"])
        for index, clipper in self.clippers.items():
            if index in self._fit.restored:
                _restore(clipper, self._fit.restored.pop(index))

    def on_load_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict) -> None:
        """A checkpoint of lightning_clip 0.1.0 keyed its state by every parameter: find it under that key."""
        states = checkpoint.get("callbacks") or {}
        if self.state_key not in states and not self.name:
            legacy = _legacy_state(states, self.method)
            if legacy is not None:
                states[self.state_key] = legacy


def _selected(
    trainer: pl.Trainer, indices: tuple[int, ...] | None, method: Method
) -> list[tuple[int, torch.optim.Optimizer]]:
    """The (index, optimizer) pairs a callback clips, each checked."""
    count = len(trainer.optimizers)
    if indices is not None and max(indices) >= count:
        raise ClippingConfigError(
            f"GradientClipping: optimizers={list(indices)} is invalid: the module has {count} optimizer(s), "
            f"indices 0..{count - 1}"
        )
    selected = [(i, opt) for i, opt in enumerate(trainer.optimizers) if indices is None or i in indices]
    for _, optimizer in selected:
        _check_optimizer(trainer, optimizer, method)
    return selected


def _warn_unmatched(patterns: tuple[str, ...], clippers) -> None:
    unmatched = [p for p in patterns if all(c.params.unmatched([p]) for c in clippers)]
    if unmatched:
        rank_zero_warn(
            f"GradientClipping: exclude pattern(s) {unmatched} match no parameter of any optimizer; "
            "patterns are globs on parameter names (e.g. 'head.weight') or module names (e.g. 'head')."
        )


def _restore(clipper: Clipper, state: dict[str, Any]) -> None:
    try:
        clipper.load_state_dict(state)
    except ValueError as error:
        raise ClippingConfigError(
            f"GradientClipping({clipper.method.name!r}) cannot restore its state: {error}"
        ) from None


def _watch_update(
    callback: GradientClipping, trainer: pl.Trainer, optimizer, clipper: Clipper, suffix: str, param_norms
) -> None:
    """Snapshot the parameters of a recording step (``param_norms``: their norms, from the step's record); the update
    statistics are logged after the optimizer step, at this step's ``global_step``."""
    layout, step = clipper.params.layout(), trainer.global_step
    layers = LayerStats(callback.grouping).index(layout, layout.groups[0][0])

    def emit(metrics: dict[str, float]) -> None:
        keyed = {base + suffix: value for base, value in metrics.items()}
        callback.last_metrics.update(keyed)
        for logger in trainer.loggers:
            logger.log_metrics(keyed, step=step)

    callback._fit.updates.snapshot(optimizer, layout, layers, emit, param_norms)


def _report_skip(trainer: pl.Trainer, layers: list[str], unrecorded: bool) -> None:
    """A skipped step: warn on rank zero naming the layers that held NaN/Inf (every rank knows them: they come from
    norms after their collective), first one first, and write their ``grad_nonfinite/<layer>`` rows when the step
    is not a recording step (which writes them itself)."""
    layers = list(dict.fromkeys(layers))
    if trainer.is_global_zero:
        where = f"first in layer {layers[0]!r} (all: {', '.join(layers)})" if layers else "global norm overflow"
        log.warning(
            "GradientClipping: non-finite gradients at global step %d, %s; step skipped", trainer.global_step, where
        )
    if layers and unrecorded:
        for logger in trainer.loggers:
            logger.log_metrics({f"grad_nonfinite/{layer}": 1.0 for layer in layers}, step=trainer.global_step)


def _report_spike(trainer: pl.Trainer, layer: str | None, spike: SpikeReport) -> None:
    if trainer.is_global_zero:
        log.warning("GradientClipping: gradient-norm spike at global step %d (norm %.4g); step skipped; grew most: "
                    "layer %r (%.3gx its recent level)", trainer.global_step, spike.norm, layer or spike.tensor,
                    spike.ratio)  # fmt: skip


def _named_params(trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer, method: Method):
    """The optimizer's parameters with the module's names (FSDP1: the root unit's, with the layout of its flat
    shards), each checked."""
    params = optimizer_params(optimizer)
    _check_dense(pl_module, params, method)
    flat_shards = None
    if isinstance(trainer.strategy, FSDPStrategy):  # FSDP1: the root unit wraps pl_module
        pl_module, flat_shards = trainer.strategy.model, fsdp1_shards(trainer.strategy.model)
    return list(zip(name_params(params, pl_module), params)), flat_shards


def _follow(trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, optimizer, clipper: Clipper) -> None:
    """The optimizer's parameters changed during the fit (``add_param_group``, e.g. ``BackboneFinetuning``): the
    engine takes them on (:meth:`Clipper.follow`)."""
    held = len(clipper.names)
    try:
        clipper.follow(*_named_params(trainer, pl_module, optimizer, clipper.method))
    except ValueError as error:
        raise ClippingConfigError(f"GradientClipping({clipper.method.name!r}), optimizer {index}: {error}") from None
    if trainer.is_global_zero:
        log.info("GradientClipping: optimizer %d gained %d parameter(s) at global step %d; clipped from now on",
                 index, len(clipper.names) - held, trainer.global_step)  # fmt: skip


def _replace_optimizer(
    callback: GradientClipping, trainer: pl.Trainer, pl_module: pl.LightningModule, index: int, optimizer, old: Clipper
) -> Clipper:
    """The trainer's optimizer at ``index`` was replaced during the fit (``trainer.optimizers = [...]``, e.g. a switch
    from Adam to SGD). The engine built for the old one would read its learning rate and state, and on the fused path
    hand it the clip coefficient, clipping nothing: a new engine takes the new optimizer. Over the same parameters
    it carries the old one's state as a checkpoint does (step and skip counts, adaptive thresholds, the spike window);
    over others that state would describe other gradients, so it starts afresh, with a warning."""
    _check_optimizer(trainer, optimizer, callback.method)
    old.flush()
    new = _build_clipper(callback, trainer, pl_module, optimizer, old.stats)
    before, after = old.params.params, new.params.params
    if len(before) == len(after) and all(p is q for p, q in zip(before, after)):
        new.load_state_dict(old.state_dict())
    else:
        rank_zero_warn(f"GradientClipping({callback.method.name!r}): optimizer {index} was replaced by one over other "
                       "parameters; its clipping state (step counts, adaptive thresholds) starts afresh")  # fmt: skip
    old.release()
    callback.clippers[index] = new
    if trainer.is_global_zero:
        log.info("GradientClipping: optimizer %d was replaced at global step %d (now %s); clipped from now on",
                 index, trainer.global_step, type(optimizer).__name__)  # fmt: skip
    return new


def _build_clipper(
    callback: GradientClipping, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer, stats
) -> Clipper:
    """The engine for one optimizer (:func:`_named_params`)."""
    named, flat_shards = _named_params(trainer, pl_module, optimizer, callback.method)
    try:
        return Clipper(
            callback.method,
            named,
            flat_shards=flat_shards,
            optimizer=optimizer,
            nonfinite=callback.nonfinite,
            max_consecutive_skips=callback.max_consecutive_skips,
            scaler_checks_nonfinite=_scaler(trainer) is not None,
            grad_scaler=_scaler(trainer) if getattr(optimizer, "_step_supports_amp_scaling", False) else None,
            stats=stats,
            skip_spikes=callback.skip_spikes,
            spike_window=callback.spike_window,
            track_max=callback.track_max,
        )
    except ValueError as error:  # a parameter the method cannot clip
        raise ClippingConfigError(f"GradientClipping(method={callback.method.name!r}): {error}") from None


def _method(method: str | Method, given: dict[str, Any]) -> Method:
    set_params = sorted(k for k, v in given.items() if v is not None)
    try:
        if isinstance(method, Method):
            if set_params:
                raise ValueError(f"{', '.join(set_params)} given beside a method object: set them on the object")
            return method
        return methods.from_arguments(getattr(method, "value", method), given)
    except (ValueError, TypeError) as error:
        raise ClippingConfigError(f"GradientClipping: {error}") from None


def _legacy_state(states: dict[str, Any], method: Method) -> dict[str, Any] | None:
    """The state a 0.1.0 checkpoint saved for ``method`` under ``GradientClipping{'method': ..., <params>}``, with
    its parameters (renamed ones under their new names) for the changed-parameter warning: the one whose
    parameters equal ``method``'s, else the only one of that method."""
    candidates = []
    for key, state in states.items():
        if isinstance(key, str) and key.startswith("GradientClipping{") and "version" not in state:
            params = ast.literal_eval(key[len("GradientClipping") :])
            if params.pop("method", None) == method.name:
                params = {method.renamed.get(k, k): list(v) if isinstance(v, tuple) else v for k, v in params.items()}
                candidates.append({**state, "params": params})
    current = method.params()
    exact = [c for c in candidates if all(current.get(k) == v for k, v in c["params"].items())]
    return (exact or candidates)[0] if len(exact) == 1 or len(candidates) == 1 else None


def _check_module(callback: GradientClipping, pl_module: pl.LightningModule) -> None:
    """A module that overrides ``configure_gradient_clipping`` clips in it, after this callback: say so."""
    own = type(pl_module).configure_gradient_clipping is not pl.LightningModule.configure_gradient_clipping
    if own and not isinstance(callback.method, methods.NoClipping):
        rank_zero_warn(
            f"{type(pl_module).__name__} overrides configure_gradient_clipping, which Lightning calls after "
            f"GradientClipping({callback.method.name!r}) has clipped: if it clips too, each step is clipped twice. "
            "Remove the override, or keep it and record what it faces with GradientClipping(method='none')."
        )


def _check_trainer(callback: GradientClipping, trainer: pl.Trainer) -> None:
    later = trainer.callbacks[trainer.callbacks.index(callback) + 1 :] if callback in trainer.callbacks else []
    for other in later:  # each pair once
        shared = _shared_optimizers(callback, other) if isinstance(other, GradientClipping) else ""
        if shared:
            rank_zero_warn(
                f"GradientClipping({callback.method.name!r}) and GradientClipping({other.method.name!r}) both clip "
                f"{shared}: each step is clipped by both, in callback order, and both log the same metric names "
                "(the later one's values replace the earlier's). Unless you mean to stack them, keep one, or give "
                "each its own optimizers=[...]."
            )
    if callback.skip_spikes is not None and _scaler(trainer) is not None:
        raise ClippingConfigError(
            "GradientClipping(skip_spikes=...) cannot run under fp16 with a GradScaler, which owns the decision "
            "to skip a step (and would halve its scale on every skip): train in bf16-mixed or fp32, or leave "
            "skip_spikes unset."
        )
    if trainer.gradient_clip_val and not isinstance(callback.method, methods.NoClipping):
        raise ClippingConfigError(
            f"Trainer(gradient_clip_val={trainer.gradient_clip_val}) and GradientClipping would both clip "
            "(double clipping): remove gradient_clip_val from the Trainer and set the limit on "
            "GradientClipping instead, e.g. GradientClipping(method='norm', max_norm=...), or keep Lightning's "
            "clipping and record what it faces with GradientClipping(method='none')."
        )
    if isinstance(trainer.strategy, DeepSpeedStrategy):
        raise ClippingConfigError(
            "GradientClipping does not support DeepSpeed, which clips inside its engine: use DeepSpeed's own "
            "`gradient_clipping` setting instead of this callback."
        )
    if isinstance(trainer.strategy, FSDPStrategy):
        _check_fsdp1(callback.method, trainer.strategy)


def _shared_optimizers(one: GradientClipping, other: GradientClipping) -> str:
    """The optimizers two callbacks both clip, in words (empty when none)."""
    if one.optimizers is None or other.optimizers is None:
        return "every optimizer"
    shared = sorted(set(one.optimizers) & set(other.optimizers))
    return f"optimizers={shared}" if shared else ""


def _check_optimizer(trainer: pl.Trainer, optimizer: torch.optim.Optimizer, method: Method) -> None:
    if isinstance(method, SPAM) and not isinstance(optimizer, SPAM.optimizers):
        eligible = ", ".join(cls.__name__ for cls in SPAM.optimizers)
        raise ClippingConfigError(
            f"GradientClipping(method='spam') reads Adam's second moment (exp_avg_sq) from the optimizer, which "
            f"{type(optimizer).__name__} does not keep: use one of {eligible} (fused or foreach variants too), or "
            "another method for this optimizer (optimizers=[...] selects which a callback clips)."
        )


def _check_dense(pl_module: pl.LightningModule, params: list[torch.Tensor], method: Method) -> None:
    """Refuses, before training, a clipped parameter of an ``Embedding``/``EmbeddingBag(sparse=True)``: its
    gradients are sparse, which no clipping here (nor ``torch.nn.utils.clip_grad_norm_``) takes."""
    clipped = {id(p) for p in params}
    for name, module in pl_module.named_modules():
        if isinstance(module, torch.nn.Embedding | torch.nn.EmbeddingBag) and module.sparse:
            if id(module.weight) in clipped:
                raise ClippingConfigError(
                    f"GradientClipping(method={method.name!r}): {type(module).__name__} {name!r} has sparse=True, "
                    "so its weight gets sparse gradients, and clipping takes dense gradients only (as "
                    "torch.nn.utils.clip_grad_norm_ does): use sparse=False, or put the embedding in an optimizer "
                    "this callback does not clip (optimizers=[...])."
                )


def _check_state(method: Method, state: dict[str, Any]) -> None:
    """Refuses saved state that cannot apply (a newer format, another method); warns naming changed parameters."""
    version = state.get("version", 1)
    if version > STATE_VERSION:
        raise ClippingConfigError(
            f"GradientClipping: the checkpoint's clipping state has version {version}, written by a newer "
            f"lightning_clip; this one reads versions up to {STATE_VERSION}: upgrade lightning_clip"
        )
    if state.get("method") != method.name:
        raise ClippingConfigError(
            f"GradientClipping(method={method.name!r}) cannot restore state saved by method={state.get('method')!r}"
        )
    saved, current = state.get("params", {}), method.params()
    changed = [f"{k}: {saved[k]!r} -> {current[k]!r}" for k in current if k in saved and saved[k] != current[k]]
    if changed:
        rank_zero_warn(
            f"GradientClipping({method.name!r}): resuming with changed parameters ({'; '.join(changed)}); "
            "the saved adaptive state is restored and the new values apply from now on."
        )


def _check_fsdp1(method: Method, strategy: FSDPStrategy) -> None:
    """FSDP1 flattens each unit's parameters into one flat parameter and splits it into equal shards. Norms of whole
    tensors reduce exactly (one collective); what needs a tensor's shape on one rank does not."""
    _, operator = method.build()
    if isinstance(operator, UnitwiseClip):
        raise ClippingConfigError(
            f"GradientClipping(method={method.name!r}) does not support FSDPStrategy (FSDP1): its flat shards "
            "split AGC's units (rows) across ranks at arbitrary offsets. Use ModelParallelStrategy with "
            "fully_shard (FSDP2), whose dim-0 shards keep every unit on one rank, or a norm-based method."
        )
    if isinstance(operator, TensorNormClip) and not strategy.kwargs.get("use_orig_params", True):
        raise ClippingConfigError(
            f"GradientClipping(method={method.name!r}) clips each parameter tensor on its own, but "
            "FSDPStrategy(use_orig_params=False) hands the optimizer one flat parameter per FSDP unit: use "
            "FSDPStrategy(use_orig_params=True) (Lightning's default) or a global-norm method."
        )


def _checked(name: str, value: Any, ok, allowed: str) -> Any:
    value = getattr(value, "value", value)  # a str Enum from a Hydra schema
    if not ok(value):
        raise ClippingConfigError(f"GradientClipping: {name}={value!r} is invalid: expected {allowed}")
    return value


def _count(name: str, value: Any, optional: bool = False) -> Any:
    if optional and value is None:
        return None
    return int(_checked(name, value, methods.is_count, "an integer >= 1"))


def _globs(name: str, value: Any) -> tuple[str, ...]:
    try:
        return methods.patterns(value)
    except ValueError as allowed:
        raise ClippingConfigError(f"GradientClipping: {name}={value!r} is invalid: expected {allowed}") from None


def _positive_or_none(value: Any) -> bool:
    return value is None or (methods.is_number(value) and 0 < value < math.inf)


def _indices(value: Any) -> tuple[int, ...] | None:
    if value is None:
        return None
    values = [value] if isinstance(value, numbers.Integral) else value
    valid = (
        isinstance(values, list | tuple)
        and values
        and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= 0 for v in values)
    )
    _checked("optimizers", value, lambda v: valid, "an optimizer index >= 0 or a non-empty list of them")
    return tuple(int(v) for v in values)


def _scaler(trainer: pl.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    for i, candidate in enumerate(trainer.optimizers):
        if candidate is optimizer:
            return i
    return len(trainer.optimizers)
