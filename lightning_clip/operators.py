"""Clip operators: how gradients are measured and scaled, given a threshold.

An operator is half of a clipping method; the other half is a threshold policy (``thresholds.py``). The operator
measures what its decision needs (per-tensor norms and their global norm, or unit-wise norms) with foreach kernels,
then scales the gradients in place. Every norm is computed in at least float32, so fp16/bf16 gradients do not
overflow in the measurement itself.
"""

from __future__ import annotations

import functools
import itertools
import math
import operator
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightning_clip import kernels
from lightning_clip.params import Layout
from lightning_clip.sharding import local

Threshold = float | Tensor

#: Added to a norm before dividing by it, as ``torch.nn.utils.clip_grad_norm_`` does.
NORM_EPS = 1e-6

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _norm_dtype(t: Tensor) -> torch.dtype | None:
    return torch.float32 if t.dtype in _LOW_PRECISION else None


def _measured_dtype(t: Tensor) -> torch.dtype:
    """The dtype of ``t``'s norms: at least float32, and real (a complex tensor's norms are those of its moduli)."""
    return _norm_dtype(t) or (t.real.dtype if t.is_complex() else t.dtype)


def tensor_norms(layout: Layout, grads: list[Tensor], norm_type: float) -> Tensor:
    """The ``norm_type``-norm of every tensor, in layout order, as one 1-D tensor: one foreach kernel per run.

    The inf-norm (largest absolute value) is taken on CPU with ``aminmax``, one pass per tensor, which runs several
    times faster there than ``_foreach_norm(ord=inf)`` but for small tensors (NaN propagates through both); the L2
    norm of a large float32/float64 tensor on CPU as a dot product (:func:`_l2_norms`); on a GPU both with the
    foreach kernel, which there is many times faster than a kernel per tensor. For sharded (DTensor)
    parameters, ``grads`` are local shards and one collective turns their norms into those of the full tensors."""
    per_run = []
    for _, run in layout.groups:
        tensors = grads[run]
        dtype = _measured_dtype(tensors[0])
        held = layout.held_of(run, tensors)
        if not held:
            per_run.append(tensors[0].new_zeros(len(tensors), dtype=dtype))
            continue
        if norm_type == math.inf:
            norms = _inf_norms(held, _size_parts(layout, ("l2", run.start), held))
        elif norm_type == 2.0 and held[0].device.type == "cpu" and held[0].dtype in _BLAS_DTYPES:
            norms = _l2_norms(held, _size_parts(layout, ("l2", run.start), held))
        else:
            norms = torch.stack(torch._foreach_norm(held, norm_type, dtype=_norm_dtype(tensors[0])))
        if len(held) < len(tensors):  # the tensors with no element on this rank have norm 0 here
            key = (run.start, norms.device)
            if key not in layout.held_index:
                layout.held_index[key] = torch.tensor(layout.held[run.start], device=norms.device)
            positions = layout.held_index[key]
            norms = norms.new_zeros(len(tensors)).index_copy_(0, positions, norms)
        per_run.append(norms)
    norms = _concat(per_run)
    return norms if layout.reducer is None else layout.reducer.norms(norms, norm_type)


def _inf_norms(tensors: list[Tensor], parts: _SizeParts) -> Tensor:
    """The largest absolute value of each tensor, in at least float32: on CPU small tensors that share a shape in one
    ``amax`` over their stack each (``parts.stacks``; 2000 tensors of 8x8 and 8 take 0.42 ms against 3.4 ms in the
    foreach kernel), the others as :func:`_max_abs` takes them; on a GPU, and for complex tensors (their moduli), one
    foreach kernel. NaN propagates."""
    if tensors[0].device.type != "cpu" or tensors[0].is_complex():
        return torch.stack(torch._foreach_norm(tensors, math.inf, dtype=_norm_dtype(tensors[0])))
    dtype = _measured_dtype(tensors[0])
    if not parts.stacks:
        return _max_abs(tensors).to(dtype)
    chunks = [(ks, torch.stack(_pick(tensors, ks)).reshape(len(ks), -1).abs_().amax(dim=1)) for ks in parts.stacks]
    others = parts.alone + parts.rest
    if others:
        chunks.append((others, _max_abs(_pick(tensors, others))))
    return _in_order(*((ks, values.to(dtype)) for ks, values in chunks))


#: On CPU, tensors of at most this many elements take the inf-norm in one foreach kernel; larger ones with
#: ``aminmax``. On 2 threads, 2000 tensors of 8x8 take 2.9 ms in the foreach kernel against 7.0 ms with
#: ``aminmax``, of 24x24 the same (6.3 against 6.0), of 32x32 9.2 against 4.2 ms.
FOREACH_INF_MAX_NUMEL = 512


def _max_abs(tensors: list[Tensor]) -> Tensor:
    """The largest absolute value of each tensor (0 for an empty one), on CPU; see :data:`FOREACH_INF_MAX_NUMEL`."""
    small = [k for k, t in enumerate(tensors) if 0 < t.numel() <= FOREACH_INF_MAX_NUMEL]
    if len(small) == len(tensors):
        return torch.stack(torch._foreach_norm(tensors, math.inf))
    taken = set(small)
    large = [k for k in range(len(tensors)) if k not in taken]
    zero = tensors[0].new_zeros(())
    extremes = [torch.aminmax(tensors[k]) if tensors[k].numel() else (zero, zero) for k in large]
    values = torch.maximum(torch.stack([high for _, high in extremes]), -torch.stack([low for low, _ in extremes]))
    if not small:
        return values
    return _in_order((small, torch.stack(torch._foreach_norm([tensors[k] for k in small], math.inf))), (large, values))


