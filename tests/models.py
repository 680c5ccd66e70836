"""Small Lightning modules and data for real Trainer runs in tests."""

from __future__ import annotations

import math

import lightning.pytorch as pl
import torch
from lightning.pytorch.strategies import FSDPStrategy
from torch.utils.data import DataLoader, TensorDataset


def dataset(n=32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=gen)
    return TensorDataset(x, (x[:, :1] * 3 + x[:, 1:2] ** 2) * 10)


def loader(n=32, batch_size=8):
    return DataLoader(dataset(n), batch_size=batch_size, shuffle=False)


class TinyModule(pl.LightningModule):
    """An MLP with a conv-free mix of 2-D weights and 1-D biases, large gradients by design (targets x10). With
    ``width=96`` its middle weight has 9216 elements, more than ``operators.ONE_AT_A_TIME_NUMEL``: on CPU that tensor
    is then measured and clipped alone."""

    def __init__(self, optimizer="sgd", lr=0.05, nan_at_step=None, seed=0, width=16):
        super().__init__()
        torch.manual_seed(seed)
        self.body = torch.nn.Sequential(torch.nn.Linear(6, width), torch.nn.Tanh(), torch.nn.Linear(width, width))
        self.head = torch.nn.Linear(width, 1)
        self.optimizer_name, self.lr, self.nan_at_step = optimizer, lr, nan_at_step

    def forward(self, x):
        return self.head(torch.tanh(self.body(x)))

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self(x).float(), y)

    def on_after_backward(self):
        if self.nan_at_step is not None and self.global_step == self.nan_at_step:
            self.body[2].weight.grad[0, 0] = float("nan")

    def configure_optimizers(self):
        trainable = [p for p in self.parameters() if p.requires_grad]  # all, unless a callback froze some
        if self.optimizer_name == "adam":
            return torch.optim.Adam(trainable, lr=self.lr)
        return torch.optim.SGD(trainable, lr=self.lr, momentum=0.9)


class TwoOptimizerModule(pl.LightningModule):
    """Manual optimization with two optimizers over disjoint parameters (the GAN pattern)."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.automatic_optimization = False
        self.generator = torch.nn.Linear(6, 6)
        self.critic = torch.nn.Linear(6, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt_g, opt_c = self.optimizers()
        critic_loss = ((self.critic(x) - y) ** 2).mean()
        opt_c.zero_grad()
        self.manual_backward(critic_loss)
        opt_c.step()
        generator_loss = (self.critic(self.generator(x)) ** 2).mean() * 100
        opt_g.zero_grad()
        self.manual_backward(generator_loss)
        opt_g.step()

    def configure_optimizers(self):
        return torch.optim.SGD(self.generator.parameters(), lr=0.01), torch.optim.SGD(self.critic.parameters(), lr=0.01)


class CPUFSDPStrategy(FSDPStrategy):
    """Lightning's FSDPStrategy (FSDP1) on CPU. Lightning allows FSDPStrategy on CUDA only (a subclass passes its
    check) and wraps the model with no ``device_id`` on CPU, where torch's FSDP then refuses to start; this changes
    only that call, so launch, hooks, precision plugin and checkpoints stay Lightning's own."""

    def _setup_model(self, model):
        from torch.distributed.fsdp import FullyShardedDataParallel

        return FullyShardedDataParallel(
            module=model,
            cpu_offload=self.cpu_offload,
            mixed_precision=self.mixed_precision_config,
            sharding_strategy=self.sharding_strategy,
            device_id=torch.device("cpu"),
            **self.kwargs,
        )


class GradProbe(pl.Callback):
    """Placed after GradientClipping: records what the optimizer will see, per step."""

    def __init__(self):
        self.norms: list[float] = []
        self.max_abs: list[float] = []
        self.grads: list[list[torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not grads:
            self.norms.append(float("nan"))
            return
        self.grads.append([g.detach().clone() for g in grads])
        self.norms.append(torch.linalg.vector_norm(torch.stack([g.float().norm() for g in grads])).item())
        self.max_abs.append(max(g.abs().max().item() for g in grads))


def trainer(callbacks, max_steps=-1, max_epochs=1, **kwargs):
    kwargs.setdefault("logger", False)
    kwargs.setdefault("enable_checkpointing", False)
    return pl.Trainer(
        accelerator="cpu",
        devices=1,
        max_epochs=max_epochs,
        max_steps=max_steps,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        **kwargs,
    )


class NormsPerStep(GradProbe):
    """Placed after GradientClipping (recording every step): the pre-clip global norm it measured, per step."""

    def __init__(self, clipping):
        super().__init__()
        self.clipping, self.pre_clip = clipping, []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.pre_clip.append(self.clipping.last_metrics.get("grad/norm", math.nan))


def fsdp1_against_plain(accelerator, strategy, plugins=(), precision=None):
    """The same model, batches and clipping with and without FSDP1 (one device); per-step pre-clip norms."""
    from lightning_clip import GradientClipping

    def run(strategy, plugins):
        clipping = GradientClipping("norm", max_norm=0.5, log_every_n_steps=1)
        probe = NormsPerStep(clipping)
        model = TinyModule(lr=0.01)
        pl.Trainer(
            accelerator=accelerator,
            devices=1,
            strategy=strategy,
            precision=precision,
            plugins=list(plugins),
            callbacks=[clipping, probe],
            max_epochs=4,
            use_distributed_sampler=False,  # FSDPStrategy installs a shuffled sampler even on one device
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        ).fit(model, loader())
        return probe.pre_clip, clipping

    return run(strategy, plugins[:1]), run("auto", plugins[1:])


def assert_same_finite_norms(sharded, plain, rtol, least):
    import pytest

    finite = [i for i, (a, b) in enumerate(zip(sharded, plain)) if math.isfinite(a) and math.isfinite(b)]
    assert len(sharded) == len(plain) == 16 and len(finite) >= least, (sharded, plain)
    for i in finite:
        assert sharded[i] == pytest.approx(plain[i], rel=rtol), (i, sharded, plain)
