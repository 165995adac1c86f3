"""The README's scheduling example runs as written and matches what it claims."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"


def test_readme_sched_example_runs() -> None:
    section = README.read_text().split("## Scheduling model starts", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S)
    assert block, "README scheduling section has no python block"
    scope: dict[str, object] = {}
    exec(compile(block.group(1), "README.md", "exec"), scope)
    best = scope["best"]
    assert best.server == "b"  # type: ignore[attr-defined]
