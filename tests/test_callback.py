import gc
import math
import tracemalloc
import warnings
import weakref

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from lightning.pytorch.callbacks import BackboneFinetuning
from lightning.pytorch.loggers import CSVLogger, WandbLogger
from lightning.pytorch.plugins import FSDPPrecision, MixedPrecision
from torch.utils.data import DataLoader, TensorDataset

from helpers import HostReads, timm_style_agc
from lightning_clip import AGC, ClippingConfigError, GradientClipping, NonFiniteGradientError, Norm
from lightning_clip.wandb_offline import read_run
from models import (
    CPUFSDPStrategy,
    GradProbe,
    NormsPerStep,
    TinyModule,
    TwoOptimizerModule,
    assert_same_finite_norms,
    fsdp1_against_plain,
    loader,
    trainer,
)


def reference_clip(method, params):
    if method == "norm":
        torch.nn.utils.clip_grad_norm_(params, 0.5)
    elif method == "value":
        torch.nn.utils.clip_grad_value_(params, 0.2)
    elif method == "tensor_norm":
        for p in params:
            torch.nn.utils.clip_grad_norm_([p], 0.5)
    elif method == "agc":
        timm_style_agc([p for p in params if p is not params[-1] and p is not params[-2]], 0.01, 1e-3)


METHOD_ARGS = {
    "none": {},
    "norm": {"max_norm": 0.5},
    "value": {"clip_value": 0.2},
    "tensor_norm": {"max_norm": 0.5},
    "agc": {"clip_factor": 0.01, "exclude": ["head"]},
}


def manual_run(method, accumulate=1, seed=0, width=16):
    """The same model and data trained by a plain PyTorch loop that clips with the reference functions."""
    model = TinyModule(seed=seed, width=width)
    optimizer = model.configure_optimizers()
    batches = list(loader())
    for i in range(0, len(batches), accumulate):
        for x, y in batches[i : i + accumulate]:
            (torch.nn.functional.mse_loss(model(x), y) / accumulate).backward()
        reference_clip(method, list(model.parameters()))
        optimizer.step()
        optimizer.zero_grad()
    return model


@pytest.mark.parametrize("method", list(METHOD_ARGS))
@pytest.mark.parametrize("accumulate,width", [(1, 16), (2, 16), (1, 96)])  # 96: a tensor taken alone on CPU
def test_trainer_run_matches_plain_loop_with_reference_clipping(method, accumulate, width):
    model = TinyModule(width=width)
    clipping = GradientClipping(method, **METHOD_ARGS[method])
    trainer(callbacks=[clipping], accumulate_grad_batches=accumulate).fit(model, loader())
    reference = manual_run(method, accumulate, width=width)
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert clipping.clippers[next(iter(clipping.clippers))].steps == 4 // accumulate


def test_callback_after_ours_sees_clipped_gradients():
    probe = GradProbe()
    trainer(callbacks=[GradientClipping("norm", max_norm=0.25), probe]).fit(TinyModule(), loader())
    assert len(probe.norms) == 4 and max(probe.norms) <= 0.25 * (1 + 1e-5)


def test_bf16_mixed_clips():
    probe = GradProbe()
    run = trainer(callbacks=[GradientClipping("value", clip_value=0.01), probe], precision="bf16-mixed")
    run.fit(TinyModule(), loader())
    assert max(probe.max_abs) <= 0.01


def test_fp16_with_real_grad_scaler_sees_unscaled_gradients_and_defers_overflow():
    clipping = GradientClipping("norm", max_norm=0.25, log_every_n_steps=1)
    probe = GradProbe()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**22)  # the first steps overflow in fp16
    plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
    run = trainer(callbacks=[clipping, probe], plugins=[plugin], max_epochs=3)
    run.fit(TinyModule(), loader())
    overflowed = [not math.isfinite(n) for n in probe.norms]
    assert any(overflowed) and not all(overflowed)
    assert all(n <= 0.25 * (1 + 1e-3) for n in probe.norms if math.isfinite(n))
    assert clipping.last_metrics["clip/nonfinite_steps"] == sum(overflowed)
    assert clipping.last_metrics["clip/skipped_steps"] == 0  # the scaler skipped them, not us


def test_gradient_clip_val_is_refused_before_training():
    with pytest.raises(ClippingConfigError, match=r"gradient_clip_val=1.0.*double clipping"):
        trainer(callbacks=[GradientClipping("norm")], gradient_clip_val=1.0).fit(TinyModule(), loader())


def test_method_none_beside_gradient_clip_val_records_what_lightnings_clipping_faces():
    """``none`` never changes a gradient, so it may sit beside ``Trainer(gradient_clip_val=...)``: it records each
    step's norm before Lightning clips it, and the optimizer steps with Lightning's clipped gradients."""

    class AfterStep(pl.Callback):  # the gradients the optimizer stepped with (Lightning zeroes them next step)
        def __init__(self):
            self.norms = []

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            grads = [p.grad for p in pl_module.parameters()]
            self.norms.append(torch.nn.utils.get_total_norm(grads).item())

    clipping, after = GradientClipping("none", log_every_n_steps=1), AfterStep()
    recorded = NormsPerStep(clipping)
    trainer(callbacks=[clipping, recorded, after], gradient_clip_val=0.5, max_epochs=2).fit(TinyModule(), loader())
    assert len(recorded.pre_clip) == len(after.norms) == 8
    assert all(n > 0.5 for n in recorded.pre_clip)
    assert all(n == pytest.approx(0.5, rel=1e-5) for n in after.norms)


