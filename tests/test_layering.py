"""Imports point one way (see ../shared/ARCHITECTURE.md):

    coordinator -> routing -> mesh.types
    coordinator -> mesh -> proto
    node -> mesh -> proto

routing does no I/O; mesh never imports node/coordinator; only entry points
(macmesh.cli) and tests import both node and coordinator; nothing but the CLI
package itself imports the CLI package `macmesh`; no module-level import cycles.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN: dict[str, set[str]] = {
    "routing": {
        "node", "coordinator", "proto", "mesh.client", "mesh.wire", "mesh.discovery",
        "asyncio", "grpc", "fastapi", "zeroconf", "httpx", "uvicorn", "mlx", "mlx_lm",
        "macmesh",
    },
    "mesh": {"node", "coordinator", "mlx", "mlx_lm", "fastapi", "macmesh"},
    "node": {"coordinator", "fastapi", "routing.policy", "macmesh"},
    "coordinator": {"node", "mlx", "mlx_lm", "macmesh"},
    "proto": {"node", "coordinator", "mesh", "routing", "macmesh"},
}  # fmt: skip


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found.add(n.module)
    return found


def violates(module: str, banned: set[str]) -> bool:
    return any(module == b or module.startswith(b + ".") for b in banned)


def banned(package: str, path: Path) -> set[str]:
    # An entry point (`python -m node`) may start the CLI; nothing else may import it.
    return FORBIDDEN[package] - {"macmesh"} if path.name == "__main__.py" else FORBIDDEN[package]


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {mod}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for mod in sorted(imports_of(path))
        if violates(mod, banned(package, path))
    ]
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("import grpc\nfrom node.app import serve\n")
    assert violates("node.app", FORBIDDEN["mesh"]) and "node.app" in imports_of(f)


PACKAGES = ("macmesh", "node", "coordinator", "mesh", "routing", "proto")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path) -> set[str]:
    """Imports run when the module loads (not those inside functions or TYPE_CHECKING)."""
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for n in tree.body:
        if isinstance(n, ast.Import):
            found.update(a.name for a in n.names)
        elif isinstance(n, ast.ImportFrom) and n.module and n.level == 0:
            found.add(n.module)
            found.update(f"{n.module}.{a.name}" for a in n.names)
    return found


def import_graph() -> dict[str, set[str]]:
    files = {module_name(p): p for pkg in PACKAGES for p in (ROOT / pkg).rglob("*.py")}
    graph: dict[str, set[str]] = {}
    for name, path in files.items():
        # `from a.b import c` names module a.b.c when that file exists, else a.b.
        graph[name] = {m for m in top_level_imports(path) if m in files and m != name}
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle, as the modules along it, or None."""
    state: dict[str, int] = {}  # 1 = on the current path, 2 = done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*path[path.index(nxt) :], nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (found := visit(start)):
            return found
    return None


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_the_cycle_check_catches_one() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_a_node_process_imports_no_coordinator() -> None:
    """`python -m node` (and `macmesh node`) loads neither the coordinator nor its web stack."""
    code = (
        "import runpy, sys; sys.argv = ['node', '--help']\n"
        "try:\n    runpy.run_module('node', run_name='__main__')\nexcept SystemExit:\n    pass\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in "
        "('coordinator', 'fastapi', 'uvicorn')))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
