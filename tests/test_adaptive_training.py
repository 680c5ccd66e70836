"""Adaptive methods in real Trainer runs: fp16 overflow with a real GradScaler, kill-and-resume exactness,
state per optimizer, several callbacks side by side."""

import math
from pathlib import Path

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_clip import ClippingConfigError, GradientClipping
from models import GradProbe, TinyModule, TwoOptimizerModule, loader, trainer

ADAPTIVE = {
    "autoclip": {"percentile": 50.0},
    "zclip": {"warmup_steps": 3, "z_thresh": 1.0},
    "adagc": {"warmup_steps": 3},
    "norm": {"max_norm": 1.0, "schedule": "cosine", "schedule_steps": 6},
}


def policy_state(clipping):
    (clipper,) = clipping.clippers.values()
    return clipper.policy.state_dict()


@pytest.mark.parametrize("method", list(ADAPTIVE))
def test_fp16_overflow_steps_never_enter_the_state(method):
    clipping = GradientClipping(method, log_every_n_steps=1, **ADAPTIVE[method])
    probe = GradProbe()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**19)  # the first steps overflow in fp16
    run = trainer(callbacks=[clipping, probe], plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)], max_epochs=8)
    run.fit(TinyModule(), loader())
    overflowed = [not math.isfinite(n) for n in probe.norms]
    assert overflowed[0] and not all(overflowed)
    state = policy_state(clipping)
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            kept = value[~torch.isnan(value)] if name == "history" else value  # unfilled ring slots are NaN
            assert torch.isfinite(kept).all(), (name, value)
    if "count" in state:  # finite steps seen (ZClip counts only its warmup)
        finite_steps = overflowed.count(False)
        assert int(state["count"]) == (min(finite_steps, 3) if method == "zclip" else finite_steps)
    # clipping stays active after the overflow steps
    assert clipping.clipped_steps > 0


