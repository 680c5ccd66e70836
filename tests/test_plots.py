"""The heatmap's bounded history, and figures built without pyplot (no backend switched, nothing registered)."""

import math
import os
import subprocess
import sys
import tracemalloc

import numpy as np

from lightning_clip.plots import HeatmapHistory, grad_norm_heatmap


def test_history_keeps_at_most_its_columns_and_never_loses_a_spike():
    history = HeatmapHistory(columns=16)
    for step in range(1000):
        history.add(step, {"a": 1.0, "b": 1000.0 if step == 613 else 2.0})
    grid = history.grid()
    assert grid.shape == (2, len(history.steps)) and 8 <= grid.shape[1] <= 16
    assert history.steps[0] == 0 and history.steps == sorted(history.steps)
    assert grid[1].max() == 1000.0 and (grid[1] == 1000.0).sum() == 1  # merged by max, in one column
    assert np.all(grid[0] == 1.0)


def test_layers_that_appear_later_are_nan_before():
    history = HeatmapHistory(columns=4)
    history.add(0, {"a": 1.0})
    history.add(1, {"a": 1.0, "late": 3.0})
    assert history.layers == ["a", "late"]
    assert math.isnan(history.grid()[1, 0]) and history.grid()[1, 1] == 3.0


def test_host_memory_is_flat_over_thousands_of_records_of_hundreds_of_layers():
    layers = [f"blocks.{i}.mlp" for i in range(300)]
    history = HeatmapHistory()
    rng = np.random.default_rng(0)

    def feed(records, start):
        for step in range(start, start + records):
            history.add(step, dict(zip(layers, rng.random(len(layers)).tolist())))

    feed(600, 0)  # past the first halving: the grid is allocated
    tracemalloc.start()
    feed(200, 600)
    early, _ = tracemalloc.get_traced_memory()
    feed(3000, 800)
    late, _ = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert late - early < 64 * 1024, (early, late)


def test_figures_switch_no_backend_and_stay_out_of_pyplot(tmp_path):
    """The old module called matplotlib.use('Agg') on import, switching a notebook user's backend."""
    script = (
        "import matplotlib\n"
        "from lightning_clip.plots import HeatmapHistory, grad_norm_heatmap\n"
        "h = HeatmapHistory(); h.add(0, {'a': 1.0}); h.add(1, {'a': 2.0})\n"
        "grad_norm_heatmap(h).savefig('heatmap.png')\n"
        "import matplotlib.pyplot as plt\n"
        "print(matplotlib.get_backend(), plt.get_fignums())\n"
    )
    env = {**os.environ, "MPLBACKEND": "svg"}
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split() == ["svg", "[]"]
    assert (tmp_path / "heatmap.png").stat().st_size > 1000


def test_importing_the_package_imports_neither_wandb_nor_hydra():
    script = "import sys, lightning_clip; print(sorted(m for m in ('wandb', 'hydra', 'omegaconf') if m in sys.modules))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "[]"


def test_heatmap_figure_has_one_row_per_layer():
    history = HeatmapHistory()
    for step in range(5):
        history.add(step, {"a": 1.0, "b": 0.0, "c": math.inf})
    fig = grad_norm_heatmap(history)
    (ax, _) = fig.axes
    assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b", "c"]
