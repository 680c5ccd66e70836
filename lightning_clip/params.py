"""Which gradients one optimizer step touches, named the way the user named them.

The parameters come from the optimizer's param groups (never from walking the module), are grouped once into
contiguous runs that share a device and dtype (so every foreach kernel gets one homogeneous list), and carry the
user's module names with wrapper components (``torch.compile``'s ``_orig_mod``, FSDP, activation checkpointing)
removed. Layouts are cached: the per-step work is one Python list of gradients, as in
``torch.nn.utils.clip_grad_norm_``.
"""

from __future__ import annotations

import fnmatch
from collections import OrderedDict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightning_clip.sharding import FlatShard, ShardReducer, local

_WRAPPER_PARTS = frozenset({"_orig_mod", "_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_forward_module"})


def clean_name(name: str) -> str:
    """The user's name for a parameter: ``_orig_mod.encoder._fsdp_wrapped_module.weight`` -> ``encoder.weight``."""
    return ".".join(part for part in name.split(".") if part not in _WRAPPER_PARTS)


def owner_name(name: str) -> str:
    """The name of the module that owns a parameter (``encoder.0.weight`` -> ``encoder.0``; top level -> ``""``)."""
    return name.rpartition(".")[0]


def matches_any(name: str, patterns: Sequence[str]) -> bool:
    """Whether a parameter name, or the name of the module owning it, matches one of the glob patterns."""
    owner = owner_name(name)
    return any(fnmatch.fnmatchcase(name, p) or (owner and fnmatch.fnmatchcase(owner, p)) for p in patterns)


def optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """The parameters of an optimizer in param-group order."""
    return [p for group in optimizer.param_groups for p in group["params"]]


def name_params(params: Sequence[Tensor], module: torch.nn.Module | None) -> list[str]:
    """Names for ``params`` from ``module.named_parameters()``; parameters the module does not own get
    ``param_<i>`` so that every tensor still has a stable, unique name."""
    by_id: dict[int, str] = {}
    if module is not None:
        for name, p in module.named_parameters(remove_duplicate=True):
            by_id.setdefault(id(p), clean_name(name))
    return [by_id.get(id(p), f"param_{i}") for i, p in enumerate(params)]


@dataclass
class Layout:
    """The tensors of one optimizer that have gradients, ordered so that each (device, dtype) run is contiguous.

    ``groups`` holds ``(device, slice)`` pairs over that order; ``indices`` the position of each tensor in its
    :class:`ParamSet` (where per-tensor state such as AdaGC's thresholds is kept). ``excluded`` holds the layout
    positions of the tensors the method leaves unclipped (measured and recorded all the same), ``clip_mask`` marks
    the others (``None`` when nothing is excluded).

    The last fields cache what other modules derive once from the static layout, each written by one module:
    ``held_index`` (operators: where a run's held tensors go), ``unitwise`` (operators: AGC's split of each run),
    ``layer_indices`` (stats: the layer of each tensor, per grouping), ``state_index`` (thresholds: ``indices`` as
    a device tensor, ``None`` when they are 0..n-1 in order, and the size of the state they index),
    ``factor_slots`` (operators: buffers for per-tensor factors and their views), ``kernel_plans`` (operators: the
    tables of the CUDA kernels, :mod:`lightning_clip.kernels`), ``size_splits`` (operators: on CPU, which tensors of a
    run are measured or clipped one at a time, and which as one stack).

    ``held`` lists, for each run that has any, the positions within the run of the tensors this rank holds
    elements of: a sharded tensor may have none here (FSDP1 places a parameter in one or two ranks' flat shards; a
    DTensor may have fewer rows than ranks). The order stays the same on every rank, as the collective needs, and
    kernels skip the empty tensors through :meth:`held_of` (on CPU a foreach kernel pays for every tensor, even
    an empty one).
    """

    names: list[str]
    params: list[Tensor]
    groups: list[tuple[torch.device, slice]]
    indices: list[int]
    reducer: ShardReducer | None = None
    held: dict[int, list[int]] = field(default_factory=dict)
    excluded: frozenset[int] = frozenset()
    clip_mask: Tensor | None = None
    held_index: dict[tuple[int, torch.device], Tensor] = field(default_factory=dict)
    unitwise: list[Any] | None = None
    layer_indices: dict[Any, Any] = field(default_factory=dict)
    state_index: tuple[Tensor | None, int] | None = None
    factor_slots: dict[Any, tuple[Tensor, list[Tensor]]] = field(default_factory=dict)
    kernel_plans: dict[Any, Any] = field(default_factory=dict)
    size_splits: dict[Any, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        names: Sequence[str],
        params: Sequence[Tensor],
        indices: Sequence[int] | None = None,
        flat_shards: Mapping[int, FlatShard] | None = None,
        exclude: Sequence[str] = (),
    ) -> Layout:
        runs: dict[tuple[torch.device, torch.dtype], list[int]] = {}
        sizes = []
        for i, p in enumerate(params):
            grad = local(p.grad if p.grad is not None else p)
            if grad.layout != torch.strided:
                raise ValueError(
                    f"parameter {names[i]!r} has a {grad.layout} gradient: clipping takes dense gradients only, as "
                    "torch.nn.utils.clip_grad_norm_ does (an Embedding(sparse=True) gives sparse ones)"
                )
            runs.setdefault((grad.device, grad.dtype), []).append(i)
            sizes.append(grad.numel())
        order = [i for members in runs.values() for i in members]
        groups, start = [], 0
        for (device, _), members in runs.items():
            groups.append((device, slice(start, start + len(members))))
            start += len(members)
        indices = list(range(len(params))) if indices is None else list(indices)
        names, params = [names[i] for i in order], [params[i] for i in order]
        reducer = ShardReducer.build(names, params, flat_shards or {})
        held = {}
        if reducer is not None:
            for _, run in groups:
                run_sizes = [sizes[i] for i in order[run]]
                if 0 in run_sizes:
                    held[run.start] = [k for k, size in enumerate(run_sizes) if size]
        excluded = frozenset(k for k, name in enumerate(names) if matches_any(name, exclude))
        clip_mask = None
        if excluded:
            keep = [k not in excluded for k in range(len(names))]
            clip_mask = torch.tensor(keep, device=groups[0][0] if groups else None)
        return cls(names, params, groups, [indices[i] for i in order], reducer, held, excluded, clip_mask)

    def grads(self) -> list[Tensor]:
        """The gradients as plain tensors: for sharded parameters their local shards (in-place changes to them
        change the DTensor gradients). An FSDP1 parameter of which this rank holds nothing has no gradient here:
        its own (empty) tensor stands for its empty local shard."""
        if self.reducer is None:
            return [p.grad for p in self.params]  # type: ignore[misc]
        return [local(p.grad) if p.grad is not None else p.detach() for p in self.params]

    def held_of(self, run: slice, items: Sequence[Any]) -> Sequence[Any]:
        """``items`` (one per tensor of ``run``) less those of the tensors that have no element on this rank."""
        keep = self.held.get(run.start)
        return items if keep is None else [items[k] for k in keep]

    def clipped_of(self, run: slice, items: Sequence[Any]) -> Sequence[Any]:
        """``items`` (one per tensor of ``run``) less those of excluded tensors and of tensors with no element on
        this rank: what a clip operator scales."""
        items = self.held_of(run, items)
        if not self.excluded:
            return items
        keep = self.held.get(run.start, range(run.stop - run.start))
        return [item for k, item in zip(keep, items) if run.start + k not in self.excluded]

    def local_params(self) -> list[Tensor]:
        """The parameters as plain tensors (local shards of DTensors), not detached: read them under
        ``torch.no_grad()``, as :meth:`Clipper.step` runs (a ``detach`` per tensor and step costs host time)."""
        return self.params if self.reducer is None else [local(p) for p in self.params]

    def __len__(self) -> int:
        return len(self.params)


