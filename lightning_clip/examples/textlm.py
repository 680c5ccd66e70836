"""A small transformer language model trained at a high learning rate with no warmup, on text that ships with
Python itself: the help topics of the standard library's documentation (``pydoc_data.topics``, about 0.47 MB of
English prose and code; nothing is downloaded). Bytes are the tokens (a vocabulary of 256), so there is nothing to
build or fetch.

Transformers are trained with a learning-rate warmup because the first steps, taken from a random initialisation,
can produce very large gradients (Liu et al. 2020, "Understanding the Difficulty of Training Transformers"; Xiong
et al. 2020, "On Layer Normalization in the Transformer Architecture", for post-norm layers). Without warmup and
at a high rate, SGD takes those gradients at full size and the run explodes.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import ClassVar

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


def python_docs_bytes() -> torch.Tensor:
    """The text of Python's bundled documentation topics, as one tensor of byte values (int64)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[key] for key in sorted(topics))
    return torch.tensor(list(text.encode("utf-8")), dtype=torch.long)


class Windows(Dataset):
    """Non-overlapping windows of ``context + 1`` tokens: inputs are the first ``context``, targets the last."""

    def __init__(self, tokens: torch.Tensor, context: int) -> None:
        self.tokens, self.context = tokens, context

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.context

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        window = self.tokens[i * self.context : (i + 1) * self.context + 1]
        return window[:-1], window[1:]


class TextDataModule(pl.LightningDataModule):
    """The first ``1 - val_fraction`` of the text for training (shuffled windows), the rest for validation."""

    def __init__(self, context: int = 64, batch_size: int = 32, val_fraction: float = 0.1, seed: int = 0) -> None:
        super().__init__()
        self.context, self.batch_size, self.val_fraction, self.seed = context, batch_size, val_fraction, seed

    def setup(self, stage: str | None = None) -> None:
        tokens = python_docs_bytes()
        cut = int(len(tokens) * (1 - self.val_fraction))
        self.train_set, self.val_set = Windows(tokens[:cut], self.context), Windows(tokens[cut:], self.context)

    def train_dataloader(self) -> DataLoader:
        generator = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=True, generator=generator)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=128)


class ByteLM(pl.LightningModule):
    """Next-byte cross-entropy on :class:`Windows`, with the optimizer its ``hparams`` name; subclasses build the
    network (``forward``: tokens -> logits over 256 bytes)."""

    datamodule: ClassVar[type[pl.LightningDataModule]] = TextDataModule  # the data it trains on

    def _loss(self, batch) -> torch.Tensor:
        tokens, targets = batch
        return torch.nn.functional.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())

    def training_step(self, batch, batch_idx):
        loss = self._loss(batch)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", self._loss(batch))

    def configure_optimizers(self):
        return make_optimizer(self.parameters(), self.hparams.optimizer, self.hparams.lr, self.hparams.momentum)


class TinyTransformerLM(ByteLM):
    """A causal byte-level transformer: token and learned position embeddings, ``layers`` post-norm encoder layers
    (``norm_first=False``, the original transformer's layout, the harder one to train without warmup) with a causal
    mask, and a linear read-out. SGD with momentum at a constant rate, no warmup."""

    def __init__(
        self,
        d_model: int = 64,
        heads: int = 4,
        layers: int = 2,
        context: int = 64,
        lr: float = 1.0,
        momentum: float = 0.9,
        norm_first: bool = False,
        seed: int = 0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(256, d_model)
        self.position = torch.nn.Parameter(torch.randn(context, d_model) * 0.02)
        layer = torch.nn.TransformerEncoderLayer(
            d_model, heads, dim_feedforward=4 * d_model, dropout=0.0, batch_first=True, norm_first=norm_first
        )
        self.blocks = torch.nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(d_model, 256)
        self.register_buffer("causal", torch.nn.Transformer.generate_square_subsequent_mask(context), persistent=False)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position[:length]
        x = self.blocks(x, mask=self.causal[:length, :length], is_causal=True)
        return self.head(x)


def make_optimizer(params, name: str, lr: float, momentum: float = 0.9) -> torch.optim.Optimizer:
    """``sgd`` (with momentum) or ``adamw`` (torch's defaults otherwise), at a constant rate with no warmup."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr)
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=momentum)
    raise ValueError(f"optimizer={name!r} is not one of 'sgd', 'adamw'")


class GRULM(ByteLM):
    """A byte-level GRU language model (a gated RNN, the LSTM's lighter sibling): embedding, ``layers`` GRU layers of
    ``hidden`` units, a linear read-out; the same text and windows as :class:`TinyTransformerLM`. Gates keep its
    gradients better behaved than a tanh RNN's, so it explodes only at a high rate (SGD with momentum here)."""

    unit: ClassVar[Callable[..., torch.nn.Module]] = torch.nn.GRU

    def __init__(
        self,
        hidden: int = 128,
        layers: int = 1,
        lr: float = 5.0,
        momentum: float = 0.9,
        seed: int = 0,
        optimizer: str = "sgd",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        torch.manual_seed(seed)
        self.embed = torch.nn.Embedding(256, 64)
        self.rnn = self.unit(64, hidden, layers, batch_first=True)
        self.head = torch.nn.Linear(hidden, 256)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(tokens))[0])


class TanhRNNLM(GRULM):
    """A byte-level Elman RNN language model (tanh units, no gates): the char-level RNN language model of Pascanu et
    al. 2013's clipping experiments, here on the same text and windows as :class:`GRULM`. Without gates its
    gradients explode at a moderate rate (SGD with momentum)."""

    unit = staticmethod(functools.partial(torch.nn.RNN, nonlinearity="tanh"))
