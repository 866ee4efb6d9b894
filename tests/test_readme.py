"""Every ```python block of README.md runs as written (each on its own, as a user would
paste it)."""
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"


def python_blocks():
    text = README.read_text()
    blocks = []
    for match in re.finditer(r"^```python\n(.*?)^```", text, flags=re.S | re.M):
        line = text.count("\n", 0, match.start()) + 1
        blocks.append(pytest.param(match.group(1), id=f"README.md:{line}"))
    return blocks


def test_readme_has_python_blocks():
    assert len(python_blocks()) >= 4


@pytest.mark.parametrize("code", python_blocks())
def test_readme_block_runs(code, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)          # a block that writes files writes them here
    exec(compile(code, str(README), "exec"), {"__name__": "__readme__"})
