"""The Triton scaling, unit-norm and SPAM kernels against torch's own multiplication, norms and clamps in float64: on
a CUDA GPU (marked ``cuda``), and on CPU under Triton's interpreter where Triton is installed (CI has no Triton: that
test then skips; the cuda ones skip without a GPU). Without either, the operators take the foreach path, which the
other tests cover."""

import math
import warnings

import pytest
import torch

from helpers import HAS_TRITON, Uncompilable, counted_launches, run_under_triton_interpreter
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


def check_clamp(device: str) -> None:
    """The clamping kernel against torch's clamp (exact: a clamp rounds nothing) and, measuring, against each
    tensor's largest absolute value in float64 (Inf where it held NaN or Inf): fp32, fp16, bf16; tensors that move,
    views one element off a 16-byte boundary; a non-contiguous tensor and float64 are declined."""
    gen = torch.Generator().manual_seed(2)
    limit = 0.7
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        for measure in (False, True):

            def make(shape, dtype=dtype):
                t = torch.randn(shape, generator=gen) * 2
                if t.numel() > 2 and shape[0] % 2:
                    t.view(-1)[-1] = math.nan if shape[0] == 3 else -math.inf
                return t.to(device, dtype)

            tensors = [make(s) for s in SHAPES]
            plan = kernels.plan(tensors, list(range(len(SHAPES))), None)
            for step in range(3):
                if step == 1:  # new tensors at new addresses
                    tensors = [make(s) for s in SHAPES]
                if step == 2:  # views of one buffer, each one element after a 16-byte boundary
                    sizes = [t.numel() + 1 for t in tensors]
                    flat = torch.zeros(sum(sizes), device=device, dtype=dtype)
                    views = [p[1:].view(s) for p, s in zip(flat.split(sizes), SHAPES)]
                    for view, t in zip(views, tensors):
                        view.copy_(t)
                    tensors = views
                expected = [t.clamp(-limit, limit) for t in tensors]
                largest = [t.double().abs().nan_to_num(math.inf, math.inf).max() if t.numel() else 0.0 for t in tensors]
                out = kernels.clamp_(plan, tensors, limit, measure=measure)
                for t, e in zip(tensors, expected):
                    torch.testing.assert_close(t, e, rtol=0, atol=0, equal_nan=True)
                if measure:
                    assert out.dtype == torch.float32 and out.shape == (len(SHAPES),)
                    torch.testing.assert_close(out.double().cpu(), torch.tensor(largest, dtype=torch.float64))
                else:
                    assert out is True
    strided = [torch.randn(8, 8, device=device).t()]
    assert kernels.clamp_(kernels.plan(strided, [0], None), strided, limit) is False
    double = [torch.randn(8, device=device, dtype=torch.float64)]
    assert kernels.clamp_(kernels.plan(double, [0], None), double, limit) is False


def check_value_paths(device: str) -> None:
    """``value`` through the Clipper with the kernel and with torch's clamps (``ENABLED`` off), on the same
    gradients, over steps that record and steps that do not, with NaN and Inf steps: with ``skip`` (clamped while
    measured) and ``ignore``, runs of fp32 and bf16 tensors, and with an excluded tensor (measured, then clamped).
    Gradients, skips, the tensors named and the records agree exactly."""
    from lightning_clip import Clipper, methods

    shapes = [(40, 30), (30,), (kernels.CHUNK + 5,), (7, 7), (9,)]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16]
    for nonfinite, exclude in (("skip", []), ("ignore", []), ("skip", ["t1"])):
        results = []
        for enabled in (True, False):
            gen = torch.Generator().manual_seed(5)
            params = [torch.nn.Parameter(torch.zeros(s, device=device, dtype=d)) for s, d in zip(shapes, dtypes)]
            method = methods.Value(clip_value=0.5, exclude=exclude)
            clipper = Clipper(method, [(f"t{k}", p) for k, p in enumerate(params)], nonfinite=nonfinite)
            kernels.ENABLED = enabled
            seen = []
            try:
                for step in range(6):
                    for p in params:
                        p.grad = (torch.randn(p.shape, generator=gen) * 0.6).to(device, p.dtype)
                    if step in (1, 4):
                        params[3 if step == 1 else 0].grad.view(-1)[5] = math.nan if step == 1 else math.inf
                    record = clipper.step(record=step % 3 == 2)
                    grads = [None if p.grad is None else p.grad.cpu() for p in params]
                    seen.append((grads, clipper.last_nonfinite, record.read().metrics() if record else None))
            finally:
                kernels.ENABLED = True
            results.append((seen, clipper.skipped_steps, clipper.state_dict()["nonfinite_steps"]))
        (kernel, skips, counted), (plain, plain_skips, plain_counted) = results
        assert skips == plain_skips == (2 if nonfinite == "skip" else 0) and counted == plain_counted
        for (grads, names, metrics), (plain_grads, plain_names, plain_metrics) in zip(kernel, plain):
            assert names == plain_names and metrics == plain_metrics
            for a, b in zip(grads, plain_grads):
                assert (a is None and b is None) or torch.equal(a.nan_to_num(), b.nan_to_num())
        assert kernel[1][1] == ["t3"] if nonfinite == "skip" else kernel[1][1] is None


