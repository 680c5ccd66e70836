import contextlib
import math

import pytest
import torch

from helpers import HostReads, clone_grads, make_params, named
from lightning_clip import methods
from lightning_clip.clipper import Clipper, NonFiniteGradientError

ALL_METHODS = [
    ("none", {}),
    ("norm", {"max_norm": 0.5}),
    ("value", {"clip_value": 0.1}),
    ("tensor_norm", {"max_norm": 0.5}),
    ("agc", {"clip_factor": 0.01}),
    ("autoclip", {}),
    ("zclip", {"warmup_steps": 2}),
    ("adagc", {"warmup_steps": 2}),
    ("norm", {"schedule": "cosine", "schedule_steps": 3}),
]


def clipper_for(method, params, nonfinite="skip", **kwargs):
    """A clipper bound to an SGD optimizer over ``params`` (the adaptive methods' warmup guard reads its rate)."""
    method = methods.from_arguments(method, kwargs)
    optimizer = torch.optim.SGD(params, lr=0.1)
    return Clipper(method, named(params), optimizer=optimizer, nonfinite=nonfinite, max_consecutive_skips=3)


@pytest.mark.parametrize(("method", "kwargs"), ALL_METHODS)
@pytest.mark.parametrize(("nonfinite", "reads"), [("ignore", 0), ("skip", 1), ("raise", 1)])
def test_host_reads_per_non_recording_step(method, kwargs, nonfinite, reads):
    params = make_params(seed=1, grad_scale=5.0)
    clipper = clipper_for(method, params, nonfinite, **kwargs)
    clipper.step()  # first step builds the cached layout
    with HostReads() as counter:
        for _ in range(3):
            clipper.step()
    assert counter.count == 3 * reads


def test_scaler_deferral_reads_nothing_and_counts_on_device():
    params = make_params(seed=2)
    clipper = Clipper(methods.Norm(), named(params), nonfinite="skip", scaler_checks_nonfinite=True)
    params[0].grad[0] = math.inf
    with HostReads() as counter:
        clipper.step()
    assert counter.count == 0
    assert params[0].grad is not None  # the scaler, not the clipper, skips this step
    assert clipper._nonfinite_steps.item() == 1


@pytest.mark.parametrize(("method", "kwargs"), ALL_METHODS)
@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_skip_drops_all_grads_and_counts(method, kwargs, bad):
    params = make_params(seed=3)
    clipper = clipper_for(method, params, **kwargs)
    params[2].grad.view(-1)[5] = bad
    assert clipper.step() is None
    assert all(p.grad is None for p in params)
    assert clipper.skipped_steps == 1 and clipper.consecutive_skips == 1


def test_raise_names_the_tensors():
    params = make_params(seed=4)
    clipper = clipper_for("norm", params, "raise")
    params[1].grad[0, 0] = math.nan
    params[4].grad[0, 0] = math.inf
    before = clone_grads(params)
    with pytest.raises(NonFiniteGradientError, match=r"in: layer1.weight, layer4.weight"):
        clipper.step()
    for p, g in zip(params, before):  # nothing was changed
        torch.testing.assert_close(p.grad, g, equal_nan=True)


@pytest.mark.parametrize("nonfinite", ["skip", "raise"])
def test_nonfinite_parameters_stop_at_once_and_are_named(nonfinite):
    """Gradients are non-finite because a parameter is (an optimizer step wrote it): no skip can mend that, so the
    first such step raises, naming the parameter, where skipping would have waited for ``max_consecutive_skips``.
    It reads the device as often as a non-finite step of finite parameters, which is skipped (or raises) as before."""
    params = make_params(seed=4)
    clipper = clipper_for("norm", params, nonfinite)

    def nan_gradients():
        for p in params:
            p.grad = torch.full_like(p, math.nan)

    nan_gradients()
    with HostReads() as finite_params, contextlib.suppress(NonFiniteGradientError):
        clipper.step()
    assert clipper.skipped_steps == (1 if nonfinite == "skip" else 0)
    params[2].data[0] = math.nan
    nan_gradients()
    with (
        HostReads() as reads,
        pytest.raises(NonFiniteGradientError, match=r"\(NaN/Inf\) at optimizer step 2: layer2\.weight\. "),
    ):
        clipper.step()
    assert reads.count == finite_params.count


@pytest.mark.parametrize("method", ["value", "spam"])
def test_elementwise_methods_refuse_complex_parameters_when_built(method):
    """Complex numbers have no order to hold an element to a bound in (``clip_grad_value_`` raises at the step):
    refused when the clipper is built, naming the parameter, unless it is excluded."""
    params = make_params(seed=13)
    params[2] = torch.nn.Parameter(torch.randn(4, 3, dtype=torch.complex64))
    params[2].grad = torch.randn(4, 3, dtype=torch.complex64) * 10
    kwargs = {"clip_value": 0.1} if method == "value" else {}
    optimizer = torch.optim.Adam(params, lr=0.1)
    with pytest.raises(ValueError, match=r"parameter 'layer2.weight' is complex.*'norm', 'tensor_norm'"):
        Clipper(methods.from_arguments(method, kwargs), named(params), optimizer=optimizer)
    excluded = methods.from_arguments(method, {**kwargs, "exclude": ["layer2.weight"]})
    Clipper(excluded, named(params), optimizer=optimizer).step()


