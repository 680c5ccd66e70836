import gc
import random
import tracemalloc

import pytest
import torch

from lightning_clip import methods
from lightning_clip.clipper import Clipper
from lightning_clip.params import LAYOUTS_KEPT, ParamSet, clean_name, matches_any, name_params, optimizer_params
from lightning_clip.stats import LayerGrouping, LayerStats


def test_clean_name_drops_wrapper_components():
    assert clean_name("_orig_mod.encoder.0.weight") == "encoder.0.weight"
    assert clean_name("_fsdp_wrapped_module.layers.1._checkpoint_wrapped_module.w") == "layers.1.w"
    assert clean_name("module.weight") == "module.weight"  # a user's own module called "module" stays


def test_patterns_match_parameter_or_owning_module():
    assert matches_any("head.weight", ["head"])
    assert matches_any("head.bias", ["head.*"])
    assert matches_any("blocks.3.norm.weight", ["*.norm"])
    assert not matches_any("header.weight", ["head"])


def test_names_follow_compile_and_optimizer_order():
    model = torch.nn.Sequential(torch.nn.Linear(2, 3), torch.nn.Linear(3, 1))
    compiled = torch.compile(model)
    optimizer = torch.optim.SGD([{"params": [model[1].weight]}, {"params": [model[0].bias]}], lr=0.1)
    params = optimizer_params(optimizer)
    assert name_params(params, compiled) == ["1.weight", "0.bias"]
    assert name_params([torch.nn.Parameter(torch.zeros(1))], model) == ["param_0"]


def test_layout_skips_params_without_grad_and_groups_dtypes():
    a, b, c = (torch.nn.Parameter(torch.zeros(2)) for _ in range(3))
    c.data = c.data.double()
    a.grad, c.grad = torch.ones(2), torch.ones(2, dtype=torch.float64)
    params = ParamSet(["a", "b", "c"], [a, b, c])
    layout = params.layout()
    assert layout.names == ["a", "c"]
    assert [run for _, run in layout.groups] == [slice(0, 1), slice(1, 2)]
    assert params.layout() is layout  # cached
    a.grad = c.grad = None
    assert params.layout() is None


def test_unmatched_patterns():
    params = ParamSet(["body.weight", "head.weight"], [torch.zeros(1), torch.zeros(1)])
    assert params.unmatched(["head", "tail.*"]) == ["tail.*"]


def test_a_sparse_gradient_is_refused_naming_its_parameter():
    embedding = torch.nn.Embedding(10, 4, sparse=True)
    dense = torch.nn.Parameter(torch.zeros(2))
    embedding(torch.tensor([1, 1, 3])).sum().backward()
    dense.grad = torch.ones(2)
    params = ParamSet(["dense", "embedding.weight"], [dense, embedding.weight])
    with pytest.raises(ValueError, match=r"'embedding.weight' has a torch.sparse_coo gradient"):
        params.layout()


def test_host_memory_stays_bounded_when_tensors_come_and_go():
    """Experts that get no token on a step, layers dropped at random: each set of tensors with gradients is a layout,
    with what it caches. The last ``LAYOUTS_KEPT`` are kept, so 600 steps of new sets hold no more host memory than
    the first 100 did (until 0.8.1 every set was kept: about 8 kB each here, growing without bound), and the
    clipping state, kept per tensor, carries across them."""
    gen = random.Random(0)
    params = [torch.nn.Parameter(torch.randn(16, 16)) for _ in range(24)]
    names = [f"experts.{i}.weight" for i in range(24)]
    stats = LayerStats(LayerGrouping())
    clipper = Clipper(methods.AdaGC(warmup_update_ratio=0.0), zip(names, params), stats=stats, skip_spikes=6.0)

    def steps(count):
        for step in range(count):
            for p in params:
                p.grad = torch.randn_like(p) if gen.random() < 0.7 else None
            clipper.step(record=step % 25 == 0)

    steps(100)
    gc.collect()
    tracemalloc.start()
    steps(100)
    gc.collect()
    early, _ = tracemalloc.get_traced_memory()
    steps(500)
    gc.collect()
    late, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert len(clipper.params._layouts) == LAYOUTS_KEPT
    assert late < early + 100_000
    assert torch.isfinite(clipper.policy.gamma).all() and clipper.policy.gamma.numel() == 24
