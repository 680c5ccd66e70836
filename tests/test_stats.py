import math

import pytest
import torch
from lightning.pytorch.loggers import CSVLogger

from helpers import HostReads, make_params
from lightning_clip import GradientClipping, methods
from lightning_clip.clipper import Clipper
from lightning_clip.stats import LayerGrouping, LayerStats
from models import GradProbe, TinyModule, loader, trainer

NAMES = ["enc.0.weight", "enc.0.bias", "enc.1.weight", "dec.weight", "dec.bias", "scale"]
SHAPES = [(4, 3), (4,), (3, 4), (2, 3), (2,), (1,)]


def recorded(grouping, **kwargs):
    params = make_params(shapes=SHAPES, seed=3, zero_params=(4,))
    grads = [p.grad.clone() for p in params]
    clipper = Clipper(methods.Norm(max_norm=0.1), zip(NAMES, params), stats=LayerStats(grouping, **kwargs))
    return clipper.step(record=True), params, grads


def test_default_layers_are_owning_modules_with_l2_aggregation():
    record, params, grads = recorded(LayerGrouping(), grad_max=True)
    assert record.layers == ["enc.0", "enc.1", "dec", "scale"]
    members = {"enc.0": [0, 1], "enc.1": [2], "dec": [3, 4], "scale": [5]}
    for k, layer in enumerate(record.layers):
        idx = members[layer]
        grad_norm = math.sqrt(sum(grads[i].double().pow(2).sum().item() for i in idx))
        param_norm = math.sqrt(sum(params[i].detach().double().pow(2).sum().item() for i in idx))
        grad_max = max(grads[i].abs().max().item() for i in idx)
        assert record.layer_stats["grad_norm"][k].item() == pytest.approx(grad_norm, rel=1e-5)
        assert record.layer_stats["param_norm"][k].item() == pytest.approx(param_norm, rel=1e-5)
        assert record.layer_stats["grad_ratio"][k].item() == pytest.approx(grad_norm / param_norm, rel=1e-5)
        assert record.layer_stats["grad_max"][k].item() == pytest.approx(grad_max, rel=1e-6)  # before clipping
        assert record.layer_stats["grad_nonfinite"][k].item() == 0.0


@pytest.mark.parametrize(
    ("grouping", "layers"),
    [
        (LayerGrouping(depth=1), ["enc", "dec", "scale"]),
        (LayerGrouping(per_parameter=True), NAMES),
        (LayerGrouping(include=("enc.*",)), ["enc.0", "enc.1"]),
        (LayerGrouping(exclude=("enc.*", "scale")), ["dec"]),
    ],
)
def test_grouping_options(grouping, layers):
    record, _, _ = recorded(grouping)
    assert record.layers == layers
    assert record.layer_stats["grad_norm"].shape == (len(layers),)


def test_each_layer_keeps_its_own_max_when_the_layers_change_between_records():
    """``grad_norm_max/<layer>`` per layer name: between records, ``b`` has no gradient on some steps and ``d``
    appears late, so the layers of a step's layout change. Each layer's max over the steps since the previous record
    equals the float64 max of its norms on the steps it had any; until 0.8.1 the running max was kept by position,
    so a change of layers dropped it (a spike of ``c`` on such a step never showed) or mixed two layers' values."""
    gen = torch.Generator().manual_seed(2)
    names = ["a.weight", "b.weight", "c.weight", "d.weight"]
    params = [torch.nn.Parameter(torch.zeros(5)) for _ in names]
    clipper = Clipper(methods.NoClipping(), zip(names, params), stats=LayerStats(LayerGrouping()), track_max=True)
    presence = [{0}, {0, 1}, {0, 2}, {0, 1, 2, 3}, {0, 2, 3}, {1, 2, 3}, {0, 1, 2, 3}]
    records, seen = [], {}
    for step, present in enumerate(presence):
        for i, p in enumerate(params):
            p.grad = torch.randn(5, generator=gen) * (100.0 if (step, i) in {(2, 2), (4, 3)} else 1.0)
            if i not in present:
                p.grad = None
            else:
                layer = names[i].split(".")[0]
                seen[layer] = max(seen.get(layer, 0.0), float(p.grad.double().norm()))
        record = clipper.step(record=step in (3, 6))
        if record is not None:
            records.append((record.layers, record.layer_stats["grad_norm_max"].tolist(), dict(seen)))
            seen = {}
    assert [layers for layers, *_ in records] == [["a", "b", "c", "d"], ["a", "b", "c", "d"]]
    for layers, maxima, expected in records:
        assert maxima == pytest.approx([expected[layer] for layer in layers], rel=1e-6)
    assert records[0][1][2] > 100 and records[1][1][3] > 100  # c's spike at step 2, d's at step 4


