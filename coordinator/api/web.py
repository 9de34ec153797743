"""The web UI's server side: serves the static files in `web/` and the mesh-view event stream.

Kept thin on purpose: the pages call the same admin API as the CLI (/api/nodes,
/api/models, ...); all this module adds is

    GET /                     web/index.html for browsers (Accept: text/html); the caller
                              in coordinator.app answers JSON to everyone else
    GET /ui, /ui/{page}       web/index.html (the page picks its view from the path)
    GET /ui/static/{name}     a file of web/ (flat: no sub-folders, no path tricks)
    GET /api/events           server-sent events: the GET /api/nodes body whenever the mesh
                              view changes (at most ~4/s), a comment every ~15 s otherwise

and `loopback_guard`, the middleware that keeps a coordinator without API keys from
showing its UI and admin API to the network unless `ui_open` says so.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

from fastapi import APIRouter, Request, Response
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse

from coordinator.api.admin import nodes_json
from coordinator.nodes import NodeRegistry

router = APIRouter(include_in_schema=False)

# A source checkout keeps web/ at the top; a wheel install puts it under share/.
_CANDIDATES = (
    Path(__file__).resolve().parents[2] / "web",
    Path(sys.prefix) / "share" / "macmesh" / "web",
)
WEB_DIR = next((p for p in _CANDIDATES if (p / "index.html").is_file()), _CANDIDATES[0])

_TYPES = {
    ".html": "text/html; charset=utf-8",
    ".js": "text/javascript; charset=utf-8",
    ".css": "text/css; charset=utf-8",
    ".svg": "image/svg+xml",
    ".txt": "text/plain; charset=utf-8",
}

# Defence in depth behind the pages' textContent-only rendering: no inline script, no
# other origin (no CDN), no framing. media-src allows the Voice page's spoken answers, which
# play from blob: URLs (its AudioWorklet module is a script from 'self').
_HEADERS = {
    "content-security-policy": (
        "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; media-src 'self' blob:; frame-ancestors 'none'; base-uri 'none'; "
        "form-action 'none'"
    ),
    "x-content-type-options": "nosniff",
    "referrer-policy": "no-referrer",
    "cache-control": "no-cache",
}

# Event stream pacing: at most this many events a second, and a comment when quiet this long
# (keeps proxies and the browser from timing the stream out).
MAX_EVENTS_PER_SECOND = 4
HEARTBEAT_SECONDS = 15.0
# Wake at least this often to notice nodes going stale (staleness has no event of its own).
POLL_SECONDS = 1.0

PATHS = ("/", "/ui", "/ui/")


def is_ui_path(path: str) -> bool:
    return path in PATHS or path.startswith("/ui/")


def wants_html(request: Request) -> bool:
    """A browser navigating (Accept names text/html); curl and SDKs send */* or JSON."""
    return "text/html" in request.headers.get("accept", "")


def index_page() -> Response:
    try:
        body = (WEB_DIR / "index.html").read_bytes()
    except FileNotFoundError:
        return HTMLResponse("web UI files are missing (web/index.html)", status_code=404)
    return HTMLResponse(body, headers=_HEADERS)


@router.get("/ui")
@router.get("/ui/{page:path}")
async def ui(page: str = "") -> Response:
    if page.startswith("static/"):
        return _static(page.removeprefix("static/"))
    return index_page()


def _static(name: str) -> Response:
    # Only plain names of files that are there: no "..", no sub-folders, no hidden files.
    files = {p.name: p for p in WEB_DIR.iterdir() if p.is_file()} if WEB_DIR.is_dir() else {}
    path = files.get(name)
    if path is None or name.startswith(".") or path.suffix not in _TYPES:
        return Response("not found", status_code=404, media_type="text/plain")
    return Response(path.read_bytes(), media_type=_TYPES[path.suffix], headers=_HEADERS)


def _comparable(payload: dict[str, Any]) -> str:
    # last_seen_seconds moves every push; an event only for what a person would see change.
    nodes = [{k: v for k, v in n.items() if k != "last_seen_seconds"} for n in payload["nodes"]]
    return json.dumps(nodes, sort_keys=True)


async def mesh_events(registry: NodeRegistry) -> AsyncIterator[str]:
    """The SSE body: the nodes payload first and on every visible change, heartbeats between."""
    yield "retry: 2000\n\n"
    last = ""
    last_write = time.monotonic()
    while True:
        payload = nodes_json(registry)
        key = _comparable(payload)
        now = time.monotonic()
        if key != last:
            last, last_write = key, now
            yield f"data: {json.dumps(payload)}\n\n"
        elif now - last_write >= HEARTBEAT_SECONDS:
            last_write = now
            yield ": heartbeat\n\n"
        await asyncio.sleep(1 / MAX_EVENTS_PER_SECOND)
        await registry.wait_changed(POLL_SECONDS)


@router.get("/api/events")
async def events(request: Request) -> StreamingResponse:
    registry: NodeRegistry = request.app.state.registry
    # Starlette cancels the generator when the client goes away.
    return StreamingResponse(
        mesh_events(registry),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )


def _loopback(host: str | None) -> bool:
    if host is None:  # a Unix socket: only this machine can reach it
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


async def loopback_guard(
    request: Request, call_next: Callable[[Request], Awaitable[Response]]
) -> Response:
    """Middleware for a coordinator with no API keys and no `ui_open`: the UI and /api/*
    answer only to this machine (anyone on the network could otherwise load and unload
    models, or rewrite the routing config)."""
    path = request.url.path
    guarded = path.startswith("/api/") or (
        is_ui_path(path) and (path != "/" or wants_html(request))
    )
    if guarded and not _loopback(request.client.host if request.client else None):
        # The OpenAI envelope, as for every other /api error (mesh.errors has no 403).
        message = (
            "the web UI and admin API answer only to this machine when no API key is "
            "configured: set --api-key (or MACMESH_API_KEYS), or start with --ui-open"
        )
        body = {"message": message, "type": "permission_error", "param": None, "code": "forbidden"}
        return JSONResponse({"error": body}, status_code=403)
    return await call_next(request)
