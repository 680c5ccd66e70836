"""The adaptive policies' one-kernel step (``threshold_kernels.py``) against their PyTorch code: two clippers on the
same gradients, one with the kernels and one without, step by step, every option that changes the kernels' code,
every way a step can be non-finite, and every path of the clipper. On a GPU (``cuda`` tests) and on CPU under
Triton's interpreter where Triton is installed (CI has no Triton: that test skips there; the policies' own tests in
``test_thresholds.py`` check the PyTorch code against the papers' formulas)."""

import math
import warnings

import pytest
import torch

from helpers import HAS_TRITON, Uncompilable, counted_launches, run_under_triton_interpreter
from lightning_clip import kernels, methods, threshold_kernels
from lightning_clip.clipper import Clipper

SHAPES = [(7,), (5, 3), (4, 3, 3, 3), (6, 1), (2, 3, 5)]
LOW_PRECISION = 2  # this tensor is bf16: its run comes after the float32 ones, so the policy state is gathered

CASES = [
    ("autoclip", {}),
    ("autoclip", {"percentile": 50.0, "window": 7, "warmup_steps": 3}),
    ("autoclip", {"percentile": 100.0, "window": 3, "clipped_history": False, "warmup_update_ratio": 0.0}),
    ("zclip", {"warmup_steps": 4}),
    ("zclip", {"warmup_steps": 4, "mode": "percentile", "clipped_warmup": False}),
    ("zclip", {"warmup_steps": 3, "clip_option": "mean", "freeze_on_spike": True, "threshold_cap": 14.0}),
    (
        "zclip",
        {"warmup_steps": 5, "threshold_scale": 0.8, "z_thresh": 1.5, "warmup_update_ratio": 0, "threshold_cap": 10},
    ),
    ("adagc", {"warmup_steps": 4}),
    ("adagc", {"warmup_steps": 4, "lambda_abs": 1.0, "warmup_threshold": "min"}),
    ("adagc", {"warmup_steps": 3, "warmup_update_ratio": 0.0, "exclude": ["layer1*"]}),
]
MODES = ("ignore", "skip", "scaler", "fused")
STEPS = 36


def scale_at(step: int) -> float:
    """The gradients' scale: a slow wave with spikes (x30, x200) that the adaptive policies must catch."""
    return {12: 30.0, 25: 200.0}.get(step, 1.0 + 0.3 * math.sin(step))


def make_params(device: str) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(0)
    params = []
    for i, shape in enumerate(SHAPES):
        dtype = torch.bfloat16 if i == LOW_PRECISION else torch.float32
        params.append(torch.nn.Parameter(torch.randn(shape, generator=gen).to(device, dtype)))
    return params


def set_grads(params, step: int, gen: torch.Generator) -> None:
    for i, p in enumerate(params):
        if i == 4 and step < 3:  # a tensor with no gradient at first: AdaGC's thresholds grow when it appears
            p.grad = None
            continue
        grad = torch.randn(p.shape, generator=gen) * scale_at(step)
        if step in (5, 6) or (step == 20 and i == 3):  # every gradient 0 (no scale: nothing enters), one tensor's 0
            grad = torch.zeros(p.shape)
        if step == 8 and i == 1:
            grad[0, 0] = math.nan  # in the tensor that one case excludes: only the guard sees it
        if step == 18 and i == 0:
            grad[3] = math.inf
        if step == 30:
            grad = grad * 1e30  # the global norm overflows float32
        p.grad = grad.to(p.device, p.dtype)


def clipper_for(method, params, mode, device):
    fused = mode == "fused"
    # at this rate the warmup guard (1e-3 of the parameters' norm over the rate) is about the gradients' norm
    optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True) if fused else torch.optim.SGD(params, lr=1e-3)
    names = [f"layer{i}.weight" for i in range(len(params))]
    return Clipper(
        method,
        zip(names, params),
        optimizer=optimizer,
        nonfinite="ignore" if mode == "ignore" else "skip",
        scaler_checks_nonfinite=mode == "scaler",
        fused=fused or None,
    )


def assert_close(actual, expected, what):
    torch.testing.assert_close(actual, expected, rtol=2e-5, atol=1e-6, equal_nan=True, msg=lambda m: f"{what}: {m}")


