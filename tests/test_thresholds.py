"""Adaptive thresholds against independent float64 re-computations of their papers' formulas, driven through the
real clipper over a sequence of global norms with spikes (and NaN/Inf steps, which must not enter any state)."""

import math

import numpy as np
import pytest
import torch

from lightning_clip import methods
from lightning_clip.clipper import Clipper

NORMS = [1.0, 1.2, 0.9, 1.1, 8.0, 1.0, 0.95, 1.3, 30.0, 1.05, 0.8, 1.2, 1.1, 5.0, 1.0, 0.9, 1.4, 1.0, 60.0, 1.1]
WITH_NONFINITE = NORMS[:6] + [math.nan] + NORMS[6:12] + [math.inf] + NORMS[12:]


def run_global(method, norms, **params):
    """Feed each norm as the gradient norm of one parameter; return the norms after clipping. The papers' methods
    have no parameter-scale warmup and keep statistics of raw norms: both are off unless ``params`` set them."""
    if method == "autoclip":
        params = {"warmup_update_ratio": 0.0, "clipped_history": False, **params}
    if method == "zclip":
        params = {"warmup_update_ratio": 0.0, "clipped_warmup": False, **params}
    p = torch.nn.Parameter(torch.zeros(4))
    clipper = Clipper(methods.from_arguments(method, params), [("w", p)], nonfinite="ignore")
    policy = clipper.policy
    out = []
    for n in norms:
        p.grad = torch.full((4,), n / 2.0)  # L2 norm n
        clipper.step()
        out.append(float(torch.linalg.vector_norm(p.grad)))
    return out, policy


def clip_to(norm, threshold):
    return norm * min(1.0, threshold / (norm + 1e-6))


def autoclip_reference(norms, percentile, window, clipped_history=False):
    history, out = [], []
    for n in norms:
        if not math.isfinite(n):
            out.append(n)
            continue
        threshold = float(np.percentile(np.array((history + [n])[-window:], dtype=np.float64), percentile))
        out.append(clip_to(n, threshold))
        history = (history + [min(n, threshold) if clipped_history else n])[-window:]
    return out


@pytest.mark.parametrize(("percentile", "window"), [(10.0, 1000), (50.0, 5), (100.0, 3)])
def test_autoclip_matches_numpy_percentile_of_history(percentile, window):
    ours, policy = run_global("autoclip", WITH_NONFINITE, percentile=percentile, window=window)
    expected = autoclip_reference(WITH_NONFINITE, percentile, window)
    finite = [i for i, n in enumerate(WITH_NONFINITE) if math.isfinite(n)]
    np.testing.assert_allclose([ours[i] for i in finite], [expected[i] for i in finite], rtol=1e-5)
    assert torch.isfinite(policy.history[~torch.isnan(policy.history)]).all()
    assert int(policy.count) == len(finite)


@pytest.mark.parametrize(("percentile", "window"), [(10.0, 1000), (50.0, 5), (90.0, 4)])
def test_autoclip_clipped_history_matches_a_history_of_clipped_norms(percentile, window):
    """The default: the history holds the norm each step kept after clipping, so a spike never raises it."""
    ours, policy = run_global("autoclip", WITH_NONFINITE, percentile=percentile, window=window, clipped_history=True)
    expected = autoclip_reference(WITH_NONFINITE, percentile, window, clipped_history=True)
    finite = [i for i, n in enumerate(WITH_NONFINITE) if math.isfinite(n)]
    np.testing.assert_allclose([ours[i] for i in finite], [expected[i] for i in finite], rtol=1e-5)
    kept = policy.history[~torch.isnan(policy.history)]
    assert float(kept.max()) <= max(ours[i] for i in finite) * (1 + 1e-5)  # nothing above what was applied


