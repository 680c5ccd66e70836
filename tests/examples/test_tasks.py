"""The example tasks really explode without clipping at their default (high) learning rate, on a fixed seed, and
train with clipping: the ground the demo and the study stand on."""

import math

import lightning.pytorch as pl
import pytest
import torch

from lightning_clip import GradientClipping
from lightning_clip.examples.adding import AddingDataModule, TanhRNN, adding_problem
from lightning_clip.examples.digits import DeepCNN, DeepMLP, DigitsDataModule
from lightning_clip.examples.textlm import GRULM, TanhRNNLM, TextDataModule, TinyTransformerLM, python_docs_bytes

TASKS = {
    "adding": (lambda: TanhRNN(), lambda: AddingDataModule(length=100, train_samples=2048), 150),
    "multiplication": (
        lambda: TanhRNN(momentum=0.0),
        lambda: AddingDataModule(length=100, train_samples=2048, problem="multiplication"),
        150,
    ),
    "digits": (lambda: DeepMLP(), lambda: DigitsDataModule(), 150),
    "textlm": (lambda: TinyTransformerLM(), lambda: TextDataModule(), 150),
    "textlm_10x": (lambda: TinyTransformerLM(lr=10.0), lambda: TextDataModule(), 150),
    "gru": (lambda: GRULM(lr=3.0), lambda: TextDataModule(), 150),
    "rnnlm": (lambda: TanhRNNLM(lr=1.0), lambda: TextDataModule(), 150),
    "cnn": (lambda: DeepCNN(), lambda: DigitsDataModule(), 150),
}
AT_STUDY_RATE = [task for task in TASKS if not task.endswith("_10x")]
EXPLODING = ["adding", "multiplication", "digits", "textlm"]  # gru diverges at its study rate on some seeds only


class Losses(pl.Callback):
    """The first loss, and the mean of the last 10 (the study's divergence test compares those)."""

    def __init__(self):
        self.losses = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))

    @property
    def first(self):
        return self.losses[0]

    @property
    def final(self):
        return sum(self.losses[-10:]) / len(self.losses[-10:])


def train(task, method, **params):
    model_fn, data_fn, steps = TASKS[task]
    first = Losses()
    clipping = GradientClipping(method, nonfinite="ignore", log_every_n_steps=10, **params)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=steps,
        callbacks=[clipping, first],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    pl.seed_everything(0, verbose=False)
    trainer.fit(model_fn(), data_fn())
    return first.final, first.first, clipping


@pytest.mark.parametrize("task", EXPLODING)
def test_diverges_without_clipping(task):
    final, first, clipping = train(task, "none")
    assert not math.isfinite(final) or final > 3 * first
    assert clipping.largest_grad_norm > 100 or clipping.largest_grad_norm == math.inf


def test_the_cnn_fails_without_clipping():
    """Its ReLUs die after the first large updates: the loss stays far above where clipping brings it, instead of
    exploding."""
    unclipped, first, _ = train("cnn", "none")
    clipped, _, _ = train("cnn", "norm", max_norm=1.0)
    assert unclipped > 3 * clipped


@pytest.mark.parametrize("task", AT_STUDY_RATE)
def test_norm_clipping_keeps_it_from_diverging(task):
    final, first, clipping = train(task, "norm", max_norm=1.0)
    assert math.isfinite(final) and final < 3 * first
    assert clipping.clipped_steps > 0
    if task in ("digits", "textlm", "gru", "rnnlm", "cnn"):  # and learns (the RNN problems need far more steps)
        assert final < first / 2


@pytest.mark.parametrize("method", ["agc", "autoclip", "zclip", "adagc"])
def test_adaptive_methods_with_their_defaults_keep_an_exploding_task_finite_and_learn(method):
    """The digits MLP explodes without clipping (above); each adaptive method with its defaults, nothing tuned."""
    final, first, _ = train("digits", method)
    assert math.isfinite(final) and final < first / 2


@pytest.mark.parametrize(
    ("method", "blind"),
    [
        ("agc", {"max_update_ratio": 0.0}),  # the paper's AGC
        ("autoclip", {"warmup_update_ratio": 0.1}),  # 0.2.0's warmup cap, 0.01 x the parameter norm, at lr 10
        ("zclip", {"warmup_update_ratio": 0.1}),
        ("adagc", {"warmup_update_ratio": 0.1}),
    ],
)
def test_adaptive_defaults_train_the_transformer_at_ten_times_its_rate(method, blind):
    """The post-norm transformer LM at 10x its study rate (SGD at 10.0), where a fixed max_norm=0.1 still trains:
    with their defaults the adaptive methods bound the relative update lr * ||g|| / ||W|| and train; the same
    methods with a limit blind to the learning rate diverge."""
    final, first, _ = train("textlm_10x", method)
    assert math.isfinite(final) and final < first / 2
    final, first, _ = train("textlm_10x", method, **blind)
    assert not math.isfinite(final) or final > 3 * first


@pytest.mark.parametrize(
    ("method", "paper"), [("autoclip", {"clipped_history": False}), ("zclip", {"clipped_warmup": False})]
)
def test_statistics_of_clipped_norms_keep_the_rnn_finite_where_the_papers_statistics_diverge(method, paper):
    """The tanh RNN's raw norms are in the hundreds from the first step: statistics of raw norms (the papers') set
    an exploding threshold once the warmup ends; statistics of the norms after clipping (the defaults) do not."""
    final, first, _ = train("adding", method)
    assert math.isfinite(final) and final < 3 * first
    final, first, _ = train("adding", method, **paper)
    assert not math.isfinite(final) or final > 3 * first


def test_text_ships_with_python_and_the_problems_have_their_targets():
    """The language model's text is Python's own documentation (no download); the multiplication problem's target
    is the product of the two marked values (the adding problem's the sum)."""
    text = python_docs_bytes()
    assert len(text) > 400_000 and int(text.max()) < 256
    for problem, combine in (("adding", torch.add), ("multiplication", torch.mul)):
        inputs, targets = adding_problem(64, 20, seed=3, problem=problem)[:]
        marked = inputs[..., 0][inputs[..., 1] == 1].reshape(64, 2)
        torch.testing.assert_close(targets.squeeze(-1), combine(marked[:, 0], marked[:, 1]))
    with pytest.raises(ValueError, match="problem='division'"):
        AddingDataModule(problem="division")