@pytest.mark.parametrize("method", ["norm", "none"])
def test_a_module_that_clips_in_configure_gradient_clipping_is_warned_of_double_clipping(method):
    """Lightning calls ``configure_gradient_clipping`` after the callback's hook: an override that clips would clip
    each step a second time. A warning says so (nothing for ``none``, which changes no gradient)."""

    class ClipsItself(TinyModule):
        def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None):
            self.clip_gradients(optimizer, gradient_clip_val=0.5, gradient_clip_algorithm="norm")

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[GradientClipping(method)]).fit(ClipsItself(), loader())
    doubled = [w for w in caught if "overrides configure_gradient_clipping" in str(w.message)]
    assert len(doubled) == (1 if method == "norm" else 0)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[GradientClipping("norm")]).fit(TinyModule(), loader())
    assert not [w for w in caught if "configure_gradient_clipping" in str(w.message)]


class SparseEmbeddingModule(TinyModule):
    """TinyModule behind an ``Embedding(sparse=True)`` offset, whose weight is trained by its own optimizer
    (``SparseAdam``) in manual optimization, or by SGD alongside the rest."""

    def __init__(self, embedding_optimizer):
        super().__init__()
        self.offset = torch.nn.Embedding(4, 6, sparse=True)
        self.embedding_optimizer = embedding_optimizer
        self.automatic_optimization = embedding_optimizer is None

    def forward(self, x):
        return super().forward(x + self.offset(torch.zeros(len(x), dtype=torch.long)))

    def training_step(self, batch, batch_idx):
        if self.automatic_optimization:
            return super().training_step(batch, batch_idx)
        optimizers = self.optimizers()
        for optimizer in optimizers:
            optimizer.zero_grad()
        self.manual_backward(super().training_step(batch, batch_idx))
        for optimizer in optimizers:
            optimizer.step()

    def configure_optimizers(self):
        if self.embedding_optimizer is None:
            return torch.optim.SGD(self.parameters(), lr=0.01)
        dense = [p for name, p in self.named_parameters() if not name.startswith("offset")]
        return torch.optim.SGD(dense, lr=0.01), torch.optim.SparseAdam(self.offset.parameters(), lr=0.01)


def test_a_sparse_embedding_in_a_clipped_optimizer_is_refused_before_training():
    clipping = GradientClipping("norm")
    with pytest.raises(ClippingConfigError, match=r"method='norm'\): Embedding 'offset' has sparse=True"):
        trainer(callbacks=[clipping]).fit(SparseEmbeddingModule(None), loader())
    assert not any(clipper.steps for clipper in clipping.clippers.values())


def test_a_sparse_embedding_in_an_optimizer_left_unclipped_trains():
    module = SparseEmbeddingModule("sparse_adam")
    before = module.offset.weight.detach().clone()
    clipping = GradientClipping("norm", max_norm=0.5, optimizers=0)
    trainer(callbacks=[clipping], max_steps=8).fit(module, loader())  # global_step counts both optimizers' steps
    assert clipping.clippers[0].steps == 4 and 1 not in clipping.clippers
    assert not torch.equal(module.offset.weight, before)


class FinetunedModule(TinyModule):
    """TinyModule whose ``body`` is the backbone that ``BackboneFinetuning`` keeps frozen for the first epoch, then
    hands to the optimizer as a new parameter group (``add_param_group``)."""

    @property
    def backbone(self):
        return self.body


@pytest.mark.parametrize("method", ["norm", "value"])
def test_parameters_added_to_the_optimizer_during_the_fit_are_clipped(method):
    unclipped, clipped = GradProbe(), GradProbe()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    callbacks = [finetuning, unclipped, GradientClipping(method, **METHOD_ARGS[method]), clipped]
    trainer(callbacks=callbacks, max_epochs=2).fit(FinetunedModule(), loader())
    assert [len(grads) for grads in unclipped.grads] == [2] * 4 + [6] * 4  # the head, then the body too
    for step, (before, after) in enumerate(zip(unclipped.grads, clipped.grads)):
        reference = [torch.nn.Parameter(torch.zeros_like(g)) for g in before]
        for p, g in zip(reference, before):
            p.grad = g.clone()
        reference_clip(method, reference)
        for p, g in zip(reference, after):
            torch.testing.assert_close(g, p.grad, rtol=1e-6, atol=1e-7, msg=f"step {step}")