def zclip_reference(
    norms,
    alpha=0.97,
    z_thresh=2.5,
    warmup_steps=25,
    mode="zscore",
    clip_option="adaptive_scaling",
    clip_factor=1.0,
    max_norm=None,
    skip_update_on_spike=False,
    eps=1e-6,
    clipped_warmup=False,
):
    """ZClip as the paper's reference code computes it, in float64, non-finite norms left out of all state; with
    ``clipped_warmup`` the warmup collects the norms after the ``max_norm`` clip."""
    buffer, mean, var, out = [], None, None, []
    for n in norms:
        if not math.isfinite(n):
            out.append(n)
            continue
        if mean is None:
            buffer.append(min(n, max_norm) if clipped_warmup and max_norm is not None else n)
            if len(buffer) >= warmup_steps:
                mean = sum(buffer) / len(buffer)
                var = sum((x - mean) ** 2 for x in buffer) / len(buffer)
            out.append(clip_to(n, max_norm) if max_norm is not None else n)
            continue
        std = var**0.5
        clip_val = None
        if mode == "percentile":
            if n > mean + z_thresh * std:
                clip_val = mean + z_thresh * std
        else:
            z = (n - mean) / (std + eps)
            if z > z_thresh:
                clip_val = mean if clip_option == "mean" else (mean + z_thresh * std / (z / z_thresh)) * clip_factor
        effective = clip_val if clip_val is not None else math.inf
        if max_norm is not None:
            effective = min(effective, max_norm)
        out.append(clip_to(n, effective))
        if clip_val is not None and skip_update_on_spike:
            continue
        value = clip_val if clip_val is not None else n
        mean = alpha * mean + (1 - alpha) * value
        var = alpha * var + (1 - alpha) * (value - mean) ** 2
    return out, mean, var


def zclip_against_reference(params, clipped_warmup=False):
    """Our ZClip against :func:`zclip_reference` on the same norms (``params`` in the reference code's names): the
    finite outputs and, once the EMA has started, its mean and variance agree. Returns our outputs and the
    reference's mean (None while still in warmup)."""
    renamed = methods.ZClip.renamed  # the reference code's names -> ours
    ours, policy = run_global(
        "zclip", WITH_NONFINITE, clipped_warmup=clipped_warmup, **{renamed.get(k, k): v for k, v in params.items()}
    )
    expected, mean, var = zclip_reference(WITH_NONFINITE, clipped_warmup=clipped_warmup, **params)
    finite = [i for i, n in enumerate(WITH_NONFINITE) if math.isfinite(n)]
    np.testing.assert_allclose([ours[i] for i in finite], [expected[i] for i in finite], rtol=1e-5)
    if mean is not None:
        assert float(policy.mean) == pytest.approx(mean, rel=1e-5)
        assert float(policy.var) == pytest.approx(var, rel=1e-4)
    return ours, mean


@pytest.mark.parametrize(
    "params",
    [
        {"warmup_steps": 4},
        {"warmup_steps": 1},
        {"warmup_steps": 4, "clip_option": "mean"},
        {"warmup_steps": 4, "mode": "percentile", "z_thresh": 1.5},
        {"warmup_steps": 4, "clip_factor": 0.7, "alpha": 0.9},
        {"warmup_steps": 4, "max_norm": 2.0},
        {"warmup_steps": 4, "skip_update_on_spike": True},
        {"warmup_steps": 25},  # warmup longer than the spikes: nothing adaptive happens
    ],
)
def test_zclip_matches_reference_code_in_float64(params):
    ours, _ = zclip_against_reference(params)
    clipped = sum(o < n * (1 - 1e-4) for o, n in zip(ours, WITH_NONFINITE) if math.isfinite(n))
    if params.get("warmup_steps") == 4 and "max_norm" not in params:
        assert clipped >= 2  # the spikes at 30 and 60 are clipped


@pytest.mark.parametrize("params", [{"warmup_steps": 4, "max_norm": 1.1}, {"warmup_steps": 8, "max_norm": 1.0}])
def test_zclip_clipped_warmup_starts_the_ema_from_the_clipped_norms(params):
    """The default: the warmup collects what its clip left (here the reference's ``max_norm`` clip stands in for the
    parameter-scale guard), so a spike inside the warmup does not start the EMA at its scale."""
    _, mean = zclip_against_reference(params, clipped_warmup=True)
    assert mean is not None  # the EMA started
    raw_mean = zclip_reference(WITH_NONFINITE, **params)[1]
    assert mean < raw_mean  # the spikes of the warmup (8.0 at step 5) did not enter it raw


