"""Clipping cost as ratios against a baseline measured in the same run.

    python scripts/benchmark.py                 # both models, 2 threads, markdown table on stdout
    python scripts/benchmark.py --repeats 30 --threads 1
    python scripts/benchmark.py --training      # Lightning runs: per-layer statistics vs wandb.watch / grad_norm
    python scripts/benchmark.py --clip-training --device cuda   # GPT training steps: no clipping, Lightning's, ours
    python scripts/benchmark.py --callback-share --steps 300    # the callback's glue against the engine it runs
    python scripts/benchmark.py --fsdp2         # 2 processes (gloo): sharded norm vs clip_grad_norm_ on DTensors
    python scripts/benchmark.py --fsdp1         # 2 processes (gloo): FSDP1 flat shards vs FSDP's own clip_grad_norm_
    python scripts/benchmark.py --fused         # clipping folded into a fused AdamW step vs clip_grad_norm_ + step
    python scripts/benchmark.py --methods       # every method: host time vs clip_grad_norm_, peak extra memory
    python scripts/benchmark.py --device cuda   # the same tables on a GPU (synchronised timing, host syncs counted)

Each row times our engine (``Clipper.step``, what ``GradientClipping`` runs in ``on_before_optimizer_step``) and its
baseline on the same gradients, alternating which goes first, and reports median(ours) / median(baseline). Ratios,
not seconds: these machines are shared, so absolute times move while ratios measured side by side hold.

Models: ~200 tensors (100 x Linear(500, 500)) and ~2000 tensors (1000 x Linear(158, 158)), both ~25M fp32 params,
and 2000 tiny tensors (1000 x Linear(8, 8)), where the time per call is host time; with ``--device cuda`` also GPT-2
124M and a Llama-shaped 1.1B model (their real tensor shapes).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import lightning.pytorch as pl
import torch

from lightning_clip import Clipper, kernels, methods
from lightning_clip.stats import LayerGrouping, LayerStats


def linear_stack(layers: int, width: int) -> list[tuple[int, ...]]:
    """The shapes of ``layers`` x Linear(width, width): a weight and a bias each."""
    return [(width, width), (width,)] * layers


def gpt2_124m() -> list[tuple[int, ...]]:
    """GPT-2 small's 148 tensors: token and position embeddings, 12 blocks of LayerNorm, qkv, projection and MLP
    (with biases), the final LayerNorm."""
    block = [(768,), (768,), (2304, 768), (2304,), (768, 768), (768,), (768,), (768,), (3072, 768), (3072,)]
    return [(50257, 768), (1024, 768)] + (block + [(768, 3072), (768,)]) * 12 + [(768,), (768,)]


def llama_1b() -> list[tuple[int, ...]]:
    """A Llama-shaped 1.1B model's 147 tensors: vocabulary 32000, width 2048, 16 blocks of q/o 2048x2048, k/v
    512x2048 (grouped-query attention), gate/up 8192x2048, down 2048x8192 and two RMSNorms, the final norm and an
    untied read-out."""
    block = [(2048,), (2048, 2048), (512, 2048), (512, 2048), (2048, 2048), (2048,)]
    return [(32000, 2048)] + (block + [(8192, 2048), (8192, 2048), (2048, 8192)]) * 16 + [(2048,), (32000, 2048)]


#: The third model's tensors are tiny (8x8): its time per call is launch- and Python-bound, a proxy for the host time
#: per call that a GPU hides behind its kernels (what the engine's own bookkeeping costs against torch's).
MODELS = {
    "200 tensors / 25M": linear_stack(100, 500),
    "2000 tensors / 25M": linear_stack(1000, 158),
    "2000 tiny tensors (host time)": linear_stack(1000, 8),
}
#: Real layouts, on a GPU only (``--device cuda``): 0.5 GB and 4.4 GB of fp32 parameters.
GPU_MODELS = {"GPT-2 124M (148 tensors)": gpt2_124m(), "Llama-shaped 1.1B (147 tensors)": llama_1b()}


DEVICE = torch.device("cpu")


def make_model(shapes: list[tuple[int, ...]]) -> list[torch.nn.Parameter]:
    generator = torch.Generator(device=DEVICE).manual_seed(0)
    return [torch.nn.Parameter(0.02 * torch.randn(s, device=DEVICE, generator=generator)) for s in shapes]


def models() -> dict[str, list[tuple[int, ...]]]:
    return {**MODELS, **GPU_MODELS} if DEVICE.type == "cuda" else MODELS


def sync() -> None:
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def refill(params: list[torch.nn.Parameter], generator: torch.Generator) -> None:
    for p in params:
        if p.grad is None:
            p.grad = torch.empty_like(p)
        getattr(p.grad, "_local_tensor", p.grad).normal_(generator=generator)  # a DTensor's local shard


def names(params) -> list[str]:
    return [f"layer{i // 2}.{'weight' if i % 2 == 0 else 'bias'}" for i in range(len(params))]


def clipper(
    method: str, params, nonfinite: str, flat_shards=None, optimizer=None, skip_spikes=None, track_max=None, **kwargs
) -> Callable[[], object]:
    engine = Clipper(
        methods.from_arguments(method, kwargs),
        zip(names(params), params),
        flat_shards=flat_shards,
        optimizer=optimizer or torch.optim.SGD(params, lr=0.1),  # the adaptive methods read its learning rate
        nonfinite=nonfinite,
        skip_spikes=skip_spikes,
        track_max=track_max,
        stats=LayerStats(LayerGrouping()),
    )
    return engine.step


def recording_with_updates(params) -> Callable[[], object]:
    """A recording step with per-layer gradient statistics and update statistics (``log_updates``): the clip and its
    record, the parameter copy, and the update norms (the optimizer step between them, the same for every clipping,
    is left out), each read to the host once."""
    from lightning_clip.updates import update_stats

    stats = LayerStats(LayerGrouping())
    engine = Clipper(methods.Norm(), zip(names(params), params), nonfinite="ignore", stats=stats)

    def step():
        record = engine.step(record=True)
        record.read()
        layout = engine.params.layout()
        with torch.no_grad():  # as the callback's snapshot
            before = [p.clone() for p in layout.local_params()]
        return update_stats(layout, stats.index(layout, layout.groups[0][0]), before, record.param_norms)

    return step


def adam_with_moments(params) -> torch.optim.Optimizer:
    """An Adam optimizer whose state holds a second moment for every parameter (what SPAM reads)."""
    optimizer = torch.optim.Adam(params)
    for p in params:
        optimizer.state[p]["exp_avg_sq"] = torch.rand_like(p) * 1e-3
    return optimizer


def recording_clipper(params, grad_max: bool) -> Callable[[], object]:
    """Norm clipping on a logging step with per-layer statistics, read to the host in one transfer as the
    callback does."""
    stats = LayerStats(LayerGrouping(), grad_max=grad_max)
    engine = Clipper(methods.Norm(), zip(names(params), params), nonfinite="ignore", stats=stats)

    def step():
        return engine.step(record=True).read()

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


def without_kernel(fn: Callable[[], object]) -> Callable[[], object]:
    """``fn`` with every Triton kernel off (``kernels.ENABLED``): the operators take torch's foreach kernels and the
    policies and the spike skipper their PyTorch code, as on CPU."""

    def call():
        kernels.ENABLED = False
        try:
            return fn()
        finally:
            kernels.ENABLED = True

    return call


def time_pair(ours, baseline, params, repeats: int) -> float:
    generator = torch.Generator(device=DEVICE).manual_seed(1)
    times: dict[str, list[float]] = {"ours": [], "baseline": []}
    for r in range(repeats + 2):
        order = [("ours", ours), ("baseline", baseline)]
        if r % 2:
            order.reverse()
        for name, fn in order:
            refill(params, generator)
            sync()
            start = time.perf_counter()
            fn()
            sync()
            elapsed = time.perf_counter() - start
            if r >= 2:  # the first two rounds warm caches and build layouts
                times[name].append(elapsed)
    return statistics.median(times["ours"]) / statistics.median(times["baseline"])


def torch_norm(params) -> Callable[[], object]:
    """The baseline of most rows: ``torch.nn.utils.clip_grad_norm_`` with its foreach kernels."""
    return lambda: torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)


def rows(params, repeats: int) -> list[tuple[str, str, float]]:
    norm_baseline = torch_norm(params)

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
    fixed_norm = clipper("norm", params, "ignore")
    cases.append(("agc, nonfinite=ignore", "norm, fixed max_norm (ours)", clipper("agc", params, "ignore"), fixed_norm))
    adaptive = [
        ("autoclip", "autoclip", {"warmup_steps": 1}),
        ("zclip", "zclip", {"warmup_steps": 1}),
        ("adagc", "adagc", {"warmup_steps": 1}),
        ("tensor_norm (AdaGC's operator, fixed)", "tensor_norm", {}),
        ("norm, cosine schedule", "norm", {"schedule": "cosine"}),
    ]
    for label, method, kwargs in adaptive:
        engine = clipper(method, params, "ignore", **kwargs)
        cases.append((f"{label}, nonfinite=ignore", "norm, fixed max_norm (ours)", engine, fixed_norm))
    if DEVICE.type == "cuda":  # the per-tensor factors without the Triton kernel: one foreach kernel per tensor
        foreach_tensor_norm = without_kernel(clipper("tensor_norm", params, "ignore"))
        cases.append(
            (
                "tensor_norm, foreach path (no Triton kernel)",
                "norm, fixed max_norm (ours)",
                foreach_tensor_norm,
                fixed_norm,
            )
        )
        for nonfinite in ("ignore", "skip"):  # torch's clamp_min_ and clamp_max_ (and the measurement before them)
            engine = without_kernel(clipper("value", params, nonfinite, clip_value=0.01))
            label = f"value, nonfinite={nonfinite}, torch's clamps (no Triton kernel)"
            cases.append((label, "clip_grad_value_(foreach=True)", engine, value_baseline))
        foreach_agc = without_kernel(clipper("agc", params, "ignore"))
        cases.append(
            ("agc, foreach path (no Triton kernel)", "timm adaptive_clip_grad loop", foreach_agc, agc_baseline)
        )
        for label, method, kwargs in adaptive[:3]:  # the policies' PyTorch code: dozens of small kernels a step
            engine = without_kernel(clipper(method, params, "ignore", **kwargs))
            label = f"{label}, PyTorch ops (no Triton kernels)"
            cases.append((label, "norm, fixed max_norm (ours)", engine, fixed_norm))
    spam = clipper("spam", params, "ignore", optimizer=adam_with_moments(params), warmup_steps=1)
    cases.append(("spam, nonfinite=ignore", "norm, fixed max_norm (ours)", spam, fixed_norm))
    if DEVICE.type == "cuda":  # SPAM's seven foreach kernels and two temporaries, where its kernel is one launch
        foreach_spam = without_kernel(clipper("spam", params, "ignore", optimizer=adam_with_moments(params),
                                              warmup_steps=1))  # fmt: skip
        cases.append(("spam, foreach path (no Triton kernel)", "norm, fixed max_norm (ours)", foreach_spam, fixed_norm))
    cases.append(
        (
            "norm, nonfinite=ignore (track_max, the default)",
            "norm, nonfinite=ignore, track_max=False (ours)",
            clipper("norm", params, "ignore"),
            clipper("norm", params, "ignore", track_max=False),
        )
    )
    cases.append(
        (
            "norm + per-layer stats + log_updates (logging step)",
            "clip_grad_norm_(foreach=True)",
            recording_with_updates(params),
            norm_baseline,
        )
    )
    cases.append(
        (
            "norm, nonfinite=skip, skip_spikes=6",
            "norm, nonfinite=skip (ours)",
            clipper("norm", params, "skip", skip_spikes=6.0),
            clipper("norm", params, "skip"),
        )
    )
    if DEVICE.type == "cuda":  # the spike skipper's PyTorch code: a score of small kernels a step
        cases.append(
            (
                "norm, nonfinite=skip, skip_spikes=6, PyTorch ops (no Triton kernel)",
                "norm, nonfinite=skip (ours)",
                without_kernel(clipper("norm", params, "skip", skip_spikes=6.0)),
                clipper("norm", params, "skip"),
            )
        )
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


class StepTimer(pl.Callback):
    """The seconds of each training batch, synchronised with the device at both ends (nothing to wait for on CPU)."""

    def __init__(self):
        self.times: list[float] = []

    def on_train_batch_start(self, *args):
        sync()
        self.start = time.perf_counter()

    def on_train_batch_end(self, *args):
        sync()
        self.times.append(time.perf_counter() - self.start)


class Stack(torch.nn.Module):
    """200 Linear(350, 350) layers with tanh: the anchor model for the per-layer statistics comparison."""

    def __init__(self, layers: int = 200, width: int = 350) -> None:
        super().__init__()
        self.layers = torch.nn.ModuleList(torch.nn.Linear(width, width) for _ in range(layers))

    def forward(self, x):
        for layer in self.layers:
            x = torch.tanh(layer(x))
        return x


def training_seconds_per_step(variant: str, steps: int, workdir: str) -> float:
    """Mean seconds per training step of a Lightning run of ``Stack`` with one way of watching gradients."""
    from lightning.pytorch.loggers import WandbLogger
    from lightning.pytorch.utilities import grad_norm
    from torch.utils.data import DataLoader, TensorDataset

    from lightning_clip import GradientClipping

    class Module(pl.LightningModule):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.net = Stack()

        def training_step(self, batch, batch_idx):
            return self.net(batch[0]).square().mean()

        def on_before_optimizer_step(self, optimizer):
            if variant == "grad_norm" and self.global_step % 10 == 0:
                self.log_dict(grad_norm(self, norm_type=2))

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if variant == "lightning_clip":  # statistics only: method none, no NaN check, so clipping itself costs nothing
        callbacks.insert(0, GradientClipping("none", nonfinite="ignore", log_every_n_steps=10))
    logger = WandbLogger(project="benchmark", save_dir=workdir, offline=True)
    module = Module()
    if variant == "wandb.watch":
        logger.watch(module, log="gradients", log_freq=10)
    data = DataLoader(TensorDataset(torch.randn(8 * steps, 350)), batch_size=8)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        logger=logger,
        log_every_n_steps=10,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, data)
    logger.experiment.finish()
    return statistics.fmean(timer.times[10:])  # the mean: watching costs fall on logging steps


def training_table(steps: int, rounds: int) -> None:
    import os
    import tempfile

    os.environ.setdefault("WANDB_MODE", "offline")
    os.environ.setdefault("WANDB_SILENT", "true")
    variants = ["none", "lightning_clip", "wandb.watch", "grad_norm"]
    times: dict[str, list[float]] = {v: [] for v in variants}
    with tempfile.TemporaryDirectory() as workdir:
        for r in range(rounds):
            for variant in variants if r % 2 == 0 else reversed(variants):
                times[variant].append(training_seconds_per_step(variant, steps, workdir))
    base = statistics.median(times["none"])
    overhead = {v: statistics.median(times[v]) / base - 1.0 for v in variants}
    print("Lightning training, 200 x Linear(350, 350), batch 8, gradients watched every 10 steps:")
    print()
    print("| watching gradients with | step time / no watching | overhead / ours |")
    print("|---|---|---|")
    for v in variants[1:]:
        print(f"| {v} | {1 + overhead[v]:.2f} | {overhead[v] / max(overhead['lightning_clip'], 1e-3):.1f} |")


class TinyGPT(torch.nn.Module):
    """A pre-norm GPT (token and position embeddings, ``layers`` causal transformer blocks, a read-out): at the
    defaults about 92M parameters, the scale at which the GPU comparison below runs."""

    def __init__(self, vocab: int = 8192, width: int = 768, layers: int = 12, heads: int = 12, length: int = 256):
        super().__init__()
        self.embed, self.position = torch.nn.Embedding(vocab, width), torch.nn.Embedding(length, width)
        block = torch.nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = torch.nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.head = torch.nn.Linear(width, vocab)

    def forward(self, tokens):
        length = tokens.shape[1]
        x = self.embed(tokens) + self.position(torch.arange(length, device=tokens.device))
        mask = torch.nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        return self.head(self.blocks(x, mask=mask, is_causal=True))


class GPTModule(pl.LightningModule):
    """:class:`TinyGPT` on random tokens with AdamW, the model of the training comparisons: 92M parameters, 256
    tokens, batch 8; ``small``: 2 layers of width 128, 64 tokens, batch 4 (for CPU)."""

    def __init__(self, small: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.vocab, self.length, self.batch = (512, 64, 4) if small else (8192, 256, 8)
        self.net = TinyGPT(self.vocab, 128, 2, 4, self.length) if small else TinyGPT(self.vocab, length=self.length)

    def training_step(self, batch, batch_idx):
        tokens = batch[0]
        logits = self.net(tokens[:, :-1])
        return torch.nn.functional.cross_entropy(logits.reshape(-1, self.vocab), tokens[:, 1:].reshape(-1))

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=3e-4)

    def loader(self, steps: int):
        from torch.utils.data import DataLoader, TensorDataset

        generator = torch.Generator().manual_seed(0)
        tokens = torch.randint(self.vocab, (self.batch * steps, self.length + 1), generator=generator)
        return DataLoader(TensorDataset(tokens), self.batch)


#: What the training comparison runs: no clipping, Lightning's own, ours with the same threshold (with and without
#: the NaN/Inf skip, whose one host read per step is the suspected cost), ours by default.
CLIP_VARIANTS = [
    "none",
    "gradient_clip_val=1.0",
    "ours: norm max_norm=1.0",
    "ours: norm max_norm=1.0, nonfinite=ignore",
    "engine alone: Clipper(Norm(max_norm=1.0)) in a bare callback",
    "ours: default (agc)",
]


def clipped_training_seconds_per_step(variant: str, steps: int, small: bool) -> float:
    """Mean seconds per step (after 10 warm-up steps, synchronised) of a Lightning run of :class:`TinyGPT` with
    AdamW, clipped one way; no logger, so only the clipping differs."""
    from lightning_clip import GradientClipping

    class BareClipping(pl.Callback):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if not hasattr(self, "clipper"):
                self.clipper = Clipper(methods.Norm(max_norm=1.0), pl_module.named_parameters())
            self.clipper.step()

    timer = StepTimer()
    callbacks: list[pl.Callback] = [timer]
    if variant.startswith("ours: norm"):
        nonfinite = "ignore" if variant.endswith("ignore") else "skip"
        clipping = GradientClipping("norm", max_norm=1.0, nonfinite=nonfinite, log_every_n_steps=50, progress_bar=False)
        callbacks.insert(0, clipping)
    elif variant.startswith("engine alone"):  # what the callback adds to the engine's own time is the difference
        callbacks.insert(0, BareClipping())
    elif variant.startswith("ours: default"):
        callbacks.insert(0, GradientClipping(log_every_n_steps=50, progress_bar=False))
    module = GPTModule(small)
    trainer = pl.Trainer(
        accelerator=DEVICE.type,
        devices=1,
        precision="bf16-mixed" if DEVICE.type == "cuda" else "32-true",
        max_steps=steps,
        gradient_clip_val=1.0 if variant.startswith("gradient_clip_val") else None,
        logger=False,
        callbacks=callbacks,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
    )
    trainer.fit(module, module.loader(steps))
    return statistics.fmean(timer.times[10:])


def clipped_training_table(steps: int, rounds: int) -> None:
    """Whole training steps with each kind of clipping, alternating the order of the variants round by round; the
    spread over rounds says how much a single comparison can be trusted on a shared machine."""
    small = DEVICE.type != "cuda"
    times: dict[str, list[float]] = {v: [] for v in CLIP_VARIANTS}
    for r in range(rounds):
        for variant in CLIP_VARIANTS if r % 2 == 0 else reversed(CLIP_VARIANTS):
            times[variant].append(clipped_training_seconds_per_step(variant, steps, small))
    base = statistics.median(times["none"])
    model = "a 2-layer GPT (width 128)" if small else "a 92M GPT (12 layers, width 768, 256 tokens, batch 8, bf16)"
    print(f"Lightning training of {model} with AdamW, {steps} steps x {rounds} rounds, on {DEVICE.type}:")
    print()
    print("| clipping | ms per step (median of rounds) | range over rounds | / no clipping |")
    print("|---|---|---|---|")
    for v in CLIP_VARIANTS:
        ms, ratio = [t * 1e3 for t in times[v]], statistics.median(times[v]) / base
        print(f"| {v} | {statistics.median(ms):.2f} | {min(ms):.2f} to {max(ms):.2f} | {ratio:.3f} |")


def callback_share(steps: int) -> None:
    """What the callback's glue adds to the engine's host time: the time inside its per-step hook
    (``on_before_optimizer_step``) against the time inside ``Clipper.step`` there, over a Lightning run of the
    small GPT on CPU. Timed inside the process, so the round-to-round spread of whole steps does not hide it."""
    from lightning_clip import GradientClipping

    spent = {"hook": 0.0, "engine": 0.0}

    def timed(owner, name, key):
        original = getattr(owner, name)

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - start

        setattr(owner, name, wrapper)
        return original

    hook = timed(GradientClipping, "on_before_optimizer_step", "hook")
    engine = timed(Clipper, "step", "engine")
    try:
        module = GPTModule(small=True)
        clipping = GradientClipping("norm", max_norm=1.0, log_every_n_steps=50, progress_bar=False)
        pl.Trainer(
            accelerator="cpu",
            max_steps=steps,
            logger=False,
            callbacks=[clipping],
            enable_progress_bar=False,
            enable_model_summary=False,
            enable_checkpointing=False,
        ).fit(module, module.loader(steps))
    finally:
        GradientClipping.on_before_optimizer_step, Clipper.step = hook, engine
    glue = spent["hook"] - spent["engine"]
    print(f"{steps} steps: the hook {spent['hook'] / steps * 1e3:.3f} ms per step, Clipper.step inside it")
    print(f"{spent['engine'] / steps * 1e3:.3f} ms: the callback adds {glue / spent['engine']:.1%} to the engine")


def count_collectives(fn) -> int:
    """How many collectives one call of ``fn`` issues, from the profiler's gloo events (nested calls included,
    e.g. DTensor's own redistribution)."""
    from torch.profiler import profile

    with profile() as prof:
        fn()
    return sum(1 for event in prof.events() if event.name.startswith("gloo:"))


