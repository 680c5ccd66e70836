"""A deep fully connected network without normalisation layers on scikit-learn's bundled digits (1797 8x8 images,
10 classes; shipped inside the package, nothing downloaded), trained at a high learning rate: its gradients explode
without clipping."""

from __future__ import annotations

from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from lightning_clip.examples.textlm import make_optimizer


def digits(seed: int = 0, val_fraction: float = 0.2) -> tuple[TensorDataset, TensorDataset]:
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.long)
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    cut = int(len(x) * (1 - val_fraction))
    train, val = order[:cut], order[cut:]
    return TensorDataset(x[train], y[train]), TensorDataset(x[val], y[val])


class DigitsDataModule(pl.LightningDataModule):
    def __init__(self, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.batch_size, self.seed = batch_size, seed

    def setup(self, stage: str | None = None) -> None:
        self.train_set, self.val_set = digits(self.seed)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


def relu_stack(layer, depth: int, features: int, width: int, gain: float) -> torch.nn.Sequential:
    """``depth`` layers (``layer(in, out)``) each followed by a ReLU, no normalisation; weights at ``gain`` times He
    initialisation, biases zero, so activations and gradients grow with depth (by about ``gain ** depth``)."""
    layers = []
    for _ in range(depth):
        module = layer(features, width)
        torch.nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
        module.weight.data *= gain
        torch.nn.init.zeros_(module.bias)
        layers += [module, torch.nn.ReLU()]
        features = width
    return torch.nn.Sequential(*layers)


class DigitsClassifier(pl.LightningModule):
    """Cross-entropy training and validation accuracy on the digits; subclasses build the network."""

    datamodule: ClassVar[type[pl.LightningDataModule]] = DigitsDataModule  # the data it trains on

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = torch.nn.functional.cross_entropy(self(x), y)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        logits = self(x)
        self.log("val/loss", torch.nn.functional.cross_entropy(logits, y))
        self.log("val/accuracy", (logits.argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return make_optimizer(self.parameters(), self.hparams.optimizer, self.hparams.lr)


class DeepMLP(DigitsClassifier):
    """``depth`` Linear+ReLU layers of ``width`` units, no normalisation, SGD with momentum at a high rate. Weights
    start at ``init_gain`` times He initialisation, so activations and gradients grow with depth (by about
    ``init_gain ** depth``)."""

    def __init__(
        self,
        depth: int = 12,
        width: int = 128,
        lr: float = 0.05,
        init_gain: float = 1.3,
        seed: int = 0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.body = relu_stack(torch.nn.Linear, depth, 64, width, init_gain)
        self.head = torch.nn.Linear(width, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


class DeepCNN(DigitsClassifier):
    """``depth`` 3x3 convolutions (``channels`` each, padding 1) with ReLU on the 8x8 digit images, no normalisation,
    global average pooling and a linear read-out; weights at ``init_gain`` times He initialisation, SGD with
    momentum at a high rate, as :class:`DeepMLP`."""

    def __init__(
        self,
        depth: int = 8,
        channels: int = 32,
        lr: float = 0.05,
        init_gain: float = 1.3,
        seed: int = 0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.body = relu_stack(lambda i, o: torch.nn.Conv2d(i, o, 3, padding=1), depth, 1, channels, init_gain)
        self.head = torch.nn.Linear(channels, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x.reshape(-1, 1, 8, 8)).mean(dim=(2, 3)))
