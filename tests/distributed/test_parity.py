"""2-process runs (DDP, FSDP2 and FSDP1 on CPU, gloo) against a single-process run of the same global batch."""

import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.plugins import MixedPrecision

from lightning_clip import GradientClipping
from models import TinyModule, loader, trainer

SCRIPT = Path(__file__).with_name("parity.py")
sys.path.insert(0, str(SCRIPT.parent))
from parity import METHODS, REFUSED, SPIKE_STEP, SPIKES  # noqa: E402

pytestmark = pytest.mark.distributed


def assert_same_state(a, b, where=""):
    """Exact equality of nested checkpoint states (tensors bitwise, NaN equal to NaN)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, torch.Tensor):
        torch.testing.assert_close(b, a, rtol=0, atol=0, equal_nan=True, msg=where)
    else:
        assert a == b, where


def launch(tmp_path, *args):
    out = tmp_path / "out.pt"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args[:2], str(out), *args[2:]],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    return torch.load(out, weights_only=False)


def single_process(method, precision="32-true", nan_at_step=None):
    clipping = GradientClipping(method, log_every_n_steps=2, log_updates=True, **METHODS[method])
    model = TinyModule(nan_at_step=nan_at_step)
    plugins = []
    if precision == "16-mixed":
        plugins, precision = (
            [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**8))],
            None,
        )
    trainer(callbacks=[clipping], precision=precision, plugins=plugins).fit(model, loader())
    return dict(model.named_parameters()), clipping


def assert_matches(result, method, precision="32-true", rtol=1e-5, atol=1e-6, nan_at_step=None):
    params, clipping = single_process(method, precision, nan_at_step)
    for name, value in result["params"].items():
        # Lightning 2.4's FSDP1 under bf16-true keeps float32 parameters (2.6 casts the module to bfloat16 first)
        expected = params[name].detach()
        torch.testing.assert_close(value.to(expected.dtype), expected, rtol=rtol, atol=atol, msg=f"{method} {name}")
    for key, value in clipping.last_metrics.items():
        if key.startswith(("grad/", "grad_norm/", "param_norm/", "grad_ratio/", "clip/threshold", "update")):
            assert result["metrics"][key] == pytest.approx(value, rel=rtol * 10, abs=atol), (method, key)


STRATEGIES = ["ddp", "fsdp2", "fsdp1", "fsdp1_flat"]
CASES = [(strategy, method) for strategy in STRATEGIES for method in METHODS if method not in REFUSED.get(strategy, ())]


@pytest.fixture(scope="module")
def fp32_runs(tmp_path_factory):
    """One fp32 launch per strategy, made when a test first needs it."""
    runs = {}

    def run(strategy):
        if strategy not in runs:
            runs[strategy] = launch(tmp_path_factory.mktemp(strategy), strategy, "32-true")
        return runs[strategy]

    return run


@pytest.mark.parametrize("strategy, method", CASES)
def test_fp32_matches_single_process(fp32_runs, strategy, method):
    assert_matches(fp32_runs(strategy)[method], method)


@pytest.mark.parametrize("strategy, method", CASES)
def test_state_is_identical_on_every_rank(fp32_runs, strategy, method):
    rank0, rank1 = fp32_runs(strategy)[method]["states_per_rank"]
    assert_same_state(rank0, rank1)


@pytest.mark.parametrize("strategy, method", CASES)
def test_collectives_per_step(fp32_runs, strategy, method):
    """DDP: none (gradients are already all-reduced). FSDP2 and FSDP1: one per step for every method that measures
    (value clipping with the NaN check measures its max too), more only on recording steps (statistics)."""
    counts = fp32_runs(strategy)[method]["collectives"]
    non_recording, recording = counts[0::2], counts[1::2]  # steps 1 and 3; steps 2 and 4 record
    # The adaptive methods' warmup guard reads the parameter norms (one more collective) while it can apply: all
    # 4 steps here (autoclip's warmup is 25 steps, zclip's and adagc's 2, the guard is computed for twice that).
    guard = 1 if method in ("autoclip", "zclip", "adagc") else 0
    assert non_recording == ([0, 0] if strategy == "ddp" else [1 + guard, 1 + guard])
    # A recording step adds the parameter norms, and the L2 norms before / after clipping where the clipping did
    # not measure them in L2 (value: inf-norm) or scaled unit by unit (agc, none: no per-tensor scale).
    expected = 0 if strategy == "ddp" else 2 + guard + {"none": 1, "value": 2, "agc": 1}.get(method, 0)
    assert recording == [expected, expected]


@pytest.mark.parametrize(
    "strategy, precision",
    [
        ("ddp", "bf16-mixed"),
        ("ddp", "bf16-true"),
        ("fsdp2", "bf16-mixed"),
        ("fsdp2", "bf16-true"),
        ("fsdp1", "bf16-mixed"),
        ("fsdp1", "bf16-true"),
    ],
)
def test_bf16_matches_single_process(tmp_path, strategy, precision):
    results = launch(tmp_path, strategy, precision)
    for method in ("norm", "agc", "zclip", "adagc"):
        if method not in REFUSED.get(strategy, ()):
            assert_matches(results[method], method, precision, rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp1"])
def test_fp16_with_grad_scaler_matches_single_process(tmp_path, strategy):
    """DDP with torch's GradScaler; FSDP1 with its ShardedGradScaler (fp16 parameters, gradients reduced in fp16)."""
    results = launch(tmp_path, strategy, "16-mixed")
    for method in ("norm", "value", "autoclip"):
        assert_matches(results[method], method, "16-mixed", rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp1"])
def test_nan_in_one_ranks_shard_makes_every_rank_skip(tmp_path, strategy):
    """The NaN is written into rank 1's shard only (DDP: rank 1's loss): rank 0, whose local values are all finite,
    still skips, and names the layer in its warning, from the per-tensor norms after their one collective."""
    results = launch(tmp_path, strategy, "32-true", "nan")
    for method in ("norm", "zclip"):
        assert results[method]["skipped_per_rank"] == [1.0, 1.0]
        rank0, rank1 = results[method]["warnings_per_rank"]
        assert len(rank0) == 1 and "non-finite gradients at global step 2, first in layer" in rank0[0], rank0
        assert "body.2" in rank0[0]
        assert rank1 == []  # reported on rank zero only
        assert_matches(results[method], method, nan_at_step=2)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_spike_handling_decides_alike_on_every_rank_and_matches_single_process(tmp_path, strategy):
    """skip_spikes: the global norm is the same on every rank, so both skip the same step (the spike), with no
    collective of their own; SPAM: FSDP2 shards the moment as the gradient, so the rule stays local."""

    results = launch(tmp_path, strategy, "32-true", "spikes")
    for name, (method, params) in SPIKES.items():
        result = results[name]

        class Spiky(TinyModule):
            def training_step(self, batch, batch_idx):
                loss = super().training_step(batch, batch_idx)
                return loss * 1000.0 if self.global_step == SPIKE_STEP else loss

        clipping = GradientClipping(method, log_every_n_steps=2, **params)
        model = Spiky(optimizer="adam", lr=0.01)
        trainer(callbacks=[clipping], max_epochs=8).fit(model, loader())
        expected = dict(model.named_parameters())
        for key, value in result["params"].items():
            torch.testing.assert_close(value, expected[key].detach(), rtol=1e-5, atol=1e-6, msg=f"{name} {key}")
        skipped = 1.0 if name == "skip_spikes" else 0.0
        assert result["skipped_per_rank"] == [skipped, skipped] == [float(clipping.skipped_steps)] * 2
        assert_same_state(*result["states_per_rank"])


@pytest.mark.parametrize("strategy", ["ddp", "fsdp2", "fsdp1"])
def test_resume_from_a_two_process_checkpoint_is_exact(tmp_path, strategy):
    results = launch(tmp_path, strategy, "32-true", "resume")
    for method, runs in results.items():
        for name, value in runs["straight"]["params"].items():
            assert torch.equal(value, runs["resumed"]["params"][name]), (method, name)
        for straight, resumed in zip(runs["straight"]["states_per_rank"], runs["resumed"]["states_per_rank"]):
            assert_same_state(straight, resumed, method)