@pytest.mark.parametrize(("method", "norm_type"), [("norm", 2.0), ("norm", math.inf), ("tensor_norm", math.inf)])
def test_complex_gradients_clip_by_their_moduli_as_torch_does(method, norm_type):
    """Norm clipping of complex gradients (small ones stacked, large ones alone) against ``clip_grad_norm_``, which
    takes the moduli; a tensor's inf-norm is its largest modulus."""
    shapes = [(8, 8), (8, 8), (5,), (100, 100)]
    params = [torch.nn.Parameter(torch.randn(s, dtype=torch.complex64)) for s in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, dtype=torch.complex64) * 10
    reference = [torch.nn.Parameter(p.detach().clone()) for p in params]
    for r, p in zip(reference, params):
        r.grad = p.grad.clone()
    record = clipper_for(method, params, max_norm=1.0, norm_type=norm_type).step(record=True)
    for group in [reference] if method == "norm" else [[r] for r in reference]:
        torch.nn.utils.clip_grad_norm_(group, 1.0, norm_type=norm_type)
    for p, r in zip(params, reference):
        torch.testing.assert_close(p.grad, r.grad)
    assert record.grad_norms.dtype == torch.float32


def test_consecutive_skips_raise_after_limit_and_reset_on_finite_step():
    params = make_params(seed=5)
    clipper = clipper_for("norm", params)
    for _ in range(3):
        for p in params:
            p.grad = torch.full_like(p, math.nan)
        clipper.step()
    for p in params:
        p.grad = torch.ones_like(p)
    clipper.step()
    assert clipper.consecutive_skips == 0 and clipper.skipped_steps == 3
    for _ in range(3):
        for p in params:
            p.grad = torch.full_like(p, math.nan)
        clipper.step()
    for p in params:
        p.grad = torch.full_like(p, math.nan)
    with pytest.raises(NonFiniteGradientError, match="4 optimizer steps in a row"):
        clipper.step()


def test_ignore_lets_nan_through_like_torch():
    params = make_params(seed=6)
    clipper = clipper_for("norm", params, "ignore")
    params[0].grad[0] = math.nan
    clipper.step()
    assert all(p.grad is not None for p in params)


@pytest.mark.parametrize(("method", "kwargs"), ALL_METHODS)
def test_record_holds_norms_before_and_after(method, kwargs):
    params = make_params(seed=7, grad_scale=5.0)
    before = torch.stack([p.grad.norm() for p in params])
    clipper = clipper_for(method, params, **kwargs)
    record = clipper.step(record=True)
    after = torch.stack([p.grad.norm() for p in params])
    torch.testing.assert_close(record.grad_norms, before, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(record.clipped_norms, after, rtol=1e-5, atol=1e-7)
    assert record.names == [f"layer{i}.weight" for i in range(len(params))]
    assert record.judged_steps == 1
    # gradients 5x their parameters: the warmup of the adaptive methods caps them at 0.01 x the parameter norm
    assert record.clipped_steps.item() == (0 if method == "none" else 1)


def test_clip_rate_counts_since_last_record():
    params = make_params(seed=8)
    clipper = clipper_for("norm", params, max_norm=1.0)
    for scale in (100.0, 1e-3, 100.0):
        for p in params:
            p.grad = torch.ones_like(p) * scale
        clipper.step()
    for p in params:
        p.grad = torch.ones_like(p) * 1e-3
    record = clipper.step(record=True)
    assert (record.clipped_steps.item(), record.judged_steps) == (2, 4)
    assert clipper.step(record=True).judged_steps == 1


def test_no_grads_is_a_no_op():
    params = make_params(seed=9)
    for p in params:
        p.grad = None
    clipper = clipper_for("agc", params)
    assert clipper.step(record=True) is None
    assert clipper.steps == 0


def test_a_step_without_gradients_after_a_skipped_one_reports_no_skip():
    """What the last step skipped is this step's alone: a following step with no gradient at all (a branch the
    batch did not use) must not report the earlier skip again (until 0.8.1 it did: the callback warned twice)."""
    params = make_params(seed=9)
    clipper = clipper_for("norm", params)
    params[0].grad[0] = math.nan
    clipper.step()
    assert clipper.last_nonfinite == ["layer0.weight"] and clipper.skipped_this_step
    clipper.step()  # the skip set every gradient to None
    assert clipper.last_nonfinite is None and not clipper.skipped_this_step


def test_state_dict_round_trip():
    params = make_params(seed=10)
    clipper = clipper_for("norm", params)
    params[0].grad[0] = math.nan
    clipper.step()
    restored = clipper_for("norm", make_params(seed=10))
    restored.load_state_dict(clipper.state_dict())
    assert (restored.steps, restored.skipped_steps, restored._nonfinite_steps.item()) == (1, 1, 1)


def test_norm_overflow_counts_as_nonfinite_and_says_so():
    params = make_params(seed=11)
    for p in params:
        p.grad = torch.full_like(p, 3e19)  # every element finite, the sum of squares overflows float32
    clipper = clipper_for("norm", params, "raise")
    with pytest.raises(NonFiniteGradientError, match=r"a norm beyond float32\) at optimizer step 1 in: layer0.weight"):
        clipper.step()


def test_fused_path_under_a_grad_scaler_reads_nothing_and_equals_clip_then_step():
    """Gradients that still carry a GradScaler's scale (a fused optimizer under fp16): the norm is divided by the
    scale on the device, and the scaler's step (which multiplies its scale into ``grad_scale``) then equals
    clipping the unscaled gradients and stepping the unfused optimizer."""
    fused_params, plain_params = make_params(seed=4), make_params(seed=4)
    fused = torch.optim.AdamW(fused_params, lr=0.01, fused=True)
    plain = torch.optim.AdamW(plain_params, lr=0.01)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    scaler.scale(torch.ones(()))  # the scale exists once a loss has been scaled
    for p in fused_params:
        p.grad *= 1024.0
    clipper = Clipper(
        methods.Norm(max_norm=0.5), named(fused_params), optimizer=fused, scaler_checks_nonfinite=True,
        grad_scaler=scaler,
    )  # fmt: skip
    with HostReads() as counter:
        clipper.step()
    assert clipper.fused and counter.count == 0
    scaler.step(fused)
    torch.nn.utils.clip_grad_norm_(plain_params, 0.5)
    plain.step()
    for a, b in zip(fused_params, plain_params):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)
    assert not hasattr(fused, "grad_scale")


