"""Reads what an offline W&B run wrote to its ``run-*.wandb`` file (for the run report and the tests).

wandb 0.31 has no Python reader for it any more. The file is a LevelDB-style log: a 7-byte header (``:W&B``, a
magic number, a version), then 32 KiB blocks of records, each with a 7-byte header (crc32, length, type: FULL,
FIRST, MIDDLE or LAST) whose payloads, joined, are serialized ``wandb_internal_pb2.Record`` messages.
"""

from __future__ import annotations

import json
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32768
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def records(path: Path):
    """The complete records in the file, in order; a record still being written at its end is left out."""
    data = Path(path).read_bytes()
    if data[:4] != b":W&B":
        raise ValueError(f"{path} is not a W&B run file")
    pos, pending = HEADER, b""
    while pos + HEADER <= len(data):
        room = BLOCK - pos % BLOCK
        if room < HEADER:
            pos += room
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + HEADER])
        if kind == 0 and length == 0:  # zero padding at the end of a block
            pos += room
            continue
        if pos + HEADER + length > len(data):  # the writer is still writing this record: it is not one yet
            return
        payload = data[pos + HEADER : pos + HEADER + length]
        pos += HEADER + length
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        record = pb.Record()
        record.ParseFromString(pending)
        yield record


@dataclass
class Run:
    history: list[dict] = field(default_factory=list)
    config: dict = field(default_factory=dict)
    metrics: dict[str, pb.MetricRecord] = field(default_factory=dict)
    summary: dict = field(default_factory=dict)
    group: str = ""
    name: str = ""
    finished: bool = False  # the run's exit record is in the file


def run_files(directory: Path) -> list[Path]:
    """The offline run files in ``directory`` (a run directory) or under it, oldest first."""
    directory = Path(directory)
    inside = directory.glob("run-*.wandb") if directory.name.startswith("offline-run-") else []
    return sorted([*inside, *directory.glob("**/offline-run-*/run-*.wandb")])


def read_run(wandb_dir: Path) -> Run:
    """The single offline run under ``wandb_dir`` (a run directory or any folder above it): history rows, config,
    define_metric records, final summary."""
    files = run_files(wandb_dir)
    if len(files) != 1:
        raise FileNotFoundError(f"expected one offline W&B run under {wandb_dir}, found {len(files)}")
    return read_run_file(files[0])


def read_run_file(path: Path, wait_s: float = 60.0, quiet_s: float = 10.0) -> Run:
    """The run in ``path``. W&B's service may still be writing the file after ``finish()`` returns (seen on a loaded
    machine: the history of a finished run read back empty), so until its exit record is there this re-reads it each
    time it grows, for at most ``wait_s`` seconds; a file that has not grown for ``quiet_s`` (a killed run) or a run
    still going at the deadline is returned as far as it got."""
    path = Path(path)
    size = path.stat().st_size  # taken before each parse, so growth during a parse is seen on the next check
    run = _parse(path)
    start = grew = time.monotonic()
    while not run.finished and time.monotonic() - start < wait_s and time.monotonic() - grew < quiet_s:
        time.sleep(0.2)
        if path.stat().st_size != size:
            size, grew = path.stat().st_size, time.monotonic()
            run = _parse(path)
    return run


def _parse(path: Path) -> Run:
    run = Run()
    for record in records(path):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            row: dict = {}
            for item in record.history.item:
                path = [item.key] if item.key else list(item.nested_key)
                target = row
                for part in path[:-1]:
                    target = target.setdefault(part, {})
                target[path[-1]] = json.loads(item.value_json)
            run.history.append(row)
        elif kind == "config":
            for item in record.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "metric":
            run.metrics[record.metric.name or record.metric.glob_name] = record.metric
        elif kind == "run":  # holds the config given to wandb.init
            run.group, run.name = record.run.run_group, record.run.display_name
            for item in record.run.config.update:
                run.config[_key(item)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[_key(item)] = json.loads(item.value_json)
        elif kind == "exit":
            run.finished = True
    return run


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)
