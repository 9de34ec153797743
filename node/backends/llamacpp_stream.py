"""One llama-server stream read into the node's events: SSE chunks to text,
reasoning and tool-call events, llama-server's failures worded for the client
(a crash, an exit, a rejected body), fed through a queue so the request can
start generating before it is counted."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncGenerator, Callable
from typing import Any

from mesh.types import GenerateEvent, ToolCall, ToolCallEvent
from node.backends.llamacpp_server import LlamaServer
from node.backends.llamacpp_wire import (
    StreamRun,
    chunk_events,
    chunk_tokens,
    error_text,
    json_or_text,
)
from node.backends.outparse import OutputParser, new_call_id
from node.backends.sse import SSEError, post_sse


class StreamFailed(Exception):
    """llama-server failed the stream; `code` is the gRPC status name to report."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


Item = GenerateEvent | StreamFailed | None


async def produce(
    server: LlamaServer,
    endpoint: str,
    body: dict[str, Any],
    parser: OutputParser,
    run: StreamRun,
    out: asyncio.Queue[Item],
    on_tokens: Callable[[int], None] | None = None,
) -> None:
    """Feed `out` from one stream: events, then None, or the failure."""
    try:
        async for event in stream(server, endpoint, body, parser, run, on_tokens):
            out.put_nowait(event)
    except StreamFailed as failed:
        out.put_nowait(failed)
    else:
        out.put_nowait(None)


async def stream(
    server: LlamaServer,
    endpoint: str,
    body: dict[str, Any],
    parser: OutputParser,
    run: StreamRun,
    on_tokens: Callable[[int], None] | None = None,
) -> AsyncGenerator[GenerateEvent, None]:
    """Events from one llama-server stream; raises StreamFailed on failure.

    `on_tokens(n)` hears of every `n` tokens generated, as they stream (the
    node's aggregate decode meter)."""
    if server.client is None:
        raise StreamFailed("UNAVAILABLE", await why_down(server, None))
    calls: dict[int, dict[str, str]] = {}
    events = post_sse("127.0.0.1", server.port, endpoint, body)
    try:
        async for data in events:
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise StreamFailed("INTERNAL", f"llama-server: {error_text(chunk)}")
            if isinstance(chunk.get("timings"), dict):
                run.timings = chunk["timings"]
            if on_tokens is not None and (n := chunk_tokens(chunk)):
                on_tokens(n)
            for ev in chunk_events(chunk, parser, calls, run):
                yield ev
            if parser.stopped:
                return  # closing the stream cancels the rest on llama-server
    except SSEError as exc:
        if exc.status:
            code = "INVALID_ARGUMENT" if exc.status == 400 else "UNAVAILABLE"
            detail = error_text(json_or_text(exc.body))
            raise StreamFailed(code, f"llama-server: HTTP {exc.status}: {detail}") from None
        raise StreamFailed("UNAVAILABLE", await why_down(server, exc)) from None
    finally:
        await events.aclose()
    for index in sorted(calls):
        c = calls[index]
        parser.tool_calls += 1
        yield ToolCallEvent(ToolCall(c["id"] or new_call_id(), c["name"], c["args"] or "{}"))


async def why_down(server: LlamaServer, exc: Exception | None) -> str:
    """Word a lost stream: a crash (once the exit is seen) or the transport error."""
    proc = server.proc
    deadline = time.monotonic() + 3.0  # the exit status lags the broken socket a little
    while time.monotonic() < deadline:
        if server.crashed:
            return f"{server.crashed} during generation; it is being restarted"
        if proc is not None and proc.returncode is not None:
            code = proc.returncode
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            return f"llama-server for {server.spec.label} died ({how}) during generation"
        await asyncio.sleep(0.02)
    return f"lost the stream from llama-server for {server.spec.label}: {exc or 'not running'}"