class MomentProbe(GradProbe):
    """A GradProbe that also keeps Adam's second moment of each tensor with a gradient (``None`` before its first
    step): placed before GradientClipping, what SPAM judges."""

    def __init__(self):
        super().__init__()
        self.moments: list[list[torch.Tensor | None]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        super().on_before_optimizer_step(trainer, pl_module, optimizer)
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        self.moments.append([optimizer.state[p]["exp_avg_sq"].clone() if p in optimizer.state else None
                             for p in params])  # fmt: skip


def test_spam_clips_parameters_added_during_the_fit_against_their_own_moments():
    theta = 2.0
    unclipped, clipped = MomentProbe(), GradProbe()
    finetuning = BackboneFinetuning(unfreeze_backbone_at_epoch=1, lambda_func=lambda epoch: 1.0)
    callbacks = [finetuning, unclipped, GradientClipping("spam", theta=theta, warmup_steps=1), clipped]
    trainer(callbacks=callbacks, max_epochs=3).fit(FinetunedModule(optimizer="adam", lr=0.01), loader())
    assert [len(grads) for grads in unclipped.grads] == [2] * 4 + [6] * 8
    spikes = 0
    for step, (before, moments, after) in enumerate(zip(unclipped.grads, unclipped.moments, clipped.grads)):
        for k, (g, v, got) in enumerate(zip(before, moments, after)):
            spike = torch.zeros_like(g, dtype=torch.bool) if v is None else (g**2 > theta * v) & (v > 0)
            spikes += int(spike.sum()) if k >= 2 and step >= 5 else 0  # the body's, after its first step
            expected = g if v is None else torch.where(spike, g.sign() * (theta * v).sqrt(), g)
            torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-8, msg=f"step {step}, tensor {k}")
    assert spikes > 0


class ReplaceOptimizer(pl.Callback):
    """Replaces the trainer's optimizer at the start of epoch 1, as a user switching optimizers mid-fit does."""

    def __init__(self, make):
        self.make = make

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == 1:
            trainer.optimizers = [self.make(pl_module)]


class SteppedNorms(pl.Callback):
    """The global norm of the gradients each optimizer step used (read after the step, which on the fused path
    writes the clipped gradients back)."""

    def __init__(self):
        self.norms = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.norms.append(torch.nn.utils.get_total_norm([p.grad for p in pl_module.parameters()]).item())


OPTIMIZERS = {
    "fused AdamW": lambda module: torch.optim.AdamW(module.parameters(), lr=0.01, fused=True),
    "SGD": lambda module: torch.optim.SGD(module.parameters(), lr=0.01),
}


class FusedModule(TinyModule):
    def configure_optimizers(self):
        return OPTIMIZERS[self.optimizer_name](self)


@pytest.mark.parametrize(("first", "second"), [("fused AdamW", "SGD"), ("SGD", "fused AdamW")])
def test_an_optimizer_replaced_during_the_fit_is_clipped_from_its_first_step(first, second):
    """``trainer.optimizers = [...]`` mid-fit: the engine built for the old optimizer handed the fused path's
    coefficient to it, so the new one stepped unclipped (norms of 50 to 73 against max_norm=0.5)."""
    clipping, stepped = GradientClipping("norm", max_norm=0.5), SteppedNorms()
    callbacks = [ReplaceOptimizer(OPTIMIZERS[second]), clipping, stepped]
    trainer(callbacks=callbacks, max_epochs=2).fit(FusedModule(optimizer=first), loader())
    assert len(stepped.norms) == 8 and all(n == pytest.approx(0.5, rel=1e-5) for n in stepped.norms)


def test_a_replacement_over_the_same_parameters_carries_the_clipping_state_and_other_parameters_start_afresh():
    same = GradientClipping("zclip")
    replace = ReplaceOptimizer(OPTIMIZERS["SGD"])
    trainer(callbacks=[replace, same], max_epochs=2).fit(TinyModule(), loader())
    assert same.clippers[0].steps == 8 and int(same.state_dict()["optimizers"][0]["policy"]["count"]) == 8

    other = GradientClipping("adagc")  # per-tensor thresholds: on other tensors they would be another tensor's
    replace = ReplaceOptimizer(lambda module: torch.optim.SGD(module.head.parameters(), lr=0.01))
    with pytest.warns(UserWarning, match=r"optimizer 0 was replaced by one over other parameters; .* starts afresh"):
        trainer(callbacks=[replace, other], max_epochs=2).fit(TinyModule(), loader())
    assert other.clippers[0].steps == 4 and other.clippers[0].names == ["head.weight", "head.bias"]
    assert other.state_dict()["optimizers"][0]["policy"]["gamma"].shape == (2,)


def test_unmatched_exclude_pattern_warns():
    with pytest.warns(UserWarning, match=r"exclude pattern\(s\) \['classifier'\] match no parameter"):
        trainer(callbacks=[GradientClipping("agc", exclude=["head", "classifier"])]).fit(TinyModule(), loader())


def test_layer_patterns_that_match_no_layer_warn_showing_the_layer_names():
    clipping = GradientClipping("norm", layer_include=["body.*", "head.weight"], layer_exclude="encoder*")
    with pytest.warns(UserWarning, match=r"\['head.weight', 'encoder\*'\] match no layer.*like \['body.0', 'body.2'"):
        trainer(callbacks=[clipping]).fit(TinyModule(), loader())


