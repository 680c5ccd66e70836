"""Where sharded norms are reduced (the reductions themselves run in tests/distributed, with 2 processes)."""

import pytest
import torch

from lightning_clip.sharding import collective_device


def test_gloo_reduces_where_the_gradients_are():
    assert collective_device("gloo", torch.device("cpu")) == torch.device("cpu")


@pytest.mark.cuda
def test_nccl_reduces_offloaded_gradients_on_this_ranks_gpu():
    gpu = torch.device("cuda", torch.cuda.current_device())
    assert collective_device("nccl", torch.device("cpu")) == gpu
    assert collective_device("nccl", gpu) == gpu
