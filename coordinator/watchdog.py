"""Calls to a node, bounded twice: by a deadline, and by the node staying in rotation.

A node that hangs with its TCP connection open (SIGSTOP, a wedged process, a Mac
asleep with its socket alive) answers nothing and refuses nothing. Its state pushes stop,
so the registry takes it out of rotation within `stale_after` seconds; every call
waiting on it here notices within `WATCH_SECONDS` of that and fails with `Unavailable`,
which the request path answers by trying another node. The deadline bounds a node that
keeps pushing state but never answers this one call.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from coordinator.nodes import NodeView
from mesh.errors import Unavailable

T = TypeVar("T")

# How often a waiting call checks that its node is still in rotation.
WATCH_SECONDS = 0.2
# Deadlines per call (seconds). Rendering and tokenizing a 100k-token prompt take well
# under a second on a Mac; these bound a node that is up but stuck.
RENDER_SECONDS = 30.0
# Until the first event of a generation (the node accepting it; it may load the model
# first, e.g. start a llama-server).
FIRST_EVENT_SECONDS = 120.0
# A stream that has sent tokens may pause (a long tool call, a busy batch); once its node is
# out of rotation this long without an event, the stream ends with an error.
MIDSTREAM_SECONDS = 10.0


async def watched(
    view: NodeView, stale_after: float, call: Awaitable[T], *, deadline: float, what: str
) -> T:
    """`await call`, unless `view` leaves rotation or `deadline` passes first (Unavailable;
    the call is cancelled, which cancels its RPC on the node)."""
    task = asyncio.ensure_future(call)
    start = time.monotonic()
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_SECONDS)
            if done:
                return task.result()
            if not view.online(stale_after):
                raise Unavailable(f"node {view.node_id} stopped answering during {what}")
            if time.monotonic() - start > deadline:
                raise Unavailable(f"node {view.node_id} did not finish {what} within {deadline:g}s")
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task


async def next_event(
    stream: AsyncIterator[T], view: NodeView, stale_after: float, *, started: bool, produced: bool
) -> T | None:
    """The stream's next item (None at its end), bounded as the phase allows.

    Before the first token: `FIRST_EVENT_SECONDS` until the node's first event, and the
    node must stay in rotation (a caller can still be moved to another node). After it:
    only a node out of rotation for `MIDSTREAM_SECONDS` with nothing sent ends the stream.
    """
    task: asyncio.Future[T] = asyncio.ensure_future(anext(stream))
    start = time.monotonic()
    out_since: float | None = None
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=WATCH_SECONDS)
            if done:
                try:
                    return task.result()
                except StopAsyncIteration:
                    return None
            now = time.monotonic()
            online = view.online(stale_after)
            if not produced:
                if not online:
                    raise Unavailable(f"node {view.node_id} stopped answering")
                if not started and now - start > FIRST_EVENT_SECONDS:
                    raise Unavailable(
                        f"node {view.node_id} did not start the generation "
                        f"within {FIRST_EVENT_SECONDS:g}s"
                    )
                continue
            out_since = None if online else (out_since or now)
            if out_since is not None and now - out_since > MIDSTREAM_SECONDS:
                raise Unavailable(
                    f"node {view.node_id} stopped answering mid-stream "
                    f"(nothing for {now - start:.0f}s)"
                )
    finally:
        if not task.done():
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
