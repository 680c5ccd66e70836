"""The clipping study: run one cell (task x clipping configuration x learning-rate multiple x seed), and aggregate a
sweep of cells.

Each job writes ``result.json`` in its directory; after a ``-m`` sweep, :class:`StudyTable` (a Hydra callback)
writes ``results.csv``, ``results.md`` and ``results.png`` in the sweep directory; :func:`main_tables` does the same
for the results of several sweeps. Definitions (as in the README):

- a run diverges when its loss turns non-finite or the mean of its last 10 losses exceeds ``divergence_factor``
  times the mean of its first 10; its final loss is the mean of its last 10% of steps;
- a configuration *trains* at a learning rate when none of its seeds diverges;
- the *best fixed threshold* of a task at a learning rate is, among the fixed configurations (``norm``, ``value``,
  ``tensor_norm``) that train, the one with the lowest mean final loss over seeds;
- a loss spike is a step whose loss exceeds the mean of the previous 50 by more than 3 of their standard deviations.
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
FIXED = tuple(THRESHOLD_OF)
ADAM_FAMILY = ("adamw",)


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


def loss_spikes(losses: list[float], window: int = 50, sigmas: float = 3.0) -> int:
    """Steps whose loss exceeds the mean of the previous ``window`` by more than ``sigmas`` standard deviations."""
    spikes = 0
    for i in range(window, len(losses)):
        previous = losses[i - window : i]
        if losses[i] > statistics.fmean(previous) + sigmas * statistics.pstdev(previous):
            spikes += 1
    return spikes


def run_cell(cfg: Any, output: Path) -> dict[str, Any]:
    """Train one cell at ``lr_scale`` times the task's learning rate and write its ``result.json``."""
    from hydra.utils import instantiate

    from lightning_clip import GradientClipping

    cell = dict(cfg.grid.cells[cfg.cell])
    base = {"task": cfg.task.name, "method": cell["method"], "cell": cell, "seed": cfg.seed, "lr_scale": cfg.lr_scale}
    if cell["method"] == "spam" and cfg.task.get("optimizer") not in ADAM_FAMILY:
        result = {**base, "applicable": False}  # SPAM reads Adam's second moment
        (output / "result.json").write_text(json.dumps(result, indent=1))
        return result
    pl.seed_everything(cfg.seed, verbose=False)
    options = {"nonfinite": "ignore", "log_every_n_steps": 10, "progress_bar": False}
    clipping = GradientClipping(**{**options, **cell})
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
    model = instantiate(cfg.task.model, lr=cfg.task.model.lr * cfg.lr_scale)
    data = instantiate(cfg.task.data)
    trainer.fit(model, datamodule=data)
    accuracy = math.nan
    if not stop.diverged and hasattr(model, "validation_step"):
        metrics = trainer.validate(model, datamodule=data, verbose=False)[0]
        accuracy = metrics.get("val/accuracy", math.nan)
    tail = stop.losses[-max(1, len(stop.losses) // 10) :]
    result = {
        **base,
        "applicable": True,
        "threshold": cell.get(THRESHOLD_OF.get(cell["method"], ""), None),
        "diverged": stop.diverged,
        "final_loss": math.nan if stop.diverged else sum(tail) / len(tail),
        "accuracy": accuracy,
        "loss_spikes": loss_spikes(stop.losses),
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
    """One row per task, learning-rate multiple and clipping configuration, averaged over seeds."""
    groups: dict[tuple[str, float, str], list[dict]] = defaultdict(list)
    for r in results:
        if r.get("applicable", True):
            groups[(r["task"], r.get("lr_scale", 1.0), json.dumps(r["cell"], sort_keys=True))].append(r)
    rows = []
    for (task, lr_scale, cell_key), runs in groups.items():
        finite = [r["final_loss"] for r in runs if not r["diverged"]]
        accuracies = [r["accuracy"] for r in runs if not r["diverged"] and not math.isnan(r["accuracy"])]
        cell = json.loads(cell_key)
        rows.append(
            {
                "task": task,
                "lr x": lr_scale,
                "method": cell["method"],
                "setting": label(cell),
                "threshold": runs[0]["threshold"],
                "seeds": len(runs),
                "divergence rate": sum(r["diverged"] for r in runs) / len(runs),
                "final loss": statistics.fmean(finite) if finite else math.nan,
                "accuracy": statistics.fmean(accuracies) if accuracies else math.nan,
                "loss spikes": _mean(float(r.get("loss_spikes", math.nan)) for r in runs if not r["diverged"]),
                "time/step vs norm": _mean(r["seconds_per_step"] for r in runs),
            }
        )
    for task, lr_scale in {(row["task"], row["lr x"]) for row in rows}:
        same = [row for row in rows if (row["task"], row["lr x"]) == (task, lr_scale)]
        norm_time = _mean(row["time/step vs norm"] for row in same if row["method"] == "norm")
        trained_fixed = [r for r in same if r["method"] in FIXED and r["divergence rate"] == 0]
        best_fixed = min((r["final loss"] for r in trained_fixed), default=math.nan)
        for row in same:
            row["time/step vs norm"] = row["time/step vs norm"] / norm_time if norm_time > 0 else math.nan
            trains = row["divergence rate"] == 0
            row["loss / best fixed"] = row["final loss"] / best_fixed if trains and best_fixed > 0 else math.nan
            if row["method"] in FIXED and trains and row["final loss"] == best_fixed:  # tensor_norm has no threshold
                row["best fixed"] = "yes"
    return sorted(rows, key=lambda r: (r["task"], r["lr x"], r["method"], r["threshold"] or 0, r["setting"]))


def robustness(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per task and configuration: the largest learning-rate multiple at which it trains, and its loss there
    relative to the best fixed threshold at that multiple (as the ZClip paper reports learning-rate robustness)."""
    by_config: dict[tuple[str, str, str], list[dict]] = defaultdict(list)
    for row in rows:
        by_config[(row["task"], row["method"], row["setting"])].append(row)
    table = []
    for (task, method, setting), runs in sorted(by_config.items()):
        trained = [r for r in runs if r["divergence rate"] == 0]
        top = max(trained, key=lambda r: r["lr x"], default=None)
        table.append(
            {
                "task": task,
                "method": method,
                "setting": setting,
                "largest lr x that trains": top["lr x"] if top else math.nan,
                "loss / best fixed there": top["loss / best fixed"] if top else math.nan,
            }
        )
    return table


COLUMNS = [
    "task",
    "lr x",
    "method",
    "setting",
    "seeds",
    "divergence rate",
    "final loss",
    "accuracy",
    "loss spikes",
    "best fixed",
    "loss / best fixed",
    "time/step vs norm",
]
ROBUSTNESS_COLUMNS = ["task", "method", "setting", "largest lr x that trains", "loss / best fixed there"]


def _cell(value: Any) -> str:
    """A markdown cell: floats to 3 significant digits, NaN (diverged on every seed, or not measured) as "-"."""
    if isinstance(value, float):
        return "-" if math.isnan(value) else f"{value:.3g}"
    return str(value)


def _markdown(rows: list[dict[str, Any]], columns: list[str]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    return lines + ["| " + " | ".join(_cell(row.get(c, "")) for c in columns) + " |" for row in rows]


def write_tables(rows: list[dict[str, Any]], directory: Path) -> list[Path]:
    """``results.csv``, ``results.md`` (per configuration, then learning-rate robustness) and ``results.png`` (final
    loss per configuration and task, at the base learning rate)."""
    with open(directory / "results.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, COLUMNS)
        writer.writeheader()
        writer.writerows({c: row.get(c, "") for c in COLUMNS} for row in rows)
    text = _markdown(rows, COLUMNS)
    if len({row["lr x"] for row in rows}) > 1:
        text += ["", "Learning-rate robustness:", "", *_markdown(robustness(rows), ROBUSTNESS_COLUMNS)]
    (directory / "results.md").write_text("\n".join(text) + "\n")
    fig = _plot([row for row in rows if row["lr x"] == 1.0] or rows)
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


def _against_best(row: dict[str, Any] | None) -> str:
    """A summary cell: final loss / best fixed threshold's, "div p" where a fraction p of seeds diverged."""
    if row is None:
        return "n/a"
    if row["divergence rate"] > 0:
        return f"div {row['divergence rate']:.2g}"
    return f"{row['loss / best fixed']:.2f}"


def _best_fixed(rows: list[dict[str, Any]]) -> str:
    best = [r for r in rows if r.get("best fixed")]
    return f"{best[0]['method']} {best[0]['setting']} ({best[0]['final loss']:.3g})" if best else "-"


def summary(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one line per task at the base learning rate: the best fixed threshold, then each
    configuration that needs no threshold as (final loss / best fixed threshold's), "div" where a seed diverged."""
    base = [row for row in rows if row["lr x"] == 1.0]
    adaptive = list(dict.fromkeys((r["method"], r["setting"]) for r in base if r["method"] not in FIXED + ("none",)))
    names = [f"{m}" if s == "defaults" else f"{m} {s}" for m, s in adaptive]
    lines = ["| task | best fixed threshold (loss) | " + " | ".join(names) + " |", "|---|---|" + "---|" * len(names)]
    for task in sorted({r["task"] for r in base}):
        same = {(r["method"], r["setting"]): r for r in base if r["task"] == task}
        cells = [_best_fixed(list(same.values()))] + [_against_best(same.get(key)) for key in adaptive]
        lines.append(f"| {task} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def defaults_at_every_rate(rows: list[dict[str, Any]]) -> str:
    """A markdown table, one line per task and learning-rate multiple at which a fixed threshold trains: the best
    fixed threshold there, then each adaptive method with its defaults against it ("div p": seeds diverged)."""
    methods = sorted({r["method"] for r in rows if r["setting"] == "defaults" and r["method"] not in FIXED + ("none",)})
    lines = ["| task | lr x | best fixed threshold (loss) | " + " | ".join(methods) + " |"]
    lines.append("|---|---|---|" + "---|" * len(methods))
    for task, rate in sorted({(r["task"], r["lr x"]) for r in rows}):
        same = [r for r in rows if r["task"] == task and r["lr x"] == rate]
        if not any(r.get("best fixed") for r in same):
            continue
        defaults = {r["method"]: r for r in same if r["setting"] == "defaults"}
        cells = [_best_fixed(same)] + [_against_best(defaults.get(m)) for m in methods]
        lines.append(f"| {task} | {rate:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def training_time(results: list[dict[str, Any]]) -> str:
    """How long the runs in the tables trained, summed from each run's own seconds per step times its steps (start-up
    and data loading left out): what one pass over the same grid costs."""
    seconds = [
        r["seconds_per_step"] * r["steps"]
        for r in results
        if r.get("applicable", True) and "steps" in r and math.isfinite(r.get("seconds_per_step", math.nan))
    ]
    hours = sum(seconds) / 3600
    return (
        f"Training time of the {len(seconds)} runs in these tables: {hours:.2f} h of one process (each run's seconds "
        f"per step x its steps); one pass over them with two processes on 2 cores: about {hours / 2:.2f} h, plus "
        "start-up."
    )


def main_tables(sweeps: list[Path], directory: Path, cells: list[dict[str, Any]] | None = None) -> list[Path]:
    """The tables of the results of several sweeps (the study's chunks) together, in ``directory``, with
    ``summary.md``. A run of a later sweep replaces a run of the same cell (task, learning rate, configuration,
    seed) in an earlier one: a chunk rerun after a change supersedes what it reran. With ``cells`` (the grid's),
    runs of a configuration the grid no longer holds (one whose definition changed) are left out."""
    current = None if cells is None else {json.dumps(dict(c), sort_keys=True) for c in cells}
    latest: dict[tuple, dict[str, Any]] = {}
    for sweep in sweeps:
        for path in sorted(Path(sweep).glob("*/result.json")):
            result = json.loads(path.read_text())
            cell = json.dumps(result["cell"], sort_keys=True)
            if current is None or cell in current:
                latest[(result["task"], float(result["lr_scale"]), cell, result["seed"])] = result
    results = list(latest.values())
    directory.mkdir(parents=True, exist_ok=True)
    rows = aggregate(results)
    parts = [summary(rows), defaults_at_every_rate(rows), training_time(results)]
    (directory / "summary.md").write_text("\n\n".join(parts) + "\n")
    return [*write_tables(rows, directory), directory / "summary.md"]
