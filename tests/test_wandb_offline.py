"""The offline run-file reader, on a real offline W&B run, read whole and as a writer leaves it part-way."""

import pytest
import wandb

from lightning_clip.wandb_offline import BLOCK, read_run, read_run_file, records, run_files

ROWS = 40


@pytest.fixture(scope="module")
def run_file(tmp_path_factory):
    """A finished offline run whose rows include some larger than a block, so records span blocks."""
    directory = tmp_path_factory.mktemp("offline")
    run = wandb.init(project="tests", dir=str(directory), mode="offline", config={"method": "agc"})
    for step in range(ROWS):
        row = {"loss": 1.0 / (step + 1), "step": step}
        if step % 10 == 3:
            row["note"] = "x" * (BLOCK + 1000)  # one record split as FIRST, MIDDLE..., LAST
        run.log(row)
    run.finish()
    return run_files(directory)[0]


def test_a_finished_run_reads_back_whole(run_file):
    run = read_run(run_file.parent)
    assert run.finished and run.config["method"] == "agc"
    rows = [row for row in run.history if "loss" in row]
    assert [row["step"] for row in rows] == list(range(ROWS))
    assert [row["loss"] for row in rows] == pytest.approx([1.0 / (step + 1) for step in range(ROWS)])
    assert len(rows[3]["note"]) == BLOCK + 1000


def test_a_file_cut_anywhere_yields_the_complete_records_before_the_cut(run_file, tmp_path):
    """W&B's service may still be appending when the file is read (seen in CI: a record cut short raised
    DecodeError). At any cut, including inside a header, a payload or a record spanning blocks, the reader yields
    exactly the records that ended before the cut, and never raises."""
    data = run_file.read_bytes()
    whole = [record.SerializeToString() for record in records(run_file)]
    cut_file = tmp_path / "run-cut.wandb"
    step = max(1, len(data) // 400)
    for cut in [*range(7, len(data), step), BLOCK - 3, BLOCK + 5, len(data) - 1]:
        if cut >= len(data):
            continue
        cut_file.write_bytes(data[:cut])
        got = [record.SerializeToString() for record in records(cut_file)]
        assert got == whole[: len(got)], f"cut at {cut}"
        assert len(got) < len(whole), f"cut at {cut} of {len(data)} still yields every record"


def test_reading_a_run_cut_short_returns_what_it_holds_once_the_file_stops_growing(run_file, tmp_path):
    """A killed run: no exit record, the file does not grow; the reader gives back the rows written so far."""
    data = run_file.read_bytes()
    cut_file = tmp_path / "run-killed.wandb"
    cut_file.write_bytes(data[: len(data) // 2 + 3])
    run = read_run_file(cut_file, wait_s=2.0, quiet_s=0.5)
    assert not run.finished
    steps = [row["step"] for row in run.history if "step" in row]
    assert 0 < len(steps) < ROWS and steps == list(range(len(steps)))
