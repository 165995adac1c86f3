"""Import structure of the package: no cycles, and the pure layers stay pure.

Edges are the ``fastckpt`` imports a module makes when it is imported (module level, including
``try`` blocks, excluding ``if TYPE_CHECKING:``) and, separately, every ``fastckpt`` import
anywhere in it (function bodies included). Neither graph may have a cycle: a lazy import
that only hides a cycle is a module boundary in the wrong place.
The purity check imports the pure modules in a fresh interpreter and looks at ``sys.modules``.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

import fastckpt

ROOT = Path(fastckpt.__file__).parent

# Modules that must import neither torch nor the C++ core (nor anything that does).
PURE = [
    "fastckpt",
    "fastckpt.errors",
    "fastckpt.config",
    "fastckpt.format",
    "fastckpt.format.reader",
    "fastckpt.format.spec",
    "fastckpt.format.index",
    "fastckpt.format.info",
    "fastckpt.format.verify",
    "fastckpt.loader.plan",
    "fastckpt.rules",
    "fastckpt.rules.devices",
    "fastckpt.rules.units",
    "fastckpt.rules.carried",
    "fastckpt.rules.host",
    "fastckpt.sched",
]


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(ROOT.rglob("*.py")):
        parts = list(path.relative_to(ROOT.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        out[".".join(parts)] = path
    return out


MODULES = _modules()
COMPILED = {"fastckpt._core"}  # built from src_cpp/, no .py file


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _import_nodes(tree: ast.AST, *, eager_only: bool) -> Iterator[ast.Import | ast.ImportFrom]:
    stack: list[ast.AST] = [tree]
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
            continue
        if eager_only and isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            continue
        if isinstance(node, ast.If) and _is_type_checking(node):
            stack.extend(node.orelse)
            continue
        stack.extend(ast.iter_child_nodes(node))


def _targets(module: str, node: ast.Import | ast.ImportFrom) -> Iterator[str]:
    if isinstance(node, ast.Import):
        for alias in node.names:
            yield alias.name
        return
    base = node.module or ""
    if node.level:
        package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
        for _ in range(node.level - 1):
            package = package.rpartition(".")[0]
        base = f"{package}.{base}" if base else package
    for alias in node.names:
        sub = f"{base}.{alias.name}"
        yield sub if sub in MODULES or sub in COMPILED else base


def _graph(*, eager_only: bool) -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        edges = set()
        for node in _import_nodes(tree, eager_only=eager_only):
            for target in _targets(module, node):
                while target and target not in MODULES and target not in COMPILED:
                    # fastckpt.x.Name -> fastckpt.x
                    target = target.rpartition(".")[0]
                if target and target != module:
                    edges.add(target)
        graph[module] = edges
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                out.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_package() -> None:
    graph = _graph(eager_only=False)
    assert "fastckpt.rules.devices" in graph["fastckpt.loader.plan"]
    assert "fastckpt.format.reader" in graph["fastckpt.loader.opening"]
    assert "fastckpt.loader.opening" in graph["fastckpt.loader.session"]


def test_cycle_finder_finds_cycles() -> None:
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_at_import_time() -> None:
    assert _cycles(_graph(eager_only=True)) == []


def test_no_cycles_behind_lazy_imports_either() -> None:
    assert _cycles(_graph(eager_only=False)) == []


def test_rule_modules_import_nothing_of_the_package_but_errors() -> None:
    graph = _graph(eager_only=False)
    for module in MODULES:
        if module.startswith("fastckpt.rules."):
            assert graph[module] <= {"fastckpt.errors"}, (module, graph[module])


@pytest.mark.parametrize("module", [m for m in PURE if m in MODULES])
def test_pure_modules_import_neither_torch_nor_core(module: str) -> None:
    code = (
        "import sys, importlib\n"
        f"importlib.import_module({module!r})\n"
        "bad = sorted(m for m in ('torch', 'fastckpt._core') if m in sys.modules)\n"
        "assert not bad, bad\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


# The layers, lowest first (docs/architecture.md). A module imports only modules of its own
# layer or below, lazily or not; the first matching prefix names a module's layer.
LAYERS: list[tuple[str, ...]] = [
    ("fastckpt.errors", "fastckpt.config", "fastckpt._version", "fastckpt.rules"),
    ("fastckpt._core", "fastckpt._core_missing", "fastckpt.io_engine"),
    ("fastckpt.format",),
    ("fastckpt.tiers", "fastckpt.remote"),
    (
        "fastckpt.serve.protocol",
        "fastckpt.serve.names",
        "fastckpt.serve.client",
        "fastckpt.serve.store",
        "fastckpt.serve.daemon",
        "fastckpt.serve.spawn",
    ),
    ("fastckpt.loader",),
    # the package root is the public API (it resolves names lazily): code of this layer and above
    # may use it, code below imports the module that defines what it needs
    ("fastckpt.sched", "fastckpt.migrate", "fastckpt.integrations", "fastckpt.transformers"),
    ("fastckpt.bench", "fastckpt.serve", "fastckpt.demo", "fastckpt.cachecli", "fastckpt.cli"),
]
# siblings that never import each other
APART = [("fastckpt.sched", "fastckpt.migrate")]


ROOT_LAYER = 6


def layer_of(module: str) -> int:
    if module == "fastckpt":
        return ROOT_LAYER
    best, found = -1, -1
    for i, prefixes in enumerate(LAYERS):
        for p in prefixes:
            if (module == p or module.startswith(p + ".")) and len(p) > best:
                best, found = len(p), i
    return found


def test_every_module_has_a_layer() -> None:
    missing = [m for m in MODULES if m != "fastckpt" and layer_of(m) < 0]
    assert not missing, f"add these modules to LAYERS: {missing}"


def test_imports_never_go_up_the_layers() -> None:
    graph = _graph(eager_only=False)
    upward = []
    for module, targets in graph.items():
        if module == "fastckpt":  # the public facade re-exports every layer, lazily
            continue
        for t in targets:
            if layer_of(t) > layer_of(module):
                upward.append(f"{module} (layer {layer_of(module)}) -> {t} (layer {layer_of(t)})")
    for a, b in APART:
        for module, targets in graph.items():
            for x, y in ((a, b), (b, a)):
                if module.startswith(x) and any(t.startswith(y) for t in targets):
                    upward.append(f"{module} -> {y} ({x} and {y} never import each other)")
    assert not upward, "\n".join(sorted(upward))


def test_the_layer_check_catches_an_upward_import() -> None:
    assert layer_of("fastckpt.format.reader") < layer_of("fastckpt.loader.session")
    assert layer_of("fastckpt.serve.client") < layer_of("fastckpt.loader.session")
    assert layer_of("fastckpt.serve.cli") > layer_of("fastckpt.loader.session")