def test_zero_parameters_give_nan_ratio_not_inf():
    record, _, _ = recorded(LayerGrouping(per_parameter=True))
    assert math.isnan(record.layer_stats["grad_ratio"][4].item())


def test_host_reads_per_step_with_stats():
    params = make_params(seed=4)
    names = [f"l{i}.weight" for i in range(len(params))]
    stats = LayerStats(LayerGrouping(), grad_max=True)
    clipper = Clipper(methods.Norm(), zip(names, params), nonfinite="ignore", stats=stats)
    clipper.step(record=True)
    with HostReads() as counter:
        clipper.step()
        clipper.step()
    assert counter.count == 0
    with HostReads() as counter:
        clipper.step(record=True)
    assert counter.count == 0  # the record stays on the device; the callback reads it once


@pytest.mark.parametrize(("nonfinite", "reads"), [("ignore", 1), ("skip", 2)])
def test_callback_reads_a_recording_step_once(nonfinite, reads):
    """One batched transfer per recording step (plus the guard's scalar with skip)."""
    clipping = GradientClipping("norm", max_norm=0.5, log_every_n_steps=1, nonfinite=nonfinite, log_grad_max=True)
    counts = []

    original = GradientClipping.on_before_optimizer_step

    def counted(self, trainer, pl_module, optimizer):
        with HostReads() as counter:
            original(self, trainer, pl_module, optimizer)
        counts.append(counter.count)

    GradientClipping.on_before_optimizer_step = counted
    try:
        trainer(callbacks=[clipping]).fit(TinyModule(), loader())
    finally:
        GradientClipping.on_before_optimizer_step = original
    assert counts == [reads] * 4


def test_csv_gets_per_layer_values_matching_independent_norms(tmp_path):
    probe_before = []

    class Before(GradProbe):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            probe_before.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters()})

    logger = CSVLogger(tmp_path, name="run")
    clipping = GradientClipping("norm", max_norm=0.5, log_grad_max=True)
    run = trainer(callbacks=[Before(), clipping], logger=logger, log_every_n_steps=2)
    run.fit(TinyModule(), loader())
    import csv

    rows = [r for r in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if r.get("grad/norm")]
    assert len(rows) == 2
    for row, step in zip(rows, (1, 3)):
        grads = probe_before[step]
        for layer in ("body.0", "body.2", "head"):
            expected = math.sqrt(sum(g.double().pow(2).sum().item() for n, g in grads.items() if n.startswith(layer)))
            assert float(row[f"grad_norm/{layer}"]) == pytest.approx(expected, rel=1e-5)
            assert float(row[f"grad_max/{layer}"]) == pytest.approx(
                max(g.abs().max().item() for n, g in grads.items() if n.startswith(layer)), rel=1e-6
            )
        assert {f"param_norm/{layer}" for layer in ("body.0", "body.2", "head")} <= set(row)


def test_skipped_step_logs_nonfinite_layers_off_cadence(tmp_path, caplog):
    logger = CSVLogger(tmp_path, name="run")
    run = trainer(callbacks=[GradientClipping("norm", log_every_n_steps=50)], logger=logger, log_every_n_steps=50)
    with caplog.at_level("WARNING", logger="lightning_clip"):
        run.fit(TinyModule(nan_at_step=2), loader())
    import csv

    rows = [r for r in csv.DictReader(open(f"{logger.log_dir}/metrics.csv")) if r.get("grad_nonfinite/body.2")]
    assert [(int(r["step"]), float(r["grad_nonfinite/body.2"])) for r in rows] == [(2, 1.0)]
    assert "first in layer 'body.2'" in caplog.text


