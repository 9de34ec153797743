"""Rendering deploy/launchd/<label>.plist.in into this machine's launchd job definitions."""

from __future__ import annotations

import plistlib
import sys
from collections.abc import Sequence
from pathlib import Path
from string import Template
from typing import Any

from macmesh.service.common import DEFAULT_LOG_MAX_MB, LABELS, SYSTEM_PATH, ServiceError
from mesh.paths import DEFAULT_GRPC_PORT


def template_dir() -> Path:
    """deploy/launchd of a source checkout, else `<prefix>/share/macmesh/launchd`."""
    here = Path(__file__).resolve().parents[2] / "deploy" / "launchd"
    if here.is_dir():
        return here
    return Path(sys.prefix) / "share" / "macmesh" / "launchd"


def python_executable() -> Path:
    """This environment's python, absolute but not resolved: a venv's `bin/python` is a
    symlink, and only the link's own path makes Python pick the venv's site-packages."""
    if not sys.executable:
        raise ServiceError("cannot tell which python runs macmesh (sys.executable is empty)")
    return Path(sys.executable).absolute()


def service_path(python: Path) -> str:
    """PATH for the job: the venv's bin (its llama-server), Homebrew, then the system."""
    return ":".join(dict.fromkeys([str(python.parent), *SYSTEM_PATH]))


def log_file(home: Path, role: str) -> Path:
    """Where launchd sends a role's stdout and stderr."""
    return home / "logs" / f"macmesh-{role}.log"


def render_plist(
    role: str,
    *,
    home: Path,
    user_home: Path,
    args: Sequence[str],
    log_max_mb: float = DEFAULT_LOG_MAX_MB,
    python: Path | None = None,
    user: str | None = None,
    templates: Path | None = None,
) -> dict[str, Any]:
    """The launchd job for `role`, from its template, with every path absolute.

    `home` is MACMESH_HOME, `user_home` HOME, `args` the role's flags; `user` (for a
    LaunchDaemon) is the account the job runs as.
    """
    label = LABELS[role]
    python = python or python_executable()
    home, user_home = home.expanduser().absolute(), user_home.expanduser().absolute()
    path = (templates or template_dir()) / f"{label}.plist.in"
    try:
        template = plistlib.loads(path.read_bytes())
    except (OSError, plistlib.InvalidFileException) as exc:
        raise ServiceError(f"cannot read the launchd template {path}: {exc}") from None
    values = {
        "PYTHON": str(python),
        "MACMESH_HOME": str(home),
        "HOME": str(user_home),
        "PATH": service_path(python),
        "LOG_FILE": str(log_file(home, role)),
        "LOG_MAX_MB": f"{log_max_mb:g}",
    }
    try:
        plist = _fill(template, values, list(args))
    except (KeyError, ValueError) as exc:
        raise ServiceError(f"{path}: unknown or malformed placeholder {exc}") from None
    if not isinstance(plist, dict) or plist.get("Label") != label:
        raise ServiceError(f"{path}: expected a dict with Label {label}")
    if user is not None:
        plist["UserName"] = user
    return plist


def _fill(node: Any, values: dict[str, str], args: list[str]) -> Any:
    """Substitute ${NAME} in every string; an array element "${ARGS}" becomes `args`."""
    if isinstance(node, str):
        return Template(node).substitute(values)
    if isinstance(node, list):
        out: list[Any] = []
        for item in node:
            if item == "${ARGS}":
                out.extend(args)
            else:
                out.append(_fill(item, values, args))
        return out
    if isinstance(node, dict):
        return {k: _fill(v, values, args) for k, v in node.items()}
    return node


def role_args(
    role: str,
    *,
    host: str,
    grpc_port: int,
    http_port: int,
    extra: Sequence[str] = (),
    both: bool = False,
) -> list[str]:
    """The role's flags; `extra` last, so a flag given there wins (argparse keeps the last)."""
    if role == "node":
        return ["--host", host, "--grpc-port", str(grpc_port), *extra]
    args = ["--host", host, "--port", str(http_port)]
    if both and grpc_port != DEFAULT_GRPC_PORT:
        # The coordinator's default peer is the local node on the default port.
        args += ["--peer", f"127.0.0.1:{grpc_port}"]
    return [*args, *extra]
