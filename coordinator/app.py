"""The coordinator's FastAPI app. State lives on `app.state`; no module globals."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry
from starlette.exceptions import HTTPException

from coordinator.api import (
    admin,
    anthropic,
    audio,
    groups,
    hub,
    lifecycle,
    model_files,
    openai,
    openapi,
    prometheus,
    requests,
    web,
)
from coordinator.api.body_limit import BodyLimit
from coordinator.api.common import anthropic_error, http_error, openai_error, validation_error
from coordinator.api.keys import KeyGate
from coordinator.audio import AudioService
from coordinator.config import CoordinatorConfig
from coordinator.keys import KEY_FILE, KeyStore
from coordinator.metrics import CoordinatorMetrics
from coordinator.nodes import NodeRegistry
from coordinator.peers import StaticPeers
from coordinator.request_log import RequestLog
from coordinator.service import ChatService
from coordinator.settings import SettingsStore
from mesh.auth import channel_credentials
from mesh.discovery import Browser, Peer
from mesh.metrics import new_registry
from mesh.version import __version__

log = logging.getLogger(__name__)

# How often the config files' model paths are compared with what nodes were sent.
MODEL_PATHS_SECONDS = 2.0

# Reachable without an API key: load balancers, launchd health checks, Prometheus.
OPEN_PATHS = frozenset({"/", "/health"}) | prometheus.OPEN_PATHS


def _open_path(path: str) -> bool:
    # The web UI's files hold no data (its pages call /api/*, which needs the key).
    return path in OPEN_PATHS or web.is_ui_path(path)


def _is_anthropic(request: Request) -> bool:
    path = request.url.path
    if path.startswith(("/anthropic/", "/v1/messages")):
        return True
    return path == "/v1/models" and "anthropic-version" in request.headers


def _browser(config: CoordinatorConfig, registry: NodeRegistry) -> Browser:
    """Bonjour: every announced node of our mesh becomes an address to try."""
    pending: set[asyncio.Task[None]] = set()

    def found(peer: Peer) -> None:
        registry.add(peer.target, discovered=True)

    def lost(peer: Peer) -> None:
        view = next((v for v in registry.nodes() if v.target == peer.target), None)
        if view is not None and view.discovered:
            task = asyncio.create_task(registry.remove(peer.target))
            pending.add(task)
            task.add_done_callback(pending.discard)

    where = {"interfaces": list(config.bonjour_interfaces)} if config.bonjour_interfaces else {}
    return Browser(found, lost, mesh=config.mesh, **where)  # type: ignore[arg-type]


def create_app(
    config: CoordinatorConfig,
    *,
    registry: NodeRegistry | None = None,
    metrics_registry: CollectorRegistry | None = None,
) -> FastAPI:
    """Build the app; the lifespan starts and stops the node registry.

    `metrics_registry` None: a fresh one (with process metrics), served at /metrics.
    """
    credentials = (
        channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
        if config.tls_ca or config.tls_cert
        else None
    )
    registry = registry or NodeRegistry(secret=config.secret, credentials=credentials)
    # Raises KeyFileError (an AuthConfigError: the CLI's clear refusal) for a bad key file.
    keys = KeyStore(
        config.api_keys,
        config.api_keys_file or config.home / KEY_FILE,
        required=config.api_keys_file is not None,
    )
    settings = SettingsStore(config.home, default_model=config.default_model)
    metrics_registry = new_registry() if metrics_registry is None else metrics_registry
    metrics = CoordinatorMetrics(metrics_registry, registry)
    service = ChatService(
        registry,
        settings,
        policy=config.routing_policy,
        metrics=metrics,
        requests=RequestLog(config.request_log_size),
    )
    peers = StaticPeers(config.home, config.peers, registry)

    async def follow_model_paths() -> None:
        # Config files are re-read when they change; nodes learn the paths they name.
        while True:
            registry.set_model_paths(settings.model_paths())
            await asyncio.sleep(MODEL_PATHS_SECONDS)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        registry.set_model_paths(settings.model_paths())
        await registry.start()
        await peers.sync()
        peers_task = asyncio.create_task(peers.run(), name="static peers")
        paths_task = asyncio.create_task(follow_model_paths(), name="model paths")
        # Idle TTLs (model_settings.json, alias/tier `ttl`): unloads models idle past theirs.
        reaper = asyncio.create_task(service.placer.run(), name="idle ttl")
        browser = _browser(config, registry) if config.discovery else None
        if browser is not None:
            try:
                await browser.start()
            except OSError as exc:
                log.warning("Bonjour discovery unavailable (%s); static peers only", exc)
                browser = None
        app.state.browser = browser
        try:
            yield
        finally:
            if browser is not None:
                await browser.close()
            for task in (peers_task, paths_task, reaper):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            await registry.close()

    app = FastAPI(title="macmesh coordinator", version=__version__, lifespan=lifespan)
    app.state.config = config
    app.state.registry = registry
    app.state.peers = peers
    app.state.settings = settings
    app.state.service = service
    app.state.audio = AudioService(service)
    app.state.metrics_registry = metrics_registry
    app.state.keys = keys

    # Innermost middleware (added first): handlers see the limit's error as it is, not
    # wrapped by the task groups of the middlewares below; the key check comes first.
    app.add_middleware(BodyLimit, max_bytes=config.max_body_bytes, is_anthropic=_is_anthropic)

    # API keys (--api-key, the key file): roles, per-key caps (coordinator.keys, api/keys.py).
    if keys.enabled:
        app.add_middleware(KeyGate, store=keys, open_path=_open_path, is_anthropic=_is_anthropic)

    if not keys.enabled and not config.ui_open:
        app.middleware("http")(web.loopback_guard)

    # The framework's own errors (no such route, wrong method, a query parameter of the
    # wrong type) in the caller's envelope too, not FastAPI's {"detail": ...}.
    @app.exception_handler(HTTPException)
    async def framework_error(request: Request, exc: HTTPException) -> Response:
        return http_error(
            exc.status_code, str(exc.detail), anthropic=_is_anthropic(request), headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def parameter_error(request: Request, exc: RequestValidationError) -> Response:
        err = validation_error(exc)
        return anthropic_error(err) if _is_anthropic(request) else openai_error(err)

    @app.api_route("/", methods=["GET", "HEAD"], include_in_schema=False)
    async def root(request: Request) -> Response:
        if web.wants_html(request):  # a browser: the web UI; everyone else: JSON
            return web.index_page()
        return JSONResponse({"name": "macmesh", "version": __version__, "status": "ok"})

    @app.get("/health")
    async def health() -> JSONResponse:
        online = registry.online()
        return JSONResponse({"status": "ok" if online else "degraded", "nodes_online": len(online)})

    app.include_router(anthropic.router)
    app.include_router(openai.router)
    app.include_router(audio.router)
    app.include_router(admin.router)
    app.include_router(lifecycle.router)
    app.include_router(hub.router)
    app.include_router(model_files.router)
    app.include_router(groups.router)
    app.include_router(requests.router)
    app.include_router(prometheus.router)
    app.include_router(web.router)
    openapi.install(app)
    return app
