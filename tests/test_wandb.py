"""A real offline W&B run, read back from its run file."""

import math

import pytest
import torch
from lightning.pytorch.loggers import WandbLogger

from lightning_clip import GradientClipping
from lightning_clip.wandb_offline import read_run
from models import GradProbe, TinyModule, loader, trainer


@pytest.fixture(scope="module")
def wandb_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("wandb")
    grads, params = [], []

    class Before(GradProbe):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})
            params.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})

    logger = WandbLogger(project="tests", save_dir=str(directory), offline=True)
    clipping = GradientClipping(
        "agc", clip_factor=0.05, exclude=["head"], log_grad_max=True, histogram_every=2, histogram_bins=16
    )
    run = trainer(callbacks=[Before(), clipping], logger=logger, log_every_n_steps=2, max_epochs=2)
    run.fit(TinyModule(lr=0.01), loader())  # AGC's update cap (1e-3 / lr = 0.1) stays above the clip factor
    logger.experiment.finish()
    return read_run(directory), grads, params


def test_history_has_the_scalars_and_per_layer_values(wandb_run):
    run, grads, params = wandb_run
    rows = [row for row in run.history if "grad/norm" in row]
    assert [row["trainer/global_step"] for row in rows] == [1, 3, 5, 7]
    for row in rows:
        step_grads = grads[row["trainer/global_step"]]
        total = math.sqrt(sum(g.double().pow(2).sum().item() for g in step_grads.values()))
        assert row["grad/norm"] == pytest.approx(total, rel=1e-5)
        for layer in ("body.0", "body.2", "head"):
            expected = math.sqrt(
                sum(g.double().pow(2).sum().item() for n, g in step_grads.items() if n.startswith(layer + "."))
            )
            assert row[f"grad_norm/{layer}"] == pytest.approx(expected, rel=1e-5)
            assert f"param_norm/{layer}" in row and f"grad_ratio/{layer}" in row and f"grad_max/{layer}" in row
        assert row["clip/threshold"] == 0.05
        step = row["trainer/global_step"]
        assert row["clip/rate"] == sum(agc_would_clip(grads[s], params[s], 0.05) for s in (step - 1, step)) / 2
        assert row["grad/norm_clipped"] <= row["grad/norm"]


def agc_would_clip(grads, params, clip_factor, eps=1e-3):
    """Whether any unit (row, or a whole 1-D tensor) outside ``head`` has |G_i| / max(|W_i|, eps) > clip_factor."""
    for name, g in grads.items():
        if name.startswith("head"):
            continue
        w = params[name]
        g_norm = g.double().norm(dim=1) if g.ndim > 1 else g.double().norm().reshape(1)
        w_norm = w.double().norm(dim=1) if w.ndim > 1 else w.double().norm().reshape(1)
        if (g_norm / w_norm.clamp(min=eps) > clip_factor).any():
            return True
    return False


def test_config_records_the_clipping_setup(wandb_run):
    run, *_ = wandb_run
    assert run.config["clipping"] == {
        "method": "agc",
        "clip_factor": 0.05,
        "eps": 0.001,
        "max_update_ratio": 0.001,
        "exclude": ["head"],
        "schedule": "constant",
        "schedule_steps": 1000,
        "schedule_factor": 0.1,
        "nonfinite": "skip",
    }


def test_summaries_are_defined_with_exact_escaped_names(wandb_run):
    run, *_ = wandb_run
    assert run.metrics["grad/norm"].summary.max
    assert run.metrics["clip/coef"].summary.min
    assert run.metrics["clip/rate"].summary.mean
    assert run.metrics["grad_norm/body\\.0"].summary.max
    assert run.metrics["grad_norm/body\\.0"].step_metric == "trainer/global_step"


def test_final_summary_holds_the_maximum(wandb_run):
    run, *_ = wandb_run
    norms = [row["grad/norm"] for row in run.history if "grad/norm" in row]
    assert run.summary["grad/norm"]["max"] == pytest.approx(max(norms))
    layer_norms = [row["grad_norm/body.0"] for row in run.history if "grad_norm/body.0" in row]
    assert run.summary["grad_norm/body.0"]["max"] == pytest.approx(max(layer_norms))


