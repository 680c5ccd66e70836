"""A 2-process run (gloo on CPU) of every clipping method, launched by tests/distributed/test_parity.py.

    python parity.py <ddp|fsdp2|fsdp1|fsdp1_flat> <precision> <out.pt> [nan|resume]

Lightning's launchers re-execute this script for rank 1, so all methods run inside one launch, one fit each.
Rank 0 saves, per method, the full final parameters and the callback's last metrics to ``out.pt``; with ``nan``,
rank 1 puts a NaN into its loss at step 2 (DDP: the all-reduce carries it to every rank) or, under FSDP2 and FSDP1,
into its local gradient shard only. With ``resume``, adaptive methods are trained 2 epochs straight and 1 + 1 epochs
through a checkpoint written by the 2-process run.

``fsdp1`` is Lightning's ``FSDPStrategy`` (``use_orig_params=True``, each Linear its own FSDP unit), ``fsdp1_flat``
the same with ``use_orig_params=False`` (the optimizer holds the flat parameters), both on CPU through
``models.CPUFSDPStrategy``.

Each method's collectives issued inside GradientClipping's hook are counted per optimizer step.
"""

import logging
import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import FSDPPrecision, MixedPrecision
from lightning.pytorch.strategies import FSDPStrategy, ModelParallelStrategy
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).parents[1]))
from lightning_clip import GradientClipping  # noqa: E402

COLLECTIVES: list[int] = []


class CountingClipping(GradientClipping):
    """GradientClipping that counts the all-reduces its hook issues, per optimizer step."""

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        original, calls = torch.distributed.all_reduce, []

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        torch.distributed.all_reduce = counted
        try:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)
        finally:
            torch.distributed.all_reduce = original
        COLLECTIVES.append(len(calls))


from models import CPUFSDPStrategy, TinyModule, dataset  # noqa: E402

METHODS = {
    "none": {},
    "norm": {"max_norm": 0.5},
    "value": {"clip_value": 0.2},
    "tensor_norm": {"max_norm": 0.5},
    "agc": {"clip_factor": 0.01, "exclude": ["head"]},
    "autoclip": {"percentile": 50.0},
    "zclip": {"warmup_steps": 2, "z_thresh": 0.5},
    "adagc": {"warmup_steps": 2},
}

#: Spike handling, trained with Adam for 8 epochs (32 steps) with every gradient x1000 at SPIKE_STEP: the method
#: and its parameters per configuration.
SPIKES = {
    "skip_spikes": ("norm", {"max_norm": 1e6, "skip_spikes": 6.0, "spike_window": 20}),
    "spam": ("spam", {"theta": 2.0, "warmup_steps": 2}),
}
SPIKE_STEP = 25


def make_strategy(name):
    if name == "fsdp2":
        return ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    if name.startswith("fsdp1"):
        return CPUFSDPStrategy(
            auto_wrap_policy={torch.nn.Linear}, use_orig_params=name == "fsdp1", state_dict_type="sharded"
        )
    return "ddp"


#: Methods refused before training under a strategy (tests/test_callback.py): FSDP1's flat shards split AGC's units
#: across ranks, and with use_orig_params=False the optimizer's tensors are whole FSDP units, not parameters.
REFUSED = {"fsdp1": {"agc"}, "fsdp1_flat": {"agc", "tensor_norm", "adagc"}}


class Sharded(TinyModule):
    """TinyModule on 2 processes: FSDP2 shards each Linear on dim 0; data split by an unshuffled sampler."""

    def __init__(self, strategy_name: str, nan_rank: int | None = None, spike_step: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.fsdp2, self.nan_rank, self.spike_step = strategy_name == "fsdp2", nan_rank, spike_step
        self.fsdp1 = strategy_name.startswith("fsdp1")

    def configure_model(self):
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.body[0], self.body[2], self.head):
                fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if not (self.fsdp2 or self.fsdp1) and self.nan_rank == self.global_rank and self.global_step == 2:
            loss = loss * float("nan")  # DDP: the all-reduce carries it to every rank
        if self.global_step == self.spike_step:
            loss = loss * 1000.0
        return loss

    def on_after_backward(self):
        if self.nan_rank != self.global_rank or self.global_step != 2:
            return
        if self.fsdp2:
            self.body[2].weight.grad._local_tensor[0, 0] = float("nan")  # FSDP2: only this rank's shard
        if self.fsdp1:  # FSDP1 (use_orig_params=True): the part of the weight in this rank's flat shard
            self.body[2].weight.grad[0] = float("nan")

    def train_dataloader(self):
        data = dataset()
        return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False))


