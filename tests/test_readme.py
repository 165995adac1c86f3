"""The README's quick start runs as written."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_quick_start_runs(tmp_path: Path) -> None:
    text = README.read_text()
    section = text.split("## Quick start", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "README quick start has no python block"
    code = block.group(1).replace("/tmp/quickstart.fastckpt", str(tmp_path / "qs.fastckpt"))
    exec(compile(code, "README.md", "exec"), {})


def test_readme_test_command_matches_ci() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    readme_cmds = re.findall(r"^(pip install .*pytest.*)$", README.read_text(), re.M)
    assert readme_cmds, "README lost its test command"
    assert readme_cmds[0] in ci
