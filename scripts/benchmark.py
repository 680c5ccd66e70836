"""Clipping cost as ratios against a baseline measured in the same run.

    python scripts/benchmark.py                 # both models, 2 threads, markdown table on stdout
    python scripts/benchmark.py --repeats 30 --threads 1

Each row times our engine (``Clipper.step``, what ``GradientClipping`` runs in ``on_before_optimizer_step``) and its
baseline on the same gradients, alternating which goes first, and reports median(ours) / median(baseline). Ratios,
not seconds: these machines are shared, so absolute times move while ratios measured side by side hold.

Models: ~200 tensors (100 x Linear(500, 500)) and ~2000 tensors (1000 x Linear(158, 158)), both ~25M fp32 params.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from lightning_clip import Clipper, ParamSet, methods
from lightning_clip.stats import LayerGrouping, LayerStats

MODELS = {"200 tensors / 25M": (100, 500), "2000 tensors / 25M": (1000, 158)}


def make_model(layers: int, width: int) -> list[torch.nn.Parameter]:
    torch.manual_seed(0)
    params = []
    for _ in range(layers):
        linear = torch.nn.Linear(width, width)
        params += [linear.weight, linear.bias]
    return params


def refill(params: list[torch.nn.Parameter], generator: torch.Generator) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        p.grad.normal_(generator=generator)


def names(params) -> list[str]:
    return [f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(len(params))]


def clipper(method: str, params, nonfinite: str, **kwargs) -> Callable[[], object]:
    policy, operator = methods.build(method, methods.resolve(method, kwargs))
    engine = Clipper(policy, operator, ParamSet(names(params), params), nonfinite=nonfinite)
    return engine.step


def recording_clipper(params, grad_max: bool) -> Callable[[], object]:
    """Norm clipping on a logging step with per-layer statistics, read to the host in one transfer as the
    callback does."""
    policy, operator = methods.build("norm", methods.resolve("norm", {}))
    stats = LayerStats(LayerGrouping(), grad_max=grad_max)
    engine = Clipper(policy, operator, ParamSet(names(params), params), nonfinite="ignore", stats=stats)

    def step():
        record = engine.step(record=True)
        total = torch.linalg.vector_norm(record.grad_norms).reshape(1)
        return torch.cat([total, *record.layer_stats.values()]).tolist()

    return step


def timm_adaptive_clip_grad(params, clip_factor=0.01, eps=1e-3) -> None:
    """timm's ``adaptive_clip_grad`` algorithm (timm/utils/agc.py), written here as the reference loop."""
    for p in params:
        g = p.grad.detach()
        dims = None if g.ndim <= 1 else tuple(range(1, g.ndim))
        keep = g.ndim > 1
        max_norm = torch.linalg.vector_norm(p.detach(), 2, dim=dims, keepdim=keep).clamp_(min=eps).mul_(clip_factor)
        grad_norm = torch.linalg.vector_norm(g, 2, dim=dims, keepdim=keep)
        clipped = g * (max_norm / grad_norm.clamp(min=1e-6))
        p.grad.detach().copy_(torch.where(grad_norm < max_norm, g, clipped))


def time_pair(ours, baseline, params, repeats: int) -> float:
    generator = torch.Generator().manual_seed(1)
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for r in range(repeats + 2):
        order = [("ours", ours), ("baseline", baseline)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            refill(params, generator)
            start = time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if r >= 2:  # the first two rounds warm caches and build layouts
                times[name].append(elapsed)
    return statistics.median(times["ours"]) / statistics.median(times["baseline"])


def rows(params, repeats: int) -> list[tuple[str, str, float]]:
    def norm_baseline():
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)

    def value_baseline():
        torch.nn.utils.clip_grad_value_(params, 0.01, foreach=True)

    def agc_baseline():
        timm_adaptive_clip_grad(params)

    cases = [
        ("norm, nonfinite=ignore", "clip_grad_norm_(foreach=True)", clipper("norm", params, "ignore"), norm_baseline),
        ("norm, nonfinite=skip", "clip_grad_norm_(foreach=True)", clipper("norm", params, "skip"), norm_baseline),
        (
            "value, nonfinite=ignore",
            "clip_grad_value_(foreach=True)",
            clipper("value", params, "ignore", clip_value=0.01),
            value_baseline,
        ),
        (
            "value, nonfinite=skip",
            "clip_grad_value_(foreach=True)",
            clipper("value", params, "skip", clip_value=0.01),
            value_baseline,
        ),
        ("agc, nonfinite=ignore", "timm adaptive_clip_grad loop", clipper("agc", params, "ignore"), agc_baseline),
        ("agc, nonfinite=skip", "timm adaptive_clip_grad loop", clipper("agc", params, "skip"), agc_baseline),
    ]
    cases += [
        (
            "norm + per-layer stats (logging step)",
            "clip_grad_norm_(foreach=True)",
            recording_clipper(params, grad_max=False),
            norm_baseline,
        ),
        (
            "norm + per-layer stats + grad_max (logging step)",
            "clip_grad_norm_(foreach=True)",
            recording_clipper(params, grad_max=True),
            norm_baseline,
        ),
    ]
    return [(ours, base, time_pair(fn, baseline, params, repeats)) for ours, base, fn, baseline in cases]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    results = {name: rows(make_model(*shape), args.repeats) for name, shape in MODELS.items()}
    names = list(results)
    print(
        f"torch {torch.__version__}, {args.threads} threads, {args.repeats} repeats, median ratio (lower is faster)\n"
    )
    print("| ours | baseline | " + " | ".join(names) + " |")
    print("|---|---|" + "---|" * len(names))
    for i, (ours, base, _) in enumerate(results[names[0]]):
        print(f"| {ours} | {base} | " + " | ".join(f"{results[n][i][2]:.2f}" for n in names) + " |")


if __name__ == "__main__":
    main()
