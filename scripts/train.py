"""Demo: a tanh RNN on the adding problem (Pascanu et al. 2013), whose gradients explode without clipping, trained
with GradientClipping and logged to Weights & Biases in offline mode (no account needed).

    python scripts/train.py                       # norm clipping at 1.0, 800 steps, about half a minute on CPU
    python scripts/train.py --method agc --param clip_factor=0.05
    python scripts/train.py --method none         # watch it diverge
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import lightning.pytorch as pl
import torch
import yaml

from lightning_clip import GradientClipping
from lightning_clip.examples.adding import AddingDataModule, TanhRNN


class PeakNorm(pl.Callback):
    """Keeps the largest pre-clip gradient norm GradientClipping recorded."""

    def __init__(self, clipping: GradientClipping) -> None:
        self.clipping, self.peak = clipping, 0.0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.peak = max(self.peak, self.clipping.last_metrics.get("grad/norm", 0.0))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--method", default="norm")
    parser.add_argument(
        "--param",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of the method, e.g. max_norm=0.5 (repeatable)",
    )
    parser.add_argument("--steps", type=int, default=800)
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default="runs/demo")
    args = parser.parse_args()

    os.environ.setdefault("WANDB_MODE", "offline")
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    pl.seed_everything(args.seed, verbose=False)
    params = {k: yaml.safe_load(v) for k, v in (p.split("=", 1) for p in args.param)}
    if args.method == "norm":
        params.setdefault("max_norm", 1.0)
    clipping = GradientClipping(args.method, **params)
    peak = PeakNorm(clipping)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    logger = pl.loggers.WandbLogger(project="lightning_clip-demo", save_dir=str(out), offline=True)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=args.steps,
        callbacks=[clipping, peak],
        logger=logger,
        log_every_n_steps=10,
        default_root_dir=str(out),
        enable_model_summary=False,
    )
    trainer.fit(TanhRNN(lr=args.lr, seed=args.seed), AddingDataModule(seed=args.seed))

    metrics = clipping.last_metrics
    run_dir = Path(logger.experiment.dir).parent
    logger.experiment.finish()
    print("\n--- lightning_clip demo summary ---")
    print(f"method               {args.method} {params}")
    loss = trainer.callback_metrics["train/loss"].item()
    print(f"final train loss     {loss:.4f} (finite: {math.isfinite(loss)}; --method none diverges to NaN here)")
    print(f"clip rate (last log) {metrics.get('clip/rate', float('nan')):.2f}")
    print(f"largest pre-clip norm {peak.peak:.3g}")
    nonfinite, skipped = metrics.get("clip/nonfinite_steps", 0), metrics.get("clip/skipped_steps", 0)
    print(f"non-finite steps     {nonfinite:.0f} (skipped: {skipped:.0f})")
    print(f"W&B offline run      {run_dir}")
    print(f"upload it with       wandb sync {run_dir}")


if __name__ == "__main__":
    main()
