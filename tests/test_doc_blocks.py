"""Every code block in the repository's Markdown runs as written, or says that it does not.

Which files: every ``.md`` file git knows (tracked, or untracked and not ignored) except the
generated reports under ``docs/results/``; new files are checked as they appear.

The conventions, for whoever writes docs:

- Every fence names its language. ``python`` and ``bash`` (``sh``, ``shell``) blocks run;
  ``json``, ``toml`` and ``ini`` blocks must parse; ``text`` is never run (output, file trees).
  Any other language must be marked as an outline.
- A block that cannot run here (it needs a GPU, vLLM, a server that runs until stopped, another
  machine, the network, or minutes) is marked by this line right before its opening fence::

      <!-- outline -->            or      <!-- outline: needs a GPU -->

  It is then only shown, never run: write it so that a reader sees that it is a sketch.
- A block of commands that CI runs is marked ``<!-- ci -->``: each of its commands (comments
  and blank lines aside) must be a line of ``.ci/run``, so that CI runs them verbatim.
- Blocks that run do so on CPU, with small generated models, in order: the blocks of one file
  run one after another in one Python process with one namespace (as a reader pasting them one
  by one would), ``bash`` blocks in ``bash -euo pipefail`` with this interpreter's environment,
  all in one fresh working directory. There, absolute paths under ``/models/`` and ``/tmp/`` are
  rewritten to that directory's ``models/`` and ``tmp/``, which hold:

  - ``models/llama-8b``, ``models/llama-3-8b``: a tiny random Llama as transformers saves it
    (``config.json``, ``model.safetensors``, generation config);
  - ``models/llama.fastckpt``, ``models/other.fastckpt``: that model converted to fastckpt;
  - ``model.safetensors`` (in the working directory itself): the model's weights file.

  A block may create more (``fastckpt convert ... /models/llama-8b.fastckpt``); later blocks of
  the same file see it.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

RUN = {"python": "python", "py": "python", "bash": "bash", "sh": "bash", "shell": "bash"}
PARSE = {"json", "toml", "ini"}
SHOW = {"text"}
_FENCE = re.compile(r"^(?P<indent> {0,3})(?P<fence>`{3,}|~{3,})(?P<lang>[^`\s]*)[^\n]*$")
_MARKER = re.compile(r"^<!--\s*(?P<kind>outline|ci)\b\s*(?::[^>]*)?-->\s*$")


@dataclass(frozen=True)
class Block:
    file: str  # relative to the repository root
    line: int  # 1-based line of the opening fence
    lang: str
    body: str
    marker: str | None  # "outline", "ci" or None

    @property
    def where(self) -> str:
        return f"{self.file}:{self.line}"


def markdown_files() -> list[Path]:
    try:
        listed = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard", "*.md"],
            cwd=ROOT,
            capture_output=True,
            check=True,
        ).stdout.split(b"\0")
        paths = sorted({ROOT / p.decode() for p in listed if p})
    except (OSError, subprocess.CalledProcessError):  # not a git checkout
        skip = {".git", ".venv", ".vllm-venv", "build", ".pytest_cache"}
        paths = sorted(
            p for p in ROOT.rglob("*.md") if not skip.intersection(p.relative_to(ROOT).parts)
        )
    return [
        p
        for p in paths
        if p.is_file() and not p.relative_to(ROOT).as_posix().startswith("docs/results/")
    ]


def blocks_of(path: Path, root: Path = ROOT) -> list[Block]:
    """The fenced code blocks of a Markdown file, with the marker line right before each."""
    lines = path.read_text(encoding="utf-8").splitlines()
    out: list[Block] = []
    i = 0
    while i < len(lines):
        m = _FENCE.match(lines[i])
        if not m:
            i += 1
            continue
        fence = m.group("fence")
        start = i
        body: list[str] = []
        i += 1
        while i < len(lines) and not lines[i].strip().startswith(fence):
            body.append(lines[i])
            i += 1
        i += 1  # the closing fence
        before = lines[start - 1].strip() if start > 0 else ""
        marker = _MARKER.match(before)
        out.append(
            Block(
                path.relative_to(root).as_posix(),
                start + 1,
                m.group("lang").lower(),
                "\n".join(body) + "\n",
                marker.group("kind") if marker else None,
            )
        )
    return out


def _all_blocks() -> list[Block]:
    return [b for p in markdown_files() for b in blocks_of(p)]


def _runnable_files() -> list[str]:
    return sorted(
        {b.file for b in _all_blocks() if b.marker is None and b.lang in RUN},
    )


# --- the conventions themselves -------------------------------------------------------------


def test_the_reader_finds_blocks_and_markers(tmp_path: Path) -> None:
    doc = tmp_path / "doc.md"
    doc.write_text(
        "text\n\n<!-- outline: needs a GPU -->\n```python\nx = 1\n```\n\n"
        "````bash\necho '```'\n````\n\n<!-- ci -->\n```bash\nls\n```\n```\nbare\n```\n"
    )
    found = [(b.line, b.lang, b.body, b.marker) for b in blocks_of(doc, tmp_path)]
    assert found == [
        (4, "python", "x = 1\n", "outline"),
        (8, "bash", "echo '```'\n", None),
        (13, "bash", "ls\n", "ci"),
        (16, "", "bare\n", None),
    ]


def test_docs_are_found() -> None:
    files = {p.relative_to(ROOT).as_posix() for p in markdown_files()}
    assert {"README.md", "docs/migrate.md", "docs/lazy.md"} <= files
    assert not any(f.startswith("docs/results/") for f in files)
    assert "README.md" in _runnable_files()


def test_every_block_runs_parses_or_is_marked() -> None:
    bad = []
    for b in _all_blocks():
        if b.marker is not None or b.lang in RUN or b.lang in PARSE or b.lang in SHOW:
            continue
        if not b.lang:
            bad.append(f"{b.where}: a fence without a language (use `text` for plain text)")
        else:
            bad.append(f"{b.where}: `{b.lang}` is neither run nor parsed: mark it <!-- outline -->")
    assert not bad, "\n".join(bad)


def _command(line: str) -> str:
    """A shell line without its trailing comment, whitespace normalised."""
    return " ".join(re.sub(r"\s+#.*$", "", line).split())


def test_ci_blocks_are_what_ci_runs() -> None:
    ci = {_command(line) for line in (ROOT / ".ci" / "run").read_text().splitlines()}
    marked = [b for b in _all_blocks() if b.marker == "ci"]
    assert marked, "the README's install and test commands are marked <!-- ci -->"
    missing = [
        f"{b.where}: {line.strip()!r}"
        for b in marked
        for line in b.body.splitlines()
        if line.strip() and not line.lstrip().startswith("#") and _command(line) not in ci
    ]
    assert not missing, ".ci/run does not run:\n" + "\n".join(missing)


def test_data_blocks_parse() -> None:
    bad = []
    for b in _all_blocks():
        if b.marker is not None or b.lang not in PARSE:
            continue
        try:
            if b.lang == "json":
                json.loads(b.body)
            elif b.lang == "toml":
                tomllib = pytest.importorskip("tomllib")
                tomllib.loads(b.body)
            else:
                configparser.ConfigParser(strict=False, interpolation=None).read_string(b.body)
        except (ValueError, configparser.Error) as exc:
            bad.append(f"{b.where}: {exc}")
    assert not bad, "\n".join(bad)


# --- running them ---------------------------------------------------------------------------

# Runs the blocks of one file in order: python blocks in one namespace, bash blocks in bash.
_DRIVER = r"""
import json, os, subprocess, sys

