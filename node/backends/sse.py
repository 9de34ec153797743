"""A minimal HTTP/1.1 client for llama-server's server-sent event streams.

The per-token path must be cheap: on a small machine the node's CPU time per
token is taken from llama-server's own threads. A general client (httpx) costs
about half a millisecond per event in its layers; this reads the chunked body
straight from an asyncio stream and only splits out `data:` lines.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncGenerator, AsyncIterator
from typing import Any


class SSEError(Exception):
    """The connection failed or broke; `status` is set for a non-200 answer."""

    def __init__(self, message: str, status: int = 0, body: bytes = b"") -> None:
        super().__init__(message)
        self.status = status
        self.body = body


async def _read_body(reader: asyncio.StreamReader, headers: dict[str, str]) -> AsyncIterator[bytes]:
    if headers.get("transfer-encoding", "").lower() == "chunked":
        while True:
            size_line = await reader.readline()
            if not size_line:
                raise SSEError("connection closed inside a chunked body")
            size = int(size_line.split(b";", 1)[0].strip() or b"0", 16)
            if size == 0:
                await reader.readline()  # the CRLF after the last chunk (no trailers)
                return
            data = await reader.readexactly(size + 2)
            yield data[:-2]
    elif "content-length" in headers:
        yield await reader.readexactly(int(headers["content-length"]))
    else:
        while chunk := await reader.read(65536):
            yield chunk


async def post_sse(
    host: str, port: int, path: str, body: dict[str, Any], *, raw_body: bool = False
) -> AsyncGenerator[str, None]:
    """POST `body` as JSON and yield each `data:` payload of the event stream.

    `raw_body`: yield the body as it arrives instead (a plain JSON answer).

    Raises SSEError for a refused or broken connection and for a non-200
    status (with the response body). Closing the iterator closes the
    connection, which makes llama-server stop the generation.
    """
    payload = json.dumps(body).encode()
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError as exc:
        raise SSEError(f"cannot connect to {host}:{port}: {exc}") from None
    try:
        writer.write(
            f"POST {path} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Type: application/json\r\n"
            f"Accept: text/event-stream\r\nContent-Length: {len(payload)}\r\n"
            "Connection: close\r\n\r\n".encode()
            + payload
        )
        await writer.drain()
        status_line = await reader.readline()
        parts = status_line.split(None, 2)
        if len(parts) < 2 or not parts[1].isdigit():
            raise SSEError(f"no HTTP answer from {host}:{port} ({status_line[:80]!r})")
        status = int(parts[1])
        headers: dict[str, str] = {}
        while (line := await reader.readline()) not in (b"\r\n", b"\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            headers[name.strip().lower()] = value.strip()
        if status != 200:
            raw = b"".join([c async for c in _read_body(reader, headers)])
            raise SSEError(f"HTTP {status}", status, raw)
        if raw_body:
            async for chunk in _read_body(reader, headers):
                yield chunk.decode()
            return
        buf = b""
        async for chunk in _read_body(reader, headers):
            buf += chunk
            *lines, buf = buf.split(b"\n")
            for line in lines:
                if line.startswith(b"data: "):
                    yield line[6:].rstrip(b"\r").decode()
        if buf.startswith(b"data: "):
            yield buf[6:].rstrip(b"\r").decode()
    except (OSError, asyncio.IncompleteReadError, ValueError) as exc:
        raise SSEError(f"stream from {host}:{port} broke: {exc or type(exc).__name__}") from None
    finally:
        writer.close()


async def post_json(host: str, port: int, path: str, body: dict[str, Any]) -> tuple[int, Any]:
    """POST `body` as JSON; (status, decoded JSON body or text). Raises SSEError on I/O."""
    raw = b""
    status = 200
    try:
        async for data in post_sse(host, port, path, body, raw_body=True):
            raw += data.encode()
    except SSEError as exc:
        if not exc.status:
            raise
        status, raw = exc.status, exc.body
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode("utf-8", "replace")
