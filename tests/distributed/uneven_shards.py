"""Run by test_uneven_shards.py: AGC and the per-tensor methods on DTensor gradients sharded unevenly on dim 0 across
2 processes (gloo), against the same methods on the full tensors in one process. Small tensors of one global shape
have different local shapes on the two ranks here, so a rank-dependent grouping of them would pair the wrong norms
in the collective. Two tensors hold more than ``operators.ONE_AT_A_TIME_NUMEL`` elements on each rank, so their local
shards take the CPU paths for large tensors (a dot product for their norms, one ``clamp_`` for ``value``). The one
4-D tensor has one row, so rank 1 holds no unit of its rank group. On the last step only a row on rank 1 is large, so
a clip rate judged from rank 0's units alone would read lower. Writes the largest difference per method, and the clip
rates each rank recorded with those of one process, and what each rank raised when a NaN sits in rank 1's shard of a
parameter, to the file given as the only argument."""

import gc
import math
import os
import sys

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.tensor import Shard, distribute_tensor, init_device_mesh

from lightning_clip import Clipper, NonFiniteGradientError, methods

#: Global shapes: on 2 ranks, (3,) splits 2 + 1, (5,) 3 + 2, (3, 4) 2 + 1 rows, (1, 4) 1 + 0, (141, 130) 71 + 70
#: rows (9230 and 9100 elements), (20001,) 10001 + 10000, (1, 2, 2, 2) 1 + 0.
SHAPES = [
    (3, 4), (3,), (5, 4), (3, 4), (5,), (141, 130), (3,), (1, 4), (3, 4), (4,), (7, 2, 2), (20001,), (7, 2, 2),
    (1, 2, 2, 2),
]  # fmt: skip
#: The large tensor, and a row of it that lies on rank 1.
LARGE, RANK1_ROW = 5, 100
CASES = {
    "agc": {"clip_factor": 0.01, "max_update_ratio": 0.0},
    "tensor_norm": {"max_norm": 0.5},
    "adagc": {"warmup_steps": 1, "lambda_abs": 1.0},
    "norm": {"max_norm": 0.5},
    "value": {"clip_value": 20.0},
}


def full_tensors(seed):
    gen = torch.Generator().manual_seed(seed)
    params = [torch.randn(s, generator=gen) for s in SHAPES]
    grads = [torch.randn(s, generator=gen) * 30.0 for s in SHAPES]
    return params, grads


def quiet_step_but_one_row():
    """Gradients far below every threshold, but for one row on rank 1 (30x the parameters' scale)."""
    grads = [torch.full(s, 1e-6) for s in SHAPES]
    grads[LARGE][RANK1_ROW] = 30.0
    return grads


def clip(method, params, grads_per_step, mesh=None):
    """The method's Clipper over the steps, recording every second one: the clipped gradients of each step, as full
    tensors, and the clip rate of each record."""
    place = (lambda t: distribute_tensor(t, mesh, [Shard(0)])) if mesh is not None else (lambda t: t)
    named = [(f"layer{i}.weight", torch.nn.Parameter(place(p.clone()))) for i, p in enumerate(params)]
    clipper = Clipper(methods.from_arguments(method, dict(CASES[method])), named, nonfinite="ignore")
    out, rates = [], []
    for step, grads in enumerate(grads_per_step):
        for (_, p), g in zip(named, grads):
            p.grad = place(g.clone())
        record = clipper.step(record=step % 2 == 1)
        if record is not None:
            rates.append(record.read().metrics()["clip/rate"])
        out.append([p.grad.full_tensor() if mesh is not None else p.grad.clone() for _, p in named])
    return out, rates


def nonfinite_shard_message(params, grads, mesh):
    """A NaN in rank 1's shard of one parameter, and in the same shard of its gradient: what each rank raises (every
    rank must stop, naming that parameter, though rank 0 holds no NaN)."""
    named = [(f"layer{i}.weight", torch.nn.Parameter(distribute_tensor(p.clone(), mesh, [Shard(0)]))) for i, p in
             enumerate(params)]  # fmt: skip
    clipper = Clipper(methods.Norm(), named, nonfinite="skip")
    for (_, p), g in zip(named, grads):
        p.grad = distribute_tensor(g.clone(), mesh, [Shard(0)])
    if dist.get_rank() == 1:
        with torch.no_grad():
            named[LARGE][1].to_local()[0, 0] = math.nan
        named[LARGE][1].grad.to_local()[0, 0] = math.nan
    try:
        clipper.step()
    except NonFiniteGradientError as error:
        return str(error)
    return None


def worker(rank, path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=os.environ["UNEVEN_PORT"])
    dist.init_process_group("gloo", rank=rank, world_size=2)
    mesh = init_device_mesh("cpu", (2,))
    params, _ = full_tensors(0)
    steps = [full_tensors(seed)[1] for seed in (1, 2, 3)] + [quiet_step_but_one_row()]
    differences, rates = {}, {}
    for method in CASES:
        (sharded, sharded_rates), (single, single_rates) = (
            clip(method, params, steps, mesh),
            clip(method, params, steps),
        )
        differences[method] = max(
            float((a - b).abs().max() / b.abs().max()) for got, want in zip(sharded, single) for a, b in zip(got, want)
        )
        per_rank = [None, None]
        dist.all_gather_object(per_rank, sharded_rates)
        rates[method] = {"ranks": per_rank, "one process": single_rates}
    messages = [None, None]
    dist.all_gather_object(messages, nonfinite_shard_message(params, steps[0], mesh))
    if rank == 0:
        torch.save({"differences": differences, "rates": rates, "nonfinite parameter": messages}, path)
    # The device mesh holds the gloo process group: freed only at interpreter exit, its threads could still be
    # joinable there and abort the process ("terminate called without an active exception", after all of the above).
    del mesh
    gc.collect()
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(worker, args=(sys.argv[1],), nprocs=2)