def run_epochs(method, epochs, tmp_path, ckpt_path=None):
    clipping = GradientClipping(method, **ADAPTIVE[method])
    model = TinyModule()
    run = trainer(callbacks=[clipping], max_epochs=epochs, enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(model, loader(), ckpt_path=ckpt_path)
    return model, clipping, run


@pytest.mark.parametrize("method", list(ADAPTIVE))
def test_resume_from_checkpoint_is_exact(method, tmp_path):
    straight, straight_clipping, _ = run_epochs(method, 3, tmp_path / "straight")
    _, _, first = run_epochs(method, 2, tmp_path / "stopped")
    checkpoint = first.checkpoint_callback.best_model_path
    resumed, resumed_clipping, _ = run_epochs(method, 3, tmp_path / "resumed", ckpt_path=checkpoint)
    for a, b in zip(straight.parameters(), resumed.parameters()):
        assert torch.equal(a, b)
    expected, got = policy_state(straight_clipping), policy_state(resumed_clipping)
    assert expected.keys() == got.keys()
    for key in expected:
        torch.testing.assert_close(
            torch.as_tensor(got[key]), torch.as_tensor(expected[key]), rtol=0, atol=0, equal_nan=True, msg=key
        )


def test_state_is_per_optimizer():
    clipping = GradientClipping("zclip", warmup_steps=2)
    trainer(callbacks=[clipping]).fit(TwoOptimizerModule(), loader())
    generator, critic = clipping.clippers.values()
    assert generator.policy is not critic.policy
    assert float(generator.policy.mean) != float(critic.policy.mean)
    assert set(clipping.state_dict()["optimizers"]) == {0, 1}


def test_two_callbacks_coexist_and_restore_their_own_state(tmp_path):
    first = GradientClipping("autoclip", percentile=90.0)
    second = GradientClipping("zclip", warmup_steps=2)
    assert first.state_key != second.state_key
    run = trainer(callbacks=[first, second], enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(TinyModule(), loader())
    checkpoint = torch.load(run.checkpoint_callback.best_model_path, weights_only=False)
    assert {first.state_key, second.state_key} <= set(checkpoint["callbacks"])
    again = [GradientClipping("autoclip", percentile=90.0), GradientClipping("zclip", warmup_steps=2)]
    trainer(callbacks=again, max_epochs=2).fit(
        TinyModule(), loader(), ckpt_path=run.checkpoint_callback.best_model_path
    )
    assert int(policy_state(again[0])["count"]) == 8  # 4 steps before the checkpoint, 4 after
    assert int(policy_state(again[1])["count"]) == 2  # ZClip's warmup count, restored full


def test_checkpoint_from_another_method_warns(tmp_path):
    run = trainer(callbacks=[GradientClipping("zclip")], enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(TinyModule(), loader())
    with pytest.warns(UserWarning, match=r"GradientClipping\{'method': 'zclip'"):
        trainer(callbacks=[GradientClipping("autoclip")], max_epochs=2).fit(
            TinyModule(), loader(), ckpt_path=run.checkpoint_callback.best_model_path
        )


LEGACY = Path(__file__).parent / "data" / "checkpoint-0.1.0.ckpt"  # written by lightning_clip 0.1.0 (a712f84)
LEGACY_CALLBACKS = {  # the callbacks of that run, with 0.1.0's parameter names
    "zclip": {"warmup_steps": 3, "z_thresh": 1.0},
    "adagc": {"warmup_steps": 3},
    "autoclip": {"percentile": 50.0},
    "norm": {"max_norm": 1.0, "schedule": "cosine", "schedule_steps": 6},
}


def test_a_checkpoint_of_version_0_1_0_restores_every_callbacks_state():
    saved = torch.load(LEGACY, weights_only=False)["callbacks"]
    callbacks = [GradientClipping(method, **params) for method, params in LEGACY_CALLBACKS.items()]
    restored = {}

    class Capture(pl.Callback):  # the state in force when training resumes
        def on_train_start(self, trainer, pl_module):
            for clipping in callbacks:
                restored[clipping.method.name] = clipping.state_dict()

    trainer(callbacks=[*callbacks, Capture()], max_epochs=3).fit(TinyModule(), loader(), ckpt_path=LEGACY)
    for method in LEGACY_CALLBACKS:
        (old_state,) = [v for k, v in saved.items() if k.startswith(f"GradientClipping{{'method': '{method}'")]
        new_state = restored[method]["optimizers"][0]
        assert new_state["steps"] == old_state["optimizers"][0]["steps"] == 8
        for name, value in old_state["optimizers"][0]["policy"].items():
            torch.testing.assert_close(
                torch.as_tensor(new_state["policy"][name]), torch.as_tensor(value), rtol=0, atol=0, equal_nan=True
            )


def test_resuming_with_a_changed_threshold_keeps_the_state_and_names_the_change(tmp_path):
    run = trainer(
        callbacks=[GradientClipping("zclip", warmup_steps=3, z_thresh=1.0)],
        enable_checkpointing=True,
        default_root_dir=tmp_path,
    )
    run.fit(TinyModule(), loader())
    saved = policy_state(run.callbacks[0])
    changed = GradientClipping("zclip", warmup_steps=3, z_thresh=2.0)
    loaded = {}

    class Capture(pl.Callback):
        def on_train_start(self, trainer, pl_module):
            loaded.update(policy_state(changed))

    with pytest.warns(UserWarning, match=r"resuming with changed parameters \(z_thresh: 1.0 -> 2.0\)"):
        trainer(callbacks=[changed, Capture()], max_epochs=2).fit(
            TinyModule(), loader(), ckpt_path=run.checkpoint_callback.best_model_path
        )
    for name in saved:
        assert torch.equal(loaded[name], saved[name]), name


def test_a_shorter_autoclip_window_keeps_the_latest_norms():
    from lightning_clip.thresholds import AutoClipThreshold

    long = AutoClipThreshold(window=5)
    long.history, long.count = torch.tensor([6.0, 7.0, 3.0, 4.0, 5.0]), torch.tensor(7)  # norms 1..7, 6 and 7 wrapped
    short = AutoClipThreshold(window=3)
    short.load_state_dict(long.state_dict())
    assert int(short.count) == 7
    assert sorted(short.history.tolist()) == [5.0, 6.0, 7.0]
    assert short.history[7 % 3] == 5.0 or short.history.tolist().index(7.0) == (7 - 1) % 3


def test_state_from_a_newer_version_is_refused():
    with pytest.raises(ClippingConfigError, match="version 3, written by a newer lightning_clip"):
        GradientClipping("norm").load_state_dict({"version": 3, "method": "norm", "optimizers": {}})


def test_two_callbacks_of_one_method_coexist_by_name(tmp_path):
    first, second = GradientClipping("zclip", name="a", warmup_steps=2), GradientClipping("zclip", name="b")
    assert first.state_key != second.state_key
    run = trainer(callbacks=[first, second], enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(TinyModule(), loader())
    checkpoint = torch.load(run.checkpoint_callback.best_model_path, weights_only=False)
    assert {first.state_key, second.state_key} <= set(checkpoint["callbacks"])


class ResumableLoader:
    """A DataLoader that saves its position (Lightning checkpoints any train loader with ``state_dict`` /
    ``load_state_dict``), so that a mid-epoch resume continues with the next batch, as the uninterrupted run does."""

    def __init__(self, n=64):
        self.batches, self.position, self.restored = list(loader(n=n)), 0, 0

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        start, self.restored = self.restored, 0
        for position in range(start, len(self.batches)):
            self.position = position
            yield self.batches[position]

    def state_dict(self):
        return {"position": self.position + 1}

    def load_state_dict(self, state):
        self.restored = state["position"]


@pytest.mark.parametrize("method", list(ADAPTIVE))
def test_resume_from_a_mid_epoch_checkpoint_is_exact(method, tmp_path):
    """``ModelCheckpoint(every_n_train_steps=3)`` saves after step 3 of an 8-step epoch; the resumed run ends with
    bitwise the parameters and adaptive state of the uninterrupted one. (With a plain DataLoader, Lightning restarts
    the epoch's iterator on resume, so the batches differ and only the restored state can match.)"""
    straight_model = TinyModule()
    straight = GradientClipping(method, **ADAPTIVE[method])
    trainer(callbacks=[straight], max_epochs=2).fit(straight_model, ResumableLoader())

    saver = pl.callbacks.ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=3, save_top_k=-1)
    first = GradientClipping(method, **ADAPTIVE[method])
    trainer(callbacks=[first, saver], max_steps=3, enable_checkpointing=True).fit(TinyModule(), ResumableLoader())
    (checkpoint,) = list(tmp_path.glob("*step=3.ckpt"))
    resumed_model = TinyModule()
    resumed = GradientClipping(method, **ADAPTIVE[method])
    trainer(callbacks=[resumed], max_epochs=2).fit(resumed_model, ResumableLoader(), ckpt_path=checkpoint)

    assert resumed.clippers[0].steps == straight.clippers[0].steps == 16
    for a, b in zip(straight_model.parameters(), resumed_model.parameters()):
        assert torch.equal(a, b)
    expected, got = policy_state(straight), policy_state(resumed)
    for key in expected:
        torch.testing.assert_close(
            torch.as_tensor(got[key]), torch.as_tensor(expected[key]), rtol=0, atol=0, equal_nan=True, msg=key
        )