#: How many layouts (sets of the tensors that hold a gradient) a :class:`ParamSet` keeps, the least recently used
#: dropped first. A model whose every tensor has a gradient on every step has one.
LAYOUTS_KEPT = 16


class ParamSet:
    """The named parameters of one optimizer, and the cached layouts of those that hold gradients this step.

    ``flat_shards`` describes parameters sharded by FSDP1 (:func:`lightning_clip.sharding.fsdp1_shards`); DTensor
    parameters describe themselves. ``exclude`` are glob patterns of parameter or module names that clipping leaves
    alone (:func:`matches_any`)."""

    def __init__(
        self,
        names: Sequence[str],
        params: Sequence[Tensor],
        flat_shards: Mapping[int, FlatShard] | None = None,
        exclude: Sequence[str] = (),
    ) -> None:
        if len(names) != len(params):
            raise ValueError(f"got {len(names)} names for {len(params)} parameters")
        self.names = list(names)
        self.params = list(params)
        self.flat_shards = dict(flat_shards or {})
        # what holds each parameter's gradient: itself, or for an FSDP1 original parameter its flat parameter (one
        # with no element on this rank never holds one, yet takes part in the step on every rank: it counts as
        # present when its flat parameter has a gradient, which is so on every rank or on none)
        self._grad_holders = [
            shard.flat_param if (shard := self.flat_shards.get(id(p))) is not None else p for p in self.params
        ]
        self.exclude = tuple(exclude)
        self._layouts: OrderedDict[tuple[int, ...], Layout] = OrderedDict()  # most recently used last

    def layout(self) -> Layout | None:
        """The layout of the parameters that hold a gradient now, or ``None`` when none does. The last
        :data:`LAYOUTS_KEPT` layouts are kept with what they cache, so that a model whose tensors come and go (experts
        that get no token, layers dropped at random) keeps its host memory bounded."""
        missing = tuple(i for i, holder in enumerate(self._grad_holders) if holder.grad is None)
        layout = self._layouts.get(missing)
        if layout is not None:
            self._layouts.move_to_end(missing)
        else:
            skipped = set(missing)
            present = [i for i in range(len(self.params)) if i not in skipped]
            if not present:
                return None
            layout = Layout.build(
                [self.names[i] for i in present],
                [self.params[i] for i in present],
                present,
                self.flat_shards,
                self.exclude,
            )
            self._layouts[missing] = layout
            if len(self._layouts) > LAYOUTS_KEPT:
                self._layouts.popitem(last=False)
        return layout

    def unmatched(self, patterns: Iterable[str]) -> list[str]:
        """The patterns that match none of these parameters."""
        return [p for p in patterns if not any(matches_any(name, [p]) for name in self.names)]
