"""The API-key gate (ASGI middleware): who the caller is, what its role lets it reach, and
its key's concurrency cap (`coordinator.keys`).

- No or an unknown key: 401, in the API's envelope (open paths excepted: health, metrics,
  the web UI's files).
- A `user` key on `/api/*` (the admin API, and the data of the web UI): 403.
- A generation request (`/v1/messages`, `/v1/chat/completions`, `/v1/completions`) over the
  key's `max_concurrent`: 429 with `Retry-After`. The slot is held for the whole ASGI call,
  which for a stream lasts until its last byte is sent or the client goes away (Starlette
  returns from the response only after its body and background task are done), and is
  released in `finally`: whatever way a request ends, its slot comes back.

The key reaches handlers as `request.state.api_key` (an `ApiKey`), for its allowed models
and its name in the request log.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from coordinator.api.common import anthropic_error, openai_error
from coordinator.keys import ApiKey, KeyStore
from mesh import errors

GENERATE_PATHS = frozenset(
    {"/v1/messages", "/anthropic/v1/messages", "/v1/chat/completions", "/v1/completions"}
    # Voice (docs/voice.md): engine work on a node, capped like generations.
    | {"/v1/audio/speech", "/v1/audio/transcriptions"}
)
# Seconds a client over its key's concurrency cap is told to wait.
RETRY_AFTER_SECONDS = 1


def presented_key(request: Request) -> str | None:
    """The key the caller sent: `x-api-key`, or `Authorization: Bearer KEY`."""
    key = request.headers.get("x-api-key")
    if key:
        return key
    auth = request.headers.get("authorization", "")
    scheme, _, token = auth.partition(" ")
    return token.strip() if scheme.lower() == "bearer" and token.strip() else None


def caller(request: Request) -> ApiKey | None:
    """The authenticated key of this request; None when the coordinator has no keys."""
    key = getattr(request.state, "api_key", None)
    return key if isinstance(key, ApiKey) else None


def key_name(request: Request) -> str | None:
    key = caller(request)
    return key.name if key is not None else None


class KeyGate:
    """ASGI middleware: authenticate, authorize by role, cap concurrency per key."""

    def __init__(
        self,
        app: ASGIApp,
        *,
        store: KeyStore,
        open_path: Callable[[str], bool],
        is_anthropic: Callable[[Request], bool],
    ) -> None:
        self.app = app
        self.store = store
        self.open_path = open_path
        self.is_anthropic = is_anthropic

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request = Request(scope)
        path = request.url.path
        if self.open_path(path):
            await self.app(scope, receive, send)
            return
        anthropic = self.is_anthropic(request)
        key = self.store.authenticate(presented_key(request))
        if key is None:
            err: errors.MeshError = errors.Unauthenticated(
                "invalid or missing API key (send x-api-key or Authorization: Bearer)"
            )
            await (anthropic_error(err) if anthropic else openai_error(err))(scope, receive, send)
            return
        request.state.api_key = key  # scope["state"]: what handlers' request.state reads
        if path.startswith("/api/") and not key.admin:
            err = errors.PermissionDenied(
                f"API key {key.name!r} has role {key.role!r}: the admin API and the web UI's "
                "data need a key with role 'admin'"
            )
            await openai_error(err)(scope, receive, send)
            return
        if request.method != "POST" or path not in GENERATE_PATHS:
            await self.app(scope, receive, send)
            return
        if not self.store.acquire(key):
            err = errors.RateLimited(
                f"API key {key.name!r} already has {key.max_concurrent} requests running "
                f"(its max_concurrent); retry when one ends",
                RETRY_AFTER_SECONDS,
            )
            service = getattr(request.app.state, "service", None)
            if service is not None:
                service.rejected("anthropic" if anthropic else "openai", None, err, key=key.name)
            headers = {"retry-after": str(RETRY_AFTER_SECONDS)}
            response = anthropic_error(err, headers) if anthropic else openai_error(err, headers)
            await response(scope, receive, send)
            return
        try:
            await self.app(scope, receive, send)
        finally:
            self.store.release(key)
