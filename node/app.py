"""Run a node: gRPC service + health, preload, graceful shutdown on signals."""

from __future__ import annotations

import logging

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from prometheus_client import CollectorRegistry

from mesh.auth import AuthConfigError, server_credentials, server_interceptors
from mesh.client import SERVER_OPTIONS
from mesh.discovery import Announcement, Announcer
from mesh.metrics import new_registry
from node.config import NodeConfig
from node.metrics import MetricsServer, NodeMetrics
from node.rpc import NodeServicer
from node.service import NodeCore
from proto import node_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)

SERVICE_NAME = "macmesh.v1.Node"


def is_loopback(host: str) -> bool:
    """Whether a bind address only accepts connections from this machine."""
    return host in ("localhost", "::1") or host.startswith("127.")


class NodeServer:
    """A started node. `start()` binds (port 0 picks a free port), `stop()` drains."""

    def __init__(
        self, config: NodeConfig, *, metrics_registry: CollectorRegistry | None = None
    ) -> None:
        """`metrics_registry` None: a fresh one (with process metrics) for this node."""
        self.config = config
        self.core: NodeCore | None = None
        self.port = 0
        self.metrics_registry = new_registry() if metrics_registry is None else metrics_registry
        # The bound `/metrics` port once started (0 while none).
        self.metrics_port = 0
        self._metrics_server: MetricsServer | None = None
        self._server: grpc.aio.Server | None = None
        self._health = HealthServicer()
        self._announcer: Announcer | None = None

    @property
    def address(self) -> str:
        return self._host_port(self.port)

    async def start(self) -> int:
        """Bind and serve; returns the bound port. Models in `preload` load first."""
        config = self.config
        if config.secret is None and not config.insecure and not is_loopback(config.host):
            raise AuthConfigError(
                f"refusing to serve on {config.host} without a mesh secret: anyone on the "
                "network could use this node. Run `macmesh init` (and copy "
                "~/.macmesh/secret to every Mac) or set MACMESH_SECRET; --insecure overrides"
            )
        metrics = NodeMetrics(self.metrics_registry)
        self.core = NodeCore(config, metrics=metrics)
        await self.core.start()
        metrics.watch(self.core)
        if config.metrics_port is not None:
            # Before gRPC: the first state a coordinator sees already names the port.
            self._metrics_server = MetricsServer(
                self.metrics_registry, config.host, config.metrics_port
            )
            self.metrics_port = self.core.metrics_port = await self._metrics_server.start()
        interceptors = server_interceptors(config.secret) if config.secret else None
        server = grpc.aio.server(options=list(SERVER_OPTIONS), interceptors=interceptors)
        pb_grpc.add_NodeServicer_to_server(NodeServicer(self.core), server)
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        host = config.host
        bind = f"[{host}]:{config.grpc_port}" if ":" in host else f"{host}:{config.grpc_port}"
        try:
            if config.tls_cert is not None and config.tls_key is not None:
                creds = server_credentials(config.tls_cert, config.tls_key, config.tls_ca)
                self.port = server.add_secure_port(bind, creds)
            else:
                self.port = server.add_insecure_port(bind)
        except RuntimeError as exc:
            await self._close_metrics()
            raise OSError(f"cannot listen on {bind}: {exc} (port in use?)") from exc
        await server.start()
        self._server = server
        await self.core.preload()
        await self._health.set("", health_pb2.HealthCheckResponse.SERVING)
        await self._health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)
        if config.announce:
            where = (
                {"interfaces": list(config.bonjour_interfaces)} if config.bonjour_interfaces else {}
            )
            self._announcer = Announcer(
                Announcement(
                    node_id=self.core.node_id,
                    mesh=config.mesh,
                    grpc_port=self.port,
                    host=config.host,
                ),
                **where,  # type: ignore[arg-type]
            )
            try:
                # DuplicateNodeId (a cloned node_id is live elsewhere) stops startup.
                await self._announcer.start()
            except OSError as exc:
                # No multicast here (some VPNs, containers): static peers still work.
                log.warning("Bonjour announcement failed (%s); reach this node by address", exc)
                self._announcer = None
        log.info(
            "node %s serving gRPC on %s (%s%s)%s",
            self.core.node_id,
            self.address,
            "mesh secret" if config.secret else "OPEN: no mesh secret",
            ", TLS" if config.tls_cert else "",
            f", metrics on http://{self._host_port(self.metrics_port)}/metrics"
            if self._metrics_server
            else "",
        )
        return self.port

    def _host_port(self, port: int) -> str:
        host = self.config.host
        if host in ("0.0.0.0", "::", ""):
            host = "127.0.0.1"
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    async def _close_metrics(self) -> None:
        if self._metrics_server is not None:
            await self._metrics_server.close()
            self._metrics_server = None

    async def stop(self, grace: float | None = None) -> None:
        """Stop taking requests, let in-flight streams finish within `grace`, then exit."""
        grace = self.config.shutdown_grace if grace is None else grace
        if self._announcer is not None:
            # Goodbye first: coordinators stop sending new work at once.
            await self._announcer.close()
            self._announcer = None
        await self._health.enter_graceful_shutdown()
        if self.core is not None:
            await self.core.close(grace)
        if self._server is not None:
            # Streams the backend ended are flushed; anything left gets cut here.
            await self._server.stop(1.0)
            self._server = None
        # Last: Prometheus sees the drain (macmesh_node_draining) until the end.
        await self._close_metrics()
        log.info("node stopped")
