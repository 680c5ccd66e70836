import math

import pytest
import torch

from helpers import HostReads, agc_reference, apply, clone_grads, make_params, named, timm_style_agc
from lightning_clip.clipper import Clipper
from lightning_clip.methods import AGC, TensorNorm
from lightning_clip.methods import Value as ValueClipMethod
from lightning_clip.operators import GlobalNormClip, NoClip, TensorNormClip, UnitwiseClip, ValueClip
from lightning_clip.params import ParamSet
from lightning_clip.thresholds import FixedThreshold


@pytest.mark.parametrize("norm_type", [1.0, 2.0, 3.0, math.inf])
@pytest.mark.parametrize("max_norm", [0.5, 1e6])
def test_global_norm_matches_torch(norm_type, max_norm):
    ours, theirs = make_params(seed=1), make_params(seed=1)
    apply(FixedThreshold(max_norm), GlobalNormClip(norm_type), ours)
    torch.nn.utils.clip_grad_norm_(theirs, max_norm, norm_type=norm_type, foreach=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)


def test_global_norm_float64_formula():
    params = make_params(seed=2, grad_scale=10.0)
    expected = clone_grads(params)
    total = torch.sqrt(sum((g.double() ** 2).sum() for g in expected))
    coef = min(1.0, 0.3 / (total.item() + 1e-6))
    apply(FixedThreshold(0.3), GlobalNormClip(2.0), params)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), g.double() * coef, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("clip_value", [0.1, 1.0, 100.0])
def test_value_matches_torch(clip_value):
    ours, theirs = make_params(seed=3), make_params(seed=3)
    apply(FixedThreshold(clip_value), ValueClip(), ours)
    torch.nn.utils.clip_grad_value_(theirs, clip_value, foreach=True)
    for a, b in zip(ours, theirs):
        assert torch.equal(a.grad, b.grad)
        assert a.grad.abs().max() <= clip_value


@pytest.mark.parametrize("nonfinite", ["ignore", "skip"])
def test_value_clamps_large_tensors_one_at_a_time_as_torch(nonfinite):
    """On CPU tensors of more than ONE_AT_A_TIME_NUMEL elements take one clamp_ each (one pass), the others the two
    foreach clamps: every gradient equals clip_grad_value_'s, bit for bit, Inf and NaN included (with ignore); with
    skip, a NaN in a large tensor skips the step and is named."""
    shapes = [(100, 100), (7,), (8193,), (8192,), (0,), (3, 3), (9000,)]
    ours, theirs = (make_params(shapes=shapes, seed=22, grad_scale=3.0) for _ in range(2))
    if nonfinite == "ignore":  # with skip they would skip the step
        for params in (ours, theirs):
            params[0].grad[4, 4] = float("inf")
            params[6].grad[10] = float("-inf")
            params[3].grad[0] = float("nan")
    clipper = Clipper(ValueClipMethod(clip_value=0.5), named(ours), nonfinite=nonfinite)
    clipper.step()
    torch.nn.utils.clip_grad_value_(theirs, 0.5, foreach=True)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=0, equal_nan=True)
    assert clipper.params.layout().size_splits[("value", 0)] == ([0, 2, 6], [1, 3, 4, 5])
    ours[2].grad[0] = float("nan")
    clipper.step()
    if nonfinite == "skip":  # measured tensor by tensor, each large one clamped right after: the NaN is still named
        assert all(p.grad is None for p in ours) and clipper.last_nonfinite == ["layer2.weight"]
        for p, q in zip(ours, theirs):
            p.grad = q.grad.clone() * 10
        ours[0].grad[1, 1], ours[5].grad[2, 2] = -math.inf, math.inf  # a clamp would hide both
        clipper.step()
        assert all(p.grad is None for p in ours) and clipper.last_nonfinite == ["layer0.weight", "layer5.weight"]