def compare(name: str, params: dict, mode: str, device: str) -> int:
    """Run one case both ways; returns how many steps the kernel took."""
    method = methods.from_arguments(name, dict(params))
    if mode == "fused" and name == "adagc":
        return -1  # per-tensor thresholds have no fused path
    ours_params, reference_params = make_params(device), make_params(device)
    ours = clipper_for(method, ours_params, mode, device)
    reference = clipper_for(method, reference_params, mode, device)
    with counted_launches() as launched:
        for step in range(STEPS):
            set_grads(ours_params, step, torch.Generator().manual_seed(step))
            set_grads(reference_params, step, torch.Generator().manual_seed(step))
            record = step % 3 == 0
            with warnings.catch_warnings():  # a kernel that fails falls back with a warning: not here
                warnings.filterwarnings("error", message="lightning_clip: the Triton")
                ours_record = ours.step(record=record)
            kernels.ENABLED = False
            try:
                reference_record = reference.step(record=record)
            finally:
                kernels.ENABLED = True
            what = f"{name} {params} {mode} step {step}"
            assert (ours_record is None) == (reference_record is None), what
            if record and ours_record is not None:
                assert_close(ours_record.grad_norms, reference_record.grad_norms, what + " grad norms")
                assert_close(ours_record.clipped_norms, reference_record.clipped_norms, what + " clipped norms")
                assert_close(ours_record.threshold, reference_record.threshold, what + " reported threshold")
            for p, q in zip(ours_params, reference_params):
                assert (p.grad is None) == (q.grad is None), what
                if p.grad is not None:  # bf16: one unit in the last place (Triton's interpreter truncates)
                    rtol = 2**-7 if p.dtype == torch.bfloat16 else 2e-5
                    torch.testing.assert_close(p.grad.float(), q.grad.float(), rtol=rtol, atol=1e-6, equal_nan=True)
            saved, expected = ours.policy.state_dict(), reference.policy.state_dict()
            assert saved.keys() == expected.keys(), what
            for key in saved:
                assert saved[key].device.type == "cpu", what
                assert_close(saved[key].to(expected[key].dtype), expected[key], f"{what} state {key}")
            if step == 10:  # a saved state is a copy: the kernel's in-place updates leave it alone
                kept = {key: value.clone() for key, value in saved.items()}
                held = saved
        for key in kept:
            torch.testing.assert_close(held[key], kept[key], equal_nan=True, rtol=0, atol=0)
    return len(launched) - launched.count("scaling")


def check_policies(device: str) -> None:
    """Every case in every mode: the same gradients, records and states as the PyTorch code, and the kernel ran on
    every step that reached the policy."""
    for name, params in CASES:
        for mode in MODES:
            taken = compare(name, params, mode, device)
            assert taken != 0, f"{name} {params} {mode}: the kernel never ran"
    if device == "cuda":  # the steps after the first launched the compiled kernels directly (kernels.launch)
        assert kernels._COMPILED or not kernels._relaunches()


