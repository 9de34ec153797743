"""The request log over HTTP: recent requests, filtered, as a page or as a live stream.

    GET /api/requests          {"requests": [...oldest first], "last_seq", "size", "total"}
    GET /api/requests/events   server-sent events: the matching backlog first, then each
                               new batch of records as it happens ({"requests": [...]}),
                               a comment every ~15 s when quiet

Both take the same query parameters: `model` (requested or resolved name), `node`, `api`
(openai, anthropic), `ok` (true: answered; false: refused, failed or cancelled), `q` (text
anywhere in the record), `after` (a `seq`: only newer records) and `limit` (1-1000,
default 100). The log lives in coordinator.request_log; its size is `--request-log-size`.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from coordinator.api.common import openai_error, sse
from coordinator.request_log import MAX_LIMIT, RequestFilter, RequestLog
from mesh.errors import InvalidRequest, MeshError

router = APIRouter(prefix="/api", tags=["admin"])

HEARTBEAT_SECONDS = 15.0
DEFAULT_LIMIT = 100


def _log(request: Request) -> RequestLog:
    log: RequestLog = request.app.state.service.requests
    return log


def _int(request: Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query_params.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = int(raw)
    except ValueError:
        raise InvalidRequest(f"must be an integer, got {raw!r}", field=name) from None
    if not low <= value <= high:
        raise InvalidRequest(f"must be between {low} and {high}, got {value}", field=name)
    return value


def _query(request: Request) -> tuple[RequestFilter, int, int]:
    """The filter, `after` and `limit` of a request; InvalidRequest names a bad one."""
    params = request.query_params
    ok_raw = params.get("ok")
    ok: bool | None = None
    if ok_raw is not None and ok_raw != "":
        if ok_raw.lower() not in ("true", "false", "1", "0"):
            raise InvalidRequest(f"must be true or false, got {ok_raw!r}", field="ok")
        ok = ok_raw.lower() in ("true", "1")
    flt = RequestFilter(
        model=params.get("model") or None,
        node=params.get("node") or None,
        api=params.get("api") or None,
        key=params.get("key") or None,
        ok=ok,
        text=params.get("q") or None,
    )
    after = _int(request, "after", 0, 0, 2**62)
    limit = _int(request, "limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
    return flt, after, limit


@router.get("/requests")
async def recent(request: Request) -> Response:
    log = _log(request)
    try:
        flt, after, limit = _query(request)
    except MeshError as err:
        return openai_error(err)
    records = log.query(flt, after=after, limit=limit)
    return JSONResponse(
        {
            "requests": [r.to_json() for r in records],
            "last_seq": log.last_seq,
            "size": log.size,
            "total": log.total,
        }
    )


async def follow(
    log: RequestLog, flt: RequestFilter, after: int, limit: int
) -> AsyncIterator[bytes]:
    """The event stream: the backlog, then new matching records as they are logged."""
    yield b"retry: 2000\n\n"
    backlog = log.query(flt, after=after, limit=limit)
    yield sse(None, {"requests": [r.to_json() for r in backlog], "last_seq": log.last_seq})
    seen = log.last_seq
    while True:
        if not await log.wait(seen, HEARTBEAT_SECONDS):
            yield b": heartbeat\n\n"
            continue
        # Everything since `seen`, however many arrived (a burst may pass the ring's size).
        fresh = log.query(flt, after=seen, limit=MAX_LIMIT)
        seen = log.last_seq
        if fresh:
            yield sse(None, {"requests": [r.to_json() for r in fresh], "last_seq": seen})


@router.get("/requests/events")
async def events(request: Request) -> Response:
    log = _log(request)
    try:
        flt, after, limit = _query(request)
    except MeshError as err:
        return openai_error(err)
    return StreamingResponse(
        follow(log, flt, after, limit),
        media_type="text/event-stream",
        headers={"cache-control": "no-cache", "x-accel-buffering": "no"},
    )