def _in_order(*chunks: tuple[list[int], Tensor]) -> Tensor:
    """The values of the tensors at each chunk's positions, as one 1-D tensor in position order."""
    values = torch.cat([chunk_values for _, chunk_values in chunks])
    positions = torch.tensor([k for chunk_positions, _ in chunks for k in chunk_positions])
    return torch.empty_like(values).index_copy_(0, positions, values)


_BLAS_DTYPES = (torch.float32, torch.float64)


def _l2_norms(tensors: list[Tensor], parts: _SizeParts) -> Tensor:
    """The L2 norm of each tensor, on CPU (float32 or float64): those of more than :data:`ONE_AT_A_TIME_NUMEL`
    elements as the square root of the tensor's dot product with itself (BLAS), small ones that share a shape in one
    ``vector_norm`` over their stack each, the rest in one foreach kernel. On 2 threads with MKL the dot products take
    0.25x the time of ``_foreach_norm`` at 250k elements a tensor and 0.66x at 25k, and they are the more accurate:
    against float64, ``vector_norm`` was off by 1.7e-6 (relative) at 250k elements of ``3 * randn + 0.5``, 8.7e-5 at
    4M and 2.7e-3 at 38M (a GPT-2 embedding), the dot product by 1.4e-8, 1.4e-6 and 4.4e-5. The stacks cost the host
    one call each where the foreach kernel costs one per tensor: 2000 tensors of 8x8 and 8 take 0.36 ms against 3.4.
    NaN and Inf propagate through all three; a norm overflows where its square does."""
    if parts.whole:
        return torch.stack(torch._foreach_norm(tensors))
    values = []
    if parts.alone:
        flats = [tensors[k].reshape(-1) for k in parts.alone]  # a view where contiguous
        values.append(torch.stack([torch.dot(flat, flat) for flat in flats]).sqrt_())
    for ks in parts.stacks:
        stacked = torch.stack([tensors[k] for k in ks])
        values.append(torch.linalg.vector_norm(stacked.reshape(len(ks), -1), 2, dim=1))
    if parts.rest:
        values.append(torch.stack(torch._foreach_norm(_pick(tensors, parts.rest))))
    values = torch.cat(values)
    return values if parts.order is None else torch.empty_like(values).index_copy_(0, parts.order, values)


def _concat(per_run: list[Tensor]) -> Tensor:
    if len(per_run) == 1:
        return per_run[0]
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in per_run) else torch.float32
    device = per_run[0].device
    return torch.cat([t.to(device=device, dtype=dtype) for t in per_run])


def _foreach_mul_(tensors: Sequence[Tensor], scale: Tensor | Sequence[Tensor]) -> None:
    if tensors:
        torch._foreach_mul_(tensors, scale)


def _factor_views(layout: Layout, key: Any, factors: Tensor, sizes: list[int] | None = None) -> list[Tensor]:
    """``factors`` as a list of views for ``_foreach_mul_``: one 0-d view per element, or ``split(sizes)`` along
    dim 0. The views are of a buffer kept in the layout and made once; each step copies the factors into it (one
    kernel), instead of creating thousands of tensor objects with ``unbind``/``split`` (host time)."""
    slot = layout.factor_slots.get(key)
    if slot is None or slot[0].shape != factors.shape or slot[0].dtype != factors.dtype:
        buffer = torch.empty_like(factors)
        slot = layout.factor_slots[key] = (buffer, list(buffer.unbind(0) if sizes is None else buffer.split(sizes)))
    slot[0].copy_(factors)
    return slot[1]


def _kept(cache: dict[Any, Any], key: Any, build: Callable[[], Any]) -> Any:
    """``cache[key]`` (one of a layout's caches), built on first use; a ``None`` is kept too (for a kernel's plan:
    the kernel does not apply)."""
    if key not in cache:
        cache[key] = build()
    return cache[key]


#: On CPU, tensors of more than this many elements are taken one at a time where that is faster than a foreach
#: kernel over the list: their L2 norms (a dot product each, :func:`_l2_norms`), ``value``'s clamp (one ``clamp_``
#: is one pass where ``clamp_min_`` then ``clamp_max_`` are two) and SPAM's clip (its temporaries are one tensor's,
#: still in cache when the next op reads them, where over the whole list they are two gradient-sized buffers).
#: Below it the foreach kernels' one call for many tensors wins. On 2 threads, one ``clamp_`` per tensor against
#: the two foreach clamps: 2.0x as long at 512 elements, 1.2x at 4096, 0.92x at 8192, 0.61x at 65536; SPAM one
#: tensor at a time against its foreach list: 0.58x (200 x 250k elements), 0.56x (2000 x 25k). On a GPU the
#: foreach kernels and those of :mod:`lightning_clip.kernels` take every tensor of a run in one launch.
ONE_AT_A_TIME_NUMEL = 8192

#: Tensors with at most this many elements that share a shape (and, for AGC, are not sharded) are taken in one kernel
#: over their stack: AGC's unit norms, and on CPU L2 norms and SPAM's clip (:class:`_SizeParts`). The stack is a copy,
#: so this pays only where a kernel launch costs more than copying the tensor: on 2 CPU threads, AGC's unit norms of
#: 1000 tensors of 8x8 take 0.26 ms stacked against 2.6 ms one by one, of 64x64 3.4 against 9.9 ms, while of 158x158
#: 49.6 against 13.1.
STACK_MAX_NUMEL = 4096
#: A stack holds at most this many elements (4 MiB of float32), so what stacking holds at once stays small whatever
#: the number of small tensors.
STACK_MAX_ELEMENTS = 1 << 20


