"""The lightning_clip Hydra app: train a model with GradientClipping, log to W&B (offline by default), report.

    python scripts/train.py                            # the demo: tanh RNN, adding problem, AGC (the default clipping)
    python scripts/train.py clipping=agc clipping.clip_factor=0.02
    python scripts/train.py clipping=none                        # watch it diverge
    python scripts/train.py trainer=ddp trainer.devices=2        # 2 processes on CPU (gloo)
    python scripts/train.py logger=csv trainer.precision=bf16-mixed
    python scripts/train.py -m clipping=norm,agc,value seed=0,1,2
    python scripts/train.py ckpt_path=outputs/<date>/<time>/checkpoints/last.ckpt  # resume (same overrides)
    python scripts/train.py --cfg job                            # print the composed config

Configs: conf/ (model, data, trainer, logger, experiment) and the packaged clipping group (lightning_clip/conf).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import hydra
import lightning.pytorch as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import get_class, instantiate
from lightning.pytorch.callbacks import LearningRateMonitor
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from omegaconf import DictConfig, OmegaConf

from lightning_clip import ClippingConfigError, GradientClipping, NonFiniteGradientError
from lightning_clip.report import report

CONF = str(Path(__file__).resolve().parents[1] / "conf")


def make_clipping(cfg: DictConfig) -> GradientClipping:
    """The callback from ``cfg.clipping``; a bad value ends the process with the callback's own message."""
    try:
        return instantiate(cfg.clipping)
    except Exception as error:  # Hydra wraps what the target raised
        refuse_clipping_config(error.__cause__ or error)
        raise


def refuse_clipping_config(error: BaseException) -> None:
    """End the process with the message of a ``ClippingConfigError`` (a bad value, or a clipping that the trainer
    or the model cannot take, found before training starts) and no traceback; other errors are left to raise."""
    if isinstance(error, ClippingConfigError):
        print(f"error in clipping config: {error}", file=sys.stderr)
        sys.exit(2)


def check_model_data(cfg: DictConfig) -> None:
    """An example model trains on one kind of data (its class's ``datamodule``): another ends the process with a
    message naming the ``data=`` option that fits, before anything is built. Models without ``datamodule`` pass."""
    model, data = get_class(cfg.model._target_), get_class(cfg.data._target_)
    wanted = getattr(model, "datamodule", None)
    if wanted is None or issubclass(data, wanted):
        return
    options = [f"data={path.stem}" for path in sorted(Path(CONF, "data").glob("*.yaml"))
               if get_class(OmegaConf.load(path)._target_) is wanted]  # fmt: skip
    fits = " or ".join(options) or wanted.__name__
    print(f"error: {model.__name__} (model) trains on {wanted.__name__}, not {data.__name__}: use {fits}",
          file=sys.stderr)  # fmt: skip
    sys.exit(2)


def check_run_options(cfg: DictConfig) -> None:
    """``seed`` and ``threads`` are integers, and ``ckpt_path`` names a checkpoint that exists (a file, or a directory
    as FSDP2 writes one; or Lightning's ``last``, found in this run's ``checkpoints/``): else the process ends with a
    message, before anything is built."""
    for key, least in (("seed", 0), ("threads", 1)):
        value = cfg.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or value < least:
            print(f"error: {key}={value!r} is invalid: expected an integer >= {least}", file=sys.stderr)
            sys.exit(2)
    path = cfg.get("ckpt_path")
    if path is not None and path != "last" and not Path(str(path)).exists():
        example = "outputs/<date>/<time>/checkpoints/last.ckpt (a directory under trainer=fsdp2)"
        print(f"error: ckpt_path={path!r} does not exist: give a checkpoint of an earlier run, e.g. {example}",
              file=sys.stderr)  # fmt: skip
        sys.exit(2)


def make_callbacks(cfg: DictConfig, clipping: GradientClipping, logger) -> list[pl.Callback]:
    """The clipping callback, then those of the ``callbacks`` group; a learning-rate monitor needs a logger, and a
    clipping callback there would clip twice, so it is refused."""
    callbacks: list[pl.Callback] = [clipping]
    for name, spec in (cfg.get("callbacks") or {}).items():
        callback = instantiate(spec)
        if isinstance(callback, GradientClipping):
            print(f"error: callbacks.{name} is a GradientClipping; set clipping in the clipping group", file=sys.stderr)
            sys.exit(2)
        if isinstance(callback, LearningRateMonitor) and not logger:
            continue
        callbacks.append(callback)
    return callbacks


