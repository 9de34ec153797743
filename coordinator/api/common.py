"""What every HTTP surface shares: body parsing, error envelopes, SSE framing, and
`respond`, the one request runner (first event, streaming or not, closing).

Each API maps `mesh.errors` to its own envelope here, once:

    Anthropic  {"type": "error", "error": {"type": ..., "message": ...}}
    OpenAI     {"error": {"message": ..., "type": ..., "param": ..., "code": ...}}
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Callable, Mapping
from typing import Any, TypeVar

import anyio
from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.background import BackgroundTask
from starlette.types import Message, Send

from coordinator.limits import check_counts, decode_json
from mesh import errors
from mesh.types import GenerateEvent

M = TypeVar("M", bound=BaseModel)

log = logging.getLogger(__name__)


async def json_body(request: Request) -> Any:
    """The request body as JSON; InvalidRequest when it is not (the admin routes' bodies),
    or when it breaks a limit (`coordinator.limits`: size, nesting)."""
    return decode_json(await request.body())


async def json_object(request: Request, expected: str = "expected a JSON object") -> dict[str, Any]:
    """The request body as a JSON object; InvalidRequest saying `expected` otherwise."""
    data = await json_body(request)
    if not isinstance(data, dict):
        raise errors.InvalidRequest(expected)
    return data


def str_field(data: Mapping[str, Any], key: str, *, required: bool = False) -> str:
    """`data[key]` as a string ("" when absent and optional); InvalidRequest naming `key`.
    `data`: a JSON object, or a multipart form (whose files are not strings)."""
    value = data.get(key)
    if value is None or value == "":
        if required:
            raise errors.InvalidRequest("field required", field=key)
        return ""
    if not isinstance(value, str):
        raise errors.InvalidRequest("must be a string", field=key)
    return value


# Seconds a client should wait before retrying when no node can serve.
RETRY_AFTER_SECONDS = 5


def http_status(err: errors.MeshError) -> int:
    """The HTTP status for a mesh error."""
    if isinstance(err, errors.RequestTooLarge):
        return 413
    if isinstance(err, errors.InvalidRequest):
        return 400
    if isinstance(err, errors.Unauthenticated):
        return 401
    if isinstance(err, errors.PermissionDenied):
        return 403
    if isinstance(err, errors.RateLimited):
        return 429
    if isinstance(err, errors.ModelNotFound):
        return 404
    if isinstance(err, errors.Unavailable | errors.Overloaded):
        return 503
    if isinstance(err, errors.Cancelled):
        return 499
    return 500


_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    499: "api_error",
    500: "api_error",
    503: "overloaded_error",
}
_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    499: "server_error",
    500: "server_error",
    503: "server_error",
}


def _headers(status: int, extra: dict[str, str] | None) -> dict[str, str]:
    headers = dict(extra or {})
    if status == 503:
        headers["retry-after"] = str(RETRY_AFTER_SECONDS)
    return headers


def anthropic_error_body(err: errors.MeshError) -> dict[str, Any]:
    status = http_status(err)
    return {"type": "error", "error": {"type": _ANTHROPIC_TYPES[status], "message": err.message}}


def anthropic_error(err: errors.MeshError, headers: dict[str, str] | None = None) -> JSONResponse:
    """An Anthropic-style error response."""
    status = http_status(err)
    return JSONResponse(anthropic_error_body(err), status, headers=_headers(status, headers))


def openai_error_body(err: errors.MeshError) -> dict[str, Any]:
    status = http_status(err)
    code: str | None = None
    if isinstance(err, errors.ModelNotFound):
        code = "model_not_found"
    elif isinstance(err, errors.PromptTooLong):
        code = "context_length_exceeded"
    elif isinstance(err, errors.RequestTooLarge):
        code = "request_too_large"
    elif isinstance(err, errors.Unauthenticated):
        code = "invalid_api_key"
    elif isinstance(err, errors.PermissionDenied):
        code = "forbidden"
    elif isinstance(err, errors.RateLimited):
        code = "rate_limit_exceeded"
    param = err.field if isinstance(err, errors.InvalidRequest) and err.field else None
    return {
        "error": {
            "message": err.message,
            "type": _OPENAI_TYPES[status],
            "param": param,
            "code": code,
        }
    }


def openai_error(
    err: errors.MeshError, headers: dict[str, str] | None = None, *, param: str | None = None
) -> JSONResponse:
    """An OpenAI-style error response; `param` fills in when the error names no field."""
    body = openai_error_body(err)
    if body["error"]["param"] is None and param:
        body["error"]["param"] = param
    status = http_status(err)
    return JSONResponse(body, status, headers=_headers(status, headers))


def http_error(
    status: int, message: str, *, anthropic: bool, headers: Mapping[str, str] | None = None
) -> JSONResponse:
    """An error the framework raised (no route, wrong method, bad query parameter) in the
    caller's envelope, with its own status."""
    if anthropic:
        kind = _ANTHROPIC_TYPES.get(
            status, "api_error" if status >= 500 else "invalid_request_error"
        )
        body: dict[str, Any] = {"type": "error", "error": {"type": kind, "message": message}}
    else:
        kind = "server_error" if status >= 500 else "invalid_request_error"
        body = {"error": {"message": message, "type": kind, "param": None, "code": None}}
    return JSONResponse(body, status, headers=headers)


def _loc(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


_PARAMETER_SOURCES = ("query", "path", "header", "cookie")


def validation_error(exc: ValidationError | RequestValidationError) -> errors.InvalidRequest:
    """Pydantic's (or FastAPI's parameter check's) first error as an InvalidRequest naming
    the field."""
    first = exc.errors()[0]
    loc = tuple(p for p in first["loc"] if not (isinstance(p, str) and p.startswith("function-")))
    if isinstance(exc, RequestValidationError) and loc and loc[0] in _PARAMETER_SOURCES:
        loc = loc[1:]
    field = _loc(loc)
    msg = first["msg"]
    if first["type"] == "missing":
        msg = "field required"
    return errors.InvalidRequest(msg[0].lower() + msg[1:] if msg else "invalid", field=field)


async def parse_body(
    request: Request, model: type[M], counts: Mapping[str, int] | None = None
) -> M:
    """Parse and validate a JSON body; InvalidRequest names the bad field.

    `counts`: the most items each list field may hold (`coordinator.limits`), checked
    before validation.
    """
    raw = await request.body()
    if not raw:
        raise errors.InvalidRequest("request body is empty; expected a JSON object")
    data = decode_json(raw)
    if not isinstance(data, dict):
        raise errors.InvalidRequest("request body must be a JSON object")
    check_counts(data, counts or {})
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def sse(event: str | None, data: Any) -> bytes:
    """One server-sent event; `data` is JSON-encoded unless it is already a string."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    head = f"event: {event}\n" if event else ""
    return f"{head}data: {payload}\n\n".encode()


async def close_streams(*gens: AsyncGenerator[Any, None]) -> None:
    """Close async generators even while the request is being cancelled.

    Starlette cancels a request through an anyio scope that re-cancels every
    await inside it; shielded, closing the node's stream (which is what stops
    generation on the node) completes.
    """
    with anyio.CancelScope(shield=True):
        for gen in gens:
            await gen.aclose()


async def gather_events(
    request: Request, first: GenerateEvent, events: AsyncGenerator[GenerateEvent, None]
) -> list[GenerateEvent]:
    """Every event of a non-streaming request; Cancelled if the client disconnects first."""
    out = [first]
    disconnected = False
    failure: errors.MeshError | None = None
    async with anyio.create_task_group() as tg:

        async def watch() -> None:
            nonlocal disconnected
            while (await request.receive())["type"] != "http.disconnect":
                pass
            disconnected = True
            tg.cancel_scope.cancel()

        tg.start_soon(watch)
        try:
            async for event in events:
                out.append(event)
        except errors.MeshError as err:
            failure = err  # raised below: inside, the task group would wrap it in a group
        tg.cancel_scope.cancel()
    if failure is not None:
        raise failure
    if disconnected:
        raise errors.Cancelled("the client disconnected")
    return out


Events = AsyncGenerator[GenerateEvent, None]


class BoundedStreamingResponse(StreamingResponse):
    """A stream that gives up on a client that stops reading.

    uvicorn stops taking writes once its buffer to the client is full (64 KiB), so
    a stalled client holds at most that much here and the node's stream is no longer
    read; gRPC's flow control then pauses the node. A write blocked for
    `send_timeout` seconds ends the response: the body and the node's stream close
    (the node cancels the generation), and the connection is dropped.
    """

    def __init__(self, *args: Any, send_timeout: float, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.send_timeout = send_timeout

    async def stream_response(self, send: Send) -> None:
        stalled = False

        async def timed_send(message: Message) -> None:
            nonlocal stalled
            with anyio.move_on_after(self.send_timeout) as scope:
                await send(message)
            if scope.cancelled_caught:
                stalled = True

        await timed_send(
            {"type": "http.response.start", "status": self.status_code, "headers": self.raw_headers}
        )
        if not stalled:
            async for chunk in self.body_iterator:
                data = chunk if isinstance(chunk, bytes | memoryview) else chunk.encode()
                await timed_send({"type": "http.response.body", "body": data, "more_body": True})
                if stalled:
                    break
        if stalled:
            log.warning(
                "client stopped reading for %g s; stream dropped, generation cancelled",
                self.send_timeout,
            )
            if self.background is not None:
                await self.background()  # closes the body and the node's stream
            # Returning without the last message makes the server drop the connection.
            return
        await send({"type": "http.response.body", "body": b"", "more_body": False})


async def respond(
    request: Request,
    events: Events,
    *,
    headers: dict[str, str],
    stream: Callable[[GenerateEvent, Events], AsyncGenerator[bytes, None]] | None,
    complete: Callable[[list[GenerateEvent]], Response],
    error: Callable[[errors.MeshError, dict[str, str]], Response],
) -> Response:
    """Turn a generation's events into the HTTP response, the same way for every API.

    Waits for the first event (`Started` comes once the node has queued the
    request, before prefill, so a full queue or bad sampling values still get a
    status code of their own). Then `stream` (the API's SSE body, given that
    first event and the rest) is handed to the server, which closes it and the
    node's stream even after a disconnect; or, without `stream`, every event is
    gathered (a disconnect cancels the generation) and `complete` builds the
    body. `error` renders a failure before the status line in the API's envelope.
    """
    handed_off = False
    try:
        first = await anext(events, None)
        if first is None:
            raise errors.BackendError("the node's stream ended at once")
        if stream is not None:
            body = stream(first, events)
            handed_off = True
            return BoundedStreamingResponse(
                body,
                send_timeout=float(request.app.state.config.send_timeout),
                media_type="text/event-stream",
                headers={**headers, "cache-control": "no-cache", "x-accel-buffering": "no"},
                # Runs after a disconnect too: closes a body that never started or
                # stopped at a `yield`, so the node always hears about it.
                background=BackgroundTask(close_streams, body, events),
            )
        return complete(await gather_events(request, first, events))
    except errors.MeshError as err:
        return error(err, headers)
    finally:
        if not handed_off:
            await close_streams(events)
