"""The README's method tables follow the code's parameter tables."""

import re
from pathlib import Path

from lightning_clip.methods import METHODS, REQUIRED

README = (Path(__file__).parents[1] / "README.md").read_text()


def test_readme_lists_every_method_parameter_with_its_default():
    section = README.split("Parameters per method:", 1)[1].split("\n\n", 2)[1]
    rows = set(re.findall(r"^\| `(\w+)` \| `(\w+)` \| ([^|]+) \|", section, flags=re.M))
    expected = set()
    for name, method in METHODS.items():
        for param, spec in method.params.items():
            default = "required" if spec.default is REQUIRED else f"`{spec.default}`"
            expected.add((name, param, default))
    assert {(m, p, d.strip()) for m, p, d in rows} == expected


def test_readme_quick_start_is_two_commands():
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.strip().splitlines() if line.strip()]
    assert len(lines) == 2
    assert "scripts/train.py" in lines[0] and "pytest" in lines[1]