@pytest.mark.parametrize(
    "params",
    [
        {"warmup_steps": 4},
        {"warmup_steps": 4, "clip_option": "mean"},
        {"warmup_steps": 4, "mode": "percentile", "z_thresh": 1.5},
        {"warmup_steps": 3, "clip_factor": 0.7, "alpha": 0.9},
        {"warmup_steps": 4, "max_grad_norm": 2.0},
        {"warmup_steps": 4, "skip_update_on_spike": True},
    ],
)
def test_zclip_matches_the_authors_package(params):
    """The authors' ``zclip`` package (1.0.0, pure PyTorch) on the same norms, finite ones only (its EMA turns NaN on
    a NaN step). Its names map to ours through ``ZClip.renamed``; its ``max_grad_norm`` is our ``threshold_cap``."""
    zclip = pytest.importorskip("zclip")
    theirs = zclip.ZClip(**{"max_grad_norm": None, **params})
    model = torch.nn.Linear(4, 1, bias=False)
    expected = []
    for n in NORMS:
        model.weight.grad = torch.full((1, 4), n / 2.0)
        theirs.step(model)
        expected.append(float(model.weight.grad.norm()))
    renamed = {**methods.ZClip.renamed, "max_grad_norm": "threshold_cap"}
    ours, _ = run_global("zclip", NORMS, **{renamed.get(k, k): v for k, v in params.items()})
    np.testing.assert_allclose(ours, expected, rtol=1e-5)
    assert any(o < n * (1 - 1e-4) for o, n in zip(ours, NORMS))


def adagc_reference(grad_norms, beta, lambda_rel, lambda_abs, warmup_steps, warmup_threshold="min"):
    """AdaGC (Wang et al. 2025, Algorithm 1) in float64; each row of ``grad_norms`` is one step's per-tensor norms,
    ``None`` for a tensor with no gradient that step (left out, its threshold kept). ``warmup_threshold="ema"``:
    during warmup the thresholds follow the same EMA as after it (ours by default)."""

    def ema(g, c):
        return c if math.isinf(g) else beta * g + (1 - beta) * c

    gamma = [math.inf] * len(grad_norms[0])
    out, step = [], 0
    for norms in grad_norms:
        present = [i for i, n in enumerate(norms) if n is not None]
        if not all(math.isfinite(norms[i]) for i in present):
            out.append(None)
            continue
        clipped = list(norms)
        if step < warmup_steps:
            coef = min(1.0, lambda_abs / (math.sqrt(sum(norms[i] ** 2 for i in present)) + 1e-6))
            start = min if warmup_threshold == "min" else ema
            for i in present:
                clipped[i] = norms[i] * coef
                gamma[i] = start(gamma[i], clipped[i])
        else:
            for i in present:
                clipped[i] = norms[i] * min(1.0, lambda_rel * gamma[i] / (norms[i] + 1e-6))
                gamma[i] = ema(gamma[i], clipped[i])
        out.append(clipped)
        step += 1
    return out, gamma


