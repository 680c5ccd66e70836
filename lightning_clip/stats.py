"""Per-layer gradient statistics from the per-tensor norms that clipping already measured. Plain PyTorch.

A layer is, by default, the module that owns the parameters (a Linear's weight and bias together); ``depth=k``
aggregates to the first k components of the module path (``encoder.layers.3.attn`` -> ``encoder.layers`` for
k=2), ``per_parameter=True`` keeps each tensor on its own. Include / exclude globs filter layers by name. Norms
aggregate as L2 norms (the square root of the summed squares), the largest absolute value as a max, all with one
``index_add_`` / ``scatter_reduce`` per statistic, so the cost does not grow with the tensor count.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass

import torch
from torch import Tensor

from lightning_clip.operators import tensor_norms
from lightning_clip.params import Layout, owner_name


@dataclass(frozen=True)
class LayerGrouping:
    """How parameter tensors are grouped into the layers that statistics are reported for."""

    depth: int | None = None
    per_parameter: bool = False
    include: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()

    def layer(self, name: str) -> str | None:
        """The layer a parameter belongs to, or None when the layer is filtered out."""
        layer = self._unfiltered(name)
        if self.include and not any(fnmatch.fnmatchcase(layer, p) for p in self.include):
            return None
        if any(fnmatch.fnmatchcase(layer, p) for p in self.exclude):
            return None
        return layer

    def _unfiltered(self, name: str) -> str:
        if self.per_parameter:
            return name
        layer = owner_name(name) or name
        return layer if self.depth is None else ".".join(layer.split(".")[: self.depth])

    def unmatched(self, names: list[str]) -> tuple[list[str], list[str]]:
        """The ``include`` and the ``exclude`` patterns that match none of the layers of these parameters, and
        (second) a few of those layers' names, to show what the patterns are matched against."""
        layers = list(dict.fromkeys(self._unfiltered(name) for name in names))
        patterns = [*self.include, *self.exclude]
        unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(layer, p) for layer in layers)]
        return unmatched, layers[:4]


@dataclass
class LayerIndex:
    """For one layout: the reported layers, and for each selected tensor (``positions``) the layer it feeds.
    ``every``: every tensor is selected, in order (no filter), so per-tensor values need no gather."""

    layers: list[str]
    positions: Tensor
    layer_of: Tensor
    position_list: list[int]
    every: bool
    maxima_slots: tuple[Tensor | None] | None = None  # where LayerMaxima keeps these layers, once it knows

    @classmethod
    def build(cls, layout: Layout, grouping: LayerGrouping, device: torch.device) -> LayerIndex:
        layers: dict[str, int] = {}
        positions, layer_of = [], []
        for i, name in enumerate(layout.names):
            layer = grouping.layer(name)
            if layer is None:
                continue
            positions.append(i)
            layer_of.append(layers.setdefault(layer, len(layers)))
        as_tensor = lambda values: torch.tensor(values, dtype=torch.long, device=device)  # noqa: E731
        every = len(positions) == len(layout.names)
        return cls(list(layers), as_tensor(positions), as_tensor(layer_of), positions, every)

    def _selected(self, tensor_values: Tensor) -> Tensor:
        return tensor_values if self.every else tensor_values[self.positions]

    def l2(self, tensor_values: Tensor) -> Tensor:
        """Per-layer L2 norms from per-tensor L2 norms."""
        squares = self._selected(tensor_values).square()
        return squares.new_zeros(len(self.layers)).index_add_(0, self.layer_of, squares).sqrt()

    def max(self, tensor_values: Tensor) -> Tensor:
        values = self._selected(tensor_values)
        return values.new_zeros(len(self.layers)).scatter_reduce_(0, self.layer_of, values, "amax")

    def any_nonfinite(self, tensor_values: Tensor) -> Tensor:
        bad = (~torch.isfinite(self._selected(tensor_values))).to(tensor_values.dtype)
        return bad.new_zeros(len(self.layers)).index_add_(0, self.layer_of, bad).clamp_max_(1.0)


class LayerMaxima:
    """The running max of each layer's gradient norm since the last record, on the device (no read), kept per layer
    name: a step's layout holds only the tensors with gradients, so its layers may differ from the step before (a
    branch unused on some steps), and each layer keeps its own max. NaN norms are ignored (``fmax``)."""

    def __init__(self) -> None:
        self.slots: dict[str, int] = {}  # layer name -> its position in ``values``
        self.values: Tensor | None = None  # NaN for a layer not seen since the last record

    def _of(self, index: LayerIndex, device: torch.device) -> Tensor | None:
        """Where ``index``'s layers sit in ``values`` (``None`` when at its start, in order: no scatter, no gather),
        kept on the index (one index, one layout, one clipper: one LayerMaxima)."""
        if index.maxima_slots is None:
            slots = [self.slots.setdefault(layer, len(self.slots)) for layer in index.layers]
            in_order = slots == list(range(len(slots)))
            index.maxima_slots = (None if in_order else torch.tensor(slots, device=device),)
        return index.maxima_slots[0]

    def add(self, index: LayerIndex, layer_norms: Tensor) -> None:
        """One step's per-layer norms (in ``index.layers`` order)."""
        positions, size = self._of(index, layer_norms.device), len(self.slots)
        if positions is None and size == len(layer_norms):  # the usual step: every layer seen so far, in order
            seen = layer_norms
        else:
            if positions is None:
                positions = torch.arange(len(layer_norms), device=layer_norms.device)
            seen = layer_norms.new_full((size,), math.nan).index_copy_(0, positions, layer_norms)
        if self.values is not None and len(self.values) < size:  # layers first seen on this step
            self.values = torch.cat([self.values, self.values.new_full((size - len(self.values),), math.nan)])
        self.values = seen if self.values is None else torch.fmax(self.values, seen)

    def take(self, index: LayerIndex) -> Tensor | None:
        """The maxima of ``index``'s layers since the last record (``None`` if nothing was added), then a fresh
        start."""
        values, self.values = self.values, None
        if values is None:
            return None
        positions = self._of(index, values.device)
        if positions is None:
            return values if len(values) == len(index.layers) else values[: len(index.layers)]
        return values[positions]


