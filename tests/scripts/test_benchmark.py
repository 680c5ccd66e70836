"""The benchmark's memory instrument, on allocations of known size."""

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "scripts"))
from benchmark import peak_extra_bytes  # noqa: E402


def test_peak_extra_bytes_sees_temporaries_freed_before_the_call_returns():
    params = [torch.nn.Parameter(torch.zeros(1000, 250)) for _ in range(4)]  # 1 MB of fp32 gradients each

    def two_temporaries_at_once():
        first = [p.grad * 2 for p in params[:2]]
        second = [p.grad * 3 for p in params[2:]]
        del first, second

    def one_at_a_time():
        for p in params:
            (p.grad * 2).sum()

    assert 4_000_000 <= peak_extra_bytes(two_temporaries_at_once, params) < 4_100_000
    assert 1_000_000 <= peak_extra_bytes(one_at_a_time, params) < 1_100_000
    assert peak_extra_bytes(lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True), params) < 10_000
