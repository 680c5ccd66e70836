"""Norms of sharded gradients: DTensor parameters (FSDP2 ``fully_shard``, tensor parallelism, Lightning's
``ModelParallelStrategy``) measured from their local shards with ONE collective for all tensors together.

A p-norm over shards is a reduction: each rank sums ``|x|^p`` over its local shard, one ``all_reduce(SUM)`` over
the vector of those sums (``MAX`` for the inf-norm) gives every rank the norms of the full tensors, and every rank
then makes the same clipping decision. Along a mesh dimension where a tensor is replicated, every rank holds the
same values, so its local sum is weighted by ``1 / replicas`` to be counted once. DDP gradients are plain tensors,
already identical on every rank: they need no collective at all (this module is not involved).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor


def is_sharded(params: Sequence[Tensor]) -> bool:
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in params)


def local(t: Tensor) -> Tensor:
    """The local shard of a DTensor (the tensor itself otherwise), as a plain tensor sharing its storage.
    ``_local_tensor`` rather than ``to_local()``: the latter goes through autograd, a cost per tensor and step."""
    return getattr(t, "_local_tensor", t)


class ShardReducer:
    """Reduces per-tensor local sums across the ranks holding shards of a layout's DTensor parameters."""

    def __init__(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        from torch.distributed.tensor import DTensor

        weights, row_local = [], []
        mesh = None
        for name, p in zip(names, params):
            if not isinstance(p, DTensor):
                raise ValueError(f"parameter {name} is a plain tensor among DTensor parameters; shard all or none")
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
        self.weights = torch.tensor(weights)
        self.row_local = row_local

    def sum(self, local_sums: Tensor, weights: Tensor | None = None) -> Tensor:
        """All-reduce (SUM) per-tensor local sums, each weighted to count replicated data once."""
        weights = self.weights if weights is None else weights
        reduced = local_sums * weights.to(local_sums.device, local_sums.dtype).reshape(-1, *[1] * (local_sums.ndim - 1))
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced

    def max(self, local_max: Tensor) -> Tensor:
        reduced = local_max.clone()
        dist.all_reduce(reduced, op=dist.ReduceOp.MAX)
        return reduced

    def norms(self, local_norms: Tensor, norm_type: float) -> Tensor:
        """Norms of the full tensors from the p-norms of their local shards: one collective."""
        if norm_type == math.inf:
            return self.max(local_norms)
        return self.sum(local_norms.pow(norm_type)).pow(1.0 / norm_type)
