"""Random layouts against references computed another way: the stateless methods against their formulas in float64,
and the stateful paths (adaptive thresholds, spike skipping, the per-layer running max, the fused optimizer path)
against themselves taken another way (unfused, or interrupted and restored), while tensors come and go between steps.

Each case is one seeded draw: a few to a few dozen tensors of mixed dtypes whose sizes straddle the CPU paths' bounds
(stacks of small tensors, large tensors one at a time), empty tensors and weights with no rows, tensors without a
gradient, excluded tensors, NaN/Inf elements."""

import copy
import dataclasses
import math
import random

import pytest
import torch

from lightning_clip import methods
from lightning_clip.clipper import Clipper
from lightning_clip.stats import LayerGrouping, LayerStats

#: Around operators.STACK_MAX_NUMEL (4096) and ONE_AT_A_TIME_NUMEL (8192), empty tensors, a weight with no rows.
SHAPES = [(8, 8), (8,), (64, 64), (65, 63), (100, 100), (2, 3, 4), (4096,), (4097,), (8193,), (3, 2731), (0, 5), (1,)]
DTYPES = [torch.float32, torch.float32, torch.bfloat16, torch.float64]
RTOL = {torch.float32: 2e-5, torch.float64: 1e-9, torch.bfloat16: 2e-2}


def draw_layout(rng: random.Random, most: int = 30) -> tuple[list[tuple[int, ...]], list[torch.dtype]]:
    shapes = [rng.choice(SHAPES) if rng.random() < 0.8 else (rng.randint(1, 50), rng.randint(1, 50))
              for _ in range(rng.randint(1, most))]  # fmt: skip
    return shapes, [rng.choice(DTYPES) for _ in shapes]


def float64_reference(method, params, grads, excluded):
    """What each method makes of ``grads`` (float64 copies; ``None``: no gradient), from its formula."""
    out = [None if g is None else g.clone() for g in grads]
    clipped = [i for i, g in enumerate(grads) if g is not None and i not in excluded and g.numel()]
    if isinstance(method, methods.Norm):  # torch's clip_grad_norm_
        norms = [torch.linalg.vector_norm(grads[i], method.norm_type) for i in clipped]
        total = torch.linalg.vector_norm(torch.stack(norms), method.norm_type).item() if norms else 0.0
        for i in clipped:
            out[i] = grads[i] * min(1.0, method.max_norm / (total + 1e-6))
    elif isinstance(method, methods.Value):
        for i in clipped:
            out[i] = grads[i].clamp(-method.clip_value, method.clip_value)
    elif isinstance(method, methods.TensorNorm):
        for i in clipped:
            out[i] = grads[i] * min(
                1.0, method.max_norm / (torch.linalg.vector_norm(grads[i], method.norm_type) + 1e-6)
            )
    elif isinstance(method, methods.AGC):  # Brock et al. 2021, eq. 3, per unit (rows; a 1-D tensor is one unit)
        for i in clipped:
            g, w = grads[i], params[i].detach().double()
            dims = tuple(range(1, g.ndim)) or None
            g_norm = torch.linalg.vector_norm(g, dim=dims, keepdim=True)
            limit = torch.linalg.vector_norm(w, dim=dims, keepdim=True).clamp(min=method.eps) * method.clip_factor
            out[i] = torch.where(g_norm > limit, g * limit / g_norm.clamp(min=1e-6), g)
    return out


@pytest.mark.parametrize("seed", range(40))
def test_stateless_methods_match_their_formulas_on_random_layouts(seed):
    rng = random.Random(seed)
    shapes, dtypes = draw_layout(rng)
    params = []
    for shape, dtype in zip(shapes, dtypes):
        p = torch.nn.Parameter((torch.randn(shape) * rng.choice([0.0, 1e-3, 1.0, 10.0])).to(dtype))
        p.grad = None if rng.random() < 0.1 else (torch.randn(shape) * rng.choice([1e-4, 1.0, 100.0, 1e4])).to(dtype)
        params.append(p)
    names = [f"m{i}.weight" for i in range(len(params))]
    excluded = {i for i in range(len(params)) if rng.random() < 0.1}
    method = rng.choice([
        methods.Norm(max_norm=rng.choice([0.1, 1e3]), norm_type=rng.choice([2.0, 1.0, math.inf, 3.0])),
        methods.Value(clip_value=rng.choice([1e-3, 0.5])),
        methods.TensorNorm(max_norm=rng.choice([0.1, 1.0]), norm_type=rng.choice([2.0, math.inf, 1.0])),
        methods.AGC(clip_factor=rng.choice([0.01, 0.1]), max_update_ratio=0.0),
    ])  # fmt: skip
    method = dataclasses.replace(method, exclude=tuple(names[i] for i in excluded))
    grads = [None if p.grad is None else p.grad.double().clone() for p in params]
    expected = float64_reference(method, params, grads, excluded)
    record = Clipper(method, zip(names, params), nonfinite=rng.choice(["ignore", "skip"])).step(record=True)
    if all(g is None for g in grads):
        assert record is None
        return
    mixed = any(d != torch.float64 for d in dtypes)
    for i, (p, want) in enumerate(zip(params, expected)):
        if want is None:
            assert p.grad is None
            continue
        rtol = 0.0 if isinstance(method, methods.Value) else RTOL[p.dtype]
        if isinstance(method, methods.Norm) and mixed:  # the coefficient carries the rounding of float32 norms
            rtol = max(rtol, 2 * RTOL[torch.float32])
        torch.testing.assert_close(p.grad.double(), want.to(p.dtype).double(), rtol=4 * rtol, atol=1e-30, msg=names[i])
    held = [names.index(n) for n in record.names]
    before = torch.tensor([torch.linalg.vector_norm(grads[i]).item() for i in held], dtype=torch.float64)
    after = torch.tensor([torch.linalg.vector_norm(params[i].grad.double()).item() for i in held], dtype=torch.float64)
    torch.testing.assert_close(record.grad_norms.double(), before, rtol=1e-2, atol=1e-30)
    torch.testing.assert_close(record.clipped_norms.double(), after, rtol=1e-2, atol=1e-30)