def test_skip_leaves_parameters_and_optimizer_state_untouched():
    snapshots = {}

    class Snapshot(GradProbe):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            opt = trainer.optimizers[0]
            snapshots[batch_idx] = (
                [p.detach().clone() for p in pl_module.parameters()],
                {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()},
            )

    model = TinyModule(optimizer="adam", nan_at_step=2)
    clipping = GradientClipping("norm", max_norm=1.0)
    trainer(callbacks=[clipping, Snapshot()], max_epochs=1).fit(model, loader())
    params_before, state_before = snapshots[2]
    params_after, state_after = snapshots[3]
    for a, b in zip(params_before, params_after):
        assert torch.equal(a, b)
    assert state_before.keys() == state_after.keys()
    for key in state_before:
        for name in state_before[key]:
            assert torch.equal(state_before[key][name], state_after[key][name])
    assert not torch.equal(snapshots[1][0][0], snapshots[2][0][0])  # other steps do train
    clipper = next(iter(clipping.clippers.values()))
    assert clipper.skipped_steps == 1


def test_raise_names_the_layer():
    with pytest.raises(NonFiniteGradientError, match=r"optimizer step 2 in: body.2.weight"):
        trainer(callbacks=[GradientClipping("norm", nonfinite="raise")]).fit(TinyModule(nan_at_step=1), loader())


def test_parameters_an_optimizer_turned_nan_stop_the_fit_at_once_naming_them():
    """``precision="16-true"`` with Adam: its eps (1e-8) is 0 in float16, so where the second moment underflows the
    first step divides 0 by 0 and writes NaN into finite parameters from finite gradients. The next step's gradients
    are NaN; skipping them cannot mend the parameters, so the fit stops there, naming them and the likely cause,
    instead of skipping ``max_consecutive_skips`` steps and blaming the learning rate or the data."""
    model = TinyModule(optimizer="adam", lr=1e-3)
    clipping = GradientClipping("norm")
    with pytest.raises(
        NonFiniteGradientError, match=r"parameters \(NaN/Inf\) at optimizer step 2: body\.0\.weight.*eps"
    ):
        trainer(callbacks=[clipping], precision="16-true").fit(model, loader())
    assert clipping.skipped_steps == 0


def test_two_optimizers_in_manual_optimization_each_clip_their_own():
    clipping = GradientClipping("norm", max_norm=0.1, log_every_n_steps=1)
    probe = GradProbe()
    model = TwoOptimizerModule()
    trainer(callbacks=[clipping, probe]).fit(model, loader())
    assert len(probe.norms) == 8 and max(probe.norms) <= 0.1 * (1 + 1e-5)
    clippers = list(clipping.clippers.values())
    expected = [["generator.weight", "generator.bias"], ["critic.weight", "critic.bias"]]
    assert [c.names for c in clippers] == expected
    assert {"grad/norm_opt0", "grad/norm_opt1", "clip/rate_opt0"} <= set(clipping.last_metrics)


def test_csv_logger_gets_the_scalars(tmp_path):
    logger = CSVLogger(tmp_path, name="run")
    run = trainer(callbacks=[GradientClipping("norm", max_norm=0.5)], logger=logger, log_every_n_steps=2)
    run.fit(TinyModule(), loader())
    import csv

    rows = list(csv.DictReader(open(f"{logger.log_dir}/metrics.csv")))
    rows = [r for r in rows if r.get("grad/norm")]
    assert [int(r["step"]) for r in rows] == [1, 3]
    for row in rows:
        assert float(row["grad/norm_clipped"]) == pytest.approx(min(float(row["grad/norm"]), 0.5), rel=1e-5)
        assert float(row["clip/threshold"]) == 0.5
        assert float(row["clip/rate"]) in (0.0, 0.5, 1.0)


def test_checkpoint_round_trip_restores_counters(tmp_path):
    clipping = GradientClipping("norm", max_norm=1.0)
    run = trainer(callbacks=[clipping], enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(TinyModule(nan_at_step=1), loader())
    checkpoint = run.checkpoint_callback.best_model_path
    resumed = GradientClipping("norm", max_norm=1.0)
    trainer(callbacks=[resumed], max_epochs=2).fit(TinyModule(), loader(), ckpt_path=checkpoint)
    clipper = next(iter(resumed.clippers.values()))
    assert (clipper.steps, clipper.skipped_steps) == (8, 1)


def test_state_from_another_method_is_refused():
    with pytest.raises(ClippingConfigError, match="cannot restore state saved by method='agc'"):
        GradientClipping("norm").load_state_dict({"method": "agc", "optimizers": {}})


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            {"method": "agc", "max_norm": 1.0},
            "method='agc' does not take max_norm; 'agc' takes: exclude, schedule, schedule_steps",
        ),
        ({"method": "zclip", "alpha": 2.0}, "alpha=2.0 is invalid for method='zclip': expected a number in (0, 1)"),
        ({"method": "nope"}, "not a clipping method"),
        ({"method": "norm", "max_norm": -1}, "max_norm=-1 is invalid"),
        ({"method": "norm", "nonfinite": "drop"}, "nonfinite='drop' is invalid: expected one of skip, raise, ignore"),
        ({"method": "norm", "max_consecutive_skips": 0}, "max_consecutive_skips=0 is invalid"),
        ({"method": "norm", "log_every_n_steps": 0}, "log_every_n_steps=0 is invalid"),
    ],
)
def test_bad_arguments_fail_at_construction(kwargs, message):
    with pytest.raises(ClippingConfigError, match="GradientClipping: ") as error:
        GradientClipping(**kwargs)
    assert message in str(error.value)