def test_layer_names_survive_torch_compile():
    model = TinyModule()
    params = list(model.parameters())
    from lightning_clip.params import name_params

    assert name_params(params, torch.compile(model)) == name_params(params, model)


def test_bad_layer_options():
    with pytest.raises(ValueError, match="layer_depth=0 is invalid"):
        GradientClipping(layer_depth=0)
    with pytest.raises(ValueError, match="exclude each other"):
        GradientClipping(layer_depth=1, per_parameter=True)
    with pytest.raises(ValueError, match="layer_include=3 is invalid"):
        GradientClipping(layer_include=3)


def test_update_statistics_are_the_real_update_on_recording_steps_only():
    """Parameters after the step minus before, per layer, against a probe that copies them around each step."""
    snapshots = {}

    class Around(GradProbe):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            snapshots[trainer.global_step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    clipping = GradientClipping("norm", max_norm=0.5, log_updates=True, log_every_n_steps=2)
    logged = []

    class Capture(CSVLogger):
        def log_metrics(self, metrics, step=None):
            logged.append((step, dict(metrics)))

    model = TinyModule()
    trainer(callbacks=[Around(), clipping], logger=Capture("logs"), max_epochs=2).fit(model, loader())
    snapshots[8] = {n: p.detach().clone() for n, p in model.named_parameters()}
    updates = [(step, m) for step, m in logged if "update/ratio" in m]
    assert [step for step, _ in updates] == [1, 3, 5, 7]  # the recording steps
    for step, metrics in updates:
        before, after = snapshots[step], snapshots[step + 1]
        for layer in ("body.0", "body.2", "head"):
            names = [n for n in before if n.startswith(layer + ".")]
            delta = math.sqrt(sum((after[n] - before[n]).double().pow(2).sum().item() for n in names))
            size = math.sqrt(sum(before[n].double().pow(2).sum().item() for n in names))
            assert metrics[f"update_norm/{layer}"] == pytest.approx(delta, rel=1e-4)
            assert metrics[f"update_ratio/{layer}"] == pytest.approx(delta / size, rel=1e-4)
        total = math.sqrt(sum((after[n] - before[n]).double().pow(2).sum().item() for n in before))
        norm = math.sqrt(sum(before[n].double().pow(2).sum().item() for n in before))
        assert metrics["update/ratio"] == pytest.approx(total / norm, rel=1e-4)


def test_update_statistics_reuse_the_records_parameter_norms():
    """A recording step measures the per-tensor parameter norms once (for ``param_norm``); the update statistics
    take them from the record instead of reading the snapshot again, with the same result."""
    from lightning_clip.updates import update_stats

    gen = torch.Generator().manual_seed(4)
    params = [torch.nn.Parameter(torch.randn(s, generator=gen)) for s in [(6, 4), (6,), (3, 6), (3,)]]
    names = ["a.weight", "a.bias", "b.weight", "b.bias"]
    stats = LayerStats(LayerGrouping())
    engine = Clipper(methods.Norm(max_norm=1.0), zip(names, params), nonfinite="ignore", stats=stats)
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen)
    record = engine.step(record=True)
    layout = engine.params.layout()
    torch.testing.assert_close(record.param_norms, torch.stack([p.detach().norm() for p in layout.params]))
    snapshots = [[p.detach().clone() for p in layout.params] for _ in range(2)]
    with torch.no_grad():
        for p in params:
            p.sub_(0.1 * p.grad)  # the optimizer's step
    index = stats.index(layout, record.param_norms.device)
    reused = update_stats(layout, index, snapshots[0], record.param_norms)
    measured = update_stats(layout, index, snapshots[1])
    assert reused.keys() == measured.keys() and len(reused) == 5
    for key, value in measured.items():
        assert reused[key] == pytest.approx(value, rel=1e-6)


def test_update_statistics_cost_no_host_read_off_recording_steps():
    clipping = GradientClipping("norm", nonfinite="ignore", log_updates=True, log_every_n_steps=100)
    counts = []

    class Count(GradProbe):
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            self.counter = HostReads().__enter__()

        def on_train_batch_end(self, *args):
            self.counter.__exit__(None, None, None)
            counts.append(self.counter.count)

    trainer(callbacks=[Count(), clipping], max_epochs=2).fit(TinyModule(), loader())
    assert counts == [0] * 8
