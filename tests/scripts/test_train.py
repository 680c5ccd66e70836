"""The Hydra app run as a user runs it: subprocesses, real overrides, W&B offline, outputs read back from disk."""

import csv
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from lightning_clip.wandb_offline import read_run

ROOT = Path(__file__).parents[2]
TRAIN = ROOT / "scripts" / "train.py"
REPORT = ROOT / "scripts" / "report.py"
FAST = ["trainer.max_steps=20", "data.train_samples=512", "data.val_samples=64", "data.length=30"]


def run(args, cwd, timeout=300):
    env = {**os.environ, "WANDB_MODE": "offline", "HYDRA_FULL_ERROR": "0"}
    return subprocess.run(
        [sys.executable, *map(str, args)], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )


def only(paths):
    paths = list(paths)
    assert len(paths) == 1, paths
    return paths[0]


def test_single_run_writes_wandb_run_report_and_summary(tmp_path):
    result = run([TRAIN, "clipping=agc", "clipping.clip_factor=0.02", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--- lightning_clip run summary ---" in result.stdout
    assert "clipping              agc {" in result.stdout and "'clip_factor': 0.02" in result.stdout
    output = only(tmp_path.glob("outputs/*/*"))
    assert {p.name for p in (output / "report").iterdir()} == {"norms.png", "clip_rate.png", "heatmap.png"}
    wandb_run = read_run(output)
    assert wandb_run.config["clipping"]["method"] == "agc" and wandb_run.config["clipping"]["clip_factor"] == 0.02
    # the whole composed config, nested, without _target_ noise; the callbacks group's checkpoint and lr monitor
    assert wandb_run.config["trainer"]["max_steps"] == 20 and wandb_run.config["data"]["length"] == 30
    assert wandb_run.config["seed"] == 0 and wandb_run.config["model"]["lr"] == 0.1
    assert "_target_" not in wandb_run.config["model"] and "_target_" not in wandb_run.config["clipping"]
    assert (output / "checkpoints" / "last.ckpt").exists()
    assert any(key.startswith("lr-") for row in wandb_run.history for key in row)
    assert any("grad/norm" in row for row in wandb_run.history)
    assert f"wandb sync {only(output.glob('wandb/offline-run-*'))}" in result.stdout


def test_tensorboard_logger_gets_the_scalars(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    result = run([TRAIN, "logger=tensorboard", "callbacks=none", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = only(tmp_path.glob("outputs/*/*"))
    events = EventAccumulator(str(only(output.glob("tensorboard/version_*")))).Reload()
    scalars = set(events.Tags()["scalars"])
    assert {"grad/norm", "grad/norm_max", "clip/rate", "grad_norm/rnn"} <= scalars, scalars
    assert len(events.Scalars("grad/norm")) == 2  # steps 9 and 19
    assert not (output / "checkpoints").exists()  # callbacks=none


def test_a_run_never_holds_two_clipping_callbacks(tmp_path):
    extra = "+callbacks.extra._target_=lightning_clip.GradientClipping"
    result = run([TRAIN, extra, "logger=none", *FAST], tmp_path)
    assert result.returncode == 2 and "callbacks.extra is a GradientClipping" in result.stderr


def test_csv_logger_and_report_script(tmp_path):
    result = run([TRAIN, "logger=csv", "report=false", "trainer.accumulate_grad_batches=2", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    output = only(tmp_path.glob("outputs/*/*"))
    rows = list(csv.DictReader(only(output.glob("**/metrics.csv")).open()))
    # 20 optimizer steps of 2 batches each: records at optimizer steps 9 and 19
    assert [int(row["step"]) for row in rows if row.get("grad/norm")] == [9, 19]
    assert not (output / "report").exists() and not (output / "wandb").exists()
    result = run([REPORT, output], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert sorted(p.name for p in (output / "report").iterdir()) == ["clip_rate.png", "heatmap.png", "norms.png"]
    for wrong, message in [
        (output / "checkpoints", "is neither a run directory nor a sweep"),
        (tmp_path / "nowhere", "not a directory"),
    ]:
        result = run([REPORT, wrong], tmp_path)
        assert result.returncode == 1 and message in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("strategy", ["cpu", pytest.param("fsdp2", marks=pytest.mark.distributed)])
def test_a_stopped_run_resumes_from_its_checkpoint_with_its_clipping_state(tmp_path, strategy):
    """``ckpt_path=``: the resumed run starts at the checkpoint's step, and ZClip's statistics and the callback's step
    count come back with it (its own checkpoint then holds all 24 steps). Under FSDP2 a checkpoint is a directory,
    with the callbacks' state in its ``meta.pt``."""
    import torch

    common = ["clipping=zclip", "logger=csv", "report=false", "trainer.log_every_n_steps=4", f"trainer={strategy}"]
    common += FAST[1:]
    first = run([TRAIN, *common, "trainer.max_steps=16", "hydra.run.dir=first"], tmp_path, timeout=600)
    assert first.returncode == 0, first.stderr[-3000:]
    saved = tmp_path / "first" / "checkpoints" / "last.ckpt"
    second = [TRAIN, *common, "trainer.max_steps=24", f"ckpt_path={saved}", "hydra.run.dir=second"]
    result = run(second, tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Restored all states from the checkpoint" in result.stderr + result.stdout
    rows = list(csv.DictReader(only((tmp_path / "second").glob("**/metrics.csv")).open()))
    assert [int(row["step"]) for row in rows if row.get("grad/norm")] == [19, 23]

    def clipping_state(path):
        checkpoint = torch.load(path / "meta.pt" if path.is_dir() else path, weights_only=False)
        state = checkpoint["callbacks"]["GradientClipping{'method': 'zclip'}"]
        return checkpoint["global_step"], state["optimizers"][0]

    (step, before), (end, after) = clipping_state(saved), clipping_state(tmp_path / "second/checkpoints/last.ckpt")
    assert (step, before["steps"], end, after["steps"]) == (16, 16, 24, 24)
    assert (int(before["policy"]["count"]), int(after["policy"]["count"])) == (16, 24)  # ZClip's warmup: 25 norms


def test_transformer_on_python_docs_text_trains_from_the_app(tmp_path):
    """model=transformer data=text: the study's language model, per-layer statistics of its attention blocks."""
    result = run(
        [TRAIN, "model=transformer", "data=text", "logger=csv", "report=false", "trainer.max_steps=20"], tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final train loss" in result.stdout
    metrics = only(tmp_path.glob("outputs/*/*/**/metrics.csv")).read_text().splitlines()[0]
    assert "grad_norm/blocks.layers.0.self_attn" in metrics and "grad/norm" in metrics


@pytest.mark.distributed
@pytest.mark.parametrize("strategy", ["ddp", "fsdp2"])
def test_two_processes_write_one_output_dir_and_one_wandb_run(tmp_path, strategy):
    result = run([TRAIN, f"trainer={strategy}", "trainer.devices=2", *FAST], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.count("--- lightning_clip run summary ---") == 1
    output = only(tmp_path.glob("outputs/*/*"))
    only(output.glob("wandb/offline-run-*"))
    assert (output / "report" / "norms.png").exists()


@pytest.mark.distributed
def test_two_job_sweep_groups_runs_and_compares_them(tmp_path):
    result = run([TRAIN, "-m", "clipping=norm,agc", *FAST], tmp_path, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = only(p for p in tmp_path.glob("multirun/*/*") if (p / "multirun.yaml").exists())
    runs = [read_run(sweep / job) for job in ("0", "1")]
    assert [r.config["clipping"]["method"] for r in runs] == ["norm", "agc"]
    assert {r.group for r in runs} == {sweep.name}
    assert [r.name for r in runs] == [",".join(sorted([f"clipping={m}", *FAST])) for m in ("norm", "agc")]
    table = (sweep / "comparison.md").read_text()
    assert "clipping=norm" in table and "clipping=agc" in table
    assert (sweep / "comparison.png").stat().st_size > 0
    assert (sweep / "0" / "report" / "norms.png").exists()


@pytest.mark.parametrize(
    ("overrides", "message", "code"),
    [
        (["clipping=norm", "clipping.max_nrom=1"], "Key 'max_nrom' not in 'NormClipping'", 1),
        (
            ["clipping=norm", "clipping.max_norm=-1"],
            "error in clipping config: GradientClipping: max_norm=-1.0 is invalid for method='norm': expected a "
            "finite number > 0",
            2,
        ),
        (
            ["model=transformer"],
            "error: TinyTransformerLM (model) trains on TextDataModule, not AddingDataModule: use data=text",
            2,
        ),  # fmt: skip
        # refused by the callback's checks at the start of fit: the demo's SGD keeps no second moment
        (["clipping=spam"], "error in clipping config: GradientClipping(method='spam') reads Adam's second", 2),
        (["seed=abc"], "error: seed='abc' is invalid: expected an integer >= 0", 2),
        (["ckpt_path=nowhere.ckpt"], "error: ckpt_path='nowhere.ckpt' does not exist: give a checkpoint", 2),
    ],
)
def test_bad_override_exits_non_zero_with_message_and_no_traceback(tmp_path, overrides, message, code):
    result = run([TRAIN, *overrides, *FAST], tmp_path)
    assert result.returncode == code
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    assert not list(tmp_path.glob("outputs/*/*/checkpoints"))  # nothing trained


def test_spam_trains_from_the_app_with_adamw(tmp_path):
    result = run([TRAIN, "clipping=spam", "model.optimizer=adamw", "model.lr=0.01", "logger=csv", *FAST], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "clipping              spam {'exclude': [], 'theta': 5000.0" in result.stdout
    assert "final train loss" in result.stdout and "(diverged)" not in result.stdout


def test_packaged_clipping_configs_from_a_separate_hydra_app(tmp_path):
    (tmp_path / "config.yaml").write_text(
        textwrap.dedent(
            """
            hydra:
              searchpath: [pkg://lightning_clip.conf]
            defaults:
              - clipping: agc
              - _self_
            """
        )
    )
    (tmp_path / "app.py").write_text(
        textwrap.dedent(
            """
            import hydra
            from hydra.utils import instantiate
            import lightning_clip

            @hydra.main(version_base="1.3", config_path=".", config_name="config")
            def main(cfg):
                callback = instantiate(cfg.clipping)
                print("CALLBACK", callback.method.name, callback.method.clip_factor, callback.method.eps)

            main()
            """
        )
    )
    result = run([tmp_path / "app.py", "clipping.clip_factor=0.03", "hydra.run.dir=out"], tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "CALLBACK agc 0.03 0.001" in result.stdout
    result = run([tmp_path / "app.py", "clipping.clip_factr=0.03", "hydra.run.dir=out"], tmp_path)
    assert result.returncode == 1 and "Key 'clip_factr' not in 'AgcClipping'" in result.stderr