@pytest.mark.parametrize("warmup_threshold", ["min", "ema"])
def test_adagc_matches_algorithm_in_float64(warmup_threshold):
    gen = torch.Generator().manual_seed(0)
    shapes = [(6, 4), (6,), (3, 3, 2)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    method = methods.AdaGC(warmup_steps=5, lambda_abs=2.0, warmup_threshold=warmup_threshold)
    clipper = Clipper(method, zip("abc", params), nonfinite="ignore")
    policy = clipper.policy
    steps, ours = [], []
    for t in range(30):
        scale = 40.0 if t in (12, 20) else 1.0
        grads = [torch.randn(s, generator=gen) * scale for s in shapes]
        if t == 15:
            grads[1][0] = math.nan  # a non-finite step: no state change
        for p, g in zip(params, grads):
            p.grad = g.clone()
        clipper.step()
        steps.append([float(g.double().norm()) for g in grads])
        ours.append([float(p.grad.double().norm()) for p in params])
    expected, gamma = adagc_reference(steps, 0.98, 1.05, 2.0, 5, warmup_threshold)
    for t, (o, e) in enumerate(zip(ours, expected)):
        if e is not None:
            np.testing.assert_allclose(o, e, rtol=1e-5, err_msg=f"step {t}")
    np.testing.assert_allclose(policy.gamma.double().numpy(), gamma, rtol=1e-5)
    assert int(policy.count) == 29


@pytest.mark.parametrize("second_dtype", [torch.float32, torch.float64])
def test_adagc_keeps_each_tensors_threshold_when_the_layout_changes(second_dtype):
    """Thresholds live per tensor of the optimizer, while a step's layout holds only the tensors with gradients, in
    device/dtype runs: a tensor with no gradient for the first steps (then first seen after warmup: unclipped) and
    again later (more thresholds than the layout has tensors), and with a float64 tensor between float32 ones, a
    layout that reorders them. Against Algorithm 1 in float64, step by step."""
    gen = torch.Generator().manual_seed(3)
    shapes, dtypes = [(5, 3), (4,), (3, 3), (6,)], [torch.float32, second_dtype, torch.float32, torch.float32]
    params = [torch.nn.Parameter(torch.zeros(s, dtype=d)) for s, d in zip(shapes, dtypes)]
    clipper = Clipper(methods.AdaGC(warmup_steps=4, lambda_abs=2.0), zip("abcd", params), nonfinite="ignore")
    steps, ours = [], []
    for t in range(24):
        absent = {3} if t < 8 or 16 <= t < 19 else set()
        grads = [
            torch.randn(s, generator=gen, dtype=d) * (30.0 if t in (10, 17) else 1.0) for s, d in zip(shapes, dtypes)
        ]
        for i, (p, g) in enumerate(zip(params, grads)):
            p.grad = None if i in absent else g.clone()
        clipper.step()
        steps.append([None if i in absent else float(g.double().norm()) for i, g in enumerate(grads)])
        ours.append([None if i in absent else float(p.grad.double().norm()) for i, p in enumerate(params)])
    expected, gamma = adagc_reference(steps, 0.98, 1.05, 2.0, 4, "ema")
    for t, (o, e) in enumerate(zip(ours, expected)):
        for i in range(4):
            if e[i] is not None:
                np.testing.assert_allclose(o[i], e[i], rtol=1e-5, err_msg=f"step {t}, tensor {i}")
    np.testing.assert_allclose(clipper.policy.gamma.double().numpy(), gamma, rtol=1e-5)


def test_adagc_keeps_each_tensors_threshold_when_the_optimizer_gains_parameters():
    """``Clipper.follow``: two tensors join after warmup (``add_param_group``, a backbone unfrozen). The first two
    keep their thresholds; the new ones are first seen then (unclipped, then their own EMA). Against Algorithm 1 in
    float64, where the new tensors are absent until they join."""
    gen = torch.Generator().manual_seed(5)
    shapes = [(5, 3), (4,), (3, 3), (6,)]
    params = [torch.nn.Parameter(torch.zeros(s)) for s in shapes]
    clipper = Clipper(methods.AdaGC(warmup_steps=4, lambda_abs=2.0), zip("ab", params[:2]), nonfinite="ignore")
    steps, ours = [], []
    for t in range(16):
        if t == 7:
            clipper.follow(zip("abcd", params))
        present = 4 if t >= 7 else 2
        grads = [torch.randn(s, generator=gen) * (30.0 if t in (9, 12) else 1.0) for s in shapes]
        for p, g in zip(params[:present], grads):
            p.grad = g.clone()
        clipper.step()
        steps.append([float(g.double().norm()) if i < present else None for i, g in enumerate(grads)])
        ours.append([float(p.grad.double().norm()) if i < present else None for i, p in enumerate(params)])
    expected, gamma = adagc_reference(steps, 0.98, 1.05, 2.0, 4, "ema")
    for t, (o, e) in enumerate(zip(ours, expected)):
        np.testing.assert_allclose([x for x in o if x is not None], [x for x in e if x is not None], rtol=1e-5,
                                   err_msg=f"step {t}")  # fmt: skip
    np.testing.assert_allclose(clipper.policy.gamma.double().numpy(), gamma, rtol=1e-5)
    assert clipper.names == list("abcd")
    with pytest.raises(ValueError, match=r"changed from 4 to 3 other than by adding parameter groups"):
        clipper.follow(zip("abd", [params[0], params[1], params[3]]))


@pytest.mark.parametrize(
    ("schedule", "expected"),
    [
        ("constant", [2.0, 2.0, 2.0, 2.0, 2.0]),
        ("linear", [0.2, 0.65, 1.1, 1.55, 2.0]),
        ("cosine", [2.0, 2.0 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4))), 1.1, None, 0.2]),
    ],
)
def test_scheduled_thresholds(schedule, expected):
    ours, _ = run_global("norm", [100.0] * 6, max_norm=2.0, schedule=schedule, schedule_steps=4)
    for step, value in enumerate(expected):
        if value is not None:
            assert ours[step] == pytest.approx(value, rel=1e-5)
    assert ours[5] == pytest.approx(expected[-1], rel=1e-5)  # the end value holds