def test_numpy_scalars_are_taken_as_python_numbers():
    clipping = GradientClipping(
        "norm",
        max_norm=np.float32(0.5),
        log_every_n_steps=np.int64(5),
        skip_spikes=np.float32(6),
        optimizers=np.int64(0),
    )
    assert clipping.method.max_norm == 0.5 and type(clipping.method.max_norm) is float
    assert (clipping.log_every_n_steps, clipping.skip_spikes, clipping.optimizers) == (5, 6.0, (0,))
    assert type(clipping.log_every_n_steps) is int and type(clipping.skip_spikes) is float


def test_a_trainer_logging_no_step_clips_and_records_nothing():
    clipping, probe = GradientClipping("norm", max_norm=0.25), GradProbe()
    trainer(callbacks=[clipping, probe], log_every_n_steps=0).fit(TinyModule(), loader())
    assert len(probe.norms) == 4 and max(probe.norms) <= 0.25 * (1 + 1e-5)
    assert clipping.last_metrics == {} and clipping.clippers[0].steps == 4 and clipping.recorded_steps == 0
    trainer(callbacks=[clipping], log_every_n_steps=2, max_epochs=2).fit(TinyModule(), loader())
    assert clipping.recorded_steps == 4  # a new fit counts its own


def test_no_warning_noise_in_plain_run():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer(callbacks=[GradientClipping("agc")]).fit(TinyModule(), loader())
    assert not [w for w in caught if "lightning_clip" in str(w.filename) or "GradientClipping" in str(w.message)]


@pytest.mark.parametrize(
    "method, use_orig_params, message",
    [
        ("agc", True, "split AGC's units"),
        ("tensor_norm", False, "use_orig_params=True"),
        ("adagc", False, "use_orig_params=True"),
    ],
)
def test_fsdp1_combinations_that_cannot_be_exact_are_refused_before_training(method, use_orig_params, message):
    """Lightning runs Callback.setup before it wraps the model or builds optimizers; the refusal comes from there."""
    run = trainer([GradientClipping(method)], strategy=CPUFSDPStrategy(use_orig_params=use_orig_params))
    with pytest.raises(ClippingConfigError, match=message):
        run.callbacks[0].setup(run, TinyModule(), "fit")


def test_fsdp1_matches_a_plain_run_step_by_step_on_cpu():
    (sharded, clipping), (plain, _) = fsdp1_against_plain("cpu", CPUFSDPStrategy(auto_wrap_policy={torch.nn.Linear}))
    assert_same_finite_norms(sharded, plain, rtol=1e-5, least=16)
    assert clipping.judged_steps == 16 and 0 < clipping.clipped_steps <= 16


def test_fsdp1_fp16_with_sharded_grad_scaler_matches_a_plain_fp16_run_on_cpu():
    """fp16 on CPU through a real GradScaler on each side (FSDPPrecision takes its ShardedGradScaler by attribute:
    Lightning 2.6 refuses one passed in); the scalers' first steps overflow, so finite steps are compared."""
    from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

    fsdp_precision = FSDPPrecision("16-mixed")
    fsdp_precision.scaler = ShardedGradScaler("cpu", init_scale=2.0**10)
    plain_precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**10))
    strategy = CPUFSDPStrategy(auto_wrap_policy={torch.nn.Linear})
    (sharded, _), (plain, _) = fsdp1_against_plain("cpu", strategy, [fsdp_precision, plain_precision])
    assert_same_finite_norms(sharded, plain, rtol=1e-2, least=10)


def test_one_callback_over_five_fits_clips_exactly_keeps_no_model_and_defines_each_runs_summaries(tmp_path):
    """Hyperparameter loops, notebooks, ``lr_find`` then ``fit``: state belongs to one fit."""
    clipping = GradientClipping("norm", max_norm=0.5)
    models = []
    for k in range(5):
        model = TinyModule(seed=k)
        (tmp_path / f"run{k}").mkdir()  # wandb 0.19.0 writes to a temporary directory when save_dir does not exist
        logger = WandbLogger(project="tests", save_dir=str(tmp_path / f"run{k}"), offline=True)
        trainer([clipping], logger=logger, log_every_n_steps=2).fit(model, loader())
        logger.experiment.finish()
        reference = manual_run("norm", seed=k)
        for (name, a), b in zip(model.named_parameters(), reference.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=f"fit {k}: {name}")
        run = read_run(tmp_path / f"run{k}")
        assert run.metrics["grad/norm"].summary.max and run.metrics["grad_norm/body\\.0"].summary.max, k
        assert len(clipping.clippers) == 1 and clipping.clippers[0].steps == 4
        models.append(weakref.ref(next(model.parameters())))
        del model, logger, reference
    gc.collect()
    assert [ref() is None for ref in models] == [True] * 5


