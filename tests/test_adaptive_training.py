"""Adaptive methods in real Trainer runs: fp16 overflow with a real GradScaler, kill-and-resume exactness,
state per optimizer, several callbacks side by side."""

import math

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_clip import GradientClipping
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