def check_spike_skipping(device: str) -> None:
    """The spike skipper's kernel against its PyTorch code (``spikes.py``): two clippers with ``skip_spikes`` on the
    same gradients, on the host-read path and the fused-optimizer path: spikes (skipped, and named by the tensor that
    grew most against its level), NaN and an overflowing norm (not entered), a tensor that gains its first gradient
    late (the levels start again), steps whose gradients are all 0 (not entered); the same skips, names, gradients
    and saved state at every step."""
    for mode in ("skip", "fused"):
        ours_params, reference_params = make_params(device), make_params(device)
        clippers = []
        for params in (ours_params, reference_params):
            fused = mode == "fused"
            optimizer = torch.optim.AdamW(params, lr=1e-3, fused=True) if fused else torch.optim.SGD(params, lr=1e-3)
            names = [f"layer{i}.weight" for i in range(len(params))]
            clippers.append(Clipper(methods.Norm(max_norm=50.0), zip(names, params), optimizer=optimizer,
                                    skip_spikes=3.0, spike_window=24, fused=fused or None))  # fmt: skip
        ours, reference = clippers
        with counted_launches() as launched:
            for step in range(48):
                scale = {24: 2.5, 28: 40.0, 35: 80.0, 42: 8.0}.get(step, 1.0 + 0.2 * math.sin(step))
                for params in (ours_params, reference_params):
                    set_grads(params, step, torch.Generator().manual_seed(step))
                    for p in params:
                        if p.grad is not None and step not in (8, 18, 30):
                            p.grad.mul_(scale / scale_at(step))
                record = step % 5 == 0
                ours.step(record=record)
                kernels.ENABLED = False
                try:
                    reference.step(record=record)
                finally:
                    kernels.ENABLED = True
                what = f"{mode} step {step}"
                assert ours.spike_skipped_steps == reference.spike_skipped_steps, what
                assert (ours.last_spike is None) == (reference.last_spike is None), what
                if ours.last_spike is not None:
                    assert ours.last_spike.tensor == reference.last_spike.tensor, what
                    assert math.isclose(ours.last_spike.ratio, reference.last_spike.ratio, rel_tol=1e-5), what
                for p, q in zip(ours_params, reference_params):
                    assert (p.grad is None) == (q.grad is None), what
                saved, expected = ours.spikes.state_dict(), reference.spikes.state_dict()
                for key in saved:
                    assert_close(saved[key].to(expected[key].dtype), expected[key], f"{what} spike state {key}")
                if step == 10:
                    kept, held = saved["history"].clone(), saved["history"]
            torch.testing.assert_close(held, kept, equal_nan=True, rtol=0, atol=0)  # a saved state is a copy
        assert launched.count("spike-skipping") == 48, mode
        ours.flush(), reference.flush()  # the fused path counts its skips on the device
        assert ours.skipped_steps == reference.skipped_steps >= 4, mode  # two spikes, NaN, the overflow
        assert mode == "fused" or reference.spike_skipped_steps >= 3  # 24 (x2.5 the level), 28, 35


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_policy_kernels_match_the_pytorch_code_on_cuda():
    check_policies("cuda")
    check_spike_skipping("cuda")


@pytest.mark.skipif(not HAS_TRITON, reason="Triton is not installed")
def test_policy_kernels_under_the_triton_interpreter_match_the_pytorch_code():
    checks = "t.check_spike_skipping('cpu'); t.check_policies('cpu')"
    run_under_triton_interpreter(f"import test_threshold_kernels as t; {checks}")


def test_no_kernel_on_cpu_without_the_interpreter(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not threshold_kernels.applies(torch.zeros(()))


def test_a_policy_kernel_that_cannot_compile_falls_back_with_one_warning(monkeypatch):
    """A GPU that Triton cannot compile for: the first launch fails before anything is written, the step takes the
    PyTorch code (the same thresholds and state as a clipper that never tried), one warning says so."""

    class FakeTriton:  # Triton need not be installed: the first launch fails before Triton would be needed
        next_power_of_2 = staticmethod(lambda n: 1 << (n - 1).bit_length())

    monkeypatch.setenv("TRITON_INTERPRET", "1")  # lets the kernels take CPU tensors
    monkeypatch.setattr(kernels, "ENABLED", True)
    monkeypatch.setattr(kernels, "_FAILED", set())
    monkeypatch.setattr(kernels, "_kernel", lambda: Uncompilable())
    monkeypatch.setattr(threshold_kernels, "triton", FakeTriton)
    monkeypatch.setattr(threshold_kernels, "_zclip", Uncompilable(), raising=False)
    params, expected_params = make_params("cpu"), make_params("cpu")
    method = methods.ZClip(warmup_steps=2)
    ours, expected = clipper_for(method, params, "ignore", "cpu"), clipper_for(method, expected_params, "ignore", "cpu")
    for step in range(4):
        set_grads(params, step + 3, torch.Generator().manual_seed(step))
        set_grads(expected_params, step + 3, torch.Generator().manual_seed(step))
        if step == 0:
            with pytest.warns(UserWarning, match="Triton ZClip kernel cannot run here"):
                ours.step()
        else:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # not tried again
                ours.step()
        assert kernels._FAILED == {"ZClip"}
        expected.step()  # not tried again: the same PyTorch code
        for p, q in zip(params, expected_params):
            torch.testing.assert_close(p.grad, q.grad)
    for key, value in ours.policy.state_dict().items():
        torch.testing.assert_close(value, expected.policy.state_dict()[key])
