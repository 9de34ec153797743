"""The Anthropic Messages surface: /v1/messages (+ stream), count_tokens, models.

Handlers parse (`anthropic_protocol`), call `ChatService`, and map
`mesh.errors` to Anthropic's envelope here, at the edge. Everything that can
fail before generation (bad body, unknown model, prompt too long, no node) is
checked by `service.prepare` first, so it comes back as a plain HTTP error; a
stream's headers and `message_start` then go out at once, before the prompt is
prefilled. Generation stops on the node when the client goes away.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import uuid
from collections.abc import AsyncGenerator
from typing import Any, TypeVar, cast

import anyio
from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response
from pydantic import RootModel

from coordinator.api.anthropic_protocol import (
    COUNT_LIMITS,
    ChatRequest,
    CountTokensRequest,
    MessagesRequest,
    parse_request,
    to_chat_prompt,
    to_sampling,
)
from coordinator.api.common import (
    Events,
    anthropic_error,
    anthropic_error_body,
    close_streams,
    parse_body,
    respond,
    sse,
)
from coordinator.api.keys import caller, key_name
from coordinator.keys import ApiKey
from coordinator.service import ChatService
from mesh import errors
from mesh.types import (
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    ReasoningDelta,
    Started,
    TextDelta,
    ToolCall,
    ToolCallEvent,
)

router = APIRouter()

R = TypeVar("R", bound=ChatRequest)

StreamEvent = tuple[str, dict[str, Any]]

_STOP_REASONS = {
    FinishReason.STOP: "end_turn",
    FinishReason.LENGTH: "max_tokens",
    FinishReason.STOP_SEQUENCE: "stop_sequence",
    FinishReason.TOOL_CALLS: "tool_use",
}
_PING = sse("ping", {"type": "ping"})
# Models carry no creation date; Anthropic's shape requires one.
_EPOCH = "1970-01-01T00:00:00Z"


# ---------- node events -> Anthropic message ----------


def new_message_id() -> str:
    """`msg_` and 24 hex digits, like Anthropic's."""
    return f"msg_{uuid.uuid4().hex[:24]}"


def signature(thinking: str) -> str:
    """A stable signature for a thinking block (clients echo it back verbatim)."""
    return base64.b64encode(hashlib.sha256(thinking.encode()).digest()).decode()


def _tool_input(arguments: str) -> dict[str, Any]:
    try:
        value = json.loads(arguments) if arguments else {}
    except json.JSONDecodeError:
        return {}
    return value if isinstance(value, dict) else {}


def _block_start(index: int, block: dict[str, Any]) -> StreamEvent:
    body = {"type": "content_block_start", "index": index, "content_block": block}
    return "content_block_start", body


def _delta(index: int, delta: dict[str, Any]) -> StreamEvent:
    return "content_block_delta", {"type": "content_block_delta", "index": index, "delta": delta}


def _stop(index: int) -> StreamEvent:
    return "content_block_stop", {"type": "content_block_stop", "index": index}