SHARDED_BASELINES = {"fsdp2": "clip_grad_norm_(foreach=True)", "fsdp1": "FSDP root's clip_grad_norm_"}


def sharded_worker(rank: int, kind: str, port: int, repeats: int, threads: int, results) -> None:
    """One of 2 processes: 50 x Linear(500, 500), each layer its own FSDP2 (``fully_shard``) or FSDP1 unit."""
    import os

    import torch.distributed as dist

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    torch.set_num_threads(threads)
    model = Stack(layers=50, width=500)
    if kind == "fsdp2":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (2,))
        for layer in model.layers:
            fully_shard(layer, mesh=mesh)
        root = fully_shard(model, mesh=mesh)
        flat_shards = None
    else:
        from torch.distributed.fsdp import FullyShardedDataParallel

        from lightning_clip.sharding import fsdp1_shards

        cpu = torch.device("cpu")
        for i, layer in enumerate(model.layers):
            model.layers[i] = FullyShardedDataParallel(layer, device_id=cpu, use_orig_params=True)
        root = FullyShardedDataParallel(model, device_id=cpu, use_orig_params=True)
        flat_shards = fsdp1_shards(root)
    root(torch.randn(4, 500)).square().mean().backward()
    params = [p for p in root.parameters() if p.grad is not None or p.numel() == 0]
    ours = clipper("norm", params, "ignore", flat_shards)

    def baseline():
        if kind == "fsdp2":
            torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        else:
            root.clip_grad_norm_(1.0)

    counts = {name: count_collectives(fn) for name, fn in (("ours", ours), ("baseline", baseline))}
    ratio = time_pair(ours, baseline, [p for p in params if p.grad is not None], repeats)
    if rank == 0:
        results.update(ratio=ratio, **{f"collectives_{k}": v for k, v in counts.items()})
    dist.destroy_process_group()


