"""Imports point one way (see ../shared/ARCHITECTURE.md):

    coordinator -> routing -> mesh.types
    coordinator -> mesh -> proto
    node -> mesh -> proto

routing does no I/O; mesh never imports node/coordinator; only entry points
(macmesh.cli) and tests import both node and coordinator.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

FORBIDDEN: dict[str, set[str]] = {
    "routing": {
        "node", "coordinator", "proto", "mesh.client", "mesh.wire", "mesh.discovery",
        "asyncio", "grpc", "fastapi", "zeroconf", "httpx", "uvicorn", "mlx", "mlx_lm",
    },
    "mesh": {"node", "coordinator", "mlx", "mlx_lm", "fastapi"},
    "node": {"coordinator", "fastapi", "routing.policy"},
    "coordinator": {"node", "mlx", "mlx_lm"},
    "proto": {"node", "coordinator", "mesh", "routing"},
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


@pytest.mark.parametrize("package", sorted(FORBIDDEN))
def test_imports_point_one_way(package: str) -> None:
    bad = [
        f"{path.relative_to(ROOT)} imports {mod}"
        for path in sorted((ROOT / package).rglob("*.py"))
        for mod in sorted(imports_of(path))
        if violates(mod, FORBIDDEN[package])
    ]
    assert not bad, "\n".join(bad)


def test_the_rule_catches_a_violation(tmp_path: Path) -> None:
    f = tmp_path / "x.py"
    f.write_text("import grpc\nfrom node.app import serve\n")
    assert violates("node.app", FORBIDDEN["mesh"]) and "node.app" in imports_of(f)