class MessageBuilder:
    """Node events -> Anthropic content blocks and stream events, in order of arrival.

    `feed` returns the stream events each node event causes; the non-streaming
    path ignores them and reads `message()` (or `error`) once `Finish` is fed.
    """

    def __init__(self, *, message_id: str, model: str, input_tokens: int) -> None:
        self.message_id = message_id
        self.model = model
        self.input_tokens = input_tokens
        self.content: list[dict[str, Any]] = []
        self.error: errors.MeshError | None = None
        self.stop_reason: str | None = None
        self.stop_sequence: str | None = None
        self.usage: dict[str, int] = {}
        self.finished = False  # Finish was fed
        self._open: str | None = None  # type of the last block while it takes deltas

    def _message(self, content: list[dict[str, Any]], usage: dict[str, int]) -> dict[str, Any]:
        return {
            "id": self.message_id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": self.stop_reason,
            "stop_sequence": self.stop_sequence,
            "usage": usage,
        }

    def start(self) -> StreamEvent:
        """`message_start`: no content yet; the prompt's token count."""
        usage = {
            "input_tokens": self.input_tokens,
            "output_tokens": 0,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
        }
        return "message_start", {"type": "message_start", "message": self._message([], usage)}

    def message(self) -> dict[str, Any]:
        """The complete non-streaming response body."""
        return self._message(self.content, self.usage)

    def end(self) -> list[StreamEvent]:
        """The node's stream ended: an error unless `Finish` came (nothing to send then)."""
        if self.finished:
            return []
        self.finished = True
        self.error = self.error or errors.BackendError("the node's stream ended before finishing")
        return [*self._close(), ("error", anthropic_error_body(self.error))]

    def feed(self, event: GenerateEvent) -> list[StreamEvent]:
        """Take one node event; returns the stream events it causes, in order."""
        if isinstance(event, TextDelta):
            return self._append("text", event.text) if event.text else []
        if isinstance(event, ReasoningDelta):
            return self._append("thinking", event.text) if event.text else []
        if isinstance(event, ToolCallEvent):
            return self._tool_use(event.call)
        if isinstance(event, ErrorEvent):
            self.error = errors.from_code(event.code, event.message)
            return []
        if isinstance(event, Finish):
            return self._finish(event)
        return []  # Started: the prompt's size is already known from `prepare`

    def _close(self) -> list[StreamEvent]:
        if self._open is None:
            return []
        self._open = None
        index = len(self.content) - 1
        block = self.content[index]
        if block["type"] != "thinking":
            return [_stop(index)]
        block["signature"] = signature(block["thinking"])
        return [
            _delta(index, {"type": "signature_delta", "signature": block["signature"]}),
            _stop(index),
        ]

    def _append(self, kind: str, text: str) -> list[StreamEvent]:
        out: list[StreamEvent] = []
        if self._open != kind:
            out = self._close()
            empty: dict[str, Any] = {"type": kind, kind: ""}
            if kind == "thinking":
                empty["signature"] = ""
            self.content.append(empty)
            self._open = kind
            out.append(_block_start(len(self.content) - 1, dict(empty)))
        self.content[-1][kind] += text
        out.append(_delta(len(self.content) - 1, {"type": f"{kind}_delta", kind: text}))
        return out

    def _tool_use(self, call: ToolCall) -> list[StreamEvent]:
        out = self._close()
        arguments = _tool_input(call.arguments)
        block = {"type": "tool_use", "id": f"toolu_{uuid.uuid4().hex[:24]}", "name": call.name}
        self.content.append({**block, "input": arguments})
        index = len(self.content) - 1
        partial = {"type": "input_json_delta", "partial_json": json.dumps(arguments)}
        return [
            *out,
            _block_start(index, {**block, "input": {}}),
            _delta(index, partial),
            _stop(index),
        ]

    def _finish(self, event: Finish) -> list[StreamEvent]:
        self.finished = True
        out = self._close()
        reason = _STOP_REASONS.get(event.reason)
        if reason is None:  # CANCELLED or ERROR
            if self.error is None:
                self.error = errors.BackendError(f"generation ended: {event.reason.value}")
            return [*out, ("error", anthropic_error_body(self.error))]
        self.stop_reason = reason
        if reason == "stop_sequence":
            self.stop_sequence = event.stop_sequence or None
        usage = event.usage
        prompt = usage.prompt_tokens or self.input_tokens
        # Anthropic's input_tokens excludes what was read from the cache.
        self.usage = {
            "input_tokens": prompt - usage.cached_prompt_tokens,
            "output_tokens": usage.completion_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": usage.cached_prompt_tokens,
        }
        delta = {"stop_reason": self.stop_reason, "stop_sequence": self.stop_sequence}
        body = {"type": "message_delta", "delta": delta, "usage": self.usage}
        return [*out, ("message_delta", body), ("message_stop", {"type": "message_stop"})]


# ---------- handlers ----------


def _service(request: Request) -> ChatService:
    return cast(ChatService, request.app.state.service)


class _JSONObject(RootModel[dict[str, Any]]):
    """Any JSON object: `parse_body` checks the JSON, `parse_request` the fields."""


async def _parse(request: Request, model: type[R]) -> R:
    return parse_request((await parse_body(request, _JSONObject, COUNT_LIMITS)).root, model)


