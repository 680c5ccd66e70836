"""Shared test helpers: parameter sets with gradients, and references computed another way."""

from __future__ import annotations

import contextlib
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import torch

from lightning_clip import kernels
from lightning_clip.operators import ClipOperator
from lightning_clip.params import ParamSet
from lightning_clip.thresholds import ThresholdPolicy

sys.path.insert(0, str(Path(__file__).parents[1] / "scripts"))
from benchmark import timm_adaptive_clip_grad as timm_style_agc  # noqa: E402, F401  (the benchmark's reference loop)

SHAPES = [(7,), (5, 3), (4, 3, 3, 3), (1,), (6, 1), (2, 3, 5)]


def make_params(shapes=SHAPES, seed=0, dtype=torch.float32, grad_scale=1.0, zero_params=(3,)):
    """Parameters of several shapes (1-D, matrices, conv kernels, some zero-initialised) with random gradients."""
    gen = torch.Generator().manual_seed(seed)
    params = []
    for i, shape in enumerate(shapes):
        data = torch.zeros(shape) if i in zero_params else torch.randn(shape, generator=gen)
        p = torch.nn.Parameter(data.to(dtype))
        p.grad = (torch.randn(shape, generator=gen) * grad_scale).to(dtype)
        params.append(p)
    return params


def named(params, prefix="layer"):
    """``(name, parameter)`` pairs, as ``Clipper`` takes them."""
    return [(f"{prefix}{i}.weight", p) for i, p in enumerate(params)]


def clone_grads(params):
    return [p.grad.detach().clone() for p in params]


@torch.no_grad()  # as Clipper.step: the parameters are read as they are, not detached
def apply(policy: ThresholdPolicy, operator: ClipOperator, params, names=None, exclude=()):
    """Clip ``params``' gradients in place with one (policy, operator) pair."""
    names = names or [name for name, _ in named(params)]
    layout = ParamSet(names, params, exclude=exclude).layout()
    grads = layout.grads()
    measured = operator.measure(layout, grads)
    operator.apply(layout, grads, measured, policy.threshold(layout, measured))
    return layout


def unitwise_norm64(x: torch.Tensor) -> torch.Tensor:
    x = x.double()
    if x.ndim <= 1:
        return torch.linalg.vector_norm(x)
    return torch.linalg.vector_norm(x, dim=tuple(range(1, x.ndim)), keepdim=True)


def agc_reference(params, clip_factor, eps, excluded=()):
    """The AGC formula of Brock et al. 2021 (eq. 3) in float64: G <- lambda * |W|*/|G| * G if |G|/|W|* > lambda."""
    out = []
    for i, p in enumerate(params):
        g = p.grad.double()
        if i in excluded:
            out.append(g)
            continue
        w_norm = unitwise_norm64(p.detach()).clamp(min=eps)
        g_norm = unitwise_norm64(g)
        ratio = g_norm / w_norm
        out.append(torch.where(ratio > clip_factor, g * clip_factor * w_norm / g_norm, g))
    return out


class HostReads:
    """Counts device-to-host reads: ``aten._local_scalar_dense`` (``.item()``, ``bool(t)``) seen by a
    ``TorchDispatchMode``, plus ``Tensor.tolist`` / ``.cpu`` / ``.numpy``, which it does not see, patched."""

    def __init__(self):
        self.count = 0

    def __enter__(self):
        from torch.utils._python_dispatch import TorchDispatchMode

        counter = self

        class _Mode(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                if func is torch.ops.aten._local_scalar_dense.default:
                    counter.count += 1
                return func(*args, **(kwargs or {}))

        self._patched = {}
        for name in ("tolist", "cpu", "numpy"):
            original = getattr(torch.Tensor, name)
            self._patched[name] = original

            def wrapper(tensor, *args, _original=original, **kwargs):
                counter.count += 1
                with _paused(self._mode):
                    return _original(tensor, *args, **kwargs)

            setattr(torch.Tensor, name, wrapper)
        self._mode = _Mode()
        self._mode.__enter__()
        return self

    def __exit__(self, *exc):
        self._mode.__exit__(*exc)
        for name, original in self._patched.items():
            setattr(torch.Tensor, name, original)


class _paused:
    """Runs a patched read without the dispatch mode also counting the ``_local_scalar_dense`` it may issue."""

    def __init__(self, mode):
        self.mode = mode

    def __enter__(self):
        from torch.utils._python_dispatch import _pop_mode_temporarily

        self._ctx = _pop_mode_temporarily()
        self._ctx.__enter__()

    def __exit__(self, *exc):
        self._ctx.__exit__(*exc)


#: Whether Triton is installed: then the kernels can run on CPU under its interpreter.
HAS_TRITON = importlib.util.find_spec("triton") is not None


@contextlib.contextmanager
def counted_launches():
    """The ``what`` of every Triton launch while the block runs, in order."""
    launched, launch = [], kernels.launch

    def counting(kernel, programs, device, what, *args, **constants):
        launched.append(what)
        return launch(kernel, programs, device, what, *args, **constants)

    kernels.launch = counting
    try:
        yield launched
    finally:
        kernels.launch = launch


class Uncompilable:
    """Stands for a Triton kernel that cannot be compiled for this GPU: its launch raises, before writing anything."""

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            raise RuntimeError("no compiler for this device")

        return launch


def run_under_triton_interpreter(code: str) -> None:
    """Run ``code`` in a fresh process from ``tests/`` where Triton interprets its kernels on CPU
    (``TRITON_INTERPRET=1`` is read once, at import); fails with the process's error output."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    here = os.path.dirname(__file__)
    result = subprocess.run([sys.executable, "-c", code], cwd=here, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-3000:]
