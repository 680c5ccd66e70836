"""The study runner, run as a user runs it: a two-cell Hydra multirun writes its results table and plot."""

import csv
import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).parents[2] / "scripts" / "study.py"


def test_two_cell_grid_writes_results(tmp_path):
    args = ["-m", "task=digits", "grid=quick", "cell=0,1", "seed=0", "task.steps=40"]
    result = subprocess.run(
        [sys.executable, str(SCRIPT), *args], cwd=tmp_path, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = next(tmp_path.glob("studies/*"))
    cells = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
    assert [c["cell"] for c in cells] == [{"method": "none"}, {"method": "norm", "max_norm": 1.0}]
    assert cells[0]["diverged"] and not cells[1]["diverged"]  # the MLP explodes without clipping
    rows = list(csv.DictReader(open(sweep / "results.csv")))
    assert [(r["method"], r["divergence rate"]) for r in rows] == [("none", "1.0"), ("norm", "0.0")]
    table = (sweep / "results.md").read_text()
    assert "| digits | 1 | none | defaults | 1 | 1 | - |" in table  # no finite loss where every seed diverged
    assert "| digits | 1 | norm | max_norm=1.0 | 1 | 0 |" in table
    assert (sweep / "results.png").stat().st_size > 0
