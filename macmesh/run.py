"""Run a node, a coordinator, or both in one process, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import socket
from collections.abc import Iterator
from dataclasses import replace

import prometheus_client
import uvicorn

from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from node.app import NodeServer
from node.config import NodeConfig

log = logging.getLogger(__name__)


class _Server(uvicorn.Server):
    """uvicorn without its own signal handling: `serve` decides the shutdown order."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _bind(host: str, port: int) -> socket.socket:
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


async def serve(node: NodeConfig | None, coordinator: CoordinatorConfig | None) -> None:
    """Start what is configured; on a signal stop the coordinator, then drain the node."""
    # No `*_created` series beside every counter and histogram (vLLM does the same):
    # Prometheus does not use them, and they double what the metric browser lists.
    prometheus_client.disable_created_metrics()  # type: ignore[no-untyped-call]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        with contextlib.suppress(NotImplementedError):
            loop.add_signal_handler(sig, stop.set)

    node_server: NodeServer | None = None
    http: _Server | None = None
    http_task: asyncio.Task[None] | None = None
    try:
        if node is not None:
            node_server = NodeServer(node)
            await node_server.start()
            print(f"macmesh node listening on {node_server.address}", flush=True)
        if coordinator is not None:
            if node_server is not None and node_server.address not in coordinator.peers:
                coordinator = replace(coordinator, peers=(node_server.address, *coordinator.peers))
            sock = _bind(coordinator.host, coordinator.port)
            port = sock.getsockname()[1]
            app = create_app(coordinator)
            grace = node.shutdown_grace if node is not None else 10.0
            http = _Server(
                uvicorn.Config(
                    app,
                    log_level="warning",
                    lifespan="on",
                    timeout_keep_alive=30,
                    # In-flight streams get the same grace as the node's.
                    timeout_graceful_shutdown=int(grace) or 1,
                )
            )
            http_task = asyncio.create_task(http.serve(sockets=[sock]))
            while not http.started and not http_task.done():
                await asyncio.sleep(0.01)
            if http_task.done():
                http_task.result()
                raise OSError("the coordinator stopped during startup")
            print(f"macmesh coordinator listening on http://{coordinator.host}:{port}", flush=True)
        await stop.wait()
        log.info("signal received: shutting down")
    finally:
        if http is not None and http_task is not None:
            http.should_exit = True
            with contextlib.suppress(asyncio.CancelledError):
                await http_task
        if node_server is not None:
            await node_server.stop()