@pytest.mark.parametrize("fused", [False, True])
def test_a_skipped_step_counts_in_the_schedule_on_either_path(fused):
    """A schedule counts every optimizer step, a skipped one too (as a learning-rate scheduler does): on the host
    path, which skips before the threshold is set, and on the fused path, which skips on the device. Linear warmup
    0.2 -> 2.0 over 4 steps, the second step skipped (NaN): the third is clipped at 1.1, the schedule's third value."""
    p = torch.nn.Parameter(torch.zeros(4))
    optimizer = torch.optim.AdamW([p], lr=0.0, fused=fused)
    method = methods.Norm(max_norm=2.0, schedule="linear", schedule_steps=4)
    clipper = Clipper(method, [("w", p)], optimizer=optimizer, nonfinite="skip")
    assert clipper.fused == fused
    for step in range(3):
        p.grad = torch.full((4,), math.nan if step == 1 else 50.0)
        record = clipper.step(record=True)
        optimizer.step()
    assert record.read().metrics()["clip/threshold"] == pytest.approx(1.1)
    assert clipper.skipped_steps == 1


def test_first_step_and_only_nonfinite_steps():
    ours, policy = run_global("autoclip", [math.inf, 5.0])
    assert ours[1] == pytest.approx(5.0, rel=1e-5)  # the history is its own norm: nothing to clip
    ours, policy = run_global("zclip", [math.nan] * 3, warmup_steps=2)
    assert int(policy.count) == 0 and float(policy.mean) == 0.0


def guarded_clipper(method, named_params, lr, **params):
    """The method with its default warmup guard, bound to an SGD optimizer at ``lr``."""
    pairs = list(named_params)
    optimizer = torch.optim.SGD([p for _, p in pairs], lr=lr)
    return Clipper(methods.from_arguments(method, params), pairs, optimizer=optimizer, nonfinite="ignore")


def guard_reference(params, lr, ratio=1e-3):
    """The warmup limit in float64: ratio x max(global parameter norm, 1e-3) / lr."""
    norm = math.sqrt(sum(float(p.detach().double().square().sum()) for p in params))
    return ratio * max(norm, 1e-3) / lr


