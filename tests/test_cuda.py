"""On a CUDA GPU (skipped without one): FSDP1 against a plain run, the fused-optimizer path, SPAM, host syncs, and the
Triton scaling kernel against the foreach path. This module imports neither W&B nor Hydra, so it runs where only torch
and Lightning are installed."""

import pytest
import torch
from lightning.pytorch.strategies import FSDPStrategy

from lightning_clip import SPAM, Clipper, GradientClipping, kernels, methods
from models import TinyModule, assert_same_finite_norms, fsdp1_against_plain, loader

pytestmark = pytest.mark.cuda


@pytest.mark.parametrize("precision", ["32-true", "16-mixed"])
def test_fsdp1_on_cuda_matches_a_single_device_run(precision):
    """Lightning's own FSDPStrategy on one GPU (fp16: its ShardedGradScaler, at GradScaler's default scale, whose
    first steps overflow) against the same run without FSDP, per step from the first, same batches."""
    (sharded, clipping), (plain, _) = fsdp1_against_plain(
        "cuda", FSDPStrategy(auto_wrap_policy={torch.nn.Linear}), precision=precision
    )
    rtol, least = (1e-5, 16) if precision == "32-true" else (1e-2, 8)
    assert_same_finite_norms(sharded, plain, rtol=rtol, least=least)
    assert clipping.judged_steps > 0


def cuda_run(fused, method="norm", precision="32-true", **kwargs):
    import lightning.pytorch as pl

    class Adam(TinyModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=0.01, fused=fused)

    model, clipping = Adam(), GradientClipping(method, log_every_n_steps=2, **kwargs)
    pl.Trainer(
        accelerator="cuda",
        devices=1,
        precision=precision,
        callbacks=[clipping],
        max_epochs=3,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    ).fit(model, loader())
    return model, clipping


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize("method", ["norm", "zclip"])
def test_fused_path_on_cuda_equals_clip_then_step(method, precision):
    (folded, clipping), (plain, _) = cuda_run(True, method, precision), cuda_run(False, method, precision)
    assert clipping.clippers[0].fused
    for a, b in zip(folded.parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_spam_on_cuda_matches_cpu():
    gen = torch.Generator().manual_seed(0)
    grads = [torch.randn(64, 32, generator=gen) * 10, torch.randn(32, generator=gen)]
    moments = [torch.rand(64, 32, generator=gen) * 1e-2, torch.rand(32, generator=gen) * 1e-2]
    moments[0][0, 0] = 0.0
    out = {}
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(torch.zeros_like(g, device=device)) for g in grads]
        optimizer = torch.optim.Adam(params)
        for p, g, v in zip(params, grads, moments):
            p.grad, optimizer.state[p]["exp_avg_sq"] = g.to(device), v.to(device)
        Clipper(SPAM(theta=50.0, warmup_steps=1), zip("ab", params), optimizer=optimizer, nonfinite="ignore").step()
        out[device] = [p.grad.cpu() for p in params]
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(a, b)


def steps_without_a_sync(clipper, steps=3):
    """One step to build the layout, then ``steps`` steps during which any host sync raises."""
    clipper.step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(steps):
            clipper.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.parametrize(
    ("method", "kwargs"),
    [
        ("norm", {}),
        ("agc", {}),
        ("autoclip", {}),
        ("zclip", {}),
        ("adagc", {}),
        ("tensor_norm", {"max_norm": 1.0}),
        ("value", {"clip_value": 0.1}),
        ("spam", {"warmup_steps": 1}),
    ],
)
def test_no_host_sync_with_ignore_on_cuda(method, kwargs):
    params = [torch.nn.Parameter(torch.randn(256, 256, device="cuda")) for _ in range(8)]
    for p in params:
        p.grad = torch.randn_like(p)
    if method == "spam":  # Adam's second moments, from one step
        optimizer = torch.optim.Adam(params, lr=1e-3)
        optimizer.step()
    else:
        optimizer = torch.optim.SGD(params, lr=0.1)  # the adaptive methods read its rate: a host float, no sync
    method = methods.from_arguments(method, kwargs)
    clipper = Clipper(method, zip(map(str, range(8)), params), optimizer=optimizer, nonfinite="ignore")
    steps_without_a_sync(clipper)


