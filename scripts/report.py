"""Plots of a run or a sweep from what it logged: python scripts/report.py <run or sweep dir>."""

import sys
from pathlib import Path

from lightning_clip.report import report

if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python scripts/report.py <run or sweep dir>")
    for path in report(Path(sys.argv[1])):
        print(path)