def test_the_fused_path_names_a_skipped_steps_tensors_when_the_layout_changes_before_the_record():
    """The fused path reports its skips at the next record, naming the tensors that held NaN/Inf. The flags are kept
    per tensor of the optimizer, so a tensor that has no gradient on some steps in between does not shift them
    (until 0.8.1 they were kept by position in the layout: reset, or given to a neighbour)."""
    params = make_params(seed=12)
    optimizer = torch.optim.AdamW(params, lr=0.01, fused=True)
    clipper = Clipper(methods.Norm(max_norm=0.5), named(params), optimizer=optimizer, nonfinite="skip")
    for step in range(3):
        for i, p in enumerate(params):
            p.grad = None if (i == 1 and step < 2) else torch.randn_like(p)
        if step == 1:
            params[4].grad[0, 0] = math.nan
        record = clipper.step(record=step == 2)
        optimizer.step()
    assert clipper.fused and record is not None
    assert clipper.last_nonfinite == ["layer4.weight"] and clipper.skipped_steps == 1


def test_a_grad_scaler_needs_a_fused_optimizer():
    params = make_params(seed=5)
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(ValueError, match="fused optimizer under fp16"):
        Clipper(methods.Norm(), named(params), optimizer=torch.optim.SGD(params, lr=0.1), grad_scaler=scaler,
                scaler_checks_nonfinite=True)  # fmt: skip


def test_bare_parameters_clip_as_clip_grad_norm_takes_them():
    params, reference = make_params(), make_params()
    torch.nn.utils.clip_grad_norm_(reference, 0.5)
    clipper = Clipper(methods.Norm(max_norm=0.5), iter(params))  # a generator, as model.parameters() is
    clipper.step()
    for p, q in zip(params, reference):
        assert torch.equal(p.grad, q.grad)
    assert clipper.names == [f"param_{i}" for i in range(len(params))]
    single, twin = make_params()[0], make_params()[0]
    Clipper(methods.Norm(max_norm=0.5), single).step()
    torch.nn.utils.clip_grad_norm_(twin, 0.5)
    assert torch.equal(single.grad, twin.grad)
    with pytest.raises(TypeError, match=r"\(name, parameter\) pairs or parameters; item 1 is str"):
        Clipper(methods.Norm(), [params[0], "weight"])


def test_spam_clip_rate_judges_recorded_steps_from_their_norms():
    """SPAM does not know whether it clipped without a measurement; a recording step has the norms before and after
    it: a step with a spike counts as clipped, one without does not, and unrecorded steps after warmup are not
    judged."""
    params = [torch.nn.Parameter(torch.zeros(4, 3)), torch.nn.Parameter(torch.zeros(3))]
    optimizer = torch.optim.Adam(params, lr=1e-3)
    clipper = Clipper(methods.SPAM(theta=5000.0, warmup_steps=2), named(params), optimizer=optimizer)

    def step(scale, spike=False, record=True):
        for p in params:
            p.grad = torch.full_like(p, scale)
        if spike:
            params[0].grad[1, 2] = 100.0
        result = clipper.step(record=record)
        optimizer.step()
        return None if result is None else result.read().metrics().get("clip/rate")

    assert step(1.0) == 0.0  # warmup: judged, not clipped
    assert step(1.0, spike=True, record=False) is None
    assert step(1.0, spike=True) == 1.0  # only the recorded step is judged
    assert step(1.0) == 0.0
