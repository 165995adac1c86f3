"""The README's commands are what CI runs (its code blocks run in tests/test_doc_blocks.py)."""

from __future__ import annotations

import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


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


def test_readme_lint_command_is_what_ci_runs() -> None:
    """ruff and mypy run in a CI step of their own (no wall-clock limit inside a test); the
    README gives the same line to run them locally."""
    readme = [
        line
        for block in _bash_blocks(README.read_text())
        for line in block.splitlines()
        if "mypy" in line
    ]
    assert len(readme) == 1, readme
    line = readme[0]
    assert "ruff check" in line and "ruff format --check" in line and "-m mypy" in line
    ci = (README.parent / ".ci" / "run").read_text().splitlines()
    assert line in ci
    # it fails CI: run with its status checked, not under `set -e` alone (which ignores a
    # failure before the last `&&`)
    after = ci[ci.index(line) + 1 :]
    assert after[:2] == ["status=$?", "set -e"] and after[2].startswith('if [ "$status" -ne 0 ]')


def test_slow_tests_leave_the_main_run_and_have_their_own(tmp_path: Path) -> None:
    """`python3 -m pytest -q` (the README's main run) deselects tests marked slow; `-m slow`,
    or naming a file, runs them (tests/conftest.py)."""
    import shutil
    import subprocess
    import sys

    shutil.copy(Path(__file__).with_name("conftest.py"), tmp_path / "conftest.py")
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\ntestpaths = .\nmarkers =\n    slow: slow\n    gpu: gpu\n"
    )
    (tmp_path / "test_two.py").write_text(
        "import pytest\n\n"
        "def test_quick():\n    pass\n\n"
        "@pytest.mark.slow\ndef test_long():\n    pass\n"
    )

    def run(*args: str) -> tuple[str, ...]:
        out = subprocess.run(
            # (no hypothesis plugin: it alone takes seconds to import)
            [
                sys.executable,
                "-m",
                "pytest",
                "-v",
                "-p",
                "no:cacheprovider",
                "-p",
                "no:hypothesispytest",
                *args,
            ],
            cwd=tmp_path,
            capture_output=True,
            text=True,
        )
        assert out.returncode == 0, out.stdout + out.stderr
        return tuple(sorted(re.findall(r"::(test_\w+) PASSED", out.stdout)))

    assert run() == ("test_quick",)
    assert run("-m", "slow") == ("test_long",)
    assert run("test_two.py") == ("test_long", "test_quick")


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
    """The vLLM plug-in's tests, the migration between vLLM engines and the serving deployment
    with vLLM engines each run in a CI step of their own (the main suite skips them: vLLM is
    not in its venv); the migration step, whose two engines start in two processes, and the
    deployment's, which starts a Ray cluster, have a time budget of their own."""
    ci = _ci_commands()
    for suite in ("tests/vllm_plugin", "tests/vllm_migrate", "tests/vllm_ray_serve"):
        steps = [line for line in ci if line.split()[-1] == suite]
        assert len(steps) == 1, f".ci/run should run {suite} in one step, found {steps}"
    (migrate_step,) = [line for line in ci if line.endswith("tests/vllm_migrate")]
    assert re.match(r"timeout \d+ \.vllm-venv/bin/python -m pytest ", migrate_step), migrate_step
    (serving_step,) = [line for line in ci if line.endswith("tests/vllm_ray_serve")]
    assert re.match(
        r"FASTCKPT_VLLM_PYTHON=\.vllm-venv/bin/python timeout \d+ python3 -m pytest ", serving_step
    ), serving_step


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


def test_migration_equality_claims_carry_the_bf16_caveat() -> None:
    """Where a doc says a migrated generation equals the unmigrated one, the same paragraph says
    that in bfloat16 a near-tie can resolve the other way (docs/migrate.md measures it)."""
    docs = [README, *sorted((README.parent / "docs").glob("*.md"))]
    claims = re.compile(r"(is|equals?|same as) the unmigrated", re.I)
    bad = []
    for path in docs:
        for paragraph in re.split(r"\n\s*\n", path.read_text()):
            if claims.search(paragraph) and not re.search(r"bfloat16|bf16", paragraph):
                bad.append(f"{path.name}: {' '.join(paragraph.split())[:160]}")
    assert not bad, "\n".join(bad)
    assert claims.search(README.read_text()), "the README's claim moved: update this test"
