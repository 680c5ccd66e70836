"""Clipping of unevenly sharded DTensor gradients, small and large (2 processes, gloo), equals the single-process
result, and so do the clip rates both ranks record; a NaN in one rank's shard of a parameter stops both ranks alike."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.distributed


def test_unevenly_sharded_small_and_large_tensors_clip_as_in_one_process(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "differences.pt"
    result = subprocess.run(
        [sys.executable, str(Path(__file__).with_name("uneven_shards.py")), str(out)],
        env={**os.environ, "UNEVEN_PORT": str(port)},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    results = torch.load(out)
    differences, rates = results["differences"], results["rates"]
    assert set(differences) == {"agc", "tensor_norm", "adagc", "norm", "value"}
    for method, difference in differences.items():
        assert difference < 1e-5, (method, difference)
    for method, rate in rates.items():
        assert rate["ranks"] == [rate["one process"]] * 2, (method, rate)
    assert rates["agc"]["one process"][-1] > 0  # the last step's one large row on rank 1 is clipped
    first, second = results["nonfinite parameter"]
    assert first == second and first.startswith("non-finite parameters (NaN/Inf) at optimizer step 1: layer5.weight. ")
