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


def _bash_blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, re.S)


def _readme_test_command() -> str:
    commands = [
        line
        for block in _bash_blocks(README.read_text())
        for line in block.splitlines()
        if line.startswith("pip install") and "pytest" in line
    ]
    assert len(commands) == 1, f"README should have exactly one test command, found {commands}"
    return commands[0]


def _ci_commands() -> list[str]:
    ci = (README.parent / ".ci" / "run").read_text()
    return [line for line in ci.splitlines() if "pytest" in line and not line.startswith("#")]


def test_readme_test_command_is_what_ci_runs() -> None:
    ci = _ci_commands()
    assert ci, ".ci/run runs no pytest command"
    assert ci[0] == _readme_test_command()
    # every other test command CI runs is one the README gives a user, verbatim
    readme_lines = {
        line for block in _bash_blocks(README.read_text()) for line in block.splitlines()
    }
    for line in ci[1:]:
        assert line in readme_lines, f".ci/run runs {line!r}, which the README does not show"


def test_ci_builds_the_vllm_venv_as_the_readme_says() -> None:
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    readme = [
        line
        for block in _bash_blocks(README.read_text())
        for line in block.splitlines()
        if "make_venv.sh" in line
    ]
    assert len(readme) == 1 and readme[0] in ci


def test_ci_runs_each_vllm_suite_in_a_step_of_its_own() -> None:
    """The vLLM plug-in's tests and the migration between vLLM engines each run in a CI step of
    their own (the main suite skips both: vLLM is not in its venv); the migration step, whose
    two engines start in two processes, has a time budget of its own."""
    ci = _ci_commands()
    for suite in ("tests/vllm_plugin", "tests/vllm_migrate"):
        steps = [line for line in ci if line.split()[-1] == suite]
        assert len(steps) == 1, f".ci/run should run {suite} in one step, found {steps}"
    (migrate_step,) = [line for line in ci if line.endswith("tests/vllm_migrate")]
    assert re.match(r"timeout \d+ \.vllm-venv/bin/python -m pytest ", migrate_step), migrate_step


def test_readme_demo_command_is_what_ci_runs() -> None:
    readme = [
        line
        for block in _bash_blocks(README.read_text())
        for line in block.splitlines()
        if line.startswith("pip install") and "fastckpt demo" in line
    ]
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert len(readme) == 1
    assert readme[0] in ci


def test_ci_installs_only_the_readme_prerequisites() -> None:
    ci = (README.parent / ".ci" / "run").read_text()
    apt = re.findall(r"^\s*apt-get install (.*)$", ci, re.M)
    readme_apt = [
        line.split("apt-get install", 1)[1]
        for block in _bash_blocks(README.read_text())
        for line in block.splitlines()
        if line.startswith("apt-get install")
    ]
    assert apt and readme_apt
    assert {p for line in apt for p in line.split() if not p.startswith("-")} <= {
        p for line in readme_apt for p in line.split() if not p.startswith("-")
    }
    # nothing pip-installed before the README's command
    before = ci.split(_readme_test_command(), 1)[0]
    assert not re.search(r"^\s*(python3? -m )?pip install", before, re.M)


def test_readme_is_self_contained() -> None:
    for path in [README, README.parent / "docs" / "benchmarks.md"]:
        text = path.read_text()
        # the design notes live outside the repository; a clone has no such folder
        for outside in (".." + "/shared", "/work" + "/shared"):
            assert outside not in text, (path, outside)


def test_source_tree_without_core_says_what_to_do(tmp_path: Path) -> None:
    """`import fastckpt` from a source tree that lacks the compiled core (the root of a clone
    after a plain `pip install .`) fails at the first load with an error that says why."""
    import shutil
    import subprocess
    import sys

    src = README.parent / "fastckpt"
    shutil.copytree(
        src, tmp_path / "fastckpt", ignore=shutil.ignore_patterns("*.so", "__pycache__")
    )
    code = (
        "import sys\n"
        # an editable install's import redirect stands aside, as after a plain install
        "sys.meta_path[:] = [f for f in sys.meta_path if 'Redirecting' not in type(f).__name__]\n"
        "import fastckpt\n"
        "try:\n"
        "    fastckpt.load('nothing.safetensors')\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
    )
    import os

    env = {**os.environ, "PYTHONPATH": ""}
    out = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, env=env
    )
    assert out.returncode == 0, out.stderr
    message = out.stdout
    assert str(tmp_path / "fastckpt") in message
    assert "pip install -e ." in message
    assert "fastckpt._core" in message