@pytest.mark.parametrize("method", ["autoclip", "zclip", "adagc"])
@pytest.mark.parametrize("lr", [0.05, 1.0, 30.0])
def test_warmup_caps_the_first_steps_at_a_relative_update(method, lr):
    """With their defaults the adaptive methods clip from the first step: while their statistics are collected, the
    global gradient norm is at most warmup_update_ratio (1e-3) x the global parameter norm / the learning rate, so
    an SGD step moves the parameters by at most 1e-3 of their norm, at any learning rate."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 8, generator=gen)), torch.nn.Parameter(torch.zeros(8))]
    clipper = guarded_clipper(method, zip(["w", "b"], params), lr)
    for step, scale in enumerate([1e4, 1e6, 3e5]):  # an exploding start
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen) * scale
        limit = guard_reference(params, lr)
        clipper.step()
        total = float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))
        assert total == pytest.approx(limit, rel=1e-5), step
        before = [p.detach().clone() for p in params]
        with torch.no_grad():
            for p in params:
                p -= lr * p.grad  # the SGD step the guard bounds
        moved = math.sqrt(sum(float((p - b).double().square().sum()) for p, b in zip(params, before)))
        assert moved == pytest.approx(1e-3 * math.sqrt(sum(float(b.double().square().sum()) for b in before)), 1e-4)


@pytest.mark.parametrize("method", ["autoclip", "zclip", "adagc"])
def test_warmup_guard_follows_a_scheduled_and_a_per_group_learning_rate(method):
    """The guard reads the rate as it is at each step (a scheduler changes it), the largest of the optimizer's
    groups, and a rate held in a tensor without a host read."""
    gen = torch.Generator().manual_seed(1)
    w, b = torch.nn.Parameter(torch.randn(6, 6, generator=gen)), torch.nn.Parameter(torch.randn(6, generator=gen))
    optimizer = torch.optim.SGD([{"params": [w], "lr": 0.5}, {"params": [b], "lr": torch.tensor(2.0)}])
    clipper = Clipper(methods.from_arguments(method, {}), [("w", w), ("b", b)], optimizer=optimizer, nonfinite="ignore")
    for lr_b in [0.1, 0.25, 2.0]:  # a rising rate lowers the guard below what the statistics allow
        optimizer.param_groups[1]["lr"] = torch.tensor(lr_b)
        for p in (w, b):
            p.grad = torch.randn(p.shape, generator=gen) * 1e3
        clipper.step()
        total = float(torch.linalg.vector_norm(torch.stack([w.grad.norm(), b.grad.norm()])))
        assert total == pytest.approx(guard_reference([w, b], max(0.5, lr_b)), rel=1e-5), lr_b


@pytest.mark.parametrize("method", ["autoclip", "zclip", "adagc"])
def test_the_warmup_guard_needs_the_optimizer_or_the_papers_warmup(method):
    p = torch.nn.Parameter(torch.ones(4))
    with pytest.raises(ValueError, match="warmup_update_ratio=0"):
        Clipper(methods.from_arguments(method, {}), [("w", p)])
    off = "lambda_abs" if method == "adagc" else "warmup_update_ratio"
    clipper = Clipper(methods.from_arguments(method, {off: 1.0 if method == "adagc" else 0.0}), [("w", p)])
    p.grad = torch.full((4,), 1e3)
    clipper.step()  # the paper's warmup reads no learning rate


@pytest.mark.parametrize("method", ["autoclip", "zclip", "adagc"])
def test_zero_parameters_still_learn_under_the_warmup_guard(method):
    p = torch.nn.Parameter(torch.zeros(4))
    clipper = guarded_clipper(method, [("w", p)], lr=0.1)
    p.grad = torch.ones(4)
    clipper.step()
    assert float(p.grad.norm()) == pytest.approx(1e-3 * 1e-3 / 0.1, rel=1e-4)


@pytest.mark.parametrize(("clipped_warmup", "after_warmup"), [(False, 1.0), (True, 0.02)])
def test_warmup_guard_ends_with_the_warmup(clipped_warmup, after_warmup):
    """The guard applies to the warmup only. With the raw warmup norms (the reference's) the EMA starts at 1.0 and
    norms of 1.0 pass; with the clipped ones (the default) it starts where the guard held the steps, 0.02, so the
    same norms are spikes and stay at that scale: the price of never starting from an exploding scale."""
    p = torch.nn.Parameter(torch.ones(4))  # parameter norm 2; at lr 0.1 the guard is 1e-3 x 2 / 0.1 = 0.02
    clipper = guarded_clipper("zclip", [("w", p)], lr=0.1, warmup_steps=3, clipped_warmup=clipped_warmup)
    after = []
    for _ in range(5):
        p.grad = torch.full((4,), 0.5)  # norm 1.0 every step
        clipper.step()
        after.append(round(float(p.grad.norm()), 6))
    assert after == [0.02, 0.02, 0.02, after_warmup, after_warmup]


@pytest.mark.parametrize(
    ("warmup_threshold", "kept"), [("min", 1.05 * 0.05), ("ema", 1.05 * (0.98**70 * 0.05 + 1 - 0.98**70))]
)
def test_adagc_after_a_quiet_start_clips_to_the_warmup_scale_only_with_the_papers_minimum(warmup_threshold, kept):
    """A tensor quiet for the first 30 of 100 warmup steps (norm 0.05) whose norm then grows to 1.0: the paper's
    minimum starts its threshold at 0.05, so the first step after warmup keeps 5% of the gradient; the EMA (the
    default) starts it at 0.77 (0.98**70 of the weight left on the quiet stretch), so the step keeps 81%."""
    param = torch.nn.Parameter(torch.zeros(4))
    method = methods.AdaGC(lambda_abs=1e6, warmup_threshold=warmup_threshold)  # the warmup clips nothing here
    clipper = Clipper(method, [("w", param)], nonfinite="ignore")
    for step in range(101):
        param.grad = torch.full((4,), (0.05 if step < 30 else 1.0) / 2.0)  # norm 0.05, then 1.0
        clipper.step()
    assert float(param.grad.norm()) == pytest.approx(kept, rel=1e-5)


@pytest.mark.parametrize(
    ("method", "params"),
    [
        ("autoclip", {}),
        ("autoclip", {"percentile": 50.0, "clipped_history": True}),
        ("zclip", {"warmup_steps": 4}),
        ("zclip", {"warmup_steps": 4, "clipped_warmup": True}),
        ("adagc", {"warmup_steps": 4, "lambda_abs": 2.0}),
        ("adagc", {"warmup_steps": 4, "lambda_abs": 2.0, "warmup_threshold": "min"}),
    ],
)
def test_steps_whose_gradients_are_all_zero_change_no_state(method, params):
    """Gradients that are all exactly 0 (a loss that does not depend on the parameters yet, a masked batch) say
    nothing of the norms' scale. Entered, they set thresholds of 0 (ZClip's mean and spread, AutoClip's percentile,
    AdaGC's minimum or EMA), and since the statistics then hold clipped norms of 0, every later step was clipped to
    nothing: training stopped for good, silently. The same norms with and without 30 zero steps before and 5 within
    give the same clipped norms and the same state."""
    if method == "adagc":
        params = {**params, "warmup_update_ratio": 0.0}
    norms = NORMS + NORMS
    zeros = [0.0] * 30 + norms[:10] + [0.0] * 5 + norms[10:]
    plain, plain_policy = run_global(method, norms, **params)
    with_zeros, policy = run_global(method, zeros, **params)
    assert [n for n in with_zeros if n > 0] == pytest.approx(plain, rel=1e-6)
    assert len([n for n in with_zeros if n > 0]) == len(norms)
    for key, value in plain_policy.state_dict().items():
        torch.testing.assert_close(policy.state_dict()[key], value, equal_nan=True, msg=key)


@pytest.mark.parametrize("method", ["autoclip", "zclip", "adagc"])
def test_the_defaults_clip_the_first_steps_that_learn_after_zero_gradients_to_a_useful_scale(method):
    """With the defaults (the warmup guard, statistics of clipped norms) after 40 steps of zero gradients: the steps
    after are clipped at most to the guard's scale, never to 0."""
    p = torch.nn.Parameter(torch.ones(16))
    clipper = Clipper(methods.from_arguments(method, {}), [("w", p)], optimizer=torch.optim.SGD([p], lr=1e-3))
    after = []
    for step in range(140):
        p.grad = torch.zeros(16) if step < 40 else torch.full((16,), 0.25)  # L2 norm 1, the guard's 1e-3 x 4 / 1e-3
        clipper.step()
        if step >= 40:
            after.append(float(p.grad.norm()))
    assert min(after) > 0.9


def test_adagc_starts_a_tensor_whose_gradient_was_zero_through_the_warmup_at_its_first_norm():
    """A tensor whose gradient is exactly 0 while others' are not (a branch not used yet) is treated as one without a
    gradient: its threshold stays unset, not 0, and starts from its first norm after the warmup, unclipped."""
    used, unused = torch.nn.Parameter(torch.zeros(4)), torch.nn.Parameter(torch.zeros(4))
    method = methods.AdaGC(warmup_steps=3, lambda_abs=10.0)
    clipper = Clipper(method, [("used", used), ("unused", unused)], nonfinite="ignore")
    for step in range(8):
        used.grad = torch.full((4,), 0.5)
        unused.grad = torch.zeros(4) if step < 6 else torch.full((4,), 1.5)  # norm 3
        clipper.step()
    assert float(unused.grad.norm()) == pytest.approx(3.0)  # its first norm at step 6, unclipped; then 3 < 1.05 x 3
    assert clipper.policy.gamma[1].item() == pytest.approx(3.0)


def test_autoclip_with_its_clipped_history_never_raises_the_threshold_while_the_papers_follows_rising_norms():
    """The default's documented price (README, "Statistics of the norms the optimizer used"): each norm enters the
    history clipped to the threshold, so the percentile never rises above what the first steps set; a history of raw
    norms (the paper) follows norms that rise 10x over the run (lagging: the 10th percentile of a ramp is its value a
    tenth of the way in). 3000-step runs of the study's SGD tasks favour the first (README)."""
    norms = [1.0 + t / 60.0 for t in range(600)]
    clipped, _ = run_global("autoclip", norms, clipped_history=True)
    raw, _ = run_global("autoclip", norms)
    assert max(clipped[25:]) <= max(clipped[:25]) * (1 + 1e-6)
    assert raw[-1] == pytest.approx(autoclip_reference(norms, 10.0, 1000)[-1], rel=1e-5) and raw[-1] > 1.9