@pytest.mark.parametrize(("method", "kwargs"), [("autoclip", {}), ("spam", {"warmup_steps": 1})])
def test_a_fit_that_ended_keeps_no_optimizer_or_model_alive(method, kwargs):
    """Methods that read the optimizer (the warmup guard its learning rate, SPAM its moments) drop it with the
    fit."""
    clipping = GradientClipping(method, **kwargs)
    model = FusedAdam(fused=False)
    trainer([clipping]).fit(model, loader())
    assert clipping.clippers[0].steps == 4
    ref = weakref.ref(next(model.parameters()))
    del model
    gc.collect()
    assert ref() is None


def test_optimizers_option_lets_two_callbacks_clip_a_gan_differently():
    generator = GradientClipping("norm", max_norm=0.01, optimizers=0)
    critic = GradientClipping("value", clip_value=0.001, optimizers=[1])
    probe = GradProbe()
    trainer(callbacks=[generator, critic, probe]).fit(TwoOptimizerModule(), loader())
    assert list(generator.clippers) == [0] and list(critic.clippers) == [1]
    critic_norms, generator_norms = probe.norms[0::2], probe.norms[1::2]  # the critic steps first
    assert max(generator_norms) <= 0.01 * (1 + 1e-5)
    assert max(probe.max_abs[0::2]) <= 0.001 * (1 + 1e-6)
    assert critic_norms[0] == pytest.approx(0.001 * math.sqrt(7), rel=1e-5)  # all 7 elements clamped


@pytest.mark.parametrize(
    ("first", "second", "shared"),
    [
        ({}, {"name": "other"}, "every optimizer"),
        ({"optimizers": [0, 1]}, {"name": "other"}, "every optimizer"),
        ({"optimizers": [0, 1]}, {"optimizers": 1, "name": "critic"}, r"optimizers=\[1\]"),
    ],
)
def test_two_callbacks_clipping_one_optimizer_warn_once_before_training(first, second, shared):
    callbacks = [GradientClipping("norm", **first), GradientClipping("norm", **second)]
    with pytest.warns(UserWarning, match=rf"both clip {shared}: each step is clipped by both") as caught:
        trainer(callbacks=callbacks, max_steps=1).fit(TwoOptimizerModule(), loader())
    assert len([w for w in caught if "both clip" in str(w.message)]) == 1


def test_value_on_a_complex_parameter_is_refused_before_training():
    class WithPhase(TinyModule):
        def __init__(self):
            super().__init__()
            self.phase = torch.nn.Parameter(torch.ones(3, dtype=torch.complex64))

        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + self.phase.abs().sum() * 0

    probe = GradProbe()
    with pytest.raises(ClippingConfigError, match=r"method='value'\): parameter 'phase' is complex"):
        trainer(callbacks=[GradientClipping("value", clip_value=0.1), probe]).fit(WithPhase(), loader())
    assert probe.norms == []  # no step was taken


def test_optimizer_index_out_of_range_is_refused_before_training():
    with pytest.raises(ClippingConfigError, match=r"optimizers=\[2\] is invalid: the module has 2 optimizer"):
        trainer([GradientClipping("norm", optimizers=2)]).fit(TwoOptimizerModule(), loader())


@pytest.mark.parametrize(
    ("method", "kwargs", "reference"),
    [
        ("norm", {"max_norm": 0.5}, lambda ps: torch.nn.utils.clip_grad_norm_(ps, 0.5)),
        ("value", {"clip_value": 0.2}, lambda ps: torch.nn.utils.clip_grad_value_(ps, 0.2)),
        ("tensor_norm", {"max_norm": 0.5}, lambda ps: [torch.nn.utils.clip_grad_norm_([p], 0.5) for p in ps]),
    ],
)
def test_exclude_leaves_matching_parameters_out_of_clipping_for_every_method(method, kwargs, reference):
    """Excluded tensors are neither scaled nor counted in the global norm: clip_grad_norm_ over the others."""
    model = TinyModule()
    probe = GradProbe()
    trainer([GradientClipping(method, exclude="head", **kwargs), probe], max_steps=1).fit(model, loader())
    expected = TinyModule()
    x, y = next(iter(loader()))
    torch.nn.functional.mse_loss(expected(x), y).backward()
    reference([p for n, p in expected.named_parameters() if not n.startswith("head")])
    for got, want in zip(probe.grads[0], [p.grad for p in expected.parameters()]):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-7)


def test_a_method_object_and_its_name_clip_alike():
    by_object, by_name = TinyModule(), TinyModule()
    trainer([GradientClipping(AGC(clip_factor=0.02))]).fit(by_object, loader())
    trainer([GradientClipping("agc", clip_factor=0.02)]).fit(by_name, loader())
    for a, b in zip(by_object.parameters(), by_name.parameters()):
        assert torch.equal(a, b)
    with pytest.raises(ClippingConfigError, match="max_norm given beside a method object"):
        GradientClipping(Norm(), max_norm=2.0)


