"""The Lightning glue: ``GradientClipping``, a callback that clips in ``on_before_optimizer_step``.

Lightning calls that hook after backward, after gradient accumulation, after a GradScaler has unscaled fp16
gradients, and before the optimizer steps (and before its own ``gradient_clip_val`` clipping). The engine
(``Clipper``) knows nothing of Lightning; this module picks the optimizer's parameters and names, checks the
trainer before training starts, and hands what was recorded to the loggers.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn

from lightning_clip import methods
from lightning_clip.clipper import NONFINITE_MODES, Clipper, StepRecord
from lightning_clip.params import ParamSet, name_params, optimizer_params


class ClippingConfigError(MisconfigurationException, ValueError):
    """A ``GradientClipping`` argument, or the trainer it is used with, is misconfigured."""


class GradientClipping(Callback):
    """Clip the gradients of the optimizer about to step, and record what was done.

    ``GradientClipping(method="agc", clip_factor=0.02)``: ``method`` is one of ``none``, ``norm``, ``value``,
    ``tensor_norm``, ``agc``; the other keyword arguments are that method's parameters (see the README's tables or
    ``lightning_clip.METHODS``). Setting a parameter the method does not take is an error.

    Args:
        method: the clipping method.
        max_norm: ``norm`` / ``tensor_norm``: largest norm allowed (default 1.0).
        norm_type: ``norm`` / ``tensor_norm``: p of the p-norm, 1, 2, ... or ``inf`` (default 2).
        clip_value: ``value``: largest absolute gradient value allowed (required).
        clip_factor: ``agc``: largest ratio of unit gradient norm to unit parameter norm (default 0.01).
        eps: ``agc``: floor on unit parameter norms (default 1e-3).
        exclude: ``agc``: glob patterns of parameter or module names left unclipped, e.g. ``["head"]``.
        nonfinite: on NaN/Inf gradients, ``skip`` the optimizer step (parameters and optimizer state unchanged),
            ``raise`` an error naming the tensors, or ``ignore``. Under fp16 with a GradScaler the scaler already
            skips such steps, so only their count is kept.
        max_consecutive_skips: with ``skip``, raise after this many skipped steps in a row.
        log_every_n_steps: record every this many optimizer steps (default: the trainer's ``log_every_n_steps``).
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
        nonfinite: Literal["skip", "raise", "ignore"] = "skip",
        max_consecutive_skips: int = 20,
        log_every_n_steps: int | None = None,
    ) -> None:
        given = {
            "max_norm": max_norm,
            "norm_type": norm_type,
            "clip_value": clip_value,
            "clip_factor": clip_factor,
            "eps": eps,
            "exclude": exclude,
        }
        try:
            self.params = methods.resolve(method, given)
        except ValueError as error:
            raise ClippingConfigError(f"GradientClipping: {error}") from None
        if nonfinite not in NONFINITE_MODES:
            raise ClippingConfigError(
                f"GradientClipping: nonfinite={nonfinite!r} is invalid: expected one of {', '.join(NONFINITE_MODES)}"
            )
        _check_count("max_consecutive_skips", max_consecutive_skips)
        if log_every_n_steps is not None:
            _check_count("log_every_n_steps", log_every_n_steps)
        self.method = method
        self.nonfinite = nonfinite
        self.max_consecutive_skips = max_consecutive_skips
        self.log_every_n_steps = log_every_n_steps
        self.last_metrics: dict[str, float] = {}
        self._clippers: dict[int, Clipper] = {}
        self._indices: dict[int, int] = {}
        self._restored: dict[int, dict[str, Any]] = {}

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
        if type(trainer.strategy).__name__ == "DeepSpeedStrategy":
            raise ClippingConfigError(
                "GradientClipping does not support DeepSpeed, which clips inside its engine: use DeepSpeed's own "
                "`gradient_clipping` setting instead of this callback."
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
            unmatched = [p for p in patterns if all(p in c.params.unmatched([p]) for c in self._clippers.values())]
            if unmatched:
                rank_zero_warn(
                    f"GradientClipping: exclude pattern(s) {unmatched} match no parameter of any optimizer; "
                    "patterns are globs on parameter names (e.g. 'head.weight') or module names (e.g. 'head')."
                )

    # ----------------------------------------------------------------------------------------- the step
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        clipper = self._clipper(trainer, pl_module, optimizer)
        every = self.log_every_n_steps or trainer.log_every_n_steps
        record = clipper.step(record=(clipper.steps + 1) % every == 0)
        if record is not None:
            self._log(trainer, record, self._suffix(trainer, optimizer))

    def _clipper(self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer) -> Clipper:
        clipper = self._clippers.get(id(optimizer))
        if clipper is None:
            params = optimizer_params(optimizer)
            policy, operator = methods.build(self.method, self.params)
            clipper = Clipper(
                policy,
                operator,
                ParamSet(name_params(params, pl_module), params),
                nonfinite=self.nonfinite,
                max_consecutive_skips=self.max_consecutive_skips,
                scaler_checks_nonfinite=_scaler(trainer) is not None,
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
        values = torch.stack([v.to(grad_norm) for v in on_device]).tolist()  # the one transfer to the host
        norm, clipped, clipped_steps, nonfinite_steps = values[:4]
        threshold_value = values[4] if isinstance(threshold, torch.Tensor) else float(threshold)
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
        metrics = {key + suffix: value for key, value in metrics.items()}
        self.last_metrics.update(metrics)
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)

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


def _scaler(trainer: pl.Trainer) -> Any:
    return getattr(trainer.precision_plugin, "scaler", None)


def _index(trainer: pl.Trainer, optimizer: torch.optim.Optimizer) -> int:
    for i, candidate in enumerate(trainer.optimizers):
        if candidate is optimizer:
            return i
    return len(trainer.optimizers)