def spike_reference(grad, moment, theta):
    """SPAM's clip in float64, rounded once: ``g`` clamped to ``+-sqrt(theta * v)``, unclipped where ``v`` is 0, NaN
    where either is NaN."""
    g, v = grad.double(), moment.double()
    limit = torch.where(v == 0, math.inf, (theta * v).sqrt())
    return torch.minimum(torch.maximum(g, -limit), limit).to(grad.dtype)


def check_spikes(device: str) -> None:
    """SPAM's kernel against float64: fp32, fp16, bf16; zero moments (unclipped), NaN in a moment and in a gradient,
    Inf gradients, tensors that move, views one element off a 16-byte boundary; a non-contiguous tensor is declined,
    float64 and moments of another dtype get no plan."""
    gen = torch.Generator().manual_seed(0)
    theta = 50.0
    for dtype in (torch.float32, torch.float16, torch.bfloat16):

        def pair(shape, dtype=dtype):
            grad = torch.randn(shape, generator=gen) * torch.where(torch.rand(shape, generator=gen) < 0.3, 30.0, 0.1)
            moment = torch.rand(shape, generator=gen) * torch.where(torch.rand(shape, generator=gen) < 0.2, 0.0, 1e-2)
            if grad.numel() > 3:
                grad.view(-1)[:3] = torch.tensor([math.inf, -math.inf, math.nan])
                moment.view(-1)[3] = math.nan
            return grad.to(device, dtype), moment.to(device, dtype)

        grads, moments = map(list, zip(*map(pair, SHAPES)))
        plan = kernels.spike_plan(grads, moments)
        assert plan is not None
        for step in range(3):
            if step == 1:  # new tensors at new addresses
                grads, moments = map(list, zip(*map(pair, SHAPES)))
            if step == 2:  # views of one buffer, each one element after a 16-byte boundary
                sizes = [g.numel() + 1 for g in grads]
                flat = torch.zeros(2 * sum(sizes), device=device, dtype=dtype)
                pieces = flat.split(sizes + sizes)
                views = [p[1:].view(s) for p, s in zip(pieces, SHAPES + SHAPES)]
                for view, t in zip(views, grads + moments):
                    view.copy_(t)
                grads, moments = views[: len(SHAPES)], views[len(SHAPES) :]
            expected = [spike_reference(g, v, theta) for g, v in zip(grads, moments)]
            assert kernels.clip_to_moments_(plan, grads, moments, theta)
            tolerance = {"rtol": 1e-6, "atol": 0} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 0}
            for g, e in zip(grads, expected):
                torch.testing.assert_close(g, e, equal_nan=True, **tolerance)
            assert plan.vector == (1 if step == 2 else 16 // grads[0].element_size())
    strided = [torch.randn(8, 8, device=device).t()]
    assert not kernels.clip_to_moments_(kernels.spike_plan(strided, strided), strided, strided, theta)
    one, double = torch.ones(3, device=device), torch.ones(3, device=device, dtype=torch.float64)
    assert kernels.spike_plan([double], [double]) is None
    assert kernels.spike_plan([one], [one.bfloat16()]) is None


def check_spam_paths(device: str) -> None:
    """SPAM through the Clipper with the kernel and with the foreach path (``ENABLED`` off), on the same gradients
    and moments: in float32 within one rounding (torch's vectorised square root on CPU is not correctly rounded: one
    ulp off in about 0.7% of elements, where the kernel's ``sqrt_rn`` is), in bfloat16 within its rounding (the
    foreach path rounds its limits to bf16, the kernel once). Runs of fp32 and bf16 tensors, an excluded tensor, a
    tensor without a moment yet, and one whose moment has another dtype (that run takes the foreach path)."""
    from lightning_clip import SPAM, Clipper

    gen = torch.Generator().manual_seed(3)
    shapes = [(40, 30), (30,), (kernels.CHUNK + 5,), (7, 7), (9,), (3, 4)]
    dtypes = [torch.float32, torch.float32, torch.float32, torch.bfloat16, torch.bfloat16, torch.float32]
    moments = {0: torch.float32, 1: torch.float32, 2: torch.float32, 3: torch.bfloat16, 4: torch.float32}  # 5: none
    results = []
    for enabled in (True, False):
        params = [torch.nn.Parameter(torch.zeros(s, device=device, dtype=d)) for s, d in zip(shapes, dtypes)]
        optimizer = torch.optim.Adam(params)
        gen.manual_seed(3)
        for k, p in enumerate(params):
            if k in moments:
                v = torch.rand(p.shape, generator=gen) * torch.where(torch.rand(p.shape, generator=gen) < 0.1, 0, 1e-2)
                optimizer.state[p]["exp_avg_sq"] = v.to(device, moments[k])
        method = SPAM(theta=5.0, warmup_steps=1, exclude=["t1"])
        clipper = Clipper(method, [(f"t{k}", p) for k, p in enumerate(params)], optimizer=optimizer, nonfinite="ignore")
        kernels.ENABLED = enabled
        try:
            steps = []
            for _ in range(2):
                for p in params:
                    p.grad = (torch.randn(p.shape, generator=gen) * 3).to(device, p.dtype)
                clipper.step()
                steps.append([p.grad.clone() for p in params])
        finally:
            kernels.ENABLED = True
        results.append(steps)
        if enabled:
            planned = [run.plan is not None for key, run in clipper.params.layout().kernel_plans.items()
                       if key[0] == "spam"]  # fmt: skip
            assert sorted(planned) == [False, True]  # the fp32 run planned; the bf16 run's moments differ in dtype
    for kernel_step, foreach_step in zip(*results):
        for a, b in zip(kernel_step, foreach_step):
            torch.testing.assert_close(a, b, rtol=2**-23 if a.dtype == torch.float32 else 2**-7, atol=0)
    changed = sum(int((a != b).sum()) for a, b in zip(results[0][0], results[0][1]))
    assert changed > 0


def check_trainer_runs() -> None:
    """Real Lightning runs, the same model and batches with the kernels and without (``ENABLED`` off): ``value``
    with ``skip`` through a NaN step, SPAM under Adam, ``norm`` with ``skip_spikes`` through a NaN step. The same
    skips, the same logged metrics and the same parameters at the end; the kernels ran on every step."""
    from lightning_clip import GradientClipping
    from models import TinyModule, loader, trainer

    cases = [  # method, its options, the model's, the kernel, the steps skipped
        ("value", {"clip_value": 0.5}, {"nan_at_step": 3}, "clamping", 1),
        ("spam", {"theta": 5.0, "warmup_steps": 2}, {"optimizer": "adam"}, "SPAM", 0),
        ("norm", {"max_norm": 1.0, "skip_spikes": 2.0, "spike_window": 20}, {"nan_at_step": 5}, "spike-skipping", 2),
    ]  # the second skip of the last: a spike at step 21
    for method, options, module_options, kernel, skipped in cases:
        runs = []
        for enabled in (True, False):
            model, clipping = TinyModule(**module_options), GradientClipping(method, log_every_n_steps=3, **options)
            kernels.ENABLED = enabled
            try:
                with counted_launches() as launched:
                    trainer([clipping], max_epochs=6).fit(model, loader())
            finally:
                kernels.ENABLED = True
            clipper = clipping.clippers[0]
            runs.append((model, clipping.last_metrics, clipper.skipped_steps, launched.count(kernel)))
        (ours, metrics, skips, launches), (plain, plain_metrics, plain_skips, plain_launches) = runs
        assert skips == plain_skips == skipped, method
        assert plain_launches == 0 and launches >= 24 - skips - (2 if method == "spam" else 0), (method, launches)
        assert metrics.keys() == plain_metrics.keys(), method
        for key, value in metrics.items():
            assert math.isclose(value, plain_metrics[key], rel_tol=1e-5, abs_tol=1e-7), (method, key)
        for a, b in zip(ours.parameters(), plain.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.cuda
def test_kernel_on_cuda_matches_float64():
    check_kernel("cuda")


@pytest.mark.cuda
def test_unit_norm_kernel_on_cuda_matches_float64():
    check_unit_norms("cuda")


@pytest.mark.cuda
def test_clamp_kernel_on_cuda_matches_torch():
    check_clamp("cuda")
    check_value_paths("cuda")


@pytest.mark.cuda
def test_spike_kernel_on_cuda_matches_float64():
    check_spikes("cuda")
    check_spam_paths("cuda")


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
    """The same checks on CPU tensors, in a process where Triton interprets the kernels."""
    checks = ["check_kernel", "check_unit_norms", "check_clamp", "check_value_paths", "check_spikes"]
    checks.append("check_spam_paths")
    calls = "; ".join(f"t.{check}('cpu')" for check in checks)
    run_under_triton_interpreter(f"import test_kernels as t; {calls}; t.check_trainer_runs()")


def test_a_kernel_that_cannot_compile_falls_back_to_foreach_with_a_warning(monkeypatch):
    """Triton present but unable to compile for the GPU (too old, say): the first launch fails before writing
    anything, the step scales through the foreach kernels, a warning says so, and the kernel is not tried again."""
    from lightning_clip import Clipper, methods

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets plan() take CPU tensors
    monkeypatch.setattr(kernels, "_kernel", Uncompilable)
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_FAILED", set())
    params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5))]
    clipper = Clipper(methods.TensorNorm(max_norm=1.0), zip("ab", params), nonfinite="ignore")
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    with pytest.warns(UserWarning, match="Triton scaling kernel cannot run here"):
        clipper.step()
    assert kernels._FAILED == {"scaling"}
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the layout's plan stays, but the kernel is not tried again
        clipper.step()
    for p in params:
        torch.testing.assert_close(p.grad.norm(), torch.tensor(1.0), rtol=1e-5, atol=0)


