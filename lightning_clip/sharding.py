"""Norms of sharded gradients, measured from local shards with ONE collective for all tensors together.

Two layouts are sharded:

- DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism, Lightning's ``ModelParallelStrategy``): each
  gradient is a DTensor whose local shard is a slice of the full tensor.
- FSDP1 (``torch.distributed.fsdp.FullyShardedDataParallel``, Lightning's ``FSDPStrategy``): each FSDP unit keeps
  one flat parameter, split into equal contiguous shards. The optimizer holds either those flat parameters
  (``use_orig_params=False``) or the original parameters, each then a 1-D view of the part of it that lies in this
  rank's shard, empty (and without gradient) on ranks that hold none of it (``use_orig_params=True``).
  :func:`fsdp1_shards` reads that layout from the FSDP units.

A p-norm over shards is a reduction: each rank sums ``|x|^p`` over its local shard, one ``all_reduce(SUM)`` over
the vector of those sums (``MAX`` for the inf-norm) gives every rank the norms of the full tensors, and every rank
then makes the same clipping decision. Where a tensor is replicated (a replicated mesh dimension, FSDP1's
``HYBRID_SHARD`` or ``NO_SHARD``), every replica holds the same values, so its local sum is weighted by
``1 / replicas`` to be counted once. DDP gradients are plain tensors, already identical on every rank: they need no
collective at all (this module is not involved).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
from torch import Tensor


@dataclass(frozen=True)
class FlatShard:
    """How FSDP1 holds one optimizer tensor: the shape of the full tensor (the unsharded original parameter, or
    the unsharded flat parameter), on how many ranks each of its elements lives, and the flat parameter it lies in
    (whose gradient exists on every rank, or on none, after a backward pass)."""

    shape: torch.Size
    replicas: int
    flat_param: Tensor = field(compare=False, repr=False)


def is_dtensor(p: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(p, DTensor)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), as a plain tensor sharing its storage.
    ``_local_tensor`` rather than ``to_local()``: the latter goes through autograd, a cost per tensor and step."""
    return getattr(t, "_local_tensor", t)


def fsdp1_shards(module: torch.nn.Module) -> dict[int, FlatShard]:
    """For every tensor an optimizer of the FSDP1-wrapped ``module`` can hold (flat parameters, and original
    parameters under ``use_orig_params=True``), keyed by ``id``: its full shape and replica count. Empty when
    ``module`` holds no FSDP1 unit."""
    from torch.distributed.fsdp import FullyShardedDataParallel

    shards: dict[int, FlatShard] = {}
    for unit in FullyShardedDataParallel.fsdp_modules(module):
        handle = unit._handle
        if handle is None:  # a unit that manages no parameter
            continue
        flat = handle.flat_param
        holders = dist.get_world_size(unit.process_group) if handle.uses_sharded_strategy else 1
        replicas = dist.get_world_size() // holders
        shards[id(flat)] = FlatShard(torch.Size([flat._unpadded_unsharded_size.numel()]), replicas, flat)
        for param, shape in zip(flat._params or (), flat._shapes):
            shards[id(param)] = FlatShard(shape, replicas, flat)
    return shards


class ShardReducer:
    """Reduces per-tensor local sums across the ranks holding shards of a layout's parameters.

    ``weights`` counts replicated data once; ``shapes`` are the shapes of the full tensors; ``row_local`` tells, per
    tensor, whether each of its dim-0 slices (AGC's units) lies whole on one rank, so that unit norms need no
    collective; ``flat`` whether the local shards are flattened (FSDP1) rather than slices of the full shape."""

    def __init__(
        self, weights: Sequence[float], shapes: Sequence[torch.Size], row_local: Sequence[bool], flat: bool
    ) -> None:
        self.weights = torch.tensor(weights)
        self.shapes = list(shapes)
        self.row_local = list(row_local)
        self.flat = flat

    @classmethod
    def build(
        cls, names: Sequence[str], params: Sequence[Tensor], flat_shards: Mapping[int, FlatShard]
    ) -> ShardReducer | None:
        """The reducer for these parameters, or ``None`` when none of them is sharded. Sharded and plain
        parameters cannot be mixed: a plain one would be counted once per rank."""
        kinds = [is_dtensor(p) or id(p) in flat_shards for p in params]
        if not any(kinds):
            return None
        if not all(kinds):
            plain = names[kinds.index(False)]
            raise ValueError(f"parameter {plain} is a plain tensor among sharded parameters; shard all or none")
        if is_dtensor(params[0]):
            return cls._for_dtensors(names, params)
        shards = [flat_shards[id(p)] for p in params]
        # FSDP1 splits the flattened tensor at arbitrary offsets: a unit may span two ranks.
        shapes = [s.shape for s in shards]
        return cls([1.0 / s.replicas for s in shards], shapes, [len(shape) <= 1 for shape in shapes], flat=True)

    @classmethod
    def _for_dtensors(cls, names: Sequence[str], params: Sequence[Tensor]) -> ShardReducer:
        weights, row_local = [], []
        mesh = None
        for name, p in zip(names, params):
            if not is_dtensor(p):
                raise ValueError(f"parameter {name} mixes DTensor and FSDP1 sharding")
            mesh = p.device_mesh
            replicas = 1
            for dim, placement in enumerate(p.placements):
                if placement.is_replicate():
                    replicas *= mesh.size(dim)
                elif not placement.is_shard():
                    raise ValueError(
                        f"parameter {name} has placement {placement}; only Shard and Replicate are supported"
                    )
            weights.append(1.0 / replicas)
            row_local.append(all(not pl.is_shard() or pl.dim == 0 for pl in p.placements))
        if mesh is not None and mesh.size() != dist.get_world_size():
            raise ValueError(
                f"the parameters' device mesh spans {mesh.size()} of {dist.get_world_size()} ranks; gradient norms "
                "are reduced over all ranks, so the mesh must span them all"
            )
        return cls(weights, [p.shape for p in params], row_local, flat=False)

    def sum(self, local_sums: Tensor, weights: Tensor | None = None) -> Tensor:
        """All-reduce (SUM) per-tensor local sums, each weighted to count replicated data once."""
        weights = self.weights if weights is None else weights
        reduced = local_sums * weights.to(local_sums.device, local_sums.dtype).reshape(-1, *[1] * (local_sums.ndim - 1))
        return _all_reduce(reduced, dist.ReduceOp.SUM)

    def max(self, local_max: Tensor) -> Tensor:
        return _all_reduce(local_max.clone(), dist.ReduceOp.MAX)

    def norms(self, local_norms: Tensor, norm_type: float) -> Tensor:
        """Norms of the full tensors from the p-norms of their local shards: one collective."""
        if norm_type == math.inf:
            return self.max(local_norms)
        return self.sum(local_norms.pow(norm_type)).pow(1.0 / norm_type)


def collective_device(backend: str, device: torch.device) -> torch.device:
    """Where a tensor on ``device`` must be for a collective of ``backend``: NCCL reduces CUDA tensors only, and
    gradients offloaded to CPU (FSDP1 ``CPUOffload``, FSDP2 ``CPUOffloadPolicy``) are reduced on this rank's GPU."""
    if backend == "nccl" and device.type == "cpu":
        return torch.device("cuda", torch.cuda.current_device())
    return device


def _all_reduce(tensor: Tensor, op: dist.ReduceOp) -> Tensor:
    device = collective_device(dist.get_backend(), tensor.device)
    if device == tensor.device:
        dist.all_reduce(tensor, op=op)
        return tensor
    moved = tensor.to(device)
    dist.all_reduce(moved, op=op)
    return moved.to(tensor.device)
