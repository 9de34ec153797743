"""Model paths that config files name, for the catalog to serve where they exist.

Two sources: this node's own `model_aliases.json` / `claude_routing.json`
(a single-Mac setup keeps them beside the node), and the paths each connected
coordinator sends when it opens its state stream (a lab keeps the config on
the coordinator's Mac; every node with the file serves it).
"""

from __future__ import annotations

import itertools
import json
import logging
import threading
from collections.abc import Iterable
from pathlib import Path

from mesh.errors import MeshError
from mesh.paths import ALIASES_FILE, ROUTING_FILE
from routing.aliases import RoutingConfig, named_paths, parse_aliases, parse_claude_routing

log = logging.getLogger(__name__)


class NamedPaths:
    """The union of the home's config paths and every coordinator's pushed paths."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self._lock = threading.Lock()
        self._pushed: dict[int, tuple[str, ...]] = {}
        self._tokens = itertools.count(1)
        self._stamp: tuple[tuple[int, int], ...] = ()
        self._own: tuple[str, ...] = ()

    def push(self, paths: Iterable[str]) -> int:
        """Paths a coordinator sent; returns a token for `withdraw` when it goes."""
        with self._lock:
            token = next(self._tokens)
            self._pushed[token] = tuple(p for p in paths if p)
            return token

    def withdraw(self, token: int) -> None:
        with self._lock:
            self._pushed.pop(token, None)

    def __call__(self) -> list[Path]:
        """Every path, expanded (the catalog calls this at each poll)."""
        own = self._own_paths()
        with self._lock:
            pushed = [p for paths in self._pushed.values() for p in paths]
        return [Path(p).expanduser() for p in {*own, *pushed}]

    def _own_paths(self) -> tuple[str, ...]:
        files = (self.home / ALIASES_FILE, self.home / ROUTING_FILE)
        stamp = tuple(_stamp(f) for f in files)
        if stamp == self._stamp:
            return self._own
        aliases, routing = (_load(f) for f in files)
        try:
            config = RoutingConfig(
                aliases=parse_aliases(aliases if aliases is not None else {}),
                claude=parse_claude_routing(routing if routing is not None else {}),
            )
        except MeshError as exc:
            # The coordinator reports bad config files; here they only name paths.
            log.warning("config files in %s: %s; serving no paths from them", self.home, exc)
            config = RoutingConfig()
        self._stamp, self._own = stamp, named_paths(config)
        return self._own


def _stamp(path: Path) -> tuple[int, int]:
    try:
        st = path.stat()
    except OSError:
        return (0, 0)
    return (st.st_mtime_ns, st.st_size)


def _load(path: Path) -> object:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log.warning("cannot read %s: %s", path, exc)
        return None