blocks = json.loads(sys.stdin.read())
namespace = {"__name__": "__main__"}
for block in blocks:
    where = f"{block['file']}:{block['line']}"
    print(f"--- {where} ({block['lang']})", flush=True)
    if block["lang"] == "python":
        # line numbers in tracebacks are the Markdown file's
        code = compile("\n" * block["line"] + block["body"], block["file"], "exec")
        exec(code, namespace)
    else:
        done = subprocess.run(["bash", "-euo", "pipefail", "-c", block["body"]])
        if done.returncode != 0:
            sys.exit(f"{where}: bash exited with status {done.returncode}")
    sys.stdout.flush()
"""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random Llama as transformers saves it (nothing downloaded)."""
    pytest.importorskip("transformers")
    import torch
    import transformers

    cfg = transformers.LlamaConfig(
        vocab_size=2048,  # docs slice rows 1000:2000 of the embedding
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("docs-model") / "llama"
    transformers.LlamaForCausalLM(cfg).save_pretrained(root, safe_serialization=True)
    return root


def _workdir(base: Path, model: Path) -> Path:
    import fastckpt

    work = base / "work"
    models = work / "models"
    models.mkdir(parents=True)
    (work / "tmp").mkdir()
    for name in ("llama-8b", "llama-3-8b"):
        shutil.copytree(model, models / name)
    fastckpt.convert(model, models / "llama.fastckpt", progress=False)
    shutil.copytree(models / "llama.fastckpt", models / "other.fastckpt")
    shutil.copy(model / "model.safetensors", work / "model.safetensors")
    return work


def _localised(body: str, work: Path) -> str:
    return re.sub(r"(?<![\w./-])/(models|tmp)/", lambda m: f"{work}/{m.group(1)}/", body)


@pytest.mark.parametrize("doc", _runnable_files())
def test_blocks_run_as_written(doc: str, tmp_path: Path, tiny_llama: Path) -> None:
    work = _workdir(tmp_path, tiny_llama)
    blocks = [
        {"file": b.file, "line": b.line, "lang": RUN[b.lang], "body": _localised(b.body, work)}
        for b in blocks_of(ROOT / doc)
        if b.marker is None and b.lang in RUN
    ]
    env = dict(os.environ)
    # the console scripts of this interpreter's environment (fastckpt, fastckpt-convert)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    done = subprocess.run(
        [sys.executable, "-c", _DRIVER],
        input=json.dumps(blocks),
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, f"{doc}:\n{done.stdout[-4000:]}\n{done.stderr[-6000:]}"