def test_value_measures_on_cpu_while_it_clamps_what_measure_gives_before_the_clamp():
    """ValueClip.clip_measuring on CPU: the inf-norms of the gradients before the clamp (NaN and Inf included), the
    same as measure(), and the gradients clamped as clip_grad_value_ clamps them."""
    shapes = [(100, 100), (7,), (8193,), (600,), (0,), (3, 3), (9000,), (600,), (3, 3)]
    params = make_params(shapes=shapes, seed=24, grad_scale=3.0)
    params[0].grad[4, 4], params[3].grad[5], params[6].grad[1] = math.inf, math.nan, -math.inf
    params[8].grad[1, 1] = -math.inf  # in a stack with (3, 3) number 5
    layout, grads = _layout_and_grads(params)
    expected = ValueClip().measure(layout, grads)
    clamped = [g.clamp(-0.5, 0.5) for g in grads]
    measured = ValueClip().clip_measuring(layout, grads, 0.5)
    torch.testing.assert_close(measured.norms, expected.norms, equal_nan=True, rtol=0, atol=0)
    assert math.isnan(measured.total) and math.isnan(expected.total)
    for g, c in zip(grads, clamped):
        torch.testing.assert_close(g, c, equal_nan=True, rtol=0, atol=0)
    assert layout.size_splits[("value measured", 0)].stacks == [[1, 4], [3, 5]]  # of the six small ones
    assert math.isinf(measured.norms[8]) and math.isnan(measured.norms[3])


@pytest.mark.parametrize("norm_type", [1.0, 2.0, math.inf])
def test_tensor_norm_matches_clipping_each_tensor_alone(norm_type):
    ours, theirs = make_params(seed=4, grad_scale=3.0), make_params(seed=4, grad_scale=3.0)
    apply(FixedThreshold(1.5), TensorNormClip(norm_type), ours)
    for p in theirs:
        torch.nn.utils.clip_grad_norm_([p], 1.5, norm_type=norm_type)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=0)
        assert torch.linalg.vector_norm(a.grad, norm_type) <= 1.5 * (1 + 1e-5)


def test_tensor_norm_leaves_small_tensors_alone():
    params = make_params(seed=5, grad_scale=1e-3)
    before = clone_grads(params)
    apply(FixedThreshold(1.0), TensorNormClip(2.0), params)
    for p, g in zip(params, before):
        assert torch.equal(p.grad, g)


@pytest.mark.parametrize("clip_factor", [0.01, 0.1, 10.0])
def test_agc_matches_paper_formula_in_float64(clip_factor):
    params = make_params(seed=6)
    expected = agc_reference(params, clip_factor, 1e-3)
    apply(FixedThreshold(clip_factor), UnitwiseClip(eps=1e-3), params)
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize(("lr", "effective"), [(0.01, 0.02), (0.1, 0.01), (3.0, 1e-3 / 3.0), (0.0, 0.02)])
def test_agc_update_cap_is_agc_at_the_smaller_of_clip_factor_and_ratio_over_lr(lr, effective):
    """AGC's default max_update_ratio (1e-3): the paper's formula (float64) at min(clip_factor, 1e-3 / lr), the
    optimizer's rate read at each step (a rate of 0 moves nothing and leaves the clip factor)."""
    params = make_params(seed=6)
    expected = agc_reference(params, effective, 1e-3)
    optimizer = torch.optim.SGD(params, lr=lr)
    Clipper(AGC(clip_factor=0.02), named(params), optimizer=optimizer, nonfinite="ignore").step()
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-5, atol=1e-9)


