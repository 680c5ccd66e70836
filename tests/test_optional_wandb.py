"""W&B is optional at run time: disabled, or not installed at all, training runs and other loggers get everything.
Each case runs in a fresh interpreter, as W&B reads its mode once per process."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent

SCRIPT = """
import sys
if {hide_wandb}:
    sys.modules["wandb"] = None  # import wandb now raises ImportError, as if it were not installed
from lightning.pytorch.loggers import CSVLogger
from lightning_clip import GradientClipping
from models import TinyModule, loader, trainer
loggers = [CSVLogger("logs", name="run")]
if not {hide_wandb}:
    from lightning.pytorch.loggers import WandbLogger
    loggers.append(WandbLogger(project="tests", save_dir="."))
clipping = GradientClipping("norm", max_norm=0.5, histogram_every=1, heatmap_every=1, log_grad_max=True)
trainer(callbacks=[clipping], logger=loggers, log_every_n_steps=2).fit(TinyModule(), loader())
print("KEYS", sorted(k for k in clipping.last_metrics if k.startswith(("grad", "clip"))))
"""


@pytest.mark.parametrize("hide_wandb", [False, True], ids=["wandb-disabled", "wandb-not-installed"])
def test_training_without_wandb(tmp_path, hide_wandb):
    env = {**os.environ, "WANDB_MODE": "disabled", "PYTHONPATH": str(TESTS)}
    result = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(hide_wandb=hide_wandb)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "'grad/norm'" in result.stdout and "'grad_norm/body.0'" in result.stdout
    csv_text = next(tmp_path.glob("logs/run/*/metrics.csv")).read_text()
    assert "grad_norm/body.0" in csv_text and "clip/rate" in csv_text
    assert not list(tmp_path.glob("**/offline-run-*"))
