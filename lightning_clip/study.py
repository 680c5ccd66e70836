"""The clipping study: run one cell (task x clipping configuration x seed), and aggregate a sweep of cells.

Each job writes ``result.json`` in its directory; after a ``-m`` sweep, :class:`StudyTable` (a Hydra callback)
writes ``results.csv``, ``results.md`` and ``results.png`` in the sweep directory. Per task and clipping
configuration, over seeds: the divergence rate (a non-finite loss, or the mean of the last 10 losses above
``divergence_factor`` times the mean of the first 10), the mean final loss of the runs that did not diverge (and
accuracy where the task has one), and the wall time per step relative to ``none``. Per fixed-threshold method: the
range of thresholds whose loss is within 5% of the best. Per adaptive method: its loss relative to the best fixed
threshold.
"""

from __future__ import annotations

import csv
import json
import math
import statistics
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import lightning.pytorch as pl
from hydra.experimental.callback import Callback as HydraCallback

THRESHOLD_OF = {"norm": "max_norm", "value": "clip_value", "tensor_norm": "max_norm"}


class DivergenceStop(pl.Callback):
    """Stops a run as soon as it diverges: a non-finite loss, or the mean of the last ``window`` losses above
    ``factor`` times the mean of the first ``window`` (single losses are too noisy to judge). Also records the
    losses and the time per step (from the ``warmup``-th step on, past start-up)."""

    def __init__(self, factor: float, window: int = 10, warmup: int = 2) -> None:
        self.factor, self.window, self.warmup = factor, window, warmup
        self.losses: list[float] = []
        self.diverged = False
        self.started: float | None = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        loss = float(outputs["loss"])
        self.losses.append(loss)
        if len(self.losses) == self.warmup:
            self.started = time.perf_counter()
        if not math.isfinite(loss) or self._above_start():
            self.diverged = True
            trainer.should_stop = True

    def _above_start(self) -> bool:
        if len(self.losses) < 2 * self.window:
            return False
        start = statistics.fmean(self.losses[: self.window])
        return statistics.fmean(self.losses[-self.window :]) > self.factor * start

    def seconds_per_step(self) -> float:
        if self.started is None or len(self.losses) <= self.warmup:
            return math.nan
        return (time.perf_counter() - self.started) / (len(self.losses) - self.warmup)


def run_cell(cfg: Any, output: Path) -> dict[str, Any]:
    """Train one cell and write its ``result.json``; the final loss is the mean of its last 10 steps."""
    from hydra.utils import instantiate

    from lightning_clip import GradientClipping

    cell = dict(cfg.grid.cells[cfg.cell])
    pl.seed_everything(cfg.seed, verbose=False)
    clipping = GradientClipping(**cell, nonfinite="ignore", log_every_n_steps=10, progress_bar=False)
    stop = DivergenceStop(cfg.divergence_factor)
    trainer = pl.Trainer(
        accelerator="cpu",
        max_steps=cfg.task.steps,
        callbacks=[clipping, stop],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        check_val_every_n_epoch=10_000,
    )
    model, data = instantiate(cfg.task.model), instantiate(cfg.task.data)
    trainer.fit(model, datamodule=data)
    accuracy = math.nan
    if not stop.diverged and hasattr(model, "validation_step"):
        metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
        accuracy = metrics.get("val/accuracy", math.nan)
    tail = stop.losses[-10:]
    result = {
        "task": cfg.task.name,
        "method": cell["method"],
        "cell": cell,
        "threshold": cell.get(THRESHOLD_OF.get(cell["method"], ""), None),
        "seed": cfg.seed,
        "diverged": stop.diverged,
        "final_loss": math.nan if stop.diverged else sum(tail) / len(tail),
        "accuracy": accuracy,
        "seconds_per_step": stop.seconds_per_step(),
        "steps": len(stop.losses),
    }
    (output / "result.json").write_text(json.dumps(result, indent=1))
    return result


def _mean(values) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return statistics.fmean(finite) if finite else math.nan


def label(cell: dict[str, Any]) -> str:
    return " ".join(f"{k}={v}" for k, v in cell.items() if k != "method") or "defaults"