def test_agc_update_cap_follows_a_scheduler_and_is_off_at_zero():
    params, paper = make_params(seed=8), make_params(seed=8)
    optimizer = torch.optim.SGD(params, lr=1.0)
    clipper = Clipper(AGC(clip_factor=0.02), named(params), optimizer=optimizer, nonfinite="ignore")
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.01)
    clipper.step()  # lr 1.0: the cap, 1e-3
    scheduler.step()
    for p, g in zip(params, make_params(seed=9)):
        p.grad = g.grad.clone()
    expected = agc_reference(params, 0.02, 1e-3)  # lr 0.01: the cap is 0.1, the clip factor rules
    clipper.step()
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-5, atol=1e-9)
    expected = agc_reference(paper, 0.02, 1e-3)
    Clipper(AGC(clip_factor=0.02, max_update_ratio=0.0), named(paper), nonfinite="ignore").step()  # no optimizer
    for p, g in zip(paper, expected):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-5, atol=1e-9)


def test_agc_matches_timm_style_loop_and_clips_zero_initialised_params_to_eps():
    ours, theirs = make_params(seed=7), make_params(seed=7)
    apply(FixedThreshold(0.02), UnitwiseClip(eps=1e-3), ours)
    timm_style_agc(theirs, clip_factor=0.02, eps=1e-3)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-9)
    # parameter 3 is zero-initialised: its gradient norm is capped at clip_factor * eps
    assert ours[3].grad.norm() <= 0.02 * 1e-3 * (1 + 1e-5)


def test_agc_units_are_output_rows_and_channels():
    conv = torch.nn.Parameter(torch.randn(4, 3, 3, 3))
    conv.grad = torch.randn(4, 3, 3, 3) * 100
    conv.grad[0] *= 1e-6  # a unit already under its limit stays as it is
    small = conv.grad[0].clone()
    apply(FixedThreshold(0.01), UnitwiseClip(), [conv])
    unit_ratio = conv.grad.flatten(1).norm(dim=1) / conv.detach().flatten(1).norm(dim=1)
    torch.testing.assert_close(unit_ratio[1:], torch.full((3,), 0.01), rtol=1e-5, atol=0)
    assert torch.equal(conv.grad[0], small)


def test_agc_exclude_by_module_and_parameter_name():
    params = make_params(seed=8)
    names = [f"body.{i}.weight" for i in range(len(params) - 2)] + ["head.weight", "head.bias"]
    expected = agc_reference(params, 0.01, 1e-3, excluded={len(params) - 2, len(params) - 1})
    apply(FixedThreshold(0.01), UnitwiseClip(), params, names=names, exclude=("head",))
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-5, atol=1e-9)