def test_histogram_bins_beyond_wandbs_limit_are_refused():
    with pytest.raises(
        ClippingConfigError, match=r"histogram_bins=1000000000 is invalid: expected an integer in \[1, 512\]"
    ):
        GradientClipping(histogram_bins=10**9)
    GradientClipping(histogram_bins=512)


def test_lightning_cli_builds_the_callback_from_the_command_line():
    from lightning.pytorch.cli import LightningCLI

    args = [
        "--trainer.callbacks+=lightning_clip.GradientClipping",
        "--trainer.callbacks.method=agc",
        "--trainer.callbacks.clip_factor=0.02",
        "--trainer.callbacks.exclude=[head]",
        "--trainer.max_steps=2",
        "--trainer.logger=false",
        "--trainer.enable_checkpointing=false",
    ]
    cli = LightningCLI(TinyModule, run=False, args=args, save_config_callback=None)
    (clipping,) = [c for c in cli.trainer.callbacks if isinstance(c, GradientClipping)]
    assert clipping.method == AGC(clip_factor=0.02, exclude=("head",))
    cli.trainer.fit(cli.model, loader())
    assert clipping.clippers[0].steps == 2


def test_host_memory_of_a_long_recorded_run_is_flat():
    """Every step recorded, 150 layers: the callback's host-side histories (heatmap, metrics) stay bounded."""

    class Deep(pl.LightningModule):
        def __init__(self):
            super().__init__()
            self.layers = torch.nn.Sequential(*[torch.nn.Linear(2, 2) for _ in range(150)])

        def training_step(self, batch, batch_idx):
            return self.layers(batch[0]).square().mean()

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    class Memory(pl.Callback):
        def __init__(self):
            self.traced = {}

        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step in (300, 900):
                self.traced[trainer.global_step] = tracemalloc.get_traced_memory()[0]

    probe = Memory()
    data = DataLoader(TensorDataset(torch.randn(900, 2)), batch_size=1)
    tracemalloc.start()
    try:
        trainer([GradientClipping("norm", log_every_n_steps=1, progress_bar=False), probe], max_steps=900).fit(
            Deep(), data
        )
    finally:
        tracemalloc.stop()
    assert probe.traced[900] - probe.traced[300] < 128 * 1024, probe.traced


@pytest.mark.parametrize("width", [16, 96])  # 96: a tensor clipped alone on CPU
def test_spam_in_a_trainer_run_matches_a_plain_loop_applying_the_rule_by_hand(width):
    theta, warmup = 2.0, 3
    model = TinyModule(optimizer="adam", lr=0.01, width=width)
    trainer([GradientClipping("spam", theta=theta, warmup_steps=warmup)], max_epochs=3).fit(model, loader())

    reference = TinyModule(optimizer="adam", lr=0.01, width=width)
    optimizer = reference.configure_optimizers()
    clipped = 0
    for step, (x, y) in enumerate([batch for _ in range(3) for batch in loader()], start=1):
        torch.nn.functional.mse_loss(reference(x), y).backward()
        if step >= warmup:
            for p in reference.parameters():
                v = optimizer.state[p]["exp_avg_sq"]
                spike = (p.grad**2 > theta * v) & (v > 0)
                clipped += int(spike.sum())
                p.grad = torch.where(spike, p.grad.sign() * (theta * v).sqrt(), p.grad)
        optimizer.step()
        optimizer.zero_grad()
    assert clipped > 0
    for (name, a), b in zip(model.named_parameters(), reference.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


def test_spam_refuses_an_optimizer_without_a_second_moment_and_judges_each_optimizer():
    with pytest.raises(ClippingConfigError, match=r"method='spam'\) reads Adam's second moment .* which SGD does not"):
        trainer([GradientClipping("spam")]).fit(TinyModule(optimizer="sgd"), loader())

    class AdamAndSGD(TwoOptimizerModule):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.generator.parameters()), torch.optim.SGD(self.critic.parameters(), lr=0.01)

    with pytest.raises(ClippingConfigError, match="which SGD does not keep"):
        trainer([GradientClipping("spam")]).fit(AdamAndSGD(), loader())
    spam = GradientClipping("spam", optimizers=0, warmup_steps=1)
    trainer([spam, GradientClipping("norm", optimizers=1)]).fit(AdamAndSGD(), loader())
    assert spam.clippers[0].steps == 4


