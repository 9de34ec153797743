"""Policy every backend applies the same way: prompt checks, request ids, the tool fallback,
draining on shutdown."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import replace

from mesh.errors import InvalidRequest, PromptTooLong
from mesh.types import GenerateRequest
from node.backends.chat_template import FALLBACK_TOOL_END, FALLBACK_TOOL_START
from node.backends.outparse import ParserConfig, json_tool_call_parser

# How often a draining backend looks at its in-flight count.
_DRAIN_POLL_S = 0.02


def check_prompt(ids: Sequence[int], context_length: int) -> None:
    """An empty prompt, or one that leaves no room in the context, is refused (400)."""
    if not ids:
        raise InvalidRequest("the prompt is empty", field="input")
    if context_length and len(ids) >= context_length:
        raise PromptTooLong(len(ids), context_length)


def room(max_tokens: int, ids: Sequence[int], context_length: int) -> int:
    """`max_tokens` clamped to what fits after the prompt: clients ask for more all the time."""
    return min(max_tokens, context_length - len(ids)) if context_length else max_tokens


def request_id(request: GenerateRequest, prefix: str = "req") -> str:
    """The caller's request id, else a fresh one."""
    return request.request_id or f"{prefix}_{uuid.uuid4().hex[:16]}"


def with_fallback_tools(cfg: ParserConfig) -> ParserConfig:
    """`cfg` parsing the `<tool_call>` JSON blocks of tools described in the system prompt
    (node.backends.chat_template), for templates that know no tools."""
    return replace(
        cfg,
        tool_call_start=FALLBACK_TOOL_START,
        tool_call_end=FALLBACK_TOOL_END,
        parse_tool_call=json_tool_call_parser,
    )


async def drain(in_flight: Callable[[], int], grace: float) -> None:
    """Wait until nothing is in flight, or `grace` seconds have passed."""
    deadline = time.monotonic() + grace
    while in_flight() and time.monotonic() < deadline:
        await asyncio.sleep(_DRAIN_POLL_S)


class CountsRunning:
    """`running`, `waiting` and `close` for a backend that counts its generations per
    model in `_running`, queues nothing, and refuses new work once `_closing`."""

    _running: dict[str, int]
    _closing: bool

    @property
    def running(self) -> int:
        """Generations under way."""
        return sum(self._running.values())

    @property
    def waiting(self) -> int:
        """Nothing waits: every generation runs at once."""
        return 0

    async def close(self, grace: float) -> None:
        """Refuse new work; give what runs `grace` seconds to finish."""
        self._closing = True
        await drain(lambda: self.running, grace)
