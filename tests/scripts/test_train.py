"""The demo script, run as a user runs it: a subprocess, W&B offline, the run read back from disk."""

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "train.py"


def test_demo_trains_and_writes_an_offline_wandb_run(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--steps", "30", "--method", "agc", "--param", "clip_factor=0.05"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "lightning_clip demo summary" in result.stdout
    assert "method               agc {'clip_factor': 0.05}" in result.stdout
    runs = list((tmp_path / "runs" / "demo" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
    assert f"wandb sync {runs[0].parent.relative_to(tmp_path)}" in result.stdout


def test_demo_rejects_a_parameter_of_another_method(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--method", "agc", "--param", "max_norm=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode != 0
    assert "method='agc' does not take max_norm; 'agc' takes: clip_factor, eps, exclude" in result.stderr