def log_run_config(cfg: DictConfig, logger) -> None:
    """The whole composed, resolved config (model, data, trainer, logger, seed, ...) in the W&B run config, as nested
    dicts W&B can filter and group by; ``clipping`` stays the callback's own entry, and ``_target_`` keys are left
    out."""
    if not isinstance(logger, WandbLogger):
        return
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("clipping", None)
    logger.log_hyperparams(_without_targets(config))  # rank zero only


def _without_targets(value):
    if isinstance(value, dict):
        return {k: _without_targets(v) for k, v in value.items() if k not in ("_target_", "_convert_")}
    return value


def make_logger(cfg: DictConfig):
    """The configured Lightning logger, or False; W&B runs of a sweep share a group named after the sweep."""
    if not cfg.get("logger") or not cfg.logger.get("_target_"):
        return False
    extra = {}
    if cfg.logger._target_.endswith("WandbLogger"):
        hydra_cfg = HydraConfig.get()
        extra["name"] = hydra_cfg.job.override_dirname or hydra_cfg.job.name
        if hydra_cfg.mode == RunMode.MULTIRUN:
            extra["group"] = Path(hydra_cfg.sweep.dir).name
    return instantiate(cfg.logger, **extra)


@hydra.main(version_base="1.3", config_path=CONF, config_name="train")
def main(cfg: DictConfig) -> float:
    check_run_options(cfg)
    torch.set_num_threads(cfg.threads)
    pl.seed_everything(cfg.seed, verbose=False)
    check_model_data(cfg)
    clipping = make_clipping(cfg)
    output = Path(HydraConfig.get().runtime.output_dir)
    logger = make_logger(cfg)
    log_run_config(cfg, logger)
    callbacks = make_callbacks(cfg, clipping, logger)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=logger, default_root_dir=str(output))
    diverged = None
    try:
        trainer.fit(instantiate(cfg.model), datamodule=instantiate(cfg.data), ckpt_path=cfg.get("ckpt_path"))
    except NonFiniteGradientError as error:  # a diverged run is an outcome to report, not a crash
        diverged = str(error)
    except ClippingConfigError as error:  # the callback's checks of the trainer and optimizers (on_fit_start)
        refuse_clipping_config(error)
    loss = math.nan if diverged else float(trainer.callback_metrics.get("train/loss", torch.tensor(math.nan)))
    if torch.distributed.is_initialized():  # else gloo's threads may abort the process at exit
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return loss

    wandb_dir = None
    if isinstance(logger, WandbLogger):
        wandb_dir = Path(logger.experiment.dir).parent
        logger.experiment.finish()  # close the run: a sweep's next job starts its own
    plots = report(output) if cfg.report and isinstance(logger, CSVLogger | WandbLogger) else []  # what it reads
    rate = clipping.clipped_steps / clipping.judged_steps if clipping.judged_steps else math.nan
    print("\n--- lightning_clip run summary ---")
    print(f"clipping              {clipping.method.name} {clipping.method.params()}")
    print(f"final train loss      {loss:.4g}{'' if math.isfinite(loss) else '  (diverged)'}")
    if diverged:
        print(f"stopped at step {trainer.global_step}: {diverged}")
    if clipping.recorded_steps:
        print(f"clip rate             {rate:.2f} of optimizer steps clipped (recorded steps)")
        print(f"largest pre-clip norm {clipping.largest_grad_norm:.4g}")
    else:
        print("clip rate             n/a: no step was recorded (trainer.log_every_n_steps)")
    print(f"skipped steps         {clipping.skipped_steps} (NaN/Inf gradients)")
    print(f"output directory      {output}")
    if plots:
        print(f"report                {plots[0].parent}")
    if wandb_dir is not None:
        print(f"W&B offline run       {wandb_dir}")
        print(f"upload it with        wandb sync {wandb_dir}")
    return loss


if __name__ == "__main__":
    main()