def sharded_table(kind: str, repeats: int, threads: int) -> None:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    manager = mp.Manager()
    results = manager.dict()
    mp.spawn(sharded_worker, args=(kind, port, repeats, threads, results), nprocs=2)
    baseline = SHARDED_BASELINES[kind]
    print(f"{kind.upper()} (2 processes, gloo, 50 x Linear(500, 500), 12.5M params), one clipping step:")
    print()
    print(f"| | ours (norm, nonfinite=ignore) | {baseline} |")
    print("|---|---|---|")
    print(f"| time / {baseline} | {results['ratio']:.2f} | 1.00 |")
    print(f"| collectives per step | {results['collectives_ours']} | {results['collectives_baseline']} |")


def fused_table(repeats: int) -> None:
    """Clipping folded into fused AdamW (``grad_scale``/``found_inf``) against clip_grad_norm_ then the same step.
    The cost of clipping is time(clip + fused step) - time(fused step alone), each measured in the same run. Under
    fp16 the fused step is the GradScaler's, and torch's way to clip before it is ``unscale_`` then
    ``clip_grad_norm_`` (Lightning refuses to clip there at all)."""
    print(
        "| layout | fp32: our clipping cost / clip_grad_norm_'s | fp16 GradScaler: ours / unscale_ + clip_grad_norm_ |"
    )
    print("|---|---|---|")
    for name, shapes in models().items():
        plain, scaled = fused_ratio(make_model(shapes), repeats), fused_ratio(make_model(shapes), repeats, scaled=True)
        print(f"| {name} | {plain:.2f} | {scaled:.2f} |")