def test_agc_measures_per_tensor_l2_norms_exactly():
    params = make_params(seed=9)
    expected = torch.stack([p.grad.double().norm() for p in params])
    layout = apply(FixedThreshold(0.01), UnitwiseClip(), make_params(seed=9), exclude=("layer0.*",))
    measured = UnitwiseClip().measure(layout, [p.grad for p in params])
    torch.testing.assert_close(measured.norms.double(), expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("operator", [GlobalNormClip(), TensorNormClip(), UnitwiseClip()])
def test_bf16_gradients_clip_like_float64(operator):
    params = make_params(seed=10, dtype=torch.bfloat16, grad_scale=50.0)
    reference = make_params(seed=10, dtype=torch.bfloat16, grad_scale=50.0)
    for p in reference:
        p.data, p.grad = p.data.double(), p.grad.double()
    apply(FixedThreshold(0.05), operator, params)
    apply(FixedThreshold(0.05), operator, reference)
    for a, b in zip(params, reference):
        assert a.grad.dtype == torch.bfloat16
        torch.testing.assert_close(a.grad.double(), b.grad, rtol=2e-2, atol=1e-6)


def test_fp16_norm_does_not_overflow():
    """A float16 tensor whose norm exceeds 65504 is measured in float32, not as inf."""
    p = torch.nn.Parameter(torch.zeros(1_000_000, dtype=torch.float16))
    p.grad = torch.full((1_000_000,), 100.0, dtype=torch.float16)
    measured = GlobalNormClip().measure(*_layout_and_grads([p]))
    assert math.isclose(measured.total.item(), 1e5, rel_tol=1e-3)


def test_noclip_changes_nothing():
    params = make_params(seed=11, grad_scale=1e3)
    before = clone_grads(params)
    apply(FixedThreshold(math.inf), NoClip(), params)
    assert all(torch.equal(p.grad, g) for p, g in zip(params, before))


def test_mixed_dtypes_are_grouped_and_measured_in_one_vector():
    params = make_params(seed=12)
    params[1].data, params[1].grad = params[1].data.double(), params[1].grad.double()
    params[2].data, params[2].grad = params[2].data.bfloat16(), params[2].grad.bfloat16()
    reference = [p.grad.double().clone() for p in params]
    total = torch.sqrt(sum((g**2).sum() for g in reference)).item()
    apply(FixedThreshold(0.5), GlobalNormClip(), params)
    for p, g in zip(params, reference):
        torch.testing.assert_close(p.grad.double(), g * (0.5 / (total + 1e-6)), rtol=1e-2, atol=1e-6)


def _layout_and_grads(params):
    layout = ParamSet([f"p{i}" for i in range(len(params))], params).layout()
    return layout, layout.grads()


@pytest.mark.parametrize("norm_type", [2.0, math.inf])
def test_empty_tensors_measure_zero(norm_type):
    shapes = [(0,), (3, 2), (0, 4)]
    params = make_params(shapes=shapes, zero_params=(), grad_scale=10.0)
    grad = params[1].grad.double().clone()
    apply(FixedThreshold(0.1), GlobalNormClip(norm_type), params)
    expected = grad * 0.1 / (torch.linalg.vector_norm(grad, norm_type) + 1e-6)
    torch.testing.assert_close(params[1].grad.double(), expected, rtol=1e-6, atol=0)
    assert params[0].grad.numel() == 0


@pytest.mark.parametrize("other_dtype", [torch.float32, torch.bfloat16])
def test_agc_takes_tensors_without_rows(other_dtype):
    """A weight with no rows has no units: alone in its group (its shape's rank, or its dtype) it is left as it is,
    and the others clip as the paper's formula says (until 0.8.1, an empty group raised from ``min()``; under FSDP2 a
    rank whose shard of every such weight is empty would have raised alone)."""
    params = make_params(shapes=[(0, 5), (0, 5, 2), (0,), (3, 4)], zero_params=(), grad_scale=10.0)
    params[3].data, params[3].grad = params[3].data.to(other_dtype), params[3].grad.to(other_dtype)
    expected = agc_reference(params, clip_factor=0.01, eps=1e-3)
    record = Clipper(AGC(max_update_ratio=0.0), named(params), nonfinite="skip").step(record=True).read()
    rtol = 1e-2 if other_dtype == torch.bfloat16 else 1e-6
    torch.testing.assert_close(params[3].grad.double(), expected[3], rtol=rtol, atol=0)
    assert [p.grad.shape for p in params[:3]] == [(0, 5), (0, 5, 2), (0,)]
    assert record.metrics()["clip/rate"] == 1.0


def spam_reference(grad, v, theta):
    """SPAM's rule (Huang et al. 2025, Algorithm 1, spike-aware clipping) in float64: elements with g^2 > theta * v
    become sign(g) * sqrt(theta * v); those with v == 0 stay as they are."""
    g, v = grad.double(), v.double()
    spike = (g**2 > theta * v) & (v > 0)
    return torch.where(spike, g.sign() * (theta * v).sqrt(), g)


def test_spam_matches_the_rule_in_float64_and_leaves_zero_moments_alone():
    from lightning_clip import SPAM, Clipper

    params = make_params(seed=13, zero_params=())
    optimizer = torch.optim.Adam(params)
    gen = torch.Generator().manual_seed(1)
    expected = []
    for p in params:
        v = torch.rand(p.shape, generator=gen) * 1e-4
        v.view(-1)[0] = 0.0  # a never-seen element
        p.grad = torch.randn(p.shape, generator=gen) * torch.where(torch.rand(p.shape, generator=gen) < 0.2, 10.0, 0.1)
        p.grad.view(-1)[0] = 1e3
        optimizer.state[p]["exp_avg_sq"] = v
        expected.append(spam_reference(p.grad, v, 50.0))
    originals = [p.grad.clone() for p in params]
    clipper = Clipper(SPAM(theta=50.0, warmup_steps=1), named(params), optimizer=optimizer, nonfinite="ignore")
    clipper.step()
    spikes = 0
    for p, want, before in zip(params, expected, originals):
        torch.testing.assert_close(p.grad.double(), want, rtol=1e-6, atol=0)
        assert p.grad.view(-1)[0] == 1e3  # v == 0 there: left alone
        spikes += int((p.grad != before).sum())
    assert spikes > 0


DTYPE_PAIRS = [(torch.float32,) * 2, (torch.bfloat16,) * 2, (torch.bfloat16, torch.float32), (torch.float64,) * 2]


@pytest.mark.parametrize("dtype,moment_dtype", DTYPE_PAIRS)
def test_spam_clips_large_tensors_alone_and_small_ones_stacked_as_the_rule_and_the_foreach_list(
    dtype, moment_dtype, monkeypatch
):
    """On CPU SPAM clips tensors of more than ONE_AT_A_TIME_NUMEL elements one at a time, and small tensors that share
    a shape (at most STACK_MAX_NUMEL elements) on their stack: the same arithmetic, so the same results as the whole
    list in one foreach call, bit for bit, and SPAM's rule in float64. The sizes straddle both bounds; one large
    tensor is excluded and one has no moment yet."""
    from lightning_clip import SPAM, Clipper, operators

    shapes = [(120, 80), (7,), (8193,), (8192,), (3, 3), (9000,), (100, 90), (3, 3), (7,), (4097,), (64, 64), (64, 64)]
    gen = torch.Generator().manual_seed(21)

    def run(one_at_a_time, stack_max):
        monkeypatch.setattr(operators, "ONE_AT_A_TIME_NUMEL", one_at_a_time)
        monkeypatch.setattr(operators, "STACK_MAX_NUMEL", stack_max)
        gen.manual_seed(21)
        params = [torch.nn.Parameter(torch.zeros(s, dtype=dtype)) for s in shapes]
        optimizer = torch.optim.Adam(params)
        moments, grads = [], []
        for k, p in enumerate(params):
            v = (torch.rand(p.shape, generator=gen) * 1e-4).to(moment_dtype)
            v.view(-1)[::11] = 0.0
            g = torch.randn(p.shape, generator=gen) * torch.where(torch.rand(p.shape, generator=gen) < 0.2, 10.0, 0.1)
            p.grad = g.to(dtype)
            grads.append(p.grad.clone())
            if k != 6:  # this one has no moment yet
                optimizer.state[p]["exp_avg_sq"] = v
            moments.append(v)
        clipper = Clipper(SPAM(theta=50.0, warmup_steps=1, exclude=["layer5.weight"]), named(params),
                          optimizer=optimizer, nonfinite="ignore")  # fmt: skip
        clipper.step()
        parts = clipper.params.layout().kernel_plans[("spam", 0)].parts
        return [p.grad for p in params], grads, moments, parts

    split, grads, moments, parts = run(8192, 4096)
    together, *_, together_parts = run(10**9, 0)
    # of the ten chosen (all but 5 and 6): (120, 80) and (8193,) alone; (7,), (3, 3) and (64, 64) in pairs
    assert (parts.alone, parts.stacks, parts.rest) == ([0, 2], [[1, 6], [4, 5], [8, 9]], [3, 7])
    assert (together_parts.alone, together_parts.stacks, together_parts.rest) == ([], [], None)
    tolerance = {torch.float32: 1e-6, torch.bfloat16: 1e-2, torch.float64: 1e-12}[dtype]
    for k, (a, b, g, v) in enumerate(zip(split, together, grads, moments)):
        assert torch.equal(a, b)
        want = g.double() if k in (5, 6) else spam_reference(g, v, 50.0)
        torch.testing.assert_close(a.double(), want, rtol=tolerance, atol=0)
    changed = [not torch.equal(a, g) for a, g in zip(split, grads)]
    assert all(changed[k] for k in (0, 1, 4, 10)) and not changed[5] and not changed[6]


def test_spam_reads_the_moments_the_optimizer_holds_now():
    """SPAM keeps which moment belongs to which gradient while the state holds the same tensors; each way the state
    changes is followed at the next step: the first steps (no state, then some), a real Adam step, a moment replaced
    by a new tensor, ``load_state_dict`` (a new state object), a cleared state, an excluded tensor."""
    from lightning_clip import SPAM, Clipper

    torch.manual_seed(14)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(6, 4), (4,), (3, 3), (5,)]]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    clipper = Clipper(SPAM(theta=2.0, warmup_steps=1, exclude=["layer3.weight"]), named(params), optimizer=optimizer,
                      nonfinite="ignore")  # fmt: skip
    saved = None

    def step(change):
        nonlocal saved
        change()
        grads = [torch.randn(p.shape) * 3 for p in params]
        moments = [optimizer.state.get(p, {}).get("exp_avg_sq") for p in params]
        expected = [g if v is None or k == 3 else spam_reference(g, v, 2.0) for k, (g, v) in
                    enumerate(zip(grads, moments))]  # fmt: skip
        for p, g in zip(params, grads):
            p.grad = g.clone()
        clipper.step()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad.double(), e.double(), rtol=1e-6, atol=0)
        optimizer.step()
        saved = saved or optimizer.state_dict()
        return sum(int((p.grad != g).sum()) for p, g in zip(params, grads))

    def one_moment():
        optimizer.state[params[0]]["exp_avg_sq"] = torch.full((6, 4), 1e-4)

    def replaced():
        optimizer.state[params[1]]["exp_avg_sq"] = torch.full((4,), 1e-6)

    def reloaded():
        optimizer.load_state_dict(saved)

    def cleared():
        optimizer.state.clear()

    clipped = [step(change) for change in [lambda: None, one_moment, lambda: None, replaced, reloaded, cleared]]
    assert clipped[0] == 0 and all(clipped[1:5])  # nothing to read yet on the first step; then clipped
    assert clipped[5] == 0  # the cleared state holds no moments: nothing is clipped