class FusedAdam(TinyModule):
    def __init__(self, fused=True, **kwargs):
        super().__init__(**kwargs)
        self.fused = fused

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=0.01, fused=self.fused)


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
@pytest.mark.parametrize(
    ("method", "kwargs"),
    [("norm", {"max_norm": 0.5}), ("autoclip", {}), ("zclip", {"warmup_steps": 3}), ("none", {})],
)
def test_clipping_folded_into_a_fused_optimizer_equals_clip_then_step(method, kwargs, precision):
    """The clip coefficient handed to fused AdamW as its grad_scale (the kernel divides the gradients by it) gives
    the parameters of clipping in place then stepping the unfused AdamW."""
    runs = {}
    for fused in (True, False):
        model = FusedAdam(fused=fused)
        clipping = GradientClipping(method, log_every_n_steps=2, **kwargs)
        trainer([clipping], max_epochs=3, precision=precision).fit(model, loader())
        runs[fused] = (model, clipping)
    assert runs[True][1].clippers[0].fused and not runs[False][1].clippers[0].fused
    for (name, a), b in zip(runs[True][0].named_parameters(), runs[False][0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("grad/norm", "grad/norm_clipped", "clip/rate"):
        assert runs[True][1].last_metrics[key] == pytest.approx(runs[False][1].last_metrics[key], rel=1e-5)
    assert not hasattr(runs[True][0].trainer.optimizers[0], "grad_scale")  # cleared after every step


@pytest.mark.parametrize(
    ("method", "kwargs", "folded"),
    [
        ("norm", {"max_norm": 0.5}, True),
        ("zclip", {"warmup_steps": 3}, True),
        ("autoclip", {}, True),
        ("agc", {"clip_factor": 0.05}, False),
        ("value", {"clip_value": 0.01}, False),
    ],
)
def test_fp16_with_a_fused_optimizer_equals_the_unfused_run(method, kwargs, folded):
    """fp16 with a real GradScaler and fused AdamW, whose gradients still carry the loss scale at the hook: global
    methods measure them, divide the norm by the scaler's scale and hand the coefficient over (the scaler multiplies
    in its scale); the others have the scaler unscale first. Both give the unfused run's parameters and records,
    overflow steps (a large initial scale) skipped by the scaler alike."""
    runs = {}
    for fused in (True, False):
        model = FusedAdam(fused=fused)
        clipping = GradientClipping(method, log_every_n_steps=1, **kwargs)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)  # the first steps overflow in fp16
        plugin = MixedPrecision("16-mixed", "cpu", scaler=scaler)
        trainer([clipping], plugins=[plugin], max_epochs=3).fit(model, loader())
        runs[fused] = (model, clipping, scaler)
    fused_run, plain_run = runs[True], runs[False]
    assert fused_run[1].clippers[0].fused == folded and not plain_run[1].clippers[0].fused
    assert fused_run[2].get_scale() == plain_run[2].get_scale() < 2.0**20  # the same overflows were skipped
    for (name, a), b in zip(fused_run[0].named_parameters(), plain_run[0].parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for key in ("grad/norm", "grad/norm_clipped", "clip/nonfinite_steps"):
        assert fused_run[1].last_metrics[key] == pytest.approx(plain_run[1].last_metrics[key], rel=1e-4), key
    assert fused_run[1].last_metrics["clip/nonfinite_steps"] > 0
    assert not hasattr(fused_run[0].trainer.optimizers[0], "grad_scale")


def test_parameters_turned_nan_on_the_fused_path_are_named_by_the_record_that_stops_the_fit():
    """The fused path skips on the device and reads nothing until a record; the record that finds the streak of
    skips too long names the parameters that hold NaN, where the cause is there rather than in the gradients."""

    class Corrupted(FusedAdam):
        def on_train_batch_start(self, batch, batch_idx):
            if self.global_step == 2:
                with torch.no_grad():
                    self.body[0].weight[0, 0] = math.nan

    clipping = GradientClipping("norm", max_norm=0.5, log_every_n_steps=4, max_consecutive_skips=1)
    with pytest.raises(NonFiniteGradientError, match=r"parameters \(NaN/Inf\) at optimizer step 4: body\.0\.weight\. "):
        trainer([clipping], max_epochs=2).fit(Corrupted(), loader())
    assert clipping.clippers[0].fused


def test_a_skip_on_the_fused_path_reads_nothing_and_changes_no_state():
    """A NaN at step 2: found_inf makes the fused kernel leave parameters, moments and the step count as they were;
    no step reads from the device; the skip is counted and reported at the next record."""
    snapshots, reads = {}, []

    class Around(GradProbe):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            opt = trainer.optimizers[0]
            snapshots[trainer.global_step] = (
                [p.detach().clone() for p in pl_module.parameters()],
                {k: {n: t.clone() for n, t in v.items()} for k, v in opt.state.items()},
            )

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.counter = HostReads().__enter__()

        def on_train_batch_end(self, *args):
            self.counter.__exit__(None, None, None)
            reads.append(self.counter.count)

    clipping = GradientClipping("norm", max_norm=0.5, log_every_n_steps=4)
    model = FusedAdam(nan_at_step=2)
    trainer([Around(), clipping], max_epochs=2).fit(model, loader())
    assert reads == [0, 0, 0, 2, 0, 0, 0, 2]  # at records only (steps 3, 7): the skip counters, then the record
    (params_before, state_before), (params_after, state_after) = snapshots[2], snapshots[3]
    assert all(torch.equal(a, b) for a, b in zip(params_before, params_after))
    for key in state_before:
        for name in state_before[key]:
            assert torch.equal(state_before[key][name], state_after[key][name]), name
    assert clipping.skipped_steps == 1 and clipping.last_metrics["clip/skipped_steps"] == 1.0