def parameter_norms(layout: Layout, like: Tensor) -> Tensor:
    """The L2 norm of every parameter tensor of ``layout`` (full tensors when sharded), as ``like``'s dtype: one read
    of the parameters, shared on a recording step by the per-layer statistics and the update statistics."""
    return tensor_norms(layout, layout.local_params(), 2.0).to(like)


class LayerStats:
    """Computes per-layer statistics for a layout on recording steps; caches the layer index per layout.

    Histograms (``histogram=True`` on a recording step) count each layer's gradient values in ``bins`` equal bins
    over ``[-max, max]`` of that layer, before clipping, on the device: values are scaled into bin indices and
    counted with ``bincount``, so no threshold is read back to the host and the bin count stays bounded."""

    def __init__(self, grouping: LayerGrouping, grad_max: bool = False, bins: int = 64) -> None:
        self.grouping = grouping
        self.grad_max = grad_max
        self.bins = bins

    def index(self, layout: Layout, device: torch.device) -> LayerIndex:
        index = layout.layer_indices.get(self.grouping)
        if index is None:
            index = layout.layer_indices[self.grouping] = LayerIndex.build(layout, self.grouping, device)
        return index

    def before_clip(self, layout: Layout, grads: list[Tensor], histogram: bool = False) -> dict[str, Tensor]:
        """What must be measured before clipping changes the gradients: the largest absolute values (per tensor)
        and, on histogram steps, the per-layer histograms."""
        if not (self.grad_max or histogram):
            return {}
        before = {"grad_max": tensor_norms(layout, grads, float("inf"))}
        if histogram:
            index = self.index(layout, before["grad_max"].device)
            layer_max = index.max(before["grad_max"])
            limits = layer_max[index.layer_of].clamp_min(torch.finfo(layer_max.dtype).tiny)
            counts = []
            for k, i in enumerate(index.position_list):
                scaled = grads[i].detach().reshape(-1).float() / limits[k]
                scaled = torch.nan_to_num(scaled, nan=0.0, posinf=1.0, neginf=-1.0)
                bin_of = ((scaled + 1.0) * (self.bins / 2)).floor_().clamp_(0, self.bins - 1).long()
                counts.append(torch.bincount(bin_of, minlength=self.bins))
            if not counts:  # no layer of these tensors is reported (layer_include / layer_exclude)
                return {**before, "grad_hist": layer_max.new_zeros(0, self.bins)}
            per_tensor = torch.stack(counts).to(layer_max.dtype)
            if layout.reducer is not None:  # counts of every rank's shard, replicated data counted once
                per_tensor = layout.reducer.sum(per_tensor, layout.reducer.weights[index.positions.cpu()])
            hist = per_tensor.new_zeros(len(index.layers), self.bins).index_add_(0, index.layer_of, per_tensor)
            before["grad_hist"] = hist
        return before

    def compute(
        self, layout: Layout, grad_norms: Tensor, param_norms: Tensor, before: dict[str, Tensor]
    ) -> dict[str, Tensor]:
        """Per-layer ``grad_norm``, ``param_norm``, ``grad_ratio`` (NaN where the layer's parameters are all zero),
        ``grad_nonfinite`` (1.0 where a tensor of the layer held NaN/Inf), ``grad_max`` when measured, and
        ``grad_hist`` (layers x bins, over ``[-grad_max, grad_max]``) on histogram steps, from the per-tensor
        gradient and parameter norms (:func:`parameter_norms`)."""
        index = self.index(layout, grad_norms.device)
        grad_norm = index.l2(grad_norms)
        param_norm = index.l2(param_norms)
        stats = {
            "grad_norm": grad_norm,
            "param_norm": param_norm,
            "grad_ratio": grad_norm / torch.where(param_norm > 0, param_norm, torch.nan),
            "grad_nonfinite": index.any_nonfinite(grad_norms),
        }
        if "grad_max" in before:
            stats["grad_max"] = index.max(before["grad_max"].to(grad_norms))
        if "grad_hist" in before:
            stats["grad_hist"] = before["grad_hist"].to(grad_norms)
        return stats
