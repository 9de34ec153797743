"""The coordinator's HTTP listener: our own bound socket, uvicorn without its signal handling.

Kept apart from `macmesh.run` so that a node-only process (`macmesh node`,
`python -m node`) never imports the coordinator, FastAPI or uvicorn.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import Iterator

import uvicorn

from coordinator.app import create_app
from coordinator.config import CoordinatorConfig


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` decides the shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def bind(host: str, port: int) -> socket.socket:
    """Bind here, so 'port in use' is an OSError we report, not uvicorn's sys.exit."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    # The explicit protocol matters: asyncio sets TCP_NODELAY on accepted connections
    # only for IPPROTO_TCP sockets. Without it, Nagle + delayed ACK add ~40 ms to
    # every response on a kept-open connection.
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror} (port in use?)") from None
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class CoordinatorServer:
    """The coordinator app on `config.host:config.port`, started and stopped by `serve`."""

    def __init__(self, config: CoordinatorConfig, *, grace: float) -> None:
        self.config = config
        self._grace = grace
        self._http: _Server | None = None
        self._task: asyncio.Task[None] | None = None
        self.port = 0

    async def start(self) -> int:
        """Bind, serve, and return once uvicorn is up (raises if it stops during startup)."""
        sock = bind(self.config.host, self.config.port)
        self.port = sock.getsockname()[1]
        http = self._http = _Server(
            uvicorn.Config(
                create_app(self.config),
                log_level="warning",
                lifespan="on",
                timeout_keep_alive=30,
                # In-flight streams get the same grace as the node's.
                timeout_graceful_shutdown=int(self._grace) or 1,
            )
        )
        task = self._task = asyncio.create_task(http.serve(sockets=[sock]))
        while not http.started and not task.done():
            await asyncio.sleep(0.01)
        if task.done():
            task.result()
            raise OSError("the coordinator stopped during startup")
        return self.port

    async def stop(self) -> None:
        if self._http is not None and self._task is not None:
            self._http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
