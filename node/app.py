"""Run a node: gRPC service + health, preload, graceful shutdown on signals."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer

from mesh.client import CHANNEL_OPTIONS
from node.config import NodeConfig
from node.rpc import NodeServicer
from node.service import NodeCore
from proto import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "macmesh.v1.Node"


class NodeServer:
    """A started node. `start()` binds (port 0 picks a free port), `stop()` drains."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.core: NodeCore | None = None
        self.port = 0
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()

    @property
    def address(self) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Models in `preload` load first."""
        self.core = NodeCore(self.config)
        server = grpc.aio.server(options=list(CHANNEL_OPTIONS))
        pb_grpc.add_NodeServicer_to_server(NodeServicer(self.core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        host = self.config.host
        bind = (
            f"[{host}]:{self.config.grpc_port}"
            if ":" in host
            else (f"{host}:{self.config.grpc_port}")
        )
        try:
            self.port = server.add_insecure_port(bind)
        except RuntimeError as exc:
            raise OSError(f"cannot listen on {bind}: {exc} (port in use?)") from exc
        await server.start()
        self._server = server
        await self.core.preload()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        log.info("node %s serving gRPC on %s", self.core.node_id, self.address)
        return self.port

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let in-flight streams finish within `grace`, then exit."""
        grace = self.config.shutdown_grace if grace is None else grace
        await self._health.enter_graceful_shutdown()
        if self.core is not None:
            await self.core.close(grace)
        if self._server is not None:
            # Streams the backend ended are flushed; anything left gets cut here.
            await self._server.stop(1.0)
            self._server = None
        log.info("node stopped")
