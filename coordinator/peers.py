"""Static peers: nodes reached without Bonjour (VPNs, other subnets).

`remotes.json` in `MACMESH_HOME` (MLX Studio compatible), a JSON list of
entries, each one of:

    "host:port"                                   a node's gRPC address
    {"name": "studio", "url": "grpc://10.0.0.5:50151", "enabled": true}
    {"name": "mini", "address": "mini.local", "grpc_port": 50151}

A seed-style `http://host:1234` URL points at an MLX Studio HTTP port, not a
node: its host is used with `grpc_port` (default 50151). The file is re-read
when it changes; peers added or removed there join or leave the registry.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from coordinator.nodes import NodeRegistry
from mesh.errors import InvalidRequest
from mesh.paths import DEFAULT_GRPC_PORT

log = logging.getLogger(__name__)

REMOTES_FILE = "remotes.json"


def parse_target(text: str, default_port: int = DEFAULT_GRPC_PORT) -> str:
    """`host[:port]`, `[v6]:port` or a URL -> `host:port` for gRPC."""
    text = text.strip()
    if not text:
        raise InvalidRequest("empty peer address")
    if "://" in text:
        parts = urlsplit(text)
        host = parts.hostname
        if not host:
            raise InvalidRequest(f"no host in {text!r}")
        port = parts.port if parts.scheme == "grpc" and parts.port else default_port
    else:
        parts = urlsplit("//" + text)
        host = parts.hostname
        try:
            port = parts.port or default_port
        except ValueError:
            raise InvalidRequest(f"bad port in {text!r}") from None
        if not host:
            raise InvalidRequest(f"no host in {text!r}")
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def parse_remotes(data: Any) -> list[str]:
    """Targets of the enabled entries of `remotes.json`."""
    if not isinstance(data, list):
        raise InvalidRequest("remotes.json must be a JSON list")
    out: list[str] = []
    for i, entry in enumerate(data):
        field = f"remotes[{i}]"
        if isinstance(entry, str):
            out.append(parse_target(entry))
            continue
        if not isinstance(entry, dict):
            raise InvalidRequest("must be 'host:port' or an object", field=field)
        if entry.get("enabled", True) is False:
            continue
        where = entry.get("url") or entry.get("address")
        if not isinstance(where, str):
            raise InvalidRequest("needs 'url' or 'address'", field=field)
        port = entry.get("grpc_port", DEFAULT_GRPC_PORT)
        if isinstance(port, bool) or not isinstance(port, int) or not 0 < port < 65536:
            raise InvalidRequest("must be a port number", field=f"{field}.grpc_port")
        try:
            out.append(parse_target(where, port))
        except InvalidRequest as exc:
            raise InvalidRequest(exc.message, field=field) from None
    return list(dict.fromkeys(out))


class StaticPeers:
    """Keeps the registry in line with `--peer` flags plus `remotes.json`."""

    def __init__(self, home: Path, flags: Iterable[str], registry: NodeRegistry) -> None:
        self.path = home / REMOTES_FILE
        self.flags = [parse_target(p) for p in flags]
        self.registry = registry
        self._current: set[str] = set()
        self._stamp: tuple[int, int] | None = None
        self._loaded = False
        self.error: str | None = None

    def _read(self) -> list[str] | None:
        """Targets from the file; None when unchanged or unreadable (keep the last)."""
        try:
            st = self.path.stat()
        except FileNotFoundError:
            stamp = None
        else:
            stamp = (st.st_mtime_ns, st.st_size)
        if self._loaded and stamp == self._stamp:
            return None
        self._loaded, self._stamp = True, stamp
        if stamp is None:
            self.error = None
            return []
        try:
            targets = parse_remotes(json.loads(self.path.read_text()))
        except (OSError, ValueError) as exc:
            self.error = f"{REMOTES_FILE}: invalid JSON ({exc})"
        except InvalidRequest as exc:
            self.error = f"{REMOTES_FILE}: {exc.message}"
        else:
            self.error = None
            return targets
        log.error("%s; keeping the previous peers", self.error)
        return None

    async def sync(self) -> None:
        """Add new peers, remove dropped ones (discovered nodes are not touched)."""
        remotes = self._read()
        if remotes is None:
            return
        wanted = set(self.flags) | set(remotes)
        for target in sorted(wanted - self._current):
            log.info("static peer %s", target)
            self.registry.add(target)
        for target in sorted(self._current - wanted):
            log.info("static peer %s removed", target)
            await self.registry.remove(target)
        self._current = wanted

    async def run(self, interval: float = 2.0) -> None:
        """Sync now and whenever remotes.json changes."""
        while True:
            await self.sync()
            await asyncio.sleep(interval)