@router.post("/v1/messages")
@router.post("/anthropic/v1/messages")
async def create_message(request: Request) -> Response:
    """Anthropic Messages, streaming (`stream: true`) or not."""
    service = _service(request)
    name: str | None = None
    try:
        body = await _parse(request, MessagesRequest)
        name = body.model
        params = to_sampling(body)
        prepared = await service.prepare(
            body.model, to_chat_prompt(body), max_tokens=params.max_tokens, key=caller(request)
        )
    except errors.MeshError as err:
        service.rejected("anthropic", name, err, key=key_name(request))
        return anthropic_error(err)
    message_id = new_message_id()
    # The client's model name, as Anthropic does; x-macmesh-model says what answered.
    builder = MessageBuilder(
        message_id=message_id, model=body.model, input_tokens=prepared.prompt_tokens
    )
    headers = {**prepared.headers, "request-id": message_id}
    events = service.generate(
        prepared, params, request_id=message_id, api="anthropic", key=key_name(request)
    )
    interval = float(request.app.state.config.ping_interval)

    def complete(got: list[GenerateEvent]) -> Response:
        for event in got:
            builder.feed(event)
        builder.end()
        # After the generation: the node that served it, if it moved.
        done = {**prepared.headers, "request-id": message_id}
        if builder.error is not None:
            return anthropic_error(builder.error, done)
        return JSONResponse(builder.message(), headers=done)

    return await respond(
        request,
        events,
        headers=headers,
        stream=(lambda first, rest: _stream(first, rest, builder, interval))
        if body.stream
        else None,
        complete=complete,
        error=anthropic_error,
    )


async def _next(events: Events) -> GenerateEvent | None:
    return await anext(events, None)


async def _stream(
    first: GenerateEvent, events: Events, builder: MessageBuilder, ping_interval: float
) -> AsyncGenerator[bytes, None]:
    """The SSE body: message_start at once, pings until the model's first output."""
    pending: asyncio.Task[GenerateEvent | None] | None = None
    try:
        yield sse(*builder.start())
        yield _PING
        event: GenerateEvent | None = first
        while event is not None:
            for name, data in builder.feed(event):
                yield sse(name, data)
            if isinstance(event, Started):
                # Prefilling a long prompt can take minutes: ping so clients and
                # proxies keep the connection until the model's first output.
                pending = asyncio.ensure_future(_next(events))
                while not (await asyncio.wait({pending}, timeout=ping_interval))[0]:
                    yield _PING
                event, pending = pending.result(), None
            else:
                event = await _next(events)
        for name, data in builder.end():
            yield sse(name, data)
    except errors.MeshError as err:
        # The status line is gone: a failure after the stream began is an `error` event.
        yield sse("error", anthropic_error_body(err))
    finally:
        if pending is not None:
            # Cancelling the task that waits on the node stops the generation there.
            pending.cancel()
            with anyio.CancelScope(shield=True):
                await asyncio.wait({pending})
        await close_streams(events)


@router.post("/v1/messages/count_tokens")
@router.post("/anthropic/v1/messages/count_tokens")
async def count_tokens(request: Request) -> Response:
    """`{"input_tokens": N}`: exactly what the node would prefill for this request."""
    try:
        body = await _parse(request, CountTokensRequest)
        tokens = await _service(request).count_tokens(
            body.model, to_chat_prompt(body), key=caller(request)
        )
    except errors.PromptTooLong as err:
        tokens = err.tokens  # counting is still meaningful for a prompt that would not fit
    except errors.MeshError as err:
        return anthropic_error(err)
    return JSONResponse({"input_tokens": tokens})


def _model_object(model_id: str, display_name: str = "") -> dict[str, Any]:
    return {
        "type": "model",
        "id": model_id,
        "display_name": display_name or model_id,
        "created_at": _EPOCH,
    }


def anthropic_models_body(service: ChatService, key: ApiKey | None = None) -> dict[str, Any]:
    """Anthropic's model list of every servable name (`key`'s allowed ones).

    The OpenAI router owns `GET /v1/models` and returns this when the request
    carries an `anthropic-version` header.
    """
    names = service.available_names(key)
    return {
        "data": [_model_object(n) for n in names],
        "has_more": False,
        "first_id": names[0] if names else None,
        "last_id": names[-1] if names else None,
    }


@router.get("/anthropic/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """Anthropic's model list (pagination parameters are accepted; it is one page)."""
    return JSONResponse(anthropic_models_body(_service(request), caller(request)))


@router.get("/anthropic/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> JSONResponse:
    """One model, by any name that resolves (a Claude name shows what answers it)."""
    try:
        resolution = _service(request).resolve_for(model_id, caller(request))
    except errors.MeshError as err:
        return anthropic_error(err)
    return JSONResponse(_model_object(model_id, resolution.model))