def _split_by_size(tensors: Sequence[Tensor]) -> tuple[list[int], list[int] | None]:
    """The positions of the tensors to take one at a time (:data:`ONE_AT_A_TIME_NUMEL`) and of the others (``None``:
    all of them)."""
    alone = [k for k, t in enumerate(tensors) if t.device.type == "cpu" and t.numel() > ONE_AT_A_TIME_NUMEL]
    taken = set(alone)
    return alone, None if not alone else [k for k in range(len(tensors)) if k not in taken]


def _size_split(layout: Layout, key: Any, tensors: Sequence[Tensor]) -> tuple[list[int], list[int] | None]:
    """:func:`_split_by_size` of a run's ``tensors``, made once per layout and kept under ``key``."""
    return _kept(layout.size_splits, key, lambda: _split_by_size(tensors))


def _stacks(items: Iterable[tuple[int, torch.Size, Any]]) -> list[list[int]]:
    """Positions of the tensors taken as one stack each (:data:`STACK_MAX_NUMEL`), from ``(position, shape, kind)``:
    non-empty tensors of at most that many elements that share a shape and a ``kind`` (a dtype, say), in groups of two
    or more, each group cut so that its stack holds at most :data:`STACK_MAX_ELEMENTS` elements."""
    groups: dict[tuple, list[int]] = {}
    for k, shape, kind in items:
        if 0 < shape.numel() <= STACK_MAX_NUMEL:
            groups.setdefault((shape, kind), []).append(k)
    stacks = []
    for (shape, _), positions in groups.items():
        most = max(2, STACK_MAX_ELEMENTS // shape.numel())
        stacks += [chunk for i in range(0, len(positions), most) if len(chunk := positions[i : i + most]) > 1]
    return stacks


@dataclass
class _SizeParts:
    """How a run's tensors are taken on CPU, by size: the large ones one at a time (:data:`ONE_AT_A_TIME_NUMEL`),
    small ones that share a shape and a dtype as one stack each (:func:`_stacks`), the rest (``None``: all) in one
    foreach list; ``order`` puts values computed in that order (alone, stacks, rest) back in position order. On a GPU
    all go in the list. Made once per layout (:func:`_size_parts`)."""

    alone: list[int]
    stacks: list[list[int]]
    rest: list[int] | None
    order: Tensor | None = None

    @classmethod
    def of(cls, tensors: Sequence[Tensor]) -> _SizeParts:
        alone, rest = _split_by_size(tensors)
        candidates = range(len(tensors)) if rest is None else rest
        stacks = _stacks((k, tensors[k].shape, tensors[k].dtype) for k in candidates if tensors[k].device.type == "cpu")
        if not alone and not stacks:
            return cls([], [], None)
        taken = {k for ks in stacks for k in ks} | set(alone)
        rest = [k for k in range(len(tensors)) if k not in taken]
        return cls(alone, stacks, rest, torch.tensor(alone + [k for ks in stacks for k in ks] + rest))

    @property
    def whole(self) -> bool:
        """All tensors go in the one foreach list."""
        return not self.alone and not self.stacks


def _size_parts(layout: Layout, key: Any, tensors: Sequence[Tensor]) -> _SizeParts:
    """:meth:`_SizeParts.of` a run's ``tensors``, made once per layout and kept under ``key``."""
    return _kept(layout.size_splits, key, lambda: _SizeParts.of(tensors))


def _pick(items: list, positions: list[int] | None) -> list:
    return items if positions is None else [items[k] for k in positions]


def _foreach_scalar(value: float, like: Tensor) -> Tensor | float:
    """``value`` as a foreach kernel's scalar for tensors like ``like``: on CPU a 0-d tensor, with which
    ``_foreach_mul`` takes a third of the host time it takes with a Python number (0.56 against 1.6 us per tensor on
    2 threads) and gives the same products; on a GPU the number itself (a tensor would be a copy to the device)."""
    if like.device.type != "cpu":
        return value
    return torch.tensor(value, dtype=_measured_dtype(like))


def _scale_each_(
    layout: Layout,
    key: Any,
    tensors: Sequence[Tensor],
    factors: Tensor,
    units: list[int] | None = None,
    select: Callable[[Sequence[Any]], Sequence[Any]] | None = None,
) -> None:
    """Multiply each tensor by its own factor in place: ``factors`` holds one per tensor, or with ``units`` ``units[i]``
    consecutive ones for tensor ``i``, one per slice along dim 0 (AGC's units). ``select`` picks the tensors to
    scale (and their factors) out of ``tensors``. On CUDA one launch of :mod:`lightning_clip.kernels` where it
    applies; otherwise one foreach kernel over views of the factors (on CUDA, one kernel per tensor)."""
    chosen = tensors if select is None else select(tensors)

    def build() -> kernels.Plan | None:
        starts: Sequence[int] = range(len(tensors))
        if units is not None:
            starts = list(itertools.accumulate(units, initial=0))[:-1]
        if select is not None:
            starts = select(starts)
        chosen_units = units if units is None or select is None else list(select(units))
        return kernels.plan(chosen, list(starts), chosen_units)

    plan = _kept(layout.kernel_plans, key, build)
    if plan is not None and kernels.multiply_(plan, chosen, factors.reshape(-1)):
        return
    views = _factor_views(layout, key, factors, units)
    _foreach_mul_(chosen, views if select is None else select(views))


def total_norm(norms: Tensor, norm_type: float) -> Tensor:
    """The global norm from per-tensor norms: the norm of the vector of norms, for every p (1, 2, inf, ...)."""
    return torch.linalg.vector_norm(norms, norm_type)


@dataclass
class Measured:
    """What an operator measured before clipping: per-tensor norms (layout order, every tensor), ``total`` the
    global norm of the tensors the method clips (what thresholds are set from), ``overall`` the global norm of all
    tensors, excluded ones included (what the NaN/Inf guard checks; ``total`` itself when nothing is excluded).
    ``units`` holds AGC's unit norms of gradients and parameters per run, for its ``apply``."""

    norms: Tensor
    total: Tensor
    norm_type: float
    overall: Tensor
    units: list[tuple[list[Tensor], list[Tensor]]] | None = None

    def scaled(self, factor: Tensor) -> Measured:
        """The same norms times ``factor`` (a 0-d tensor): the norms of gradients that still carry a loss scale,
        without it. Only for global-coefficient operators (no unit norms)."""
        factor = factor.to(self.norms)
        return Measured(self.norms * factor, self.total * factor, self.norm_type, self.overall * factor)


@dataclass
class Applied:
    """What clipping did: whether it changed any gradient (``None`` when not known without a measurement), and the
    factor each tensor was scaled by, when every element of a tensor was scaled alike (``None`` otherwise)."""

    changed: Tensor | bool | None
    scale: Tensor | None


class ClipOperator:
    """Measures gradients and scales them given a threshold. ``measures_always`` is False when clipping needs no
    measurement (value clipping), so a step that neither logs nor checks for NaN/Inf reads each gradient once.
    Tensors the layout excludes are measured but never scaled, and left out of ``Measured.total``."""

    norm_type: float = 2.0
    measures_always = True
    reads_optimizer = False  # whether apply() needs the optimizer's state (bind() hands it over)
    clips_while_measuring = False  # whether clip_measuring() may clip and measure in one pass
    elementwise = False  # whether each element is held to a bound (value, SPAM): real gradients only

    def bind(self, optimizer: Any) -> None:
        """Give the operator the optimizer whose gradients it clips (for those that read its state)."""

    def check(self, names: Sequence[str], params: Sequence[Tensor]) -> None:
        """Refuse, before any step, a parameter this operator cannot clip (``names``: those it clips): a complex one
        where each element is held to a bound (``elementwise``), an order complex numbers do not have."""
        if not self.elementwise:
            return
        for name, p in zip(names, params):
            if p.is_complex():
                raise ValueError(
                    f"parameter {name!r} is complex, and this method holds each element to a bound, an order complex "
                    "numbers do not have (torch.nn.utils.clip_grad_value_ refuses them too): clip it by norm "
                    "('norm', 'tensor_norm', which take the modulus), or exclude it"
                )

    def measure(self, layout: Layout, grads: list[Tensor]) -> Measured:
        norms = tensor_norms(layout, grads, self.norm_type)
        overall = total_norm(norms, self.norm_type)
        if layout.clip_mask is None:
            return Measured(norms, overall, self.norm_type, overall)
        clipped = torch.where(layout.clip_mask.to(norms.device), norms, 0.0)
        return Measured(norms, total_norm(clipped, self.norm_type), self.norm_type, overall)

    @staticmethod
    def _unexcluded(layout: Layout, scale: Tensor) -> Tensor:
        """Per-tensor scale factors with the excluded tensors' set to 1."""
        if layout.clip_mask is None:
            return scale
        return torch.where(layout.clip_mask.to(scale.device), scale, 1.0)

    def apply(self, layout: Layout, grads: list[Tensor], measured: Measured | None, threshold: Threshold) -> Applied:
        raise NotImplementedError

    def clip_measuring(self, layout: Layout, grads: list[Tensor], threshold: Threshold) -> Measured | None:
        """Clip and measure in one pass where this operator can (``clips_while_measuring``), returning what
        :meth:`measure` would have returned before the clip; ``None`` (nothing done) elsewhere."""
        return None


class NoClip(ClipOperator):
    """Measures, never changes a gradient (method ``none``)."""

    measures_always = False

    def apply(self, layout, grads, measured, threshold) -> Applied:
        return Applied(changed=False, scale=None)


class GlobalNormClip(ClipOperator):
    """Scales all gradients by ``min(1, threshold / (total_norm + 1e-6))`` (Pascanu et al. 2013, "On the
    difficulty of training recurrent neural networks"), the computation of ``torch.nn.utils.clip_grad_norm_``."""

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = norm_type

    def apply(self, layout, grads, measured, threshold) -> Applied:
        assert measured is not None
        coef = torch.clamp(threshold / (measured.total + NORM_EPS), max=1.0)
        for device, run in layout.groups:
            _foreach_mul_(layout.clipped_of(run, grads[run]), coef.to(device))
        return Applied(changed=coef < 1.0, scale=self._unexcluded(layout, coef.expand(len(layout))))


class TensorNormClip(ClipOperator):
    """Scales each tensor by ``min(1, threshold / (its norm + 1e-6))``: Keras ``clipnorm`` semantics, each tensor
    clipped on its own (as opposed to Keras ``global_clipnorm``). ``threshold`` may be one value or one per tensor."""

    def __init__(self, norm_type: float = 2.0) -> None:
        self.norm_type = norm_type

    def apply(self, layout, grads, measured, threshold) -> Applied:
        assert measured is not None
        coefs = self._unexcluded(layout, torch.clamp(threshold / (measured.norms + NORM_EPS), max=1.0))
        for device, run in layout.groups:
            select = functools.partial(layout.clipped_of, run)
            _scale_each_(layout, ("tensor", run.start), grads[run], coefs[run].to(device), select=select)
        return Applied(changed=(coefs < 1.0).any(), scale=coefs)


class ValueClip(ClipOperator):
    """Clamps every element to ``[-threshold, threshold]``, as ``torch.nn.utils.clip_grad_value_``. Its measurement
    (only taken when a step logs or checks for NaN/Inf) is the largest absolute value, the inf-norm.

    On CUDA one launch of :func:`kernels.clamp_` clamps a run in one pass, where ``clamp_min_`` then ``clamp_max_``
    read and write every gradient twice; :meth:`clip_measuring` also measures in that pass. On CPU each large tensor
    takes one ``clamp_`` (:data:`ONE_AT_A_TIME_NUMEL`)."""

    norm_type = math.inf
    measures_always = False
    clips_while_measuring = True
    elementwise = True

    @staticmethod
    def _plan(layout: Layout, run: slice, tensors: Sequence[Tensor]) -> kernels.Plan | None:
        def build() -> kernels.Plan | None:  # one factor slot per tensor, unused: a clamp has no factors
            return kernels.plan(tensors, list(range(len(tensors))), None)

        return _kept(layout.kernel_plans, ("value", run.start), build)

    @staticmethod
    def _clamp_(layout: Layout, run: slice, tensors: list[Tensor], limit: float) -> None:
        """``clip_grad_value_``'s clamp without the kernel: two foreach passes, but one ``clamp_`` for each large
        tensor on CPU (:data:`ONE_AT_A_TIME_NUMEL`)."""
        alone, rest = _size_split(layout, ("value", run.start), tensors)
        for k in alone:
            tensors[k].clamp_(-limit, limit)
        ValueClip._foreach_clamp_(_pick(tensors, rest), limit)

    @staticmethod
    def _foreach_clamp_(tensors: list[Tensor], limit: float) -> None:
        """``clip_grad_value_``'s two foreach passes."""
        if tensors:
            torch._foreach_clamp_min_(tensors, -limit)
            torch._foreach_clamp_max_(tensors, limit)

    def apply(self, layout, grads, measured, threshold) -> Applied:
        limit = float(threshold)
        for _, run in layout.groups:
            clipped = layout.clipped_of(run, grads[run])
            plan = self._plan(layout, run, clipped) if clipped else None
            if clipped and (plan is None or not kernels.clamp_(plan, clipped, limit)):
                self._clamp_(layout, run, clipped, limit)
        return Applied(changed=None if measured is None else measured.total > limit, scale=None)

    def clip_measuring(self, layout: Layout, grads: list[Tensor], threshold: Threshold) -> Measured | None:
        """Clamp and measure (the per-tensor inf-norms from before the clamp, NaN counted as Inf) where nothing is
        excluded or sharded: in one pass where the kernel applies (CUDA), and on CPU tensor by tensor, each large
        one clamped right after it is measured, while it is still in cache; ``None`` (nothing done) elsewhere."""
        if layout.excluded or layout.reducer is not None:
            return None
        plans = [self._plan(layout, run, grads[run]) for _, run in layout.groups]
        if any(plan is None and device.type != "cpu" for plan, (device, _) in zip(plans, layout.groups)):
            return None
        limit, per_run = float(threshold), []
        for plan, (_, run) in zip(plans, layout.groups):
            tensors = grads[run]
            norms = False if plan is None else kernels.clamp_(plan, tensors, limit, measure=True)
            if norms is False:  # CPU; or a tensor not contiguous this step, or a GPU Triton cannot compile for
                norms = self._measure_then_clamp_(layout, run, tensors, limit)
            per_run.append(norms)
        norms = _concat(per_run)
        total = total_norm(norms, math.inf)
        return Measured(norms, total, math.inf, total)

    def _measure_then_clamp_(self, layout: Layout, run: slice, tensors: list[Tensor], limit: float) -> Tensor:
        """Each tensor's largest absolute value, then its clamp: those taken one at a time (large, on CPU) one after
        the other, the rest together. Nothing is excluded here, so these are the tensors :meth:`apply` clamps."""
        alone, rest = _size_split(layout, ("value", run.start), tensors)
        peaks = []
        for k in alone:
            low, high = torch.aminmax(tensors[k])
            peaks.append(torch.maximum(high, -low))
            tensors[k].clamp_(-limit, limit)
        together = _pick(tensors, rest)
        parts = _size_parts(layout, ("value measured", run.start), together)
        values = _inf_norms(together, parts) if together else None
        self._foreach_clamp_(together, limit)
        if not alone:
            return values
        measured = torch.stack(peaks).to(_measured_dtype(tensors[0]))
        return measured if not rest else _in_order((alone, measured), (rest, values))


@dataclass
class _MomentRun:
    """SPAM's view of one layout run, read from one snapshot of the optimizer's state (:meth:`SpikeAwareClip._seen`):
    which of the run's clipped tensors have a second moment (``None``: all), those moments (local shards), whether
    they need converting to the gradients' dtype, the kernel's plan (``None``: the foreach path), and which of them
    the foreach path clips one at a time."""

    seen: list[Tensor | None]
    positions: list[int] | None
    moments: list[Tensor]
    convert: bool
    plan: kernels.Plan | None
    parts: _SizeParts  # of the chosen tensors, for the foreach path


class SpikeAwareClip(ClipOperator):
    """SPAM's spike-aware clipping (Huang et al., ICLR 2025, "SPAM: Spike-Aware Adam with Momentum Reset for Stable
    LLM Training", section 3.2): each gradient element with ``g**2 > theta * v``, ``v`` the optimizer's raw second
    moment (Adam's ``exp_avg_sq`` before this step, without bias correction, as the reference code reads it),
    becomes ``sign(g) * sqrt(theta * v)``; ``theta`` is the threshold. Elements whose ``v`` is 0 (never seen, or a
    dead unit) are left unclipped: a limit of 0 would freeze them. As ``min(max(g, -limit), limit)`` with foreach
    kernels (:meth:`_clip_to_moments_`; on CPU large tensors one at a time and small ones stacked by shape,
    :class:`_SizeParts`); the limit is ``+inf`` where ``v`` is 0. On CUDA one launch of
    :func:`kernels.clip_to_moments_` does the same. SPAM's momentum reset changes the optimizer and is not done.

    It reads the optimizer's state: :meth:`bind` hands it the optimizer (the Clipper does). Which moments belong to
    which gradient is read once and kept while the state holds the same moment tensors (Adam updates them in place;
    ``load_state_dict`` or a cleared state replaces them): checking that is one pass over the state in C, where
    looking each parameter up costs a Python call per tensor."""

    measures_always = False
    reads_optimizer = True
    elementwise = True

    def __init__(self) -> None:
        self.optimizer: Any = None
        self._snapshot: list[Tensor | None] = []

    def bind(self, optimizer: Any) -> None:
        self.optimizer, self._snapshot = optimizer, []

    def _seen(self) -> list[Tensor | None]:
        """Every ``exp_avg_sq`` in the optimizer's state, in its order: the stored list when it holds the same
        tensors, so that a run's cached :class:`_MomentRun` stays valid exactly as long as it is the same list."""
        current = list(map(dict.get, self.optimizer.state.values(), itertools.repeat("exp_avg_sq")))
        if len(current) != len(self._snapshot) or not all(map(operator.is_, current, self._snapshot)):
            self._snapshot = current
        return self._snapshot

    def _moment_run(self, layout: Layout, run: slice, grads: Sequence[Tensor], seen: list) -> _MomentRun:
        key = ("spam", run.start)
        cached = layout.kernel_plans.get(key)
        if cached is not None and cached.seen is seen:
            return cached
        state = self.optimizer.state
        found = layout.clipped_of(run, [state.get(p, {}).get("exp_avg_sq") for p in layout.params[run]])
        positions = [k for k, v in enumerate(found) if v is not None]
        moments = [local(found[k]) for k in positions]
        chosen = [grads[k] for k in positions]
        convert = any(v.dtype != g.dtype for g, v in zip(chosen, moments))
        plan = None if convert or not chosen else kernels.spike_plan(chosen, moments)
        every = len(positions) == len(found)
        parts = _SizeParts.of(chosen)
        layout.kernel_plans[key] = _MomentRun(seen, None if every else positions, moments, convert, plan, parts)
        return layout.kernel_plans[key]

    @staticmethod
    def _clip_to_moments_(targets: list[Tensor], moments: list[Tensor], theta: Tensor | float) -> None:
        """The rule in foreach kernels: ``limit = max(sqrt(theta * v), tiny) / sign(v)`` (``x / 0 = inf`` where ``v``
        is 0: unclipped; ``tiny`` where ``theta * v`` underflows), then ``min(max(g, -limit), limit)``."""
        limits = torch._foreach_mul(moments, theta)
        torch._foreach_sqrt_(limits)
        torch._foreach_clamp_min_(limits, torch.finfo(torch.float32).tiny)
        torch._foreach_div_(limits, torch._foreach_sign(moments))
        torch._foreach_minimum_(targets, limits)
        torch._foreach_neg_(limits)
        torch._foreach_maximum_(targets, limits)

    @classmethod
    def _clip_stacked_(cls, targets: list[Tensor], moments: list[Tensor], theta: Tensor | float) -> None:
        """Small tensors of one shape: the same rule on their stack, copied back. The rule's seven foreach kernels
        cost the host a call per tensor each; a stack, an ``unbind`` and one ``_foreach_copy_`` cost about two. On 2
        CPU threads: 0.37x the time of the foreach list for 1000 tensors of 8x8, 0.69x for 200 of 64x64."""
        stacked = torch.stack(targets)
        cls._clip_to_moments_([stacked], [torch.stack(moments)], theta)
        torch._foreach_copy_(targets, stacked.unbind())

    def apply(self, layout, grads, measured, threshold) -> Applied:
        if self.optimizer is None:
            raise RuntimeError("SpikeAwareClip needs the optimizer: Clipper(..., optimizer=...)")
        theta = float(threshold)
        if math.isinf(theta):
            return Applied(changed=False, scale=None)
        seen = self._seen()
        for _, run in layout.groups:
            clipped = layout.clipped_of(run, grads[run])
            moment_run = self._moment_run(layout, run, clipped, seen)
            targets = clipped if moment_run.positions is None else [clipped[k] for k in moment_run.positions]
            if not targets:
                continue
            moments = moment_run.moments
            if moment_run.plan is not None and kernels.clip_to_moments_(moment_run.plan, targets, moments, theta):
                continue
            if moment_run.convert:
                moments = [v.to(g.dtype) for g, v in zip(targets, moments)]
            factor = _foreach_scalar(theta, targets[0])
            parts = moment_run.parts
            for k in parts.alone:
                self._clip_to_moments_([targets[k]], [moments[k]], factor)
            for ks in parts.stacks:
                self._clip_stacked_(_pick(targets, ks), _pick(moments, ks), factor)
            together = _pick(targets, parts.rest)
            if together:
                self._clip_to_moments_(together, _pick(moments, parts.rest), factor)
        return Applied(changed=None, scale=None)


#: AGC sums each tensor's squared unit norms into this many lanes, then the lanes: consecutive units land on different
#: addresses. On CUDA ``index_add_`` adds atomically, and a warp adding 32 units of one tensor into one sum waits on
#: itself: at 1.1B (441k units into 147 sums) that took 0.36 ms of AGC's 8.3.
SUM_LANES = 32


@dataclass
class _UnitGroup:
    """Tensors of one run that share a rank: their positions in the run and how many units each has. Their unit
    norms are concatenated into one column, so the arithmetic on them is a handful of kernels, not a few per tensor.
    ``parts`` splits ``positions`` into the tensors measured together: one large tensor, or small tensors of one
    shape stacked (:data:`STACK_MAX_NUMEL`)."""

    positions: list[int]
    units: list[int]
    dims: tuple[int, ...]
    slots: Tensor  # for each unit (row of the column), its slot in the per-tensor sums: see :data:`SUM_LANES`
    parts: list[list[int]]


def _unit_norms_in_one_launch(layout: Layout, key: Any, tensors: list[Tensor], group: _UnitGroup) -> Tensor | None:
    """A rank group's column of unit norms from the unit-norm kernel, where it applies: CUDA, no stacked parts, no
    sharding (there a rank's rows come from the collective's layout)."""
    if layout.reducer is not None or any(len(part) > 1 for part in group.parts):
        return None
    plan = _kept(layout.kernel_plans, key, lambda: kernels.norm_plan(tensors, group.units))
    if plan is None:
        return None
    column = kernels.unit_norms(plan, tensors)
    return None if column is None else column.view(-1, *[1] * len(group.dims))


@dataclass
class _UnitwiseRun:
    """The static split of one device/dtype run for AGC: 1-D tensors (one unit each, ``vectors``), tensors of 2+
    dims grouped by rank, and excluded tensors (measured, never clipped)."""

    vectors: list[int]
    groups: list[_UnitGroup]
    excluded: list[int]
    order: Tensor  # run position of each norm in [vectors, groups..., excluded] order
    vector_parts: list[list[int]]  # ``vectors`` split as a group's ``parts``: stacked small shapes, then the rest


class UnitwiseClip(ClipOperator):
    """Adaptive gradient clipping (Brock et al. 2021, "High-Performance Large-Scale Image Recognition Without
    Normalization", section 4.1): each unit's gradient ``G_i`` (a row of a weight, an output channel of a conv
    kernel, the whole of a 1-D tensor) is scaled by ``lambda * max(||W_i||, eps) / ||G_i||`` when
    ``||G_i|| / max(||W_i||, eps) > lambda``, with ``lambda`` the clip factor (the threshold). Parameters matching
    the layout's exclusions (the paper excludes the final classifier) are left unclipped.

    torch has no foreach reduction along a dimension, so unit-wise norms take one kernel per tensor of 2+ dims, or
    one per stack of small tensors that share a shape (:data:`STACK_MAX_NUMEL`); on CUDA the tensors measured one by
    one take one launch of :func:`kernels.unit_norms` instead. They are then concatenated so that the ratio, the
    clamping and the scaling are a few kernels per run.
    """

    def __init__(self, eps: float = 1e-3) -> None:
        self.eps = eps

    def _runs(self, layout: Layout) -> list[_UnitwiseRun]:
        if layout.unitwise is None:
            layout.unitwise = [self._split(layout, device, run) for device, run in layout.groups]
        return layout.unitwise

    def _split(self, layout: Layout, device: torch.device, run: slice) -> _UnitwiseRun:
        vectors, excluded, by_rank = [], [], {}
        reducer = layout.reducer
        for position, i in enumerate(range(run.start, run.stop)):
            ndim = layout.params[i].ndim if reducer is None else len(reducer.shapes[i])
            if i in layout.excluded:
                excluded.append(position)
            elif ndim <= 1:
                vectors.append(position)
            else:
                if reducer is not None and reducer.flat:
                    raise ValueError(
                        f"agc: {layout.names[i]} is held by FSDP1 (FSDPStrategy) as part of a flat shard, which splits "
                        "its units across ranks; use FSDP2 (ModelParallelStrategy with fully_shard) for AGC"
                    )
                if reducer is not None and not reducer.row_local[i]:
                    raise ValueError(
                        f"agc: {layout.names[i]} is sharded along a dimension other than 0, so its unit norms are "
                        "split across ranks; shard it on dim 0 (as fully_shard does) or exclude it"
                    )
                by_rank.setdefault(ndim, []).append(position)
        # sharded: local shapes may differ between ranks, and the norms must come in the same order on every rank
        # for the collective, so nothing is stacked there
        stack = reducer is None
        vector_parts = self._parts([(k, layout.params[run.start + k].shape) for k in vectors], stack)
        vectors = [k for part in vector_parts for k in part]
        groups = []
        for rank, members in by_rank.items():
            parts = self._parts([(k, layout.params[run.start + k].shape) for k in members], stack)
            positions = [k for part in parts for k in part]
            units = [local(layout.params[run.start + k]).shape[0] for k in positions]
            owner = torch.repeat_interleave(torch.arange(len(positions)), torch.tensor(units))
            slots = (owner * SUM_LANES + torch.arange(len(owner)) % SUM_LANES).to(device)
            groups.append(_UnitGroup(positions, units, tuple(range(1, rank)), slots, parts))
        order = vectors + [k for g in groups for k in g.positions] + excluded
        return _UnitwiseRun(vectors, groups, excluded, torch.tensor(order, device=device), vector_parts)

    @staticmethod
    def _parts(shapes: list[tuple[int, torch.Size]], stack: bool) -> list[list[int]]:
        """Positions grouped for measuring: small tensors that share a shape together (when ``stack``,
        :func:`_stacks`), the rest alone, in order."""
        stacked = _stacks((k, shape, None) for k, shape in shapes) if stack else []
        together = {k for ks in stacked for k in ks}
        return stacked + [[k] for k, _ in shapes if k not in together]

    @staticmethod
    def _unit_norms(layout: Layout, key: Any, tensors: list[Tensor], split: _UnitwiseRun) -> list[Tensor]:
        """Unit norms of a run: a vector (one per 1-D tensor), then one ``(units, 1, ...)`` column per rank group.
        On CUDA a group of tensors measured one by one takes one launch of the unit-norm kernel
        (:func:`kernels.unit_norms`) instead of one ``vector_norm`` each; ``key`` names the tensors' plans."""
        columns = []
        if split.vectors:
            dtype = _norm_dtype(tensors[split.vectors[0]])
            norms = [
                torch.linalg.vector_norm(
                    torch.stack([tensors[k] for k in part]).reshape(len(part), -1), 2, dim=1, dtype=dtype
                )
                for part in split.vector_parts
                if len(part) > 1
            ]
            singles = [tensors[part[0]] for part in split.vector_parts if len(part) == 1]
            if singles:
                norms.append(torch.stack(torch._foreach_norm(singles, 2, dtype=dtype)))
            columns.append(torch.cat(norms))
        for number, group in enumerate(split.groups):
            column = _unit_norms_in_one_launch(layout, (key, number), [tensors[k] for k in group.positions], group)
            if column is not None:
                columns.append(column)
                continue
            dtype = _norm_dtype(tensors[group.positions[0]])
            norms = []
            for part in group.parts:
                if len(part) == 1:
                    norms.append(
                        torch.linalg.vector_norm(tensors[part[0]], 2, dim=group.dims, keepdim=True, dtype=dtype)
                    )
                    continue
                stack = torch.stack([tensors[k] for k in part])
                dims = tuple(d + 1 for d in group.dims)
                norms.append(torch.linalg.vector_norm(stack, 2, dim=dims, keepdim=True, dtype=dtype).flatten(0, 1))
            columns.append(torch.cat(norms))
        return columns

    def measure(self, layout, grads) -> Measured:
        """Unit norms of gradients and parameters (kept for ``apply``: parameters do not change in between) and
        per-tensor L2 norms. Sharded: one collective turns the local sums of 1-D tensors and of the per-tensor
        totals into full ones (rows of tensors sharded on dim 0 are whole on each rank)."""
        per_run, units = [], []
        params = layout.local_params()
        for (_, run), split in zip(layout.groups, self._runs(layout)):
            run_grads = grads[run]
            grad_columns = self._unit_norms(layout, ("grad units", run.start), run_grads, split)
            param_columns = self._unit_norms(layout, ("param units", run.start), params[run], split)
            parts = grad_columns[:1] if split.vectors else []
            for group, column in zip(split.groups, grad_columns[len(parts) :]):
                squares = column.reshape(-1).square()
                lanes = squares.new_zeros(len(group.positions) * SUM_LANES).index_add_(0, group.slots, squares)
                sums = lanes.view(-1, SUM_LANES).sum(1)
                parts.append(sums.sqrt())
            if split.excluded:
                excluded = [run_grads[k] for k in split.excluded]
                parts.append(torch.stack(torch._foreach_norm(excluded, 2, dtype=_norm_dtype(excluded[0]))))
            ordered = torch.cat(parts)
            if layout.reducer is not None:
                ordered = self._reduce(layout, run, split, grad_columns, param_columns, ordered)
            norms = torch.empty_like(ordered)
            norms[split.order] = ordered
            per_run.append(norms)
            units.append((grad_columns, param_columns))
        norms = _concat(per_run)
        total = total_norm(norms, 2.0)
        return Measured(norms, total, 2.0, total, units)

    @staticmethod
    def _reduce(layout, run, split, grad_columns, param_columns, ordered) -> Tensor:
        weights = layout.reducer.weights[run]
        vector_weights = weights[split.vectors] if split.vectors else weights[:0]
        squares = [ordered.square()]
        if split.vectors:
            squares = [grad_columns[0].square(), param_columns[0].square(), *squares]
        reduced = layout.reducer.sum(
            torch.cat(squares), torch.cat([vector_weights, vector_weights, weights[split.order.cpu()]])
        )
        if split.vectors:
            count = len(split.vectors)
            grad_columns[0], param_columns[0] = reduced[:count].sqrt(), reduced[count : 2 * count].sqrt()
            reduced = reduced[2 * count :]
        return reduced.sqrt()

    def apply(self, layout, grads, measured, threshold) -> Applied:
        assert measured is not None
        smallest = []
        for (_, run), split, (grad_columns, param_columns) in zip(layout.groups, self._runs(layout), measured.units):
            if not grad_columns:
                continue
            run_grads = grads[run]
            targets = ([[run_grads[k] for k in split.vectors]] if split.vectors else []) + [
                [run_grads[k] for k in group.positions] for group in split.groups
            ]
            pieces = ([None] if split.vectors else []) + [group.units for group in split.groups]
            columns = zip(grad_columns, param_columns, targets, pieces)
            for column, (grad_norms, param_norms, tensors, units) in enumerate(columns):
                limits = param_norms.clamp_min(self.eps).mul_(threshold)
                scales = limits.div_(grad_norms.clamp_min(NORM_EPS)).clamp_max_(1.0)
                _scale_each_(layout, ("unit", run.start, column), tensors, scales, units)
                if scales.numel():  # tensors with no rows (here, or in this rank's shard) have no units
                    smallest.append(scales.min())
        if layout.reducer is not None:  # these are this rank's units: judged from the record's per-tensor norms
            return Applied(changed=None, scale=None)
        if not smallest:
            return Applied(changed=False, scale=None)
        device = smallest[0].device
        return Applied(changed=torch.stack([s.to(device) for s in smallest]).min() < 1.0, scale=None)
