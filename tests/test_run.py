"""Process plumbing of `macmesh up` / `coordinator`."""

from __future__ import annotations

import asyncio
import socket

import pytest

from macmesh.http_server import bind as _bind


async def test_accepted_connections_get_tcp_nodelay() -> None:
    """Regression: without it every kept-alive response waited ~40 ms (Nagle + delayed ACK)."""
    sock = _bind("127.0.0.1", 0)
    accepted: asyncio.Queue[asyncio.StreamWriter] = asyncio.Queue()

    async def on_conn(_r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await accepted.put(w)

    server = await asyncio.start_server(on_conn, sock=sock)
    try:
        _, client = await asyncio.open_connection(*sock.getsockname()[:2])
        writer = await asyncio.wait_for(accepted.get(), 5)
        conn: socket.socket = writer.get_extra_info("socket")
        assert conn.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)
        client.close()
        writer.close()
    finally:
        server.close()
        await server.wait_closed()


def test_port_in_use_is_a_clear_error() -> None:
    taken = _bind("127.0.0.1", 0)
    try:
        with pytest.raises(OSError, match=r"cannot listen on 127\.0\.0\.1:\d+: .*port in use"):
            _bind("127.0.0.1", taken.getsockname()[1])
    finally:
        taken.close()
