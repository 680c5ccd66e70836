"""The README and the packaged configs follow the methods' definitions."""

from pathlib import Path

import pytest

from lightning_clip import configs, methods

ROOT = Path(__file__).parents[1]
README = (ROOT / "README.md").read_text()


def test_readme_parameter_table_is_the_one_generated_from_the_definitions():
    assert methods.parameter_table() in README, (
        "regenerate it with: python -c 'from lightning_clip import methods; print(methods.parameter_table())'"
    )


@pytest.mark.parametrize("method", list(methods.METHODS))
def test_packaged_clipping_configs_are_generated_from_the_definitions(method):
    text = (ROOT / "lightning_clip" / "conf" / "clipping" / f"{method}.yaml").read_text()
    assert text == configs.packaged_yaml(method)


def test_readme_lists_every_packaged_config_and_rename():
    for method in methods.METHODS:
        assert f"`{method}`" in README
    for cls in methods.METHODS.values():
        for old, new in cls.renamed.items():
            assert f"`{old}` -> `{new}`" in README, (cls.name, old)


def test_readme_quick_start_is_two_commands():
    block = README.split("## Quick start", 1)[1].split("```bash", 1)[1].split("```", 1)[0]
    lines = [line for line in block.strip().splitlines() if line.strip()]
    assert len(lines) == 2
    assert "scripts/train.py" in lines[0] and "pytest" in lines[1]