def test_histograms_count_pre_clip_gradients_every_k_records(wandb_run):
    import numpy as np

    run, grads, params = wandb_run
    rows = [row for row in run.history if "grad_hist/body.0" in row]
    assert [row["trainer/global_step"] for row in rows] == [3, 7]  # every 2nd recording step
    for row in rows:
        step_grads = grads[row["trainer/global_step"]]
        for layer in ("body.0", "body.2", "head"):
            hist = row[f"grad_hist/{layer}"]
            values = np.concatenate([g.flatten().numpy() for n, g in step_grads.items() if n.startswith(layer + ".")])
            limit = np.abs(values).max()
            assert hist["_type"] == "histogram" and len(hist["values"]) == 16
            assert hist["bins"][0] == pytest.approx(-limit, rel=1e-5) and hist["bins"][-1] == pytest.approx(
                limit, rel=1e-5
            )
            expected, _ = np.histogram(values, bins=np.linspace(-limit, limit, 17))
            assert sum(hist["values"]) == values.size
            assert np.abs(np.array(hist["values"]) - expected).max() <= 2  # float rounding at bin borders


def test_heatmap_image_at_the_end_of_training(wandb_run):
    run, *_ = wandb_run
    images = [row for row in run.history if "grad_norm_heatmap" in row]
    assert len(images) == 1
    assert images[0]["grad_norm_heatmap"]["_type"] == "image-file"


def test_histograms_of_two_optimizers_when_layer_include_keeps_only_one_of_them(tmp_path):
    """``layer_include`` keeps the generator's layer only: the critic's optimizer then reports no layer, and its
    histogram steps (until 0.8.1 a crash on an empty stack of counts) log none, while the generator's do, keyed
    with its optimizer's suffix as every other per-layer value (until 0.8.1 they had none)."""
    from models import TwoOptimizerModule

    logger = WandbLogger(project="tests", save_dir=str(tmp_path), offline=True)
    clipping = GradientClipping("norm", layer_include=["generator"], histogram_every=1)
    trainer(callbacks=[clipping], logger=logger, log_every_n_steps=1, max_steps=4).fit(TwoOptimizerModule(), loader())
    logger.experiment.finish()
    keys = {key for row in read_run(tmp_path).history for key in row}
    assert {"grad_hist/generator_opt0", "grad_norm/generator_opt0", "grad/norm_opt1"} <= keys
    assert not any(key.startswith(("grad_hist/critic", "grad_norm/critic")) for key in keys)


class SpikeOnce(TinyModule):
    """Every gradient x1000 on global step 5, which is not a recording step (records at 3, 7, 11, 15)."""

    def on_after_backward(self):
        if self.global_step == 5:
            for p in self.parameters():
                p.grad *= 1000.0


def test_a_spike_between_records_shows_in_the_next_records_maxima_summary_and_report(tmp_path):
    from lightning_clip.report import load, norms_figure

    norms, body2 = [], []

    class Norms(GradProbe):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            norm = lambda params: float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in params])))  # noqa: E731
            norms.append(norm(pl_module.parameters()))
            body2.append(norm(pl_module.body[2].parameters()))

    logger = WandbLogger(project="tests", save_dir=str(tmp_path), offline=True)
    clipping = GradientClipping("norm", max_norm=1e9, log_every_n_steps=4)
    trainer(callbacks=[Norms(), clipping], logger=logger, max_epochs=4).fit(SpikeOnce(), loader())
    logger.experiment.finish()
    run = read_run(tmp_path)
    rows = {row["trainer/global_step"]: row for row in run.history if "grad/norm" in row}
    assert sorted(rows) == [3, 7, 11, 15]
    for step in rows:  # the max over the steps since the previous record, this one included
        window = slice(step - 3, step + 1)
        assert rows[step]["grad/norm_max"] == pytest.approx(max(norms[window]), rel=1e-5)
        assert rows[step]["grad_norm_max/body.2"] == pytest.approx(max(body2[window]), rel=1e-5)
    assert rows[7]["grad/norm"] < rows[7]["grad/norm_max"] / 10  # the sampled value alone misses the spike
    assert run.summary["grad/norm_max"]["max"] == pytest.approx(max(norms), rel=1e-5)
    assert max(norms) > 1000 * max(norms[:5])
    fig = norms_figure(load(tmp_path))
    (line,) = [line for line in fig.axes[0].get_lines() if line.get_label() == "grad/norm_max"]
    assert max(line.get_ydata()) == pytest.approx(max(norms), rel=1e-5)
