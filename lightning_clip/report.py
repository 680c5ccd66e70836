"""Turn what a run logged (its CSV log, or its offline W&B run) into PNG plots, and a sweep into one comparison.

    python scripts/report.py outputs/2026-11-25/10-00-00        # one run  -> <run>/report/*.png
    python scripts/report.py multirun/2026-11-25/10-00-00       # a sweep  -> each run's plots + comparison.md/png

A run directory is one that Hydra wrote (it holds ``.hydra/``) or any directory holding a ``metrics.csv`` or an
offline W&B run. Plots: pre- and post-clip global norm over steps with the threshold, the clip rate, and the
per-layer gradient-norm heatmap.
"""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

import yaml
from hydra.experimental.callback import Callback as HydraCallback

from lightning_clip import plots
from lightning_clip.wandb_offline import read_run_file, run_files

STEP = "step"


@dataclass
class RunLog:
    """The logged rows of one run, each a ``{key: number}`` dict with the step under ``"step"``."""

    directory: Path
    rows: list[dict[str, float]]

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = [(int(r[STEP]), r[key]) for r in self.rows if key in r and STEP in r]
        return [s for s, _ in points], [v for _, v in points]

    def last(self, key: str) -> float:
        values = self.series(key)[1]
        return values[-1] if values else math.nan

    def keys(self) -> list[str]:
        return list(dict.fromkeys(k for r in self.rows for k in r))

    def overrides(self) -> str:
        path = self.directory / ".hydra" / "overrides.yaml"
        if not path.exists():
            return ""
        return " ".join(yaml.safe_load(path.read_text()) or [])


def load(directory: Path) -> RunLog:
    """The rows a run logged: its CSV log when there is one, else its offline W&B run."""
    directory = Path(directory)
    csvs = sorted(directory.glob("**/metrics.csv"))
    if csvs:
        rows = []
        with open(csvs[-1]) as handle:
            for raw in csv.DictReader(handle):
                rows.append({k: float(v) for k, v in raw.items() if v not in ("", None)})
        return RunLog(directory, rows)
    files = run_files(directory)
    if not files:
        raise FileNotFoundError(f"{directory} holds no metrics.csv and no offline W&B run")
    rows = []
    for row in read_run_file(files[-1]).history:
        numbers = {k: float(v) for k, v in row.items() if isinstance(v, int | float) and not isinstance(v, bool)}
        if "trainer/global_step" in numbers:
            numbers[STEP] = numbers["trainer/global_step"]
            rows.append(numbers)
    return RunLog(directory, rows)


def is_run(directory: Path) -> bool:
    """A directory Hydra ran a job in, or one holding a run's log within three levels."""
    near = ("metrics.csv", "*/metrics.csv", "*/*/metrics.csv", "wandb/offline-run-*/run-*.wandb")
    return (directory / ".hydra").is_dir() or any(any(directory.glob(pattern)) for pattern in near)


def run_directories(directory: Path) -> list[Path]:
    """``[directory]`` for a run; the job directories inside it for a sweep."""
    directory = Path(directory)
    if (directory / ".hydra").is_dir() and not (directory / "multirun.yaml").exists():
        return [directory]
    jobs = sorted((d for d in directory.iterdir() if d.is_dir() and is_run(d)), key=lambda d: (len(d.name), d.name))
    if jobs:
        return jobs
    if is_run(directory):
        return [directory]
    raise FileNotFoundError(f"{directory} is neither a run directory nor a sweep of runs")


def plot_run(log: RunLog, out: Path) -> list[Path]:
    """``norms.png``, ``clip_rate.png`` and ``heatmap.png`` (when per-layer norms were logged) under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    written = [_save(norms_figure(log), out / "norms.png")]

    fig, ax = plots.figure(9, 3.5)
    steps, values = log.series("clip/rate")
    ax.plot(steps, values, ".-")
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("step")
    ax.set_ylabel("fraction of steps clipped")
    ax.set_title("clip rate")
    written.append(_save(fig, out / "clip_rate.png"))

    if log.series("update/ratio")[0]:
        written.append(_save(updates_figure(log), out / "updates.png"))
    layers = [k.split("/", 1)[1] for k in log.keys() if k.startswith("grad_norm/")]
    if layers:
        history = {layer: dict(zip(*log.series(f"grad_norm/{layer}"))) for layer in layers}
        written.append(_save(plots.grad_norm_heatmap(plots.HeatmapHistory.of(history)), out / "heatmap.png"))
    return written


def norms_figure(log: RunLog):
    """The global norm before and after clipping at the recorded steps, the largest norm of the steps in between
    (``grad/norm_max``: no spike unseen), and the threshold."""
    fig, ax = plots.figure(9, 4.5)
    styles = (("grad/norm", "-"), ("grad/norm_clipped", "-"), ("grad/norm_max", ":"), ("clip/threshold", "--"))
    for key, style in styles:
        steps, values = log.series(key)
        if steps:
            ax.plot(steps, values, style, label=key)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global L2 norm")
    ax.set_title("gradient norm before and after clipping (dotted: largest since the previous record)")
    ax.legend()
    return fig


def updates_figure(log: RunLog):
    """The update / parameter norm ratio of the whole model and of each layer (``log_updates=True``)."""
    fig, ax = plots.figure(9, 4.5)
    keys = ["update/ratio"] + [k for k in log.keys() if k.startswith("update_ratio/")]
    for key in keys:
        steps, values = log.series(key)
        ax.plot(steps, values, "-" if key == "update/ratio" else ":", label=key, linewidth=2 if "/ratio" in key else 1)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("update norm / parameter norm")
    ax.set_title("what the optimizer applied, relative to the weights")
    ax.legend(fontsize=7)
    return fig


def summarize(log: RunLog) -> dict[str, float | str]:
    norms = log.series("grad/norm")[1]
    rates = log.series("clip/rate")[1]
    return {
        "run": log.directory.name,
        "overrides": log.overrides(),
        "final train loss": log.last("train/loss"),
        "largest grad norm": max(norms) if norms else math.nan,
        "mean clip rate": sum(rates) / len(rates) if rates else math.nan,
        "non-finite steps": log.last("clip/nonfinite_steps"),
    }


def compare(logs: list[RunLog], out: Path) -> list[Path]:
    """A markdown table and a plot of the global gradient norm across the runs of a sweep."""
    rows = [summarize(log) for log in logs]
    header = list(rows[0])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [f"{v:.4g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    table = out / "comparison.md"
    table.write_text("\n".join(lines) + "\n")
    fig, ax = plots.figure(9, 4.5)
    for log, row in zip(logs, rows):
        steps, values = log.series("grad/norm")
        ax.plot(steps, values, label=row["overrides"] or row["run"])
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("global L2 norm before clipping")
    ax.set_title("gradient norm across runs")
    ax.legend(fontsize=7)
    return [table, _save(fig, out / "comparison.png")]


def report(directory: Path) -> list[Path]:
    """Write the plots of a run, or of every run of a sweep plus the comparison; returns the files written."""
    directory = Path(directory)
    runs = run_directories(directory)
    logs = [load(run) for run in runs]
    written = [path for log in logs for path in plot_run(log, log.directory / "report")]
    if runs != [directory]:
        written += compare(logs, directory)
    return written


def _save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=110)
    return path


class SweepReport(HydraCallback):
    """Hydra callback: after a ``-m`` sweep, the comparison of its runs (table and plot) in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        if config.get("report", True) and config.get("logger"):
            sweep = Path(config.hydra.sweep.dir)
            written = compare([load(run) for run in run_directories(sweep)], sweep)
            print(f"sweep comparison      {written[0]}")