def aggregate(results: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One row per task and clipping configuration, averaged over seeds."""
    groups: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in results:
        groups[(r["task"], json.dumps(r["cell"], sort_keys=True))].append(r)
    rows = []
    for (task, cell_key), runs in groups.items():
        finite = [r["final_loss"] for r in runs if not r["diverged"]]
        accuracies = [r["accuracy"] for r in runs if not r["diverged"] and not math.isnan(r["accuracy"])]
        cell = json.loads(cell_key)
        rows.append(
            {
                "task": task,
                "method": cell["method"],
                "setting": label(cell),
                "threshold": runs[0]["threshold"],
                "seeds": len(runs),
                "divergence rate": sum(r["diverged"] for r in runs) / len(runs),
                "final loss": statistics.fmean(finite) if finite else math.nan,
                "accuracy": statistics.fmean(accuracies) if accuracies else math.nan,
                "time/step vs none": _mean(r["seconds_per_step"] for r in runs),
            }
        )
    for task in {row["task"] for row in rows}:
        task_rows = [row for row in rows if row["task"] == task]
        base = [row["time/step vs none"] for row in task_rows if row["method"] == "none"]
        fixed = [row for row in task_rows if row["threshold"] is not None and not math.isnan(row["final loss"])]
        best_fixed = min((row["final loss"] for row in fixed), default=math.nan)
        for row in task_rows:
            row["time/step vs none"] = row["time/step vs none"] / base[0] if base else math.nan
            same = [r for r in fixed if r["method"] == row["method"]]
            if row["threshold"] is not None and same:
                best = min(r["final loss"] for r in same)
                good = sorted(r["threshold"] for r in same if r["final loss"] <= 1.05 * best)
                row["thresholds within 5% of best"] = f"{good[0]:g}..{good[-1]:g}" if good else ""
            elif row["method"] in ("agc", "autoclip", "zclip", "adagc"):
                row["loss / best fixed"] = row["final loss"] / best_fixed if best_fixed > 0 else math.nan
    return sorted(rows, key=lambda r: (r["task"], r["method"], r["threshold"] or 0))


COLUMNS = [
    "task",
    "method",
    "setting",
    "seeds",
    "divergence rate",
    "final loss",
    "accuracy",
    "thresholds within 5% of best",
    "loss / best fixed",
    "time/step vs none",
]


def _cell(value: Any) -> str:
    """A markdown cell: floats to 3 significant digits, NaN (diverged on every seed, or not measured) as "-"."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def write_tables(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """``results.csv``, ``results.md`` and ``results.png`` (final loss per configuration and task)."""
    with open(directory / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in COLUMNS} for row in rows)
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in rows:
        cells = [row.get(c, "") for c in COLUMNS]
        lines.append("| " + " | ".join(_cell(v) for v in cells) + " |")
    (directory / "results.md").write_text("\n".join(lines) + "\n")
    fig = _plot(rows)
    fig.savefig(directory / "results.png", dpi=110)
    return [directory / "results.md", directory / "results.csv", directory / "results.png"]


def _plot(rows: list[dict[str, Any]]) -> Any:
    """Per task, each configuration's final loss relative to the task's best (log scale, 1 = best): blue where no
    seed diverged, orange where some did (the others' loss), a red cross at the right edge where all did."""
    tasks = sorted({row["task"] for row in rows})
    columns = min(2, len(tasks))
    lines = math.ceil(len(tasks) / columns)
    from matplotlib.figure import Figure

    fig = Figure(figsize=(7 * columns, 4.5 * lines), layout="constrained")
    axes = fig.subplots(lines, columns, squeeze=False)
    for ax in axes.flat[len(tasks) :]:
        ax.set_visible(False)
    for ax, task in zip(axes.flat, tasks):
        task_rows = [row for row in rows if row["task"] == task]
        losses = [row["final loss"] for row in task_rows]
        best = min((v for v in losses if not math.isnan(v)), default=math.nan)
        ratios = [v / best if best > 0 else math.nan for v in losses]
        edge = 2 * max((r for r in ratios if not math.isnan(r)), default=1.0)
        for y, (row, ratio) in enumerate(zip(task_rows, ratios)):
            if math.isnan(ratio):
                ax.plot(edge, y, "x", color="tab:red", markersize=9)
            else:
                color = "tab:blue" if row["divergence rate"] == 0 else "tab:orange"
                ax.hlines(y, 1.0, ratio, color=color, linewidth=2)
                ax.plot(ratio, y, "o", color=color)
        ax.axvline(1.05, color="grey", linestyle="--", linewidth=1)
        ax.set_xscale("log")
        ax.set_yticks(range(len(task_rows)), [f"{row['method']} {row['setting']}" for row in task_rows])
        ax.invert_yaxis()
        ax.set_xlabel("final loss / best of the task (x: diverged on every seed; orange: on some)")
        ax.set_title(task)
    return fig


class StudyTable(HydraCallback):
    """Hydra callback: after a sweep of study cells, the results table and plot in the sweep directory."""

    def on_multirun_end(self, config, **kwargs) -> None:
        sweep = Path(config.hydra.sweep.dir)
        results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/result.json"))]
        if results:
            written = write_tables(aggregate(results), sweep)
            print(f"study results         {written[0]}")