def test_spam_waits_for_its_warmup_and_needs_the_optimizer():
    from lightning_clip import SPAM, Clipper

    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.Adam([p])
    optimizer.state[p]["exp_avg_sq"] = torch.full((4,), 1e-6)
    clipper = Clipper(SPAM(theta=1.0, warmup_steps=3), [("w", p)], optimizer=optimizer, nonfinite="ignore")
    clipped = []
    for _ in range(4):
        p.grad = torch.ones(4)
        clipper.step()
        clipped.append(bool(p.grad[0] < 1.0))
    assert clipped == [False, False, True, True]  # from the 3rd step on, as the reference's step >= grad_accu_steps
    with pytest.raises(ValueError, match="reads the optimizer's state"):
        Clipper(SPAM(), [("w", p)])


def test_agc_update_cap_reads_a_rate_held_in_a_tensor_without_a_host_read():
    """fused/capturable optimizers may hold their rate in a tensor: the cap is then computed on the device."""
    params = make_params(seed=10)
    optimizer = torch.optim.SGD([{"params": params[:2], "lr": 0.5}, {"params": params[2:], "lr": torch.tensor(3.0)}])
    clipper = Clipper(AGC(clip_factor=0.02), named(params), optimizer=optimizer, nonfinite="ignore")
    clipper.step()  # the first step builds the layout
    for p, r in zip(params, make_params(seed=11)):
        p.grad = r.grad.clone()
    expected = agc_reference(params, 1e-3 / 3.0, 1e-3)  # the largest rate of the groups
    with HostReads() as counter:
        clipper.step()
    assert counter.count == 0
    for p, g in zip(params, expected):
        torch.testing.assert_close(p.grad.double(), g, rtol=1e-5, atol=1e-9)