def test_value_with_skip_measures_then_clamps_where_the_clamping_kernel_cannot_compile(monkeypatch):
    """``value`` with ``skip`` clamps while measuring where the kernel runs; where it cannot compile, that step's
    runs are measured and clamped with torch's kernels instead (a warning says so once), and NaN is still found
    (clamping first would have hidden an Inf). The other kernels are not given up with it."""
    from lightning_clip import Clipper, methods

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets plan() take CPU tensors
    monkeypatch.setattr(kernels, "_kernel", Uncompilable)
    monkeypatch.setattr(kernels, "_clamp_kernel", Uncompilable)
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_FAILED", set())
    params = [torch.nn.Parameter(torch.ones(4, 3)), torch.nn.Parameter(torch.ones(5, dtype=torch.bfloat16))]
    clipper = Clipper(methods.Value(clip_value=0.5), zip("ab", params), nonfinite="skip")
    for p in params:
        p.grad = torch.full_like(p, 2.0)
    params[1].grad[2] = -math.inf
    with pytest.warns(UserWarning, match="Triton clamping kernel cannot run here"):
        clipper.step()
    assert clipper.last_nonfinite == ["b"] and all(p.grad is None for p in params)
    for p in params:
        p.grad = torch.full_like(p, -2.0)
    clipper.step()
    assert all(torch.equal(p.grad, torch.full_like(p, -0.5)) for p in params)

    class Compiles:
        launched = []

        def __getitem__(self, grid):
            return lambda *args, **kwargs: self.launched.append(args)

    assert kernels._FAILED == {"clamping"}  # only the kernel that failed is given up: the others still launch
    assert kernels.launch(Compiles(), 1, torch.device("cpu"), "scaling", 7) and Compiles.launched == [(7,)]
    assert not kernels.launch(Compiles(), 1, torch.device("cpu"), "clamping", 7) and len(Compiles.launched) == 1


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
