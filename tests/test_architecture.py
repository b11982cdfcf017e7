"""The tree's shape: no import circles, imports point one way, and the `steer` parser is torch-free.

Every import counts, also the ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("steering", "server", "clients")


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _target(name: str) -> str | None:
    """The project module an import of `name` loads last (`a.b.c` → `a.b.c`, else `a.b`)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imports(module: str, path: Path) -> set[str]:
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = set()
    tree = ast.parse(path.read_text(), str(path))
    for block in ast.walk(tree):  # `if TYPE_CHECKING:` imports never run
        if isinstance(block, ast.If) and "TYPE_CHECKING" in ast.unparse(block.test):
            block.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0] if node.level > 1 else package
                base = f"{anchor}.{base}" if base else anchor
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for name in names:
            target = _target(name)
            if target and target != module:
                found.add(target)
    return found


GRAPH = {module: _imports(module, path) for module, path in MODULES.items()}


def _cycles() -> list[list[str]]:
    """Strongly connected components with more than one module (Tarjan)."""
    index, low, stack, on_stack, out = {}, {}, [], set(), []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in GRAPH[v]:
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

    sys.setrecursionlimit(10_000)
    for v in sorted(GRAPH):
        if v not in index:
            visit(v)
    return out


def test_the_graph_sees_the_packages():
    assert {"steering.interventions.kernel", "server.engine", "server.api.protocol"} <= set(GRAPH)
    assert "steering.interventions.kernel" in GRAPH["steering.interventions.hooks"]


def test_no_import_circles():
    assert _cycles() == []


def test_the_cycle_finder_finds_a_cycle():
    GRAPH["steering.interventions.kernel"].add("steering.interventions.hooks")
    try:
        pair = {"steering.interventions.hooks", "steering.interventions.kernel"}
        assert any(pair <= set(component) for component in _cycles())
    finally:
        GRAPH["steering.interventions.kernel"].discard("steering.interventions.hooks")


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("steering")))
def test_the_library_never_imports_the_server_or_clients(module):
    assert not {t for t in GRAPH[module] if t.split(".")[0] in {"server", "clients"}}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if not m.startswith("server.engine")))
def test_engine_internals_are_reached_only_through_its_interface(module):
    assert not {t for t in GRAPH[module] if t.startswith("server.engine.")}


@pytest.mark.parametrize("module", sorted(m for m in MODULES if m.startswith("server.engine")))
def test_the_engine_never_imports_the_api(module):
    assert not {t for t in GRAPH[module] if t.startswith(("server.api", "server.security"))}


def test_every_package_says_what_lives_there():
    for module, path in MODULES.items():
        if path.name == "__init__.py" and module != "server.playground":
            doc = ast.get_docstring(ast.parse(path.read_text())) or ""
            assert len(doc.splitlines()) >= 1, f"{module} has no docstring"


def test_the_steer_parser_does_not_import_torch():
    code = ("import sys; from server.cli import build_parser; "
            "build_parser().parse_args(['compare', '--help'])")
    probe = ("import sys; from server.cli import build_parser; p = build_parser(); "
             "p.parse_args(['generate', 'hi']); "
             "print(sorted(m for m in sys.modules if m.split('.')[0] in "
             "{'torch', 'transformers', 'numpy'}))")
    out = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True,
                         text=True, check=True)
    assert out.stdout.strip() == "[]"
    helped = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert helped.returncode == 0 and "--variant" in helped.stdout


def test_requests_carry_a_typed_context_not_loose_state():
    """Per-request values live in `server.context.RequestContext`, not `request.state.*`."""
    loose = [f"{m}: {line.strip()}" for m, path in MODULES.items() if m.startswith("server")
             and m != "server.context" for line in path.read_text().splitlines()
             if "request.state" in line or 'scope.get("state")' in line]
    assert loose == []


def test_one_serving_module_per_seam():
    """Generation is served by small modules, each with one job, and compare uses their public
    names only (no `_private` helper of a sibling)."""
    api = {m.rpartition(".")[2] for m in MODULES if m.startswith("server.api.")}
    assert {"prepare", "tracker", "jobs", "responses", "streaming", "completions",
            "compare"} <= api and "serving" not in api
    tree = ast.parse(MODULES["server.api.compare"].read_text())
    private = [alias.name for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
               and (node.module or "").startswith("server") for alias in node.names
               if alias.name.startswith("_")]
    assert private == []
