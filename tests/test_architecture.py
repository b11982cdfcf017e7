"""The tree's shape: the import layers hold (import-linter, contracts in pyproject.toml), every
package says what lives there, and the `steer` parser is torch-free.

Every import counts, also the ones inside functions: a lazy import is still a dependency.
"""

from __future__ import annotations

import ast
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("steering", "server", "clients")
LINT = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or "lint-imports"


def _modules() -> dict[str, Path]:
    out = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = path.relative_to(ROOT).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            out[name] = path
    return out


MODULES = _modules()


def _lint(config: Path | None = None) -> subprocess.CompletedProcess:
    args = [LINT, "--no-cache"] + (["--config", str(config)] if config else [])
    return subprocess.run(args, cwd=ROOT, capture_output=True, text=True)


def test_the_import_contracts_hold():
    out = _lint()
    assert out.returncode == 0, out.stdout + out.stderr
    assert "0 broken" in out.stdout


def test_the_contracts_catch_an_upward_import(tmp_path):
    """The linter sees the real graph: the library's layers upside down must break."""
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    steering = next(c for c in config["contracts"] if c["id"] == "steering")
    lines = ["[importlinter]", "root_packages =", *(f"    {p}" for p in PACKAGES),
             "[importlinter:contract:upside-down]", "name = upside down", "type = layers",
             "containers = steering", "layers =",
             *(f"    {layer}" for layer in reversed(steering["layers"]))]
    (tmp_path / "contracts.ini").write_text("\n".join(lines) + "\n")
    out = _lint(tmp_path / "contracts.ini")
    assert out.returncode != 0 and "BROKEN" in out.stdout, out.stdout


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


def test_no_merge_conflict_markers_are_committed():
    """A merge left unresolved (`<<<<<<< `/`>>>>>>> ` lines) never reaches a tracked file."""
    root = Path(__file__).resolve().parents[1]
    if not (root / ".git").exists() or shutil.which("git") is None:
        pytest.skip("not a git checkout")
    found = subprocess.run(["git", "grep", "-n", "-I", "-E", "^(<<<<<<<|>>>>>>>) "], cwd=root,
                           capture_output=True, text=True)
    assert found.returncode == 1, found.stdout[:2000]  # 1: no match
