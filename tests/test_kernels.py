"""The Triton scaling and unit-norm kernels against torch's own multiplication and norms in float64: on a CUDA GPU
(marked ``cuda``), and on CPU under Triton's interpreter where Triton is installed (CI has no Triton: that test then
skips; the cuda ones skip without a GPU). Without either, the operators take the foreach path, which the other tests
cover."""

import warnings

import pytest
import torch

from helpers import HAS_TRITON, run_under_triton_interpreter
from lightning_clip import kernels

#: Shapes that cover empty tensors (first, so the kernel addresses from another), one element, several chunks
#: with a ragged end, and rows of odd width.
SHAPES = [(0,), (3, 5), (7,), (2, 0), (1,), (kernels.CHUNK * 2 + 77,), (3, kernels.CHUNK // 2 + 9), (64, 64), (5, 2, 3)]


def reference(tensors, factors, units):
    """Each tensor times its factor (or its rows' factors), computed in float64 and rounded once."""
    out, position = [], 0
    for t, count in zip(tensors, units or [1] * len(tensors)):
        if units is None:
            factor = factors[position].double()
        else:
            factor = factors[position : position + count].double().reshape(-1, *([1] * (t.ndim - 1)))
        out.append((t.double() * factor).to(t.dtype))
        position += count
    return out


def starts_of(units, count):
    if units is None:
        return list(range(count))
    return [sum(units[:i]) for i in range(count)]


def check_kernel(device: str) -> None:
    """Every dtype, per tensor and per row; steps whose tensors move (the address table is rebuilt), tensors that
    are views at offsets that are not 16-byte aligned (no vector loads), and a non-contiguous tensor (declined)."""
    gen = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16, torch.float16, torch.float64):
        factor_dtype = torch.float64 if dtype == torch.float64 else torch.float32
        for per_row in (False, True):
            units = [s[0] if len(s) > 1 else 1 for s in SHAPES] if per_row else None
            tensors = [torch.randn(s, generator=gen).to(device, dtype) for s in SHAPES]
            plan = kernels.plan(tensors, starts_of(units, len(SHAPES)), units)
            assert plan is not None
            for step in range(3):
                if step == 1:  # new tensors at new addresses
                    tensors = [torch.randn(s, generator=gen).to(device, dtype) for s in SHAPES]
                if step == 2:  # views of one buffer, each starting one element after a 16-byte boundary
                    sizes = [t.numel() + 1 for t in tensors]
                    flat = torch.randn(sum(sizes), generator=gen).to(device, dtype)
                    pieces = flat.split(sizes)
                    tensors = [p[1:].view(s) for p, s in zip(pieces, SHAPES)]
                count = sum(units) if per_row else len(SHAPES)
                factors = (torch.rand(count, generator=gen, dtype=factor_dtype) * 2).to(device)
                expected = reference(tensors, factors, units)
                assert kernels.multiply_(plan, tensors, factors)
                exact = dtype in (torch.float32, torch.float64)
                tolerance = {"rtol": 0, "atol": 0} if exact else {"rtol": 2**-7, "atol": 0}
                for t, e in zip(tensors, expected):
                    torch.testing.assert_close(t, e, **tolerance)
                # fresh tensors are 16-byte aligned: vector loads; views one element in are not
                assert plan.vector == (1 if step == 2 else 16 // tensors[0].element_size())
    strided = [torch.randn(8, 8, device=device).t()]
    plan = kernels.plan(strided, [0], None)
    assert not kernels.multiply_(plan, strided, torch.ones(1, device=device))


#: For the unit-norm kernel: no rows, one row, rows longer than a block and than a chunk, many short rows over
#: several chunks, conv kernels.
UNIT_SHAPES = [(0, 4), (1, 5), (3, 3000), (2, kernels.CHUNK + 5), (300, 70), (16, 3, 3, 3), (5, 2, 3), (64, 64)]


def check_unit_norms(device: str) -> None:
    """The unit norms of every shape in one launch, against ``vector_norm`` over each row in float64: fp32, fp16 and
    bf16 (summed in float32); tensors that move, views one element off a 16-byte boundary, a non-contiguous tensor
    (declined), and empty rows (no plan)."""
    gen = torch.Generator().manual_seed(0)
    units = [s[0] for s in UNIT_SHAPES]
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        tensors = [torch.randn(s, generator=gen).to(device, dtype) for s in UNIT_SHAPES]
        plan = kernels.norm_plan(tensors, units)
        assert plan is not None
        for step in range(3):
            if step == 1:  # new tensors at new addresses
                tensors = [(torch.randn(s, generator=gen) * 3).to(device, dtype) for s in UNIT_SHAPES]
            if step == 2:  # views of one buffer, each one element after a 16-byte boundary
                sizes = [t.numel() + 1 for t in tensors]
                flat = torch.randn(sum(sizes), generator=gen).to(device, dtype)
                tensors = [p[1:].view(s) for p, s in zip(flat.split(sizes), UNIT_SHAPES)]
            norms = kernels.unit_norms(plan, tensors)
            assert norms is not None and norms.dtype == torch.float32 and norms.shape == (sum(units),)
            expected = torch.cat([torch.linalg.vector_norm(t.double().flatten(1), dim=1) for t in tensors])
            torch.testing.assert_close(norms.double(), expected.to(norms.device), rtol=1e-5, atol=1e-6)
    strided = [torch.randn(8, 8, device=device).t()]
    assert kernels.unit_norms(kernels.norm_plan(strided, [8]), strided) is None
    assert kernels.norm_plan([torch.zeros(3, 0, device=device)], [3]) is None
    assert kernels.norm_plan([torch.zeros(3, 4, device=device, dtype=torch.float64)], [3]) is None


@pytest.mark.cuda
def test_kernel_on_cuda_matches_float64():
    check_kernel("cuda")


@pytest.mark.cuda
def test_unit_norm_kernel_on_cuda_matches_float64():
    check_unit_norms("cuda")


@pytest.mark.cuda
def test_kernel_is_off_with_enabled_false():
    kernels.ENABLED = False
    try:
        assert kernels.plan([torch.ones(3, device="cuda")], [0], None) is None
    finally:
        kernels.ENABLED = True


def test_no_plan_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert kernels.plan([torch.ones(3)], [0], None) is None


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_kernel_under_the_triton_interpreter_matches_float64():
    """The same checks on CPU tensors, in a process where Triton interprets the kernel."""
    run_under_triton_interpreter("import test_kernels as t; t.check_kernel('cpu'); t.check_unit_norms('cpu')")


def test_a_kernel_that_cannot_compile_falls_back_to_foreach_with_a_warning(monkeypatch):
    """Triton present but unable to compile for the GPU (too old, say): the first launch fails before writing
    anything, the step scales through the foreach kernels, a warning says so, and the kernel is not tried again."""
    from lightning_clip import Clipper, methods

    class Uncompilable:
        def __getitem__(self, grid):
            def launch(*args, **kwargs):
                raise RuntimeError("no compiler for this device")

            return launch

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets plan() take CPU tensors
    monkeypatch.setattr(kernels, "_kernel", Uncompilable)
    monkeypatch.setattr(kernels, "ENABLED", True)
    params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5))]
    clipper = Clipper(methods.TensorNorm(max_norm=1.0), zip("ab", params), nonfinite="ignore")
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    with pytest.warns(UserWarning, match="Triton scaling kernel cannot run here"):
        clipper.step()
    assert not kernels.ENABLED
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layout's plan stays, but the kernel is not tried again
        clipper.step()
    for p in params:
        torch.testing.assert_close(p.grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_a_compiled_kernel_is_launched_again_only_for_what_it_was_specialised_on():
    """``kernels.launch`` keeps Triton's compiled kernels under their specialisation: the constexprs, each integer's
    value, each tensor's dtype, each argument's type. A tensor that is not 16-byte aligned goes through Triton's own
    launch, which specialises on alignment; floats are not specialised on."""
    cpu, aligned = torch.device("cpu"), torch.zeros(8)
    key = kernels._specialization("kernel", cpu, (aligned, 3, 0.5), {"BLOCK": 16})
    assert key == kernels._specialization("kernel", cpu, (torch.ones(8), 3, 0.25), {"BLOCK": 16})
    assert kernels._specialization("kernel", cpu, (torch.zeros(9)[1:], 3, 0.5), {"BLOCK": 16}) is None
    others = [
        ((aligned.double(), 3, 0.5), {"BLOCK": 16}),
        ((aligned, 1, 0.5), {"BLOCK": 16}),
        ((aligned, 3, 1), {"BLOCK": 16}),
        ((aligned, 3, 0.5), {"BLOCK": 32}),
    ]
    for args, constants in others:
        assert kernels._specialization("kernel", cpu, args, constants) != key