def full_params(trainer, model):
    """The full parameters of every rank's model, named as in the unwrapped model."""
    if not isinstance(trainer.strategy, FSDPStrategy):
        return {name: getattr(p, "full_tensor", p.detach)().detach().clone() for name, p in model.named_parameters()}
    from torch.distributed.fsdp import FullyShardedDataParallel

    from lightning_clip.params import clean_name

    with FullyShardedDataParallel.summon_full_params(trainer.strategy.model):
        return {clean_name(name): p.detach().clone() for name, p in trainer.strategy.model.named_parameters()}


class Warnings(logging.Handler):
    """What the callback's logger says on this rank."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def fit(strategy_name, precision, method, params, epochs=1, nan=False, root=None, ckpt_path=None, spikes=False):
    strategy = make_strategy(strategy_name)
    plugins = []
    if precision == "16-mixed" and strategy_name.startswith("fsdp1"):
        from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

        # FSDPPrecision builds a CUDA ShardedGradScaler and (Lightning 2.6) refuses one passed in: set a CPU one.
        plugin = FSDPPrecision("16-mixed")
        plugin.scaler = ShardedGradScaler("cpu", init_scale=2.0**8)
        plugins = [plugin]
        precision = None
    elif precision == "16-mixed":
        plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
        precision = None
    clipping = CountingClipping(method, log_every_n_steps=2, log_updates=True, **params)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=strategy,
        precision=precision,
        plugins=plugins,
        max_epochs=epochs,
        callbacks=[clipping],
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=root is not None,
        default_root_dir=root,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    spiky = {"spike_step": SPIKE_STEP, "optimizer": "adam", "lr": 0.01} if spikes else {}
    model = Sharded(strategy_name, nan_rank=1 if nan else None, **spiky)
    COLLECTIVES.clear()
    warnings = Warnings()
    logging.getLogger("lightning_clip").addHandler(warnings)
    try:
        trainer.fit(model, ckpt_path=ckpt_path)
    finally:
        logging.getLogger("lightning_clip").removeHandler(warnings)
    warned = [None, None]
    torch.distributed.all_gather_object(warned, warnings.messages)
    states = [None, None]
    torch.distributed.all_gather_object(states, clipping.state_dict())
    skipped = [None, None]
    torch.distributed.all_gather_object(skipped, clipping.skipped_steps)
    return {
        "params": full_params(trainer, model),
        "metrics": dict(clipping.last_metrics),
        "skipped_per_rank": skipped,
        "warnings_per_rank": warned,
        "states_per_rank": states,
        "collectives": list(COLLECTIVES),
        "checkpoint": trainer.checkpoint_callback.best_model_path if root else None,
    }


def main():
    strategy_name, precision, out = sys.argv[1], sys.argv[2], sys.argv[3]
    mode = sys.argv[4] if len(sys.argv) > 4 else ""
    results = {}
    if mode == "spikes":
        for name, (method, params) in SPIKES.items():
            results[name] = fit(strategy_name, precision, method, params, epochs=8, spikes=True)
    elif mode == "resume":
        root = Path(out).parent
        for method in ("autoclip", "zclip", "adagc"):
            straight = fit(strategy_name, precision, method, METHODS[method], epochs=2)
            first = fit(strategy_name, precision, method, METHODS[method], epochs=1, root=str(root / method))
            resumed = fit(strategy_name, precision, method, METHODS[method], epochs=2, ckpt_path=first["checkpoint"])
            results[method] = {"straight": straight, "resumed": resumed}
    else:
        methods = {"norm": METHODS["norm"], "zclip": METHODS["zclip"]} if mode == "nan" else METHODS
        for method, params in methods.items():
            if method in REFUSED.get(strategy_name, ()):
                continue
            results[method] = fit(strategy_name, precision, method, params, nan=mode == "nan")
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)
    # Without this, gloo's threads may still be joinable at interpreter exit and abort the process.
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