@pytest.mark.parametrize(("method", "kwargs"), [("tensor_norm", {"max_norm": 1.0}), ("agc", {}), ("adagc", {})])
def test_per_tensor_scaling_on_cuda_matches_cpu(method, kwargs):
    """Per-tensor factors on CUDA give CPU's gradients, and a tensor under its own limit is left bit for bit as it
    was (AdaGC's first step is a global clip, which scales every tensor)."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(64, 32), (32,), (16, 8, 3, 3), (8,)]
    grads = [torch.randn(s, generator=gen) * (10.0 if i % 2 == 0 else 1e-3) for i, s in enumerate(shapes)]
    out = {}
    for device in ("cpu", "cuda"):
        params = [torch.nn.Parameter(torch.ones(s, device=device)) for s in shapes]
        optimizer = torch.optim.SGD(params, lr=0.1)
        method_object = methods.from_arguments(method, kwargs)
        clipper = Clipper(method_object, zip("abcd", params), optimizer=optimizer, nonfinite="ignore")
        for step in range(3):
            for p, g in zip(params, grads):
                p.grad = g.to(device) * (step + 1)
            clipper.step()
        out[device] = [p.grad.cpu() for p in params]
    for a, b in zip(out["cpu"], out["cuda"]):
        torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-7)
    if method != "adagc":
        assert torch.equal(out["cuda"][3], grads[3] * 3)  # 1e-3 scale: never clipped
    assert not torch.equal(out["cuda"][0], grads[0] * 3)  # 10x scale: clipped


@pytest.mark.parametrize("method", ["agc", "zclip", "adagc"])
def test_a_learning_rate_held_on_the_gpu_is_read_without_a_sync(method):
    """A rate held in a CUDA tensor (capturable and fused optimizers allow it): AGC's cap and the warmup caps are
    computed on the device, with the rate of a float group beside it."""
    params = [torch.nn.Parameter(torch.randn(64, 64, device="cuda")) for _ in range(4)]
    optimizer = torch.optim.SGD([{"params": params[:2], "lr": 0.1}, {"params": params[2:], "lr": 0.1}])
    optimizer.param_groups[1]["lr"] = torch.tensor(0.3, device="cuda")
    clipper = Clipper(methods.from_arguments(method, {}), zip("abcd", params), optimizer=optimizer, nonfinite="ignore")
    for p in params:
        p.grad = torch.randn_like(p) * 100
    steps_without_a_sync(clipper)
    assert all(torch.isfinite(p.grad).all() for p in params)


@pytest.mark.parametrize("method", ["tensor_norm", "agc", "adagc"])
def test_scaling_kernel_takes_new_gradients_each_step_without_a_sync(method):
    """Gradients at new addresses every step (as when the optimizer sets them to None): the kernel's address table
    is rebuilt through pinned memory, with no host sync, and the result is the foreach path's."""
    shapes = [(300, 40), (40,), (7, 3, 3, 3), (1000,)] * 3
    runs = {}
    for enabled in (True, False):
        kernels.ENABLED = enabled
        try:
            params = [torch.nn.Parameter(torch.ones(s, device="cuda")) for s in shapes]
            optimizer = torch.optim.SGD(params, lr=0.1)
            kwargs = {"max_norm": 1.0} if method == "tensor_norm" else {}
            engine = Clipper(methods.from_arguments(method, kwargs), zip(map(str, range(len(params))), params),
                             optimizer=optimizer, nonfinite="ignore")  # fmt: skip
            gen = torch.Generator(device="cuda").manual_seed(0)
            grads = []
            for step in range(4):
                for p in params:
                    p.grad = torch.randn(p.shape, device="cuda", generator=gen) * 10.0 ** (step % 3 - 1)
                if step == 1 and enabled:
                    torch.cuda.synchronize()
                    torch.cuda.set_sync_debug_mode("error")
                engine.step()
                grads.append([p.grad.clone() for p in params])
            torch.cuda.set_sync_debug_mode("default")
        finally:
            kernels.ENABLED = True
            torch.cuda.set_sync_debug_mode("default")
        plans = engine.params.layout().kernel_plans.values()
        assert all(plan is not None for plan in plans) == enabled
        runs[enabled] = grads
    for with_kernel, with_foreach in zip(runs[True], runs[False]):
        for a, b in zip(with_kernel, with_foreach):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_scaling_kernel_matches_the_foreach_path_on_a_transformer_layout(dtype):
    """GPT-2-shaped tensors (embeddings, qkv, MLP, LayerNorms; two blocks) with AGC, AdaGC and tensor_norm over steps,
    the Triton kernels against the foreach path: equal in fp32, within one bf16 rounding in bf16. AdaGC's thresholds
    come from its own kernel on one side (``threshold_kernels.py``), which rounds its EMA differently (fused
    multiply-adds), and AGC's unit norms from the unit-norm kernel, which sums in another order: within float32
    rounding there."""
    block = [(64,), (64,), (192, 64), (192,), (64, 64), (64,), (64,), (64,), (256, 64), (256,), (64, 256), (64,)]
    shapes = [(5000, 64), (128, 64)] + block * 2
    for method in ("agc", "adagc", "tensor_norm"):
        out = {}
        for enabled in (True, False):
            kernels.ENABLED = enabled
            try:
                gen = torch.Generator(device="cuda").manual_seed(1)
                params = [
                    torch.nn.Parameter(0.02 * torch.randn(s, device="cuda", generator=gen).to(dtype)) for s in shapes
                ]
                kwargs = {"tensor_norm": {"max_norm": 0.01}, "adagc": {"warmup_steps": 1}}.get(method, {})
                engine = Clipper(methods.from_arguments(method, kwargs), zip(map(str, range(len(params))), params),
                                 optimizer=torch.optim.SGD(params, lr=0.1), nonfinite="ignore")  # fmt: skip
                for step in range(3):
                    for p in params:
                        p.grad = (torch.randn(p.shape, device="cuda", generator=gen) * (1 + 5 * step)).to(dtype)
                    engine.step()
            finally:
                kernels.ENABLED = True
            out[enabled] = [p.grad for p in params]
        tolerance = {"rtol": 0, "atol": 0} if dtype == torch.float32 else {"rtol": 2**-7, "atol": 0}
        if method in ("adagc", "agc") and dtype == torch.float32:
            tolerance = {"rtol": 1e-6, "atol": 0}
        for a, b in zip(out[True], out[False]):
            torch.testing.assert_close(a, b, **tolerance)


@pytest.mark.parametrize("method", ["agc", "adagc"])
def test_trainer_run_with_the_scaling_kernel_equals_one_without(method, monkeypatch):
    """A Lightning run on the GPU (bf16-mixed, AdamW) with per-tensor or unit-wise factors: the same parameters
    whether the factors are applied by the Triton kernel (every step) or by the foreach kernels."""
    launches = []
    multiply = kernels.multiply_

    def counted(plan, tensors, factors):
        launches.append(multiply(plan, tensors, factors))
        return launches[-1]

    monkeypatch.setattr(kernels, "multiply_", counted)
    with_kernel, _ = cuda_run(False, method, "bf16-mixed")
    assert launches and all(launches)
    monkeypatch.setattr(kernels, "ENABLED", False)
    count = len(launches)
    without_kernel, _ = cuda_run(False, method, "bf16-mixed")
    assert len(launches) == count
    for a, b in zip(with_kernel.parameters(), without_kernel.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)
