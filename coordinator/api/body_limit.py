"""The request-body size limit, enforced while the body is read (`coordinator.limits`).

A declared `Content-Length` over the limit is answered at once, before any of the body
is read. Otherwise the body's chunks are counted as the app receives them, and the
chunk that passes the limit raises `RequestTooLarge` inside the handler, which answers
413 in its API's envelope (this middleware answers for handlers that do not). So at
most the limit plus one chunk is ever held, and nothing reaches a node. uvicorn reads
and discards the rest of an oversized body after the response, keeping the connection.
"""

from __future__ import annotations

from collections.abc import Callable

from fastapi import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.api.common import anthropic_error, openai_error
from mesh import errors


def _api(path: str, anthropic: bool) -> str | None:
    """The request log's `api` for an inference path; None for the rest."""
    if anthropic:
        return "anthropic"
    return "openai" if path.startswith("/v1/") else None


class BodyLimit:
    """ASGI middleware: request bodies of at most `max_bytes`, else 413."""

    def __init__(
        self, app: ASGIApp, *, max_bytes: int, is_anthropic: Callable[[Request], bool]
    ) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.is_anthropic = is_anthropic

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope)
        anthropic = self.is_anthropic(request)
        err = errors.RequestTooLarge(self.max_bytes)
        api = _api(request.url.path, anthropic)
        service = getattr(scope["app"].state, "service", None) if "app" in scope else None
        if api is not None and service is not None:
            service.rejected(api, None, err)
        response = anthropic_error(err) if anthropic else openai_error(err)
        await response(scope, receive, send)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        for name, value in scope["headers"]:
            if name == b"content-length":
                try:
                    declared = int(value)
                except ValueError:
                    break  # the server refuses a malformed length itself
                if declared > self.max_bytes:
                    await self._refuse(scope, receive, send)
                    return
                break

        received = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise errors.RequestTooLarge(self.max_bytes)
            return message

        async def tracked_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracked_send)
        except errors.RequestTooLarge:
            if started:
                raise
            await self._refuse(scope, receive, send)
