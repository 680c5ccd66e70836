"""The adding and multiplication problems of Hochreiter & Schmidhuber (1997), as used by Pascanu et al. 2013 ("On
the difficulty of training recurrent neural networks", section 5.1) to show exploding gradients in a tanh RNN.

Each sequence has two channels: random values in [0, 1), and a marker that is 1 at two positions (one in the first
half, one in the second) and 0 elsewhere. The target is the sum (adding) or the product (multiplication) of the two
marked values. Predicting the mean gives a mean squared error of 1/6 for the sum and 7/144 (about 0.049) for the
product; a model that solves the task gets far below that.
"""

from __future__ import annotations

from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip.examples.textlm import make_optimizer

PROBLEMS = ("adding", "multiplication")


def _check_problem(problem: str) -> None:
    if problem not in PROBLEMS:
        raise ValueError(f"problem={problem!r} is not one of {PROBLEMS}")


def adding_problem(samples: int, length: int, seed: int = 0, problem: str = "adding") -> TensorDataset:
    """``samples`` sequences of shape ``(length, 2)`` and their targets, generated from ``seed``; ``problem`` is
    ``"adding"`` or ``"multiplication"``."""
    _check_problem(problem)
    gen = torch.Generator().manual_seed(seed)
    values = torch.rand(samples, length, generator=gen)
    half = length // 2
    first = torch.randint(0, half, (samples,), generator=gen)
    second = torch.randint(half, length, (samples,), generator=gen)
    markers = torch.zeros(samples, length)
    rows = torch.arange(samples)
    markers[rows, first] = 1.0
    markers[rows, second] = 1.0
    a, b = values[rows, first], values[rows, second]
    targets = a + b if problem == "adding" else a * b
    return TensorDataset(torch.stack([values, markers], dim=-1), targets.unsqueeze(-1))


class AddingDataModule(pl.LightningDataModule):
    def __init__(
        self,
        length: int = 100,
        train_samples: int = 4096,
        val_samples: int = 512,
        batch_size: int = 64,
        seed: int = 0,
        problem: str = "adding",
    ) -> None:
        super().__init__()
        _check_problem(problem)
        self.length, self.train_samples, self.val_samples = length, train_samples, val_samples
        self.batch_size, self.seed, self.problem = batch_size, seed, problem

    def setup(self, stage: str | None = None) -> None:
        self.train_set = adding_problem(self.train_samples, self.length, self.seed, self.problem)
        self.val_set = adding_problem(self.val_samples, self.length, self.seed + 1, self.problem)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=self.batch_size)


class TanhRNN(pl.LightningModule):
    """A single-layer tanh RNN with a linear read-out. ``recurrent_scale`` sets the spectral radius of the
    recurrent weights at initialisation: above 1, gradients through long sequences explode (Pascanu et al. 2013,
    section 3). ``optimizer``: ``sgd`` with ``momentum``, or ``adamw`` (:func:`~lightning_clip.examples.textlm.
    make_optimizer`), which ``method="spam"`` needs."""

    datamodule: ClassVar[type[pl.LightningDataModule]] = AddingDataModule  # the data it trains on

    def __init__(
        self,
        hidden: int = 64,
        lr: float = 0.1,
        recurrent_scale: float = 1.5,
        momentum: float = 0.9,
        seed: int = 0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.rnn = torch.nn.RNN(2, hidden, nonlinearity="tanh", batch_first=True)
        with torch.no_grad():
            weight = torch.randn(hidden, hidden)
            weight *= recurrent_scale / torch.linalg.eigvals(weight).abs().max()
            self.rnn.weight_hh_l0.copy_(weight)
        self.head = torch.nn.Linear(hidden, 1)

    def configure_model(self) -> None:
        """Under ``ModelParallelStrategy`` (``trainer=fsdp2``), shard the model with FSDP2 over the data-parallel
        mesh; otherwise nothing to do."""
        mesh = self.device_mesh
        if mesh is None:
            return
        from torch.distributed.fsdp import fully_shard

        fully_shard(self.head, mesh=mesh["data_parallel"])
        fully_shard(self, mesh=mesh["data_parallel"])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out, _ = self.rnn(x)
        return self.head(out[:, -1])

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.mse_loss(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/loss", torch.nn.functional.mse_loss(self(x), y), prog_bar=True)

    def configure_optimizers(self):
        return make_optimizer(self.parameters(), self.hparams.optimizer, self.hparams.lr, self.hparams.momentum)
