"""Run a node, a coordinator, or both in one process, until SIGTERM/SIGINT."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from dataclasses import replace
from typing import TYPE_CHECKING

import prometheus_client

from node.app import NodeServer
from node.config import NodeConfig

if TYPE_CHECKING:
    from coordinator.config import CoordinatorConfig
    from macmesh.http_server import CoordinatorServer

log = logging.getLogger(__name__)


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
    http: CoordinatorServer | None = None
    try:
        if node is not None:
            node_server = NodeServer(node)
            await node_server.start()
            print(f"macmesh node listening on {node_server.address}", flush=True)
        if coordinator is not None:
            # Here, not at the top: a node-only process never imports the coordinator.
            from macmesh.http_server import CoordinatorServer

            if node_server is not None and node_server.address not in coordinator.peers:
                coordinator = replace(coordinator, peers=(node_server.address, *coordinator.peers))
            grace = node.shutdown_grace if node is not None else 10.0
            http = CoordinatorServer(coordinator, grace=grace)
            port = await http.start()
            print(f"macmesh coordinator listening on http://{coordinator.host}:{port}", flush=True)
        await stop.wait()
        log.info("signal received: shutting down")
    finally:
        if http is not None:
            await http.stop()
        if node_server is not None:
            await node_server.stop()