REPEATED = [(8, 8), (8,), (3, 4, 2, 2), (8, 8), (), (70, 70), (8,), (3, 4, 2, 2), (8, 8), (), (70, 70), (5,)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_agc_stacks_small_tensors_of_one_shape_and_clips_as_the_paper_and_the_plain_path(dtype, monkeypatch):
    """Small tensors sharing a shape (matrices, conv kernels, vectors, scalars) have their unit norms taken over
    their stack (one kernel), large ones (70x70 > STACK_MAX_NUMEL) alone; both against the float64 formula and the
    plain one-kernel-per-tensor path, over steps with new gradients (the factor buffers are reused), with an
    excluded tensor among the stacked ones."""
    from lightning_clip import operators

    names = [f"layer{i}.weight" for i in range(len(REPEATED))]
    stacked_params = make_params(REPEATED, seed=11, dtype=dtype, grad_scale=30.0, zero_params=(1,))
    plain_params = make_params(REPEATED, seed=11, dtype=dtype, grad_scale=30.0, zero_params=(1,))
    method = AGC(clip_factor=0.01, max_update_ratio=0.0, exclude=("layer3",))
    stacked = Clipper(method, zip(names, stacked_params), nonfinite="ignore")
    layout = stacked.params.layout()
    split = UnitwiseClip()._split(layout, torch.device("cpu"), layout.groups[0][1])
    assert (
        sorted(len(p) for g in split.groups for p in g.parts) == [1, 1, 2, 2] and max(map(len, split.vector_parts)) == 2
    )
    monkeypatch.setattr(operators, "STACK_MAX_NUMEL", 0)
    plain = Clipper(method, zip(names, plain_params), nonfinite="ignore")
    plain.step()
    monkeypatch.undo()
    assert all(len(p) == 1 for g in plain.params.layout().unitwise[0].groups for p in g.parts)
    for step in range(3):
        if step:
            gen = torch.Generator().manual_seed(step)
            for a, b in zip(stacked_params, plain_params):
                a.grad = (torch.randn(a.shape, generator=gen) * 10.0**step).to(dtype)
                b.grad = a.grad.clone()
            plain.step()
        expected = agc_reference(stacked_params, 0.01, 1e-3, excluded={3})
        stacked.step()
        tolerance = {"rtol": 1e-5, "atol": 1e-9} if dtype == torch.float32 else {"rtol": 2e-2, "atol": 1e-6}
        for a, b, g in zip(stacked_params, plain_params, expected):
            assert a.grad.dtype == dtype
            torch.testing.assert_close(a.grad.double(), g.to(dtype).double(), **tolerance)
            torch.testing.assert_close(a.grad.double(), b.grad.double(), **tolerance)


def test_tensor_norm_factors_are_right_at_every_step_with_the_buffers_reused():
    """Per-tensor factors reach the scaling through views of one buffer kept in the layout, refilled each step;
    each step against clipping each tensor alone with torch's function."""
    params = make_params(REPEATED, seed=12, grad_scale=5.0)
    clipper = Clipper(TensorNorm(max_norm=1.0), named(params), nonfinite="ignore")
    for step in range(3):
        gen = torch.Generator().manual_seed(step)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * 3.0**step
        alone = [torch.nn.Parameter(p.detach().clone()) for p in params]
        for a, p in zip(alone, params):
            a.grad = p.grad.clone()
            torch.nn.utils.clip_grad_norm_([a], 1.0)
        clipper.step()
        for p, a in zip(params, alone):
            torch.testing.assert_close(p.grad, a.grad, rtol=1e-6, atol=1e-8)
    layout = clipper.params.layout()
    on_kernel = any(plan is not None for plan in layout.kernel_plans.values())  # Triton's (interpreter): no views
    assert len(layout.factor_slots) == (0 if on_kernel else 1)


def test_inf_norms_of_small_and_large_tensors_in_any_order_match_torch_with_nan_and_inf():
    """On CPU the inf-norm takes small tensors that share a shape in one amax over their stack, other small tensors in
    one foreach kernel and large ones with aminmax; every tensor's norm comes back in its place, NaN and Inf included
    (in a stack too), empty tensors as 0."""
    shapes = [(3000,), (4, 4), (0,), (40, 40), (7,), (512,), (513,), (2, 3), (4, 4), (40, 40), (0,), (9,)]
    params = make_params(shapes=shapes, zero_params=(), seed=13)
    params[1].grad[2, 2] = float("nan")
    params[3].grad[5, 5] = float("-inf")
    params[6].grad[0] = float("nan")
    params[8].grad = params[8].grad.t().contiguous().t()
    params[9].grad[0, 0] = float("inf")
    layout, grads = _layout_and_grads(params)
    norms = ValueClip().measure(layout, grads).norms
    assert layout.size_splits[("l2", 0)].stacks == [[1, 8], [3, 9]]
    expected = [torch.linalg.vector_norm(g, math.inf) if g.numel() else torch.tensor(0.0) for g in grads]
    torch.testing.assert_close(norms, torch.stack(expected), equal_nan=True, rtol=0, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_l2_norms_of_large_tensors_are_dot_products_in_place_and_closer_to_float64_than_vector_norm(dtype):
    """On CPU tensors of more than ONE_AT_A_TIME_NUMEL elements take their L2 norm as a dot product with themselves,
    small ones that share a shape one vector_norm over their stack: every norm comes back in its place (the others
    from the foreach kernel), non-contiguous tensors too, NaN and Inf propagate, and over 4M elements the norm is
    within 1e-5 of float64 (vector_norm's own float32 accumulation is off by about 1e-4 there). The parameter norms
    of a record take the same path."""
    from lightning_clip import operators

    shapes = [(200, 50), (7,), (8193,), (8192,), (0,), (3, 3), (50, 200), (9000,), (3, 3), (7,), (4, 5)]
    params = make_params(shapes=shapes, zero_params=(), seed=23, dtype=dtype)
    for k in (6, 8):  # with the strides of their transposes
        params[k].grad = params[k].grad.t().contiguous().t()
    params[7].grad[3] = float("inf")
    params[2].grad[5] = float("nan")
    params[9].grad[1] = float("nan")
    params[5].grad[1, 1] = float("-inf")
    layout, grads = _layout_and_grads(params)
    assert not grads[6].is_contiguous() and not grads[8].is_contiguous()
    norms = GlobalNormClip().measure(layout, grads).norms
    parts = layout.size_splits[("l2", 0)]
    assert (parts.alone, parts.stacks, parts.rest) == ([0, 2, 6, 7], [[1, 9], [5, 8]], [3, 4, 10])
    expected = torch.stack([torch.linalg.vector_norm(g.double()) for g in grads])
    torch.testing.assert_close(norms.double(), expected, equal_nan=True, rtol=1e-6, atol=0)
    assert norms.dtype == dtype and math.isinf(norms[7]) and math.isnan(norms[2])
    assert math.isinf(norms[5]) and math.isnan(norms[9]) and norms[4] == 0

    big = torch.randn(4_000_000, generator=torch.Generator().manual_seed(0), dtype=dtype) * 3 + 0.5
    exact = big.double().square().sum().sqrt()
    alone = operators._SizeParts([0], [], [])
    measured = operators._l2_norms([big], alone)[0]
    assert abs(measured.double() - exact) / exact < 1e-5
    huge = torch.full((10_000,), 1e20, dtype=torch.float32)  # the square overflows float32 as vector_norm's does
    assert math.isinf(operators._l2_norms([huge], alone)[0]) and math.isinf(torch.linalg.vector_norm(huge))