def fused_ratio(params, repeats: int, scaled: bool = False) -> float:
    """Our clipping cost over torch's, on fused AdamW (``norm``, ``nonfinite="skip"``); ``scaled``: under a
    GradScaler (scale 1, so that the gradients need no rescaling in between)."""
    optimizer = torch.optim.AdamW(params, lr=1e-6, fused=True)
    scaler = torch.amp.GradScaler(DEVICE, init_scale=1.0) if scaled else None
    if scaler is not None:
        scaler.scale(torch.ones((), device=DEVICE))  # the scale exists once a loss has been scaled
    engine = Clipper(
        methods.Norm(), zip(names(params), params), optimizer=optimizer, nonfinite="skip",
        scaler_checks_nonfinite=scaled, grad_scaler=scaler,
    )  # fmt: skip

    def step():
        if scaler is None:
            optimizer.step()
        else:
            scaler.step(optimizer)
            scaler.update()

    def ours():
        engine.step()
        step()

    def theirs():
        if scaler is not None:
            scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(params, 1.0, foreach=True)
        step()

    cost_ours = time_pair(ours, step, params, repeats) - 1.0
    cost_theirs = time_pair(theirs, step, params, repeats) - 1.0
    return cost_ours / cost_theirs


#: Every method at its defaults (the adaptive ones past a one-step warmup), for the per-method table.
EVERY_METHOD = [
    ("norm", {}),
    ("value", {"clip_value": 0.01}),
    ("tensor_norm", {}),
    ("agc", {}),
    ("autoclip", {"warmup_steps": 1}),
    ("zclip", {"warmup_steps": 1}),
    ("adagc", {"warmup_steps": 1}),
    ("spam", {"warmup_steps": 1}),
]


