"""Spike skipping (``skip_spikes``): the rule against a float64 re-computation, level shifts, real Trainer runs that
leave parameters and Adam's state untouched on a skipped spike, resume, and the refusals."""

import math

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from helpers import HostReads
from lightning_clip import ClippingConfigError, GradientClipping, methods
from lightning_clip.clipper import Clipper, NonFiniteGradientError
from models import TinyModule, loader, trainer


def drive(norms, k=6.0, window=128, **kwargs):
    """Feed each global norm to a clipper with spike skipping; returns whether each step was skipped."""
    p = torch.nn.Parameter(torch.zeros(4))
    clipper = Clipper(methods.NoClipping(), [("w", p)], skip_spikes=k, spike_window=window, **kwargs)
    skipped = []
    for n in norms:
        p.grad = torch.full((4,), n / 2.0)
        clipper.step()
        skipped.append(p.grad is None)
    return skipped, clipper


def reference(norms, k, window):
    """The rule in float64: skip when the norm exceeds mean + k * std (population) of the last ``window`` finite
    norms, once max(20, window // 2) of them exist; every finite norm enters the window."""
    history, out = [], []
    for n in norms:
        ready = len(history) >= min(max(20, window // 2), window)
        recent = np.array(history[-window:], dtype=np.float64)
        out.append(bool(ready and n > recent.mean() + k * recent.std()))
        if math.isfinite(n):
            history.append(n)
    return out


def noisy(steps, seed=0, level=1.0):
    return (level * (1 + 0.1 * np.random.default_rng(seed).standard_normal(steps))).tolist()


@pytest.mark.parametrize(("k", "window"), [(6.0, 128), (3.0, 40), (2.0, 30)])
def test_decisions_match_the_rule_in_float64(k, window):
    norms = noisy(300)
    for step, factor in ((70, 20.0), (150, 4.0), (151, 5.0), (230, 1000.0)):
        norms[step] *= factor
    skipped, _ = drive(norms, k, window)
    assert skipped == reference(norms, k, window)
    assert skipped[230] and sum(skipped) >= 2


def test_no_spike_no_skip_and_nothing_before_the_minimum_window():
    norms = noisy(400, seed=1)
    norms[10] *= 100.0  # before max(20, window // 2) = 64 norms: no decision yet
    skipped, clipper = drive(norms)
    assert not any(skipped) and clipper.spike_skipped_steps == 0


@pytest.mark.parametrize(("k", "window"), [(6.0, 128), (3.0, 64)])
def test_a_level_shift_is_admitted_within_the_bound(k, window):
    """The norm doubles for good at step 200: after at most ceil(window / (k**2 + 1)) skipped steps the run steps
    again, well below max_consecutive_skips (20)."""
    norms = noisy(400, seed=2, level=1.0)
    norms[200:] = [2 * n for n in noisy(200, seed=3)]
    skipped, _ = drive(norms, k, window)
    streak = next(i for i, s in enumerate(skipped[200:]) if not s)
    assert 1 <= streak <= math.ceil(window / (k**2 + 1)) + 1
    assert not any(skipped[200 + streak + 20 :])


def test_nonfinite_norms_never_enter_the_window():
    norms = noisy(100, seed=4)
    norms[80] = math.nan
    skipped, clipper = drive(norms, max_consecutive_skips=5)
    assert skipped[80] and int(clipper.spikes.count) == 99 and clipper.spike_skipped_steps == 0


def test_host_reads_stay_one_per_non_skipped_step():
    p = torch.nn.Parameter(torch.zeros(8))
    clipper = Clipper(methods.Norm(), [("w", p)], skip_spikes=6.0)
    p.grad = torch.ones(8)
    clipper.step()
    with HostReads() as counter:
        for _ in range(5):
            p.grad = torch.ones(8)
            clipper.step()
    assert counter.count == 5


def test_spike_streaks_count_towards_max_consecutive_skips():
    norms = noisy(30) + [math.nan, math.nan, 1e6]  # two non-finite skips, then a spike: 3 in a row
    with pytest.raises(NonFiniteGradientError, match=r"3 optimizer steps in a row were gradient-norm spikes"):
        drive(norms, k=6.0, window=40, max_consecutive_skips=2)


class SpikyModule(TinyModule):
    """Adam; the loss (so every gradient) is multiplied by 1000 on the chosen global steps."""

    def __init__(self, spike_at=(), **kwargs):
        super().__init__(optimizer="adam", lr=0.01, **kwargs)
        self.spike_at = set(spike_at)

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss * 1000.0 if self.global_step in self.spike_at else loss


def snapshots_around(step):
    taken = {}

    class Probe(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if trainer.global_step in (step, step + 1):
                opt = trainer.optimizers[0]
                taken[trainer.global_step] = (
                    [p.detach().clone() for p in pl_module.parameters()],
                    {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()},
                )

    return Probe(), taken


def test_a_spike_in_a_trainer_run_leaves_parameters_and_adam_state_bitwise_unchanged():
    probe, taken = snapshots_around(30)
    clipping = GradientClipping("norm", max_norm=1e6, skip_spikes=6.0, spike_window=40, log_every_n_steps=5)
    trainer([clipping, probe], max_epochs=10).fit(SpikyModule(spike_at=[30]), loader(n=32, batch_size=8))
    (params_before, state_before), (params_after, state_after) = taken[30], taken[31]
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    for key in state_before:
        for name in state_before[key]:
            assert torch.equal(state_before[key][name], state_after[key][name]), name  # moments and step count
    assert clipping.clippers[0].spike_skipped_steps == 1 and clipping.skipped_steps == 1
    assert clipping.last_metrics["clip/spike_skipped_steps"] == 1.0


def test_a_run_without_spikes_skips_nothing():
    clipping = GradientClipping("norm", max_norm=1e6, skip_spikes=6.0, spike_window=40)
    trainer([clipping], max_epochs=12).fit(SpikyModule(), loader(n=32, batch_size=8))
    assert clipping.clippers[0].steps == 48 and clipping.skipped_steps == 0


def test_resume_continues_the_window_exactly(tmp_path):
    def run(epochs, ckpt_path=None, root=None):
        clipping = GradientClipping("norm", max_norm=1e6, skip_spikes=6.0, spike_window=40)
        model = SpikyModule(spike_at=[30, 45])
        trainer([clipping], max_epochs=epochs, enable_checkpointing=root is not None, default_root_dir=root).fit(
            model, loader(), ckpt_path=ckpt_path
        )
        return model, clipping

    straight, straight_clipping = run(14)
    _, first = run(9, root=tmp_path)
    checkpoint = next(tmp_path.glob("**/*.ckpt"))
    resumed, resumed_clipping = run(14, ckpt_path=checkpoint)
    assert straight_clipping.clippers[0].spike_skipped_steps == resumed_clipping.clippers[0].spike_skipped_steps == 2
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    for key, value in straight_clipping.clippers[0].spikes.state_dict().items():
        torch.testing.assert_close(resumed_clipping.clippers[0].spikes.state_dict()[key], value, equal_nan=True)


def test_the_warning_names_the_layer_that_grew_most(caplog):
    class OneLayerSpike(SpikyModule):
        def on_after_backward(self):
            if self.global_step == 30:
                self.body[2].weight.grad *= 1e4

    clipping = GradientClipping("norm", max_norm=1e6, skip_spikes=6.0, spike_window=40)
    with caplog.at_level("WARNING", logger="lightning_clip"):
        trainer([clipping], max_epochs=10).fit(OneLayerSpike(), loader())
    (message,) = [r.getMessage() for r in caplog.records if "spike" in r.getMessage()]
    assert "global step 30" in message and "layer 'body.2'" in message


def test_each_tensor_keeps_its_level_when_others_have_no_gradient():
    """Levels are kept per tensor of the optimizer: ``b`` (bf16, so the layout reorders around it) has a gradient
    on every third step only, and ``d`` from step 10 on. Spikes on steps where the layout differs from the one
    before are skipped and name the tensor that grew, with the ratio to its own EMA (float64 reference); until
    0.8.1 the levels followed the layout's positions, and such a spike raised a shape mismatch."""
    gen = torch.Generator().manual_seed(0)
    names, dtypes = ["a", "b", "c", "d"], [torch.float32, torch.bfloat16, torch.float32, torch.float32]
    params = [torch.nn.Parameter(torch.zeros(6, dtype=d)) for d in dtypes]
    clipper = Clipper(methods.NoClipping(), zip(names, params), skip_spikes=6.0, spike_window=40)
    levels, spikes = {}, {41: ("c", 1e3), 45: ("b", 1e5), 52: ("d", 1e7)}  # each far above the window's last
    for step in range(60):
        present = [i for i in range(4) if (i != 1 or step % 3 == 0) and (i != 3 or step >= 10)]
        grads = {i: (1 + 0.05 * torch.randn(6, generator=gen)).to(dtypes[i]) for i in present}
        if step in spikes:
            grads[names.index(spikes[step][0])] *= spikes[step][1]
        for i, p in enumerate(params):
            p.grad = grads.get(i)
        norms = {i: float(g.double().norm()) for i, g in grads.items()}
        clipper.step()
        if step in spikes:
            tensor = names.index(spikes[step][0])
            assert clipper.last_spike.tensor == spikes[step][0], step
            assert clipper.last_spike.ratio == pytest.approx(norms[tensor] / levels[tensor], rel=1e-4)
        else:
            assert clipper.last_spike is None, step
        for i, n in norms.items():  # every finite step updates the levels, a skipped spike's too
            levels[i] = n if i not in levels else 0.9 * levels[i] + 0.1 * n


@pytest.mark.parametrize("nonfinite", ["raise", "ignore"])
def test_skip_spikes_needs_nonfinite_skip(nonfinite):
    with pytest.raises(ClippingConfigError, match="skip_spikes"):
        GradientClipping("norm", skip_spikes=6.0, nonfinite=nonfinite)


def test_skip_spikes_is_refused_under_fp16_with_a_grad_scaler():
    plugin = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    with pytest.raises(ClippingConfigError, match="GradScaler, which owns the decision"):
        trainer([GradientClipping("norm", skip_spikes=6.0)], plugins=[plugin]).fit(TinyModule(), loader())


def test_bf16_mixed_skips_spikes():
    clipping = GradientClipping("norm", max_norm=1e6, skip_spikes=6.0, spike_window=40)
    trainer([clipping], max_epochs=10, precision="bf16-mixed").fit(SpikyModule(spike_at=[30]), loader())
    assert clipping.clippers[0].spike_skipped_steps == 1


def test_zero_norms_never_enter_the_window():
    """A stretch of gradients that are all 0 says nothing of the norms' level: entered, a window of zeros (mean and
    spread 0) would skip the first steps that learn as spikes."""
    norms = [0.0] * 80 + noisy(60, seed=5)
    skipped, clipper = drive(norms)
    assert not any(skipped) and int(clipper.spikes.count) == 60
