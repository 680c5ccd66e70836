"""A 2-process run (gloo on CPU) of every clipping method, launched by tests/distributed/test_parity.py.

    python parity.py <ddp|fsdp2> <precision> <out.pt> [nan]

Lightning's launchers re-execute this script for rank 1, so all methods run inside one launch, one fit each.
Rank 0 saves, per method, the full final parameters and the callback's last metrics to ``out.pt``; with ``nan``,
rank 1 puts a NaN into its loss at step 2 (DDP: the all-reduce carries it to every rank) or, under FSDP2, into
its local gradient shard only.
"""

import sys
from pathlib import Path

import lightning.pytorch as pl
import torch
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch.utils.data import DataLoader
from torch.utils.data.distributed import DistributedSampler

sys.path.insert(0, str(Path(__file__).parents[1]))
from lightning_clip import GradientClipping  # noqa: E402
from models import TinyModule, dataset  # noqa: E402

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


class Sharded(TinyModule):
    """TinyModule on 2 processes: FSDP2 shards each Linear on dim 0; data split by an unshuffled sampler."""

    def __init__(self, fsdp2: bool, nan_rank: int | None = None, **kwargs):
        super().__init__(**kwargs)
        self.fsdp2, self.nan_rank = fsdp2, nan_rank

    def configure_model(self):
        if self.fsdp2:
            from torch.distributed.fsdp import fully_shard

            mesh = self.device_mesh["data_parallel"]
            for layer in (self.body[0], self.body[2], self.head):
                fully_shard(layer, mesh=mesh)
            fully_shard(self, mesh=mesh)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        if not self.fsdp2 and self.nan_rank == self.global_rank and self.global_step == 2:
            loss = loss * float("nan")  # DDP: the all-reduce carries it to every rank
        return loss

    def on_after_backward(self):
        if self.fsdp2 and self.nan_rank == self.global_rank and self.global_step == 2:
            self.body[2].weight.grad._local_tensor[0, 0] = float("nan")  # FSDP2: only this rank's shard

    def train_dataloader(self):
        data = dataset()
        return DataLoader(data, batch_size=4, sampler=DistributedSampler(data, shuffle=False))


def full(t):
    return t.full_tensor() if hasattr(t, "full_tensor") else t


def main():
    strategy_name, precision, out = sys.argv[1], sys.argv[2], sys.argv[3]
    inject = len(sys.argv) > 4 and sys.argv[4] == "nan"
    methods = {"norm": METHODS["norm"], "zclip": METHODS["zclip"]} if inject else METHODS
    results = {}
    for method, params in methods.items():
        fsdp2 = strategy_name == "fsdp2"
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if fsdp2 else "ddp"
        plugins = []
        if precision == "16-mixed":
            plugins = [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))]
            precision = None
        clipping = GradientClipping(method, log_every_n_steps=2, **params)
        trainer = pl.Trainer(
            accelerator="cpu",
            devices=2,
            strategy=strategy,
            precision=precision,
            plugins=plugins,
            max_epochs=1,
            callbacks=[clipping],
            use_distributed_sampler=False,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
        )
        model = Sharded(fsdp2, nan_rank=1 if inject else None)
        trainer.fit(model)
        params_full = {name: full(p.detach()).clone() for name, p in model.named_parameters()}
        skipped = torch.tensor([float(clipping.skipped_steps)])
        gathered = [torch.zeros(1), torch.zeros(1)]
        torch.distributed.all_gather(gathered, skipped)
        results[method] = {
            "params": params_full,
            "metrics": dict(clipping.last_metrics),
            "skipped_per_rank": [float(s) for s in gathered],
            "states": clipping.state_dict(),
        }
        precision = sys.argv[2]
    if torch.distributed.get_rank() == 0:
        torch.save(results, out)


if __name__ == "__main__":
    main()