def peak_extra_bytes(fn: Callable[[], object], params) -> int:
    """The most memory ``fn`` holds at once beyond what existed before it (its temporaries), on the benchmark's
    device: on a GPU from the allocator's peak, on CPU from the profiler's allocation and free events in order."""
    refill(params, torch.Generator(device=DEVICE).manual_seed(2))
    fn()  # layouts and state are built on the first call
    refill(params, torch.Generator(device=DEVICE).manual_seed(3))
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]")
    live = peak = 0
    for _, nbytes in events:
        live += nbytes
        peak = max(peak, live)
    return peak


def method_table(repeats: int) -> None:
    """Every method against ``clip_grad_norm_``: host time per call on 2000 tiny tensors, and the peak memory it
    allocates on the 200-tensor model (25M parameters, 100 MB of fp32 gradients)."""
    tiny, large = make_model(MODELS["2000 tiny tensors (host time)"]), make_model(MODELS["200 tensors / 25M"])
    gradient_bytes = sum(p.numel() * p.element_size() for p in large)

    def engine(method, params, nonfinite, kwargs):
        optimizer = adam_with_moments(params) if method == "spam" else None
        return clipper(method, params, nonfinite, optimizer=optimizer, **kwargs)

    print("| method | nonfinite | host time / clip_grad_norm_ (2000 tiny tensors) | peak extra memory, MB (25M) |")
    print("|---|---|---|---|")
    print(f"| clip_grad_norm_(foreach=True) | | 1.00 | {peak_extra_bytes(torch_norm(large), large) / 1e6:.3f} |")
    for method, kwargs in EVERY_METHOD:
        for nonfinite in ("ignore", "skip"):
            host = time_pair(engine(method, tiny, nonfinite, kwargs), torch_norm(tiny), tiny, repeats)
            extra = peak_extra_bytes(engine(method, large, nonfinite, kwargs), large)
            share = f"{extra / gradient_bytes:.2f} of the gradients"
            print(f"| {method} | {nonfinite} | {host:.2f} | {extra / 1e6:.3f} ({share}) |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--training", action="store_true", help="time Lightning runs instead of clipping alone")
    parser.add_argument(
        "--clip-training", action="store_true", help="time Lightning training steps: no clipping, Lightning's, ours"
    )
    parser.add_argument(
        "--callback-share", action="store_true", help="what the callback adds to the engine's host time (CPU)"
    )
    parser.add_argument("--fsdp2", action="store_true", help="time clipping of FSDP2 (DTensor) gradients")
    parser.add_argument("--fsdp1", action="store_true", help="time clipping of FSDP1 (flat-shard) gradients")
    parser.add_argument("--fused", action="store_true", help="time clipping folded into a fused optimizer step")
    parser.add_argument(
        "--methods", action="store_true", help="every method: host time against clip_grad_norm_, peak extra memory"
    )
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    parser.add_argument("--steps", type=int, default=60, help="with --training: steps per run")
    parser.add_argument("--rounds", type=int, default=3, help="with --training: runs per variant")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    global DEVICE
    DEVICE = torch.device(args.device)
    if args.fused:
        fused_table(args.repeats)
        return
    if args.methods:
        method_table(args.repeats)
        return
    if args.training:
        training_table(args.steps, args.rounds)
        return
    if args.clip_training:
        clipped_training_table(args.steps, args.rounds)
        return
    if args.callback_share:
        callback_share(args.steps)
        return
    if args.fsdp2 or args.fsdp1:
        sharded_table("fsdp2" if args.fsdp2 else "fsdp1", args.repeats, args.threads)
        return
    results = {name: rows(make_model(shapes), args.repeats) for name, shapes in models().items()}
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
