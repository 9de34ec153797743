"""One timed generation on one path: straight to a node's gRPC, or a streamed
Anthropic `/v1/messages` or OpenAI `/v1/chat/completions` request, each read as
it arrives and checked for a well-formed end."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import httpx

from mesh.client import NodeClient
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    GenerateRequest,
    Message,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    ToolCallEvent,
)

# Anthropic stop reasons in the node's terms, to compare finish reasons.
ANTHROPIC_FINISH = {"end_turn": "stop", "max_tokens": "length", "stop_sequence": "stop_sequence"}


class BenchError(RuntimeError):
    """A failed start, a failed request or a malformed stream (exit code 2)."""


@dataclass
class Sample:
    """One generation on one path; times are client-side arrivals."""

    path: str
    text: str = ""
    deltas: int = 0
    completion_tokens: int = 0
    finish_reason: str = ""
    ttft_s: float = 0.0
    decode_s: float = 0.0
    decode_tps: float = 0.0
    total_s: float = 0.0
    cold: bool = False
    # Seconds since the request, one per text delta.
    arrivals: list[float] = field(default_factory=list)

    def add_text(self, text: str, now: float) -> None:
        self.text += text
        self.deltas += 1
        self.arrivals.append(now)

    def close(self, t_end: float) -> Sample:
        if not self.arrivals:
            raise BenchError(f"{self.path}: no text came back")
        self.ttft_s = self.arrivals[0]
        self.decode_s = self.arrivals[-1] - self.arrivals[0]
        steps = len(self.arrivals) - 1
        self.decode_tps = steps / self.decode_s if steps > 0 and self.decode_s > 0 else 0.0
        self.total_s = t_end
        return self


def chat_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]


async def run_direct(
    client: NodeClient, model: str, prompt: str, max_tokens: int, *, cold: bool = False
) -> Sample:
    """Straight to the node: `NodeClient.generate` with the chat prompt."""
    request = GenerateRequest(
        model=model,
        prompt=ChatPrompt((Message("user", prompt),)),
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )
    s = Sample("direct", cold=cold)
    finish: Finish | None = None
    t_req = time.perf_counter()
    async for event in client.generate(request):
        now = time.perf_counter() - t_req
        if isinstance(event, TextDelta):
            if event.text:
                s.add_text(event.text, now)
        elif isinstance(event, ErrorEvent):
            raise BenchError(f"direct: node error {event.code}: {event.message}")
        elif isinstance(event, ReasoningDelta | ToolCallEvent):
            raise BenchError(f"direct: unexpected event {event!r}")
        elif isinstance(event, Finish):
            finish = event
    if finish is None:
        raise BenchError("direct: the stream ended without a Finish event")
    s.completion_tokens = finish.usage.completion_tokens
    s.finish_reason = finish.reason.value
    return s.close(time.perf_counter() - t_req)


async def _sse_data(resp: httpx.Response, path: str) -> AsyncIterator[tuple[float, str]]:
    """Yield (arrival time, parsed data) for each `data:` line (raw, not buffered)."""
    if resp.status_code != 200:
        body = (await resp.aread()).decode(errors="replace")
        raise BenchError(f"{path}: HTTP {resp.status_code}: {body[:300]}")
    async for line in resp.aiter_lines():
        if line.startswith("data:"):
            yield time.perf_counter(), line[5:].strip()


async def run_anthropic(
    http: httpx.AsyncClient, base: str, model: str, prompt: str, max_tokens: int, **kw: bool
) -> Sample:
    """`POST /v1/messages`, `stream: true`."""
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "messages": chat_messages(prompt),
    }
    headers = {"anthropic-version": "2023-06-01"}
    s = Sample("anthropic", cold=kw.get("cold", False))
    stopped = False
    t_req = time.perf_counter()
    async with http.stream("POST", f"{base}/v1/messages", json=body, headers=headers) as resp:
        async for t, raw in _sse_data(resp, "anthropic"):
            data = json.loads(raw)
            kind = data.get("type")
            if kind == "content_block_delta":
                delta = data["delta"]
                if delta.get("type") != "text_delta":
                    raise BenchError(f"anthropic: unexpected delta {delta!r}")
                if delta["text"]:
                    s.add_text(delta["text"], t - t_req)
            elif kind == "message_delta":
                s.completion_tokens = data["usage"]["output_tokens"]
                reason = data["delta"]["stop_reason"]
                s.finish_reason = ANTHROPIC_FINISH.get(reason, reason)
            elif kind == "message_stop":
                stopped = True
            elif kind == "error":
                raise BenchError(f"anthropic: error event {data!r}")
    if not stopped:
        raise BenchError("anthropic: the stream ended without message_stop")
    return s.close(time.perf_counter() - t_req)


async def run_openai(
    http: httpx.AsyncClient,
    base: str,
    model: str,
    prompt: str,
    max_tokens: int,
    *,
    cold: bool = False,
    system: str = "",
) -> Sample:
    """`POST /v1/chat/completions`, `stream: true` (usage in the last chunk); `system`,
    when given, goes first as a system message."""
    messages = chat_messages(prompt)
    if system:
        messages.insert(0, {"role": "system", "content": system})
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
        "messages": messages,
    }
    s = Sample("openai", cold=cold)
    done = False
    t_req = time.perf_counter()
    async with http.stream("POST", f"{base}/v1/chat/completions", json=body) as resp:
        async for t, raw in _sse_data(resp, "openai"):
            if raw == "[DONE]":
                done = True
                continue
            data = json.loads(raw)
            if "error" in data:
                raise BenchError(f"openai: error chunk {data!r}")
            for choice in data.get("choices") or ():
                content = choice.get("delta", {}).get("content")
                if content:
                    s.add_text(content, t - t_req)
                if choice.get("finish_reason"):
                    s.finish_reason = choice["finish_reason"]
            if data.get("usage"):
                s.completion_tokens = data["usage"]["completion_tokens"]
    if not done:
        raise BenchError("openai: the stream ended without [DONE]")
    return s.close(time.perf_counter() - t_req)
