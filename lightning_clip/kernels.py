"""One CUDA kernel (Triton) that multiplies many gradients by factors of their own, in one launch: one factor per
tensor (per-tensor clipping, AdaGC) or one per unit, a slice along dim 0 (AGC). A second one takes the L2 norm of
every unit of many tensors in one launch (AGC's measurement, :func:`unit_norms`), where torch takes one
``vector_norm`` launch per tensor: on an H100 this took AGC from 2.0-3.8x of ``norm``'s time to 0.75-1.3x. A third
clamps many gradients to limits set by their optimizer's second moments (SPAM, :func:`clip_to_moments_`), where the
foreach path takes seven kernels and two gradient-sized temporaries; the same kernel clamps many gradients to one
value (:func:`clamp_`) in one pass where ``clip_grad_value_`` takes two, measuring their largest values in the same
pass when asked.

``torch._foreach_mul_(tensors, factors)`` does the same with one 0-d or ``(rows, 1, ...)`` factor per tensor, but
on CUDA a foreach kernel keeps its fast path (many tensors per launch) only where the factors match the tensors in
shape; otherwise it launches one kernel per tensor. On an H200, 2000 tensors of 158x158 took 14.1 ms that way and
0.55 ms with one factor shared by all. Here each program scales one chunk of one tensor. A table made once per
layout says which tensor and which chunk. A table of where each tensor lies, as an offset from one of them, says
where; it is rebuilt only when their addresses change (the caching allocator usually hands a new gradient the old
one's memory). On an H100 this took ``tensor_norm`` from 2.4-2.6x of ``norm``'s time to 1.0-1.1x (README, Speed).

Used for contiguous CUDA tensors when Triton is installed (CUDA builds of torch ship it); elsewhere, or with the
environment variable ``LIGHTNING_CLIP_TRITON=0`` (read at import, or set :data:`ENABLED`), the callers use the
foreach kernels, which compute the same products. The adaptive policies' kernels (``threshold_kernels.py``) are
switched by the same flag and launched by the same :func:`launch`.
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

#: Whether the Triton kernels run where they apply (this module's scaling, and the policies' steps); PyTorch's
#: kernels otherwise.
ENABLED = os.environ.get("LIGHTNING_CLIP_TRITON", "1") != "0"

#: Elements per program. Tensors whose index does not fit in int32 with a chunk to spare keep the foreach path.
CHUNK = 16384
_INT32_LIMIT = 2**31 - 1 - CHUNK
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


@functools.cache
def _kernel():
    """The Triton kernel (``None`` without Triton); Triton compiles it at its first launch and caches it on disk."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def multiply(
        base,  # one of the tensors: the others are addressed from it
        offsets,  # int64, per tensor: its address less the base's, in elements
        factors,
        chunk_tensors,  # int32, per program: which tensor
        chunk_starts,  # int32, per program: the first element of its chunk
        numels,  # int32, per tensor
        factor_starts,  # int32, per tensor: the position of its first factor
        row_sizes,  # int32, per tensor: elements per unit (only read when PER_ROW)
        PER_ROW: tl.constexpr,
        VECTOR: tl.constexpr,  # every offset a multiple of this (16 bytes' worth when all are 16-byte aligned)
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        tensor = tl.load(chunk_tensors + program)
        start = tl.load(chunk_starts + program)
        pointer = base + tl.multiple_of(tl.load(offsets + tensor), VECTOR)
        end = tl.minimum(tl.load(numels + tensor) - start, CHUNK)
        first_factor = tl.load(factor_starts + tensor)
        if PER_ROW:
            row = tl.load(row_sizes + tensor)
        else:
            shared = tl.load(factors + first_factor)
        full = (end // BLOCK) * BLOCK
        for offset in range(0, full, BLOCK):  # whole blocks: no mask, so the loads vectorize
            index = tl.max_contiguous(tl.multiple_of(start + offset + tl.arange(0, BLOCK), BLOCK), BLOCK)
            if PER_ROW:
                factor = tl.load(factors + first_factor + index // row)
            else:
                factor = shared
            values = tl.load(pointer + index)
            tl.store(pointer + index, (values.to(factor.dtype) * factor).to(values.dtype))
        if full < end:
            index = start + full + tl.arange(0, BLOCK)
            inside = index < start + end
            if PER_ROW:
                factor = tl.load(factors + first_factor + index // row, mask=inside, other=1.0)
            else:
                factor = shared
            values = tl.load(pointer + index, mask=inside)
            tl.store(pointer + index, (values.to(factor.dtype) * factor).to(values.dtype), mask=inside)

    return multiply


@functools.cache
def _norm_kernel():
    """The unit-norm kernel (``None`` without Triton): the L2 norm of every unit (slice along dim 0) of many tensors in
    one launch, where torch takes one ``vector_norm`` launch per tensor. Each program takes whole rows of one tensor,
    about :data:`CHUNK` elements' worth (at least one row), and sums each row's squares in float32."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def unit_norms(
        base,  # one of the tensors: the others are addressed from it
        offsets,  # int64, per tensor: its address less the base's, in elements
        out,  # float32, one per unit of every tensor
        chunk_tensors,  # int32, per program: which tensor
        chunk_starts,  # int32, per program: its first row
        units,  # int32, per tensor: how many rows
        unit_starts,  # int32, per tensor: the position of its first row's norm in ``out``
        row_sizes,  # int32, per tensor: elements per row
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        tensor = tl.load(chunk_tensors + program)
        first = tl.load(chunk_starts + program)
        size = tl.load(row_sizes + tensor)
        count = tl.minimum(tl.maximum(CHUNK // size, 1), tl.load(units + tensor) - first)
        pointer = base + tl.load(offsets + tensor)
        unit = tl.load(unit_starts + tensor) + first
        for r in range(0, count):
            row = pointer + (first + r) * size
            squares = tl.zeros([BLOCK], dtype=tl.float32)
            for offset in range(0, size, BLOCK):
                index = offset + tl.arange(0, BLOCK)
                values = tl.load(row + index, mask=index < size, other=0.0).to(tl.float32)
                squares += values * values
            tl.store(out + unit + r, tl.sqrt_rn(tl.sum(squares, axis=0)))

    return unit_norms


@functools.cache
def _clamp_kernel():
    """Clamping in one launch (``None`` without Triton): every element of many gradients clamped to ``+-limit`` in one
    read and one write, where ``clip_grad_value_``'s ``clamp_min_`` then ``clamp_max_`` read and write twice.

    With ``MOMENTS`` (SPAM), each element's limit is ``max(sqrt(limit * v), tiny)``, ``v`` its element of the
    optimizer's second moment, infinite where ``v`` is 0: the arithmetic of ``operators.SpikeAwareClip``'s foreach
    path (seven kernels, two gradient-sized temporaries), in float32. With ``MEASURE``, each tensor's largest
    absolute value before the clamp (NaN counted as Inf) is taken in the same pass, into ``norms`` (zeros), one
    atomic max per program. NaN stays NaN, as in torch's clamp."""
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def clamp(
        base,  # one of the gradients: the other tensors are addressed from it
        offsets,  # int64: the gradients' offsets from the base, in elements, then (MOMENTS) their moments'
        count,  # how many gradients
        limit,  # the bound, or (MOMENTS) SPAM's theta
        norms,  # float32, per gradient (only written when MEASURE)
        chunk_tensors,  # int32, per program: which gradient
        chunk_starts,  # int32, per program: the first element of its chunk
        numels,  # int32, per gradient
        MOMENTS: tl.constexpr,
        MEASURE: tl.constexpr,
        VECTOR: tl.constexpr,  # every offset a multiple of this (16 bytes' worth when all are 16-byte aligned)
        CHUNK: tl.constexpr,
        BLOCK: tl.constexpr,
    ):
        program = tl.program_id(0)
        tensor = tl.load(chunk_tensors + program)
        start = tl.load(chunk_starts + program)
        grad = base + tl.multiple_of(tl.load(offsets + tensor), VECTOR)
        if MOMENTS:
            moment = base + tl.multiple_of(tl.load(offsets + count + tensor), VECTOR)
        end = tl.minimum(tl.load(numels + tensor) - start, CHUNK)
        largest = tl.zeros([BLOCK], dtype=tl.float32)
        tiny = 1.1754943508222875e-38  # float32's smallest normal number: the foreach path's least limit
        for offset in range(0, end, BLOCK):
            index = tl.max_contiguous(tl.multiple_of(start + offset + tl.arange(0, BLOCK), BLOCK), BLOCK)
            whole = offset + BLOCK <= end  # no mask on whole blocks, so their loads vectorize
            inside = index < start + end
            if whole:
                values = tl.load(grad + index)
            else:
                values = tl.load(grad + index, mask=inside, other=0.0)
            x = values.to(tl.float32)
            bound = limit
            if MOMENTS:
                if whole:
                    v = tl.load(moment + index).to(tl.float32)
                else:
                    v = tl.load(moment + index, mask=inside, other=0.0).to(tl.float32)
                root = tl.maximum(tl.sqrt_rn(v * limit), tiny, propagate_nan=tl.PropagateNan.ALL)
                bound = tl.where(v == 0.0, float("inf"), root)
            if MEASURE:
                largest = tl.maximum(largest, tl.where(x == x, tl.abs(x), float("inf")))
            low = tl.maximum(x, -bound, propagate_nan=tl.PropagateNan.ALL)
            clamped = tl.minimum(low, bound, propagate_nan=tl.PropagateNan.ALL).to(values.dtype)
            if whole:
                tl.store(grad + index, clamped)
            else:
                tl.store(grad + index, clamped, mask=inside)
        if MEASURE:
            tl.atomic_max(norms + tensor, tl.max(largest, axis=0))

    return clamp


def _on_kernel_device(tensor: Tensor) -> bool:
    """CUDA; or CPU under Triton's interpreter (``TRITON_INTERPRET=1``), where tests run the kernel without a GPU."""
    return tensor.is_cuda or (tensor.device.type == "cpu" and os.environ.get("TRITON_INTERPRET") == "1")


def runs_on(tensor: Tensor) -> bool:
    """Whether this module's kernels are on and can run on ``tensor``'s device (Triton installed)."""
    return ENABLED and _on_kernel_device(tensor) and _kernel() is not None


@dataclass
class Plan:
    """The static tables for one list of tensors (shapes fixed by the layout), on their device, and the offset table
    of the addresses seen last (with the vector width they allow). In a unit-norm plan (:func:`norm_plan`) a chunk
    starts at a row, ``numels`` holds each tensor's rows and ``factor_starts`` the position of its first norm."""

    chunk_tensors: Tensor
    chunk_starts: Tensor
    numels: Tensor
    factor_starts: Tensor
    row_sizes: Tensor
    per_row: bool
    base: int  # a tensor with elements: the others are addressed from its address
    addresses: list[int] | None = None
    offset_table: Tensor | None = None
    vector: int = 1
    block: int = 1024  # elements a program loads at once
    outputs: int = 0  # unit-norm plans: how many norms


def plan(tensors: Sequence[Tensor], factor_starts: list[int], units: list[int] | None) -> Plan | None:
    """The tables for scaling ``tensors`` (the gradients of one layout run, every step the same shapes) by
    ``factors[factor_starts[i]]`` each, or with ``units`` by ``units[i]`` consecutive factors from there, one per
    slice along dim 0; ``None`` where the kernel does not apply."""
    if not (tensors and runs_on(tensors[0]) and tensors[0].dtype in _DTYPES):
        return None
    if any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors):
        return None
    numels = [t.numel() for t in tensors]
    if max(numels) > _INT32_LIMIT:
        return None
    chunks = [(numel + CHUNK - 1) // CHUNK for numel in numels]
    counts = torch.tensor(chunks)
    chunk_tensors = torch.repeat_interleave(torch.arange(len(tensors)), counts)
    firsts = torch.cumsum(counts, 0) - counts
    chunk_starts = (torch.arange(int(counts.sum())) - firsts[chunk_tensors]) * CHUNK
    rows = [numel // max(u, 1) for numel, u in zip(numels, units)] if units is not None else [1] * len(tensors)
    device = tensors[0].device

    def table(values) -> Tensor:
        return torch.as_tensor(values, dtype=torch.int32).to(device)

    return Plan(
        table(chunk_tensors),
        table(chunk_starts),
        table(numels),
        table(factor_starts),
        table(rows),
        units is not None,
        next((i for i, numel in enumerate(numels) if numel), 0),
    )


def norm_plan(tensors: Sequence[Tensor], units: list[int]) -> Plan | None:
    """The tables for the unit norms of ``tensors`` (2+ dims, ``units[i]`` rows each, every step the same shapes),
    concatenated in order; ``None`` where the kernel does not apply (float64 keeps torch's kernels, as do empty
    rows)."""
    if not (tensors and runs_on(tensors[0]) and tensors[0].dtype in _DTYPES[:3] and _norm_kernel()):
        return None
    if any(t.dtype != tensors[0].dtype or t.device != tensors[0].device for t in tensors):
        return None
    numels = [t.numel() for t in tensors]
    if max(numels) > _INT32_LIMIT or any(u and not n for u, n in zip(units, numels)):
        return None
    sizes = [n // u if u else 1 for n, u in zip(numels, units)]
    per_chunk = torch.tensor([max(CHUNK // size, 1) for size in sizes])
    counts = (torch.tensor(units) + per_chunk - 1) // per_chunk
    chunk_tensors = torch.repeat_interleave(torch.arange(len(tensors)), counts)
    firsts = torch.cumsum(counts, 0) - counts
    chunk_starts = (torch.arange(int(counts.sum())) - firsts[chunk_tensors]) * per_chunk[chunk_tensors]
    unit_starts = list(itertools.accumulate(units, initial=0))
    device = tensors[0].device

    def table(values) -> Tensor:
        return torch.as_tensor(values, dtype=torch.int32).to(device)

    block = min(max(1 << (max(sizes) - 1).bit_length(), 16), 1024)
    base = next((i for i, numel in enumerate(numels) if numel), 0)
    return Plan(table(chunk_tensors), table(chunk_starts), table(units), table(unit_starts[:-1]), table(sizes), True,
                base, block=block, outputs=unit_starts[-1])  # fmt: skip


def unit_norms(plan: Plan, tensors: Sequence[Tensor]) -> Tensor | None:
    """The L2 norm of every unit of ``tensors`` as planned, concatenated, in float32, in one launch; ``None`` if one
    of them is not contiguous this step, or if the kernel cannot run (as :func:`multiply_`)."""
    if not _ready(plan, tensors):
        return None
    device = tensors[0].device
    out = torch.empty(plan.outputs, dtype=torch.float32, device=device)
    programs = len(plan.chunk_tensors)
    if not programs:
        return out
    ran = launch(
        _norm_kernel(), programs, device, "unit-norm",
        tensors[plan.base], plan.offset_table, out, plan.chunk_tensors, plan.chunk_starts, plan.numels,
        plan.factor_starts, plan.row_sizes, CHUNK=CHUNK, BLOCK=plan.block,
    )  # fmt: skip
    return out if ran else None


def _ready(plan: Plan, tensors: Sequence[Tensor]) -> bool:
    """Whether the kernels are on and ``tensors`` can be launched on as planned this step: all contiguous, and
    located (:func:`_locate`)."""
    return ENABLED and all(map(Tensor.is_contiguous, tensors)) and _locate(plan, tensors)


def _locate(plan: Plan, tensors: Sequence[Tensor]) -> bool:
    """Where the tensors are this step, as offsets from the plan's base tensor in elements (a table rebuilt only when
    an address changed, copied from pinned memory: no host sync); ``False`` if one is not aligned to its element."""
    addresses = list(map(Tensor.data_ptr, tensors))
    if addresses != plan.addresses:
        size = tensors[0].element_size()
        if any(a % size for a in addresses):
            return False
        device = tensors[0].device
        offsets = [(a - addresses[plan.base]) // size for a in addresses]
        staged = torch.tensor(offsets, dtype=torch.int64, pin_memory=device.type == "cuda")
        plan.offset_table = staged.to(device, non_blocking=True)  # pinned: no host sync
        plan.vector = 16 // size if all(a % 16 == 0 for a in addresses) and size <= 16 else 1
        plan.addresses = addresses
    return True


def multiply_(plan: Plan, tensors: Sequence[Tensor], factors: Tensor) -> bool:
    """Scale ``tensors`` in place as planned, in one launch; ``False`` (nothing done) if one of them is not
    contiguous this step, or if the kernel cannot be compiled for this GPU (a warning says so, and it is not tried
    again). Their dtype is the planned one: a gradient always has its parameter's."""
    if not _ready(plan, tensors):
        return False
    programs = len(plan.chunk_tensors)
    if not programs:
        return True
    return launch(
        _kernel(), programs, tensors[0].device, "scaling",
        tensors[plan.base], plan.offset_table, factors.contiguous(), plan.chunk_tensors, plan.chunk_starts,
        plan.numels, plan.factor_starts, plan.row_sizes,
        PER_ROW=plan.per_row, VECTOR=plan.vector, CHUNK=CHUNK, BLOCK=1024,
    )  # fmt: skip


def clamp_(plan: Plan, tensors: Sequence[Tensor], limit: float, measure: bool = False) -> Tensor | bool:
    """Clamp ``tensors`` in place to ``+-limit`` as planned by :func:`plan` (float32, float16, bfloat16), in one launch.
    With ``measure``, returns each tensor's largest absolute value before the clamp (float32; Inf where it held NaN
    or Inf); else ``True``. ``False`` (nothing done) where :func:`multiply_` would return it."""
    if tensors[0].dtype not in _DTYPES[:3]:  # float64 would be clamped in float32
        return False
    norms = torch.zeros(len(tensors) if measure else 0, dtype=torch.float32, device=tensors[0].device)
    ran = _clamp(plan, tensors, len(tensors), float(limit), norms, moments=False, measure=measure)
    return False if not ran else norms if measure else True


def spike_plan(grads: Sequence[Tensor], moments: Sequence[Tensor]) -> Plan | None:
    """The tables for SPAM's clip of ``grads`` by their second ``moments`` (the same shapes, every step), ``None`` where
    the kernel does not apply: the moments must share the gradients' dtype (float32, float16 or bfloat16; float64
    keeps the foreach path) and device."""
    if not (grads and grads[0].dtype in _DTYPES[:3] and _clamp_kernel()):
        return None
    like = grads[0]
    if any(v.dtype != like.dtype or v.device != like.device or v.shape != g.shape for g, v in zip(grads, moments)):
        return None
    return plan(grads, list(range(len(grads))), None)


def clip_to_moments_(plan: Plan, grads: Sequence[Tensor], moments: Sequence[Tensor], theta: float) -> bool:
    """SPAM's clip of ``grads`` in place: each element clamped to ``+-max(sqrt(theta * v), tiny)`` (unclipped where
    ``v`` is 0), as planned by :func:`spike_plan`, in one launch; ``False`` (nothing done) where :func:`multiply_`
    would return it."""
    empty = torch.empty(0, dtype=torch.float32, device=grads[0].device)
    return _clamp(plan, [*grads, *moments], len(grads), float(theta), empty, moments=True, measure=False)


def _clamp(plan: Plan, tensors: list[Tensor], count: int, limit: float, norms: Tensor, moments: bool,
           measure: bool) -> bool:  # fmt: skip
    """Launch the clamping kernel on ``tensors`` (the ``count`` gradients, then their moments when ``moments``)."""
    if not _ready(plan, tensors):
        return False
    programs = len(plan.chunk_tensors)
    if not programs:
        return True
    return launch(
        _clamp_kernel(), programs, tensors[0].device, "SPAM" if moments else "clamping",
        tensors[plan.base], plan.offset_table, count, limit, norms, plan.chunk_tensors, plan.chunk_starts, plan.numels,
        MOMENTS=moments, MEASURE=measure, VECTOR=plan.vector, CHUNK=CHUNK, BLOCK=1024,
    )  # fmt: skip


def launch(kernel, programs: int, device: torch.device, what: str, *args, **constants) -> bool:
    """Launch a Triton ``kernel`` on ``programs`` programs on ``device``; ``False`` (nothing done) if it cannot be
    compiled for this GPU: then a warning says so and the kernel that does ``what`` is not tried again
    (:data:`_FAILED`); the others still run.

    Triton's own launch binds and specialises every argument anew (19 us of host time per launch on an H100, more
    than two PyTorch kernels). A kernel it compiled is kept here under what it was specialised on
    (:func:`_specialization`) and launched again directly (9 us)."""
    if what in _FAILED:
        return False
    elsewhere = device.type == "cuda" and device.index != torch.cuda.current_device()
    try:
        with torch.cuda.device(device) if elsewhere else contextlib.nullcontext():  # Triton launches on the current
            key = _specialization(kernel, device, args, constants) if _relaunches() else None
            compiled = _COMPILED.get(key) if key is not None else None
            if compiled is not None:
                compiled[(programs, 1, 1)](*args, *constants.values())
            else:
                compiled = kernel[(programs,)](*args, **constants)
                if key is not None and compiled is not None and list(constants) == kernel.arg_names[len(args) :]:
                    _COMPILED[key] = compiled
    except Exception as error:  # compiling for this GPU failed (before anything was written)
        _FAILED.add(what)
        message = f"lightning_clip: the Triton {what} kernel cannot run here ({error!r}); using PyTorch's kernels"
        warnings.warn(message, stacklevel=3)
        return False
    return True


#: The kernels Triton compiled, by :func:`_specialization`.
_COMPILED: dict[tuple, object] = {}

#: What the kernels that could not be compiled here do (``launch``'s ``what``): they are not tried again.
_FAILED: set[str] = set()


def _specialization(kernel, device: torch.device, args: tuple, constants: dict) -> tuple | None:
    """All that Triton specialises a compiled kernel on, for these arguments: its constexprs, each integer's value,
    each tensor's dtype, each argument's type; ``None`` where a tensor is not 16-byte aligned (Triton specialises on
    alignment: such launches keep its own path)."""
    key = [kernel, device, *constants.values()]
    for arg in args:
        if isinstance(arg, Tensor):
            if arg.data_ptr() % 16:
                return None
            key.append(arg.dtype)
        else:
            key.append(arg if isinstance(arg, int) else type(arg))
    return tuple(key)


@functools.cache
def _relaunches() -> bool:
    """Whether a compiled kernel can be launched again with the launch's arguments as they are, constexprs among them
    (Triton 3.3 on; before, the launch left them out). Under Triton's interpreter a launch returns no compiled
    kernel, so nothing is kept."""
    try:
        import triton
    except ImportError:
        return False
    major, minor = (int(part) for part in triton.__version__.split(".")[:2])
    return (major, minor) >= (3, 3)
