"""Prometheus: the coordinator's own `/metrics`, and service discovery of the whole mesh.

    GET /metrics                    this coordinator's metrics (text or OpenMetrics)
    GET /api/prometheus/targets     Prometheus HTTP SD: every node's /metrics + this one

Both are open even when API keys are set (like vLLM's /metrics): they carry no
prompts, and Prometheus then needs no credentials. Every target serves
`/metrics`, so a scrape job needs no `__metrics_path__` relabelling.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from coordinator.config import CoordinatorConfig
from coordinator.metrics import NO_KEY
from coordinator.nodes import NodeRegistry, NodeView
from coordinator.service import ChatService

router = APIRouter()

OPEN_PATHS = frozenset({"/metrics", "/api/prometheus/targets"})


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    """The coordinator's registry, in the format the scraper asks for."""
    registry: CollectorRegistry = request.app.state.metrics_registry
    service: ChatService = request.app.state.service
    loaded = {
        m.id for v in service.registry.online() if v.state for m in v.state.models if m.loaded
    }
    service.metrics.preinit(service.settings.routing(), loaded)
    keys = request.app.state.keys
    service.metrics.preinit_keys(keys.names() if keys.enabled else [NO_KEY])
    encoder, content_type = choose_encoder(request.headers.get("accept", ""))
    return Response(encoder(registry), media_type=content_type)


def node_host(target: str) -> str:
    """The host of a `host:port` / `[v6]:port` address (or of a bare host)."""
    if target.startswith("["):
        return target[1 : target.find("]")]
    return target.rsplit(":", 1)[0] if ":" in target else target


def _loopback(host: str) -> bool:
    return host in ("localhost", "::1") or host.startswith("127.")


def _host_port(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def node_targets(views: list[NodeView], mesh: str, here: str = "") -> list[dict[str, Any]]:
    """One target group per node that reports a metrics port, online or not.

    Offline nodes stay listed (Prometheus shows them `up == 0`) until the
    coordinator forgets them; a node known at two addresses is listed at the
    one it reported from last. A node reached over loopback runs on this
    machine: it is listed at `here` (the host Prometheus reached us at), when
    that is not loopback itself (`macmesh up --host 0.0.0.0` on a lab Mac).
    """
    latest: dict[str, NodeView] = {}
    for view in views:
        if view.state is None or not view.state.metrics_port:
            continue
        seen = latest.get(view.node_id)
        if seen is None or view.last_seen > seen.last_seen:
            latest[view.node_id] = view
    out = []
    for node_id, view in sorted(latest.items()):
        assert view.state is not None
        host = node_host(view.target)
        if _loopback(host) and here and not _loopback(here):
            host = here
        address = _host_port(host, view.state.metrics_port)
        labels = {"node": node_id, "role": "node", "mesh": mesh}
        out.append({"targets": [address], "labels": labels})
    return out


@router.get("/api/prometheus/targets")
async def targets(request: Request) -> JSONResponse:
    """Prometheus HTTP service discovery (`http_sd_configs`) for the whole mesh.

    The coordinator lists itself at the address the request came to (the Host
    header): whoever reached this endpoint reaches `/metrics` there too.
    """
    config: CoordinatorConfig = request.app.state.config
    registry: NodeRegistry = request.app.state.registry
    own = request.headers.get("host") or _host_port(config.host, config.port)
    groups = node_targets(registry.nodes(), config.mesh, node_host(own))
    groups.append({"targets": [own], "labels": {"role": "coordinator", "mesh": config.mesh}})
    return JSONResponse(groups)
