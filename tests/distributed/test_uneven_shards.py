"""Clipping of unevenly sharded DTensor gradients, small and large (2 processes, gloo), equals the single-process
result."""

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
    differences = torch.load(out)
    assert set(differences) == {"agc", "tensor_norm", "adagc", "norm", "value"}
    for method, difference in differences.items():
        assert difference < 1e-5, (method, difference)