def draw_stateful(rng: random.Random):
    return rng.choice([
        methods.AutoClip(window=rng.choice([3, 50]), warmup_steps=3),
        methods.ZClip(warmup_steps=3),
        methods.Norm(max_norm=rng.choice([0.3, 10.0]), schedule=rng.choice(["linear", "cosine"]), schedule_steps=7),
        methods.NoClipping(),
    ])  # fmt: skip


def random_steps(rng: random.Random, shapes, steps: int = 45):
    """Per step: each tensor's gradient or ``None`` (absent), with rare spikes and NaN elements."""
    gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
    for _ in range(steps):
        grads = [torch.randn(s, generator=gen) * (1e3 if rng.random() < 0.04 else 1.0) for s in shapes]
        if rng.random() < 0.06:
            grads[rng.randrange(len(grads))].view(-1)[0] = math.nan
        absent = {i for i in range(len(shapes)) if rng.random() < 0.15}
        yield [None if i in absent else g for i, g in enumerate(grads)]


def make_params(shapes, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in shapes]


@pytest.mark.parametrize("seed", range(12))
def test_the_fused_path_equals_clip_then_step_while_tensors_come_and_go(seed):
    """Fused AdamW (the clip as its grad_scale, the skip as its found_inf, skips reported at records) against unfused
    AdamW after clipping in place: the same parameters at every step, the same skip counts, and at each record the
    same tensors named and the same running maxima (``grad/norm_max``, ``grad_norm_max/<layer>``)."""
    rng = random.Random(seed)
    shapes = [s for s in draw_layout(rng, most=10)[0] if s != (0, 5)]
    names = [f"l{i}.weight" for i in range(len(shapes))]
    method = draw_stateful(rng)
    options = dict(nonfinite="skip", skip_spikes=rng.choice([None, 4.0]), spike_window=30, max_consecutive_skips=100)
    runs = []
    for fused in (True, False):
        params = make_params(shapes, seed)
        optimizer = torch.optim.AdamW(params, lr=0.01, fused=fused)
        stats = LayerStats(LayerGrouping())
        runs.append(
            (params, optimizer, Clipper(method, zip(names, params), optimizer=optimizer, stats=stats, **options))
        )
    (fused_params, _, fused), (plain_params, _, plain) = runs
    assert fused.fused and not plain.fused
    named_since_record = set()
    for step, grads in enumerate(random_steps(rng, shapes)):
        metrics = []
        for params, optimizer, clipper in runs:
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.clone()
            record = clipper.step(record=step % 6 == 5)
            optimizer.step()
            metrics.append(None if record is None else record.read().metrics())
        named_since_record |= set(plain.last_nonfinite or [])
        if metrics[0] is not None:
            assert set(fused.last_nonfinite or []) == named_since_record, step
            assert fused.skipped_steps == plain.skipped_steps, step
            maxima = {k: v for k, v in metrics[1].items() if k.startswith(("grad/norm_max", "grad_norm_max/"))}
            assert {k: metrics[0][k] for k in maxima} == pytest.approx(maxima, rel=1e-5, nan_ok=True), step
            named_since_record = set()
        for a, b in zip(fused_params, plain_params):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"step {step}")


@pytest.mark.parametrize("seed", range(12))
def test_state_restored_mid_run_continues_exactly_while_tensors_come_and_go(seed):
    """A clipper rebuilt from ``state_dict`` at a random step (as a resumed run) continues bitwise as the one that
    ran through: adaptive thresholds, AdaGC's per-tensor thresholds, the spike window and per-tensor levels."""
    rng = random.Random(seed)
    shapes, dtypes = draw_layout(rng, most=12)
    shapes = [s if s != (0, 5) else (5,) for s in shapes]
    method = rng.choice([draw_stateful(rng), methods.AdaGC(warmup_steps=rng.choice([1, 5]))])
    options = dict(nonfinite="skip", skip_spikes=rng.choice([None, 3.0]), spike_window=40)
    names = [f"p{i}" for i in range(len(shapes))]

    def build(params, state=None):
        optimizer = torch.optim.SGD(params, lr=0.05)
        if state is not None:
            optimizer.load_state_dict(state[1])
        clipper = Clipper(method, zip(names, params), optimizer=optimizer, **options)
        if state is not None:
            clipper.load_state_dict(state[0])
        return optimizer, clipper

    straight = [torch.nn.Parameter(p.detach().to(d)) for p, d in zip(make_params(shapes, seed), dtypes)]
    resumed = [torch.nn.Parameter(p.detach().clone()) for p in straight]
    (opt_a, clip_a), (opt_b, clip_b) = build(straight), build(resumed)
    cut = rng.randint(1, 30)
    for step, grads in enumerate(random_steps(rng, shapes)):
        if step == cut:
            opt_b, clip_b = build(resumed, copy.deepcopy((clip_b.state_dict(), opt_b.state_dict())))
        for params, optimizer, clipper in ((straight, opt_a, clip_a), (resumed, opt_b, clip_b)):
            for p, g in zip(params, grads):
                p.grad = None if g is None else g.to(p.dtype, copy=True)
            clipper.step(record=step % 7 == 0)
            optimizer.step()
        assert all(torch.equal(a, b) for a, b in zip(straight, resumed)), step
