"""Plots of a run or a sweep from what it logged: python scripts/report.py <run or sweep dir>."""

import sys
from pathlib import Path

from lightning_clip.report import report

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/report.py <run or sweep dir>")
    directory = Path(sys.argv[1])
    if not directory.is_dir():
        sys.exit(f"error: {directory} is not a directory (a run's or a sweep's output directory)")
    try:
        paths = report(directory)
    except FileNotFoundError as error:  # a directory that holds no run's metrics
        sys.exit(f"error: {error}")
    for path in paths:
        print(path)
