"""The OpenAI-compatible surface: chat completions, completions, models.

Handlers parse (`openai_protocol`), call `ChatService`, and map `mesh.errors`
to the OpenAI envelope here, at the edge. Generation stops on the node when
the client goes away: streams close the service's event stream in `finally`,
and non-streaming requests watch for the disconnect while they wait.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncGenerator, Iterable
from dataclasses import dataclass, field
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response

from coordinator.api.common import (
    Events,
    close_streams,
    openai_error,
    openai_error_body,
    parse_body,
    respond,
    sse,
)
from coordinator.api.keys import caller, key_name
from coordinator.api.openai_protocol import (
    COUNT_LIMITS,
    ChatCompletionRequest,
    CompletionRequest,
    to_chat,
    to_completion,
)
from coordinator.service import ChatService
from mesh import errors
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    TextPrompt,
    ToolCall,
    ToolCallEvent,
    Usage,
)
from mesh.version import __version__

router = APIRouter()

SYSTEM_FINGERPRINT = f"macmesh-{__version__}"

# ---------- events -> responses ----------


@dataclass(frozen=True, slots=True)
class ResponseMeta:
    """What every response object of one request repeats."""

    id: str
    created: int
    model: str


def _usage(u: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": u.prompt_tokens,
        "completion_tokens": u.completion_tokens,
        "total_tokens": u.prompt_tokens + u.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": u.cached_prompt_tokens},
    }


def _finish_reason(finish: Finish, had_tool_calls: bool) -> str:
    if finish.reason is FinishReason.LENGTH:
        return "length"
    if finish.reason is FinishReason.TOOL_CALLS or had_tool_calls:
        return "tool_calls"
    return "stop"


def _raise_failure(event: ErrorEvent | Finish) -> None:
    """Errors after the stream began: the node's message, as a server error."""
    if isinstance(event, ErrorEvent):
        raise errors.from_code(event.code, event.message)
    if event.reason in (FinishReason.ERROR, FinishReason.CANCELLED):
        raise errors.BackendError(f"generation ended with {event.reason.value}")


@dataclass
class Collected:
    """A whole generation, gathered from its events."""

    text: str = ""
    reasoning: str = ""
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish: Finish | None = None


def collect(events: Iterable[GenerateEvent]) -> Collected:
    """Gather events; raises MeshError when the node reported a failure."""
    out = Collected()
    for ev in events:
        if isinstance(ev, TextDelta):
            out.text += ev.text
        elif isinstance(ev, ReasoningDelta):
            out.reasoning += ev.text
        elif isinstance(ev, ToolCallEvent):
            out.tool_calls.append(ev.call)
        elif isinstance(ev, ErrorEvent):
            _raise_failure(ev)
        elif isinstance(ev, Finish):
            _raise_failure(ev)
            out.finish = ev
    if out.finish is None:
        raise errors.BackendError("the node's stream ended without a finish event")
    return out


def _tool_call(call: ToolCall) -> dict[str, Any]:
    return {
        "id": call.id,
        "type": "function",
        "function": {"name": call.name, "arguments": call.arguments},
    }


def chat_completion(events: Iterable[GenerateEvent], meta: ResponseMeta) -> dict[str, Any]:
    """A `chat.completion` object from a whole generation."""
    got = collect(events)
    assert got.finish is not None
    message: dict[str, Any] = {
        "role": "assistant",
        "content": got.text if got.text or not got.tool_calls else None,
    }
    if got.tool_calls:
        message["tool_calls"] = [_tool_call(c) for c in got.tool_calls]
    if got.reasoning:
        message["reasoning_content"] = got.reasoning
    return {
        "id": meta.id,
        "object": "chat.completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": _finish_reason(got.finish, bool(got.tool_calls)),
                "logprobs": None,
            }
        ],
        "usage": _usage(got.finish.usage),
    }


def text_completion(events: Iterable[GenerateEvent], meta: ResponseMeta) -> dict[str, Any]:
    """A `text_completion` object; reasoning (if the node split any) stays in the text."""
    got = collect(events)
    assert got.finish is not None
    return {
        "id": meta.id,
        "object": "text_completion",
        "created": meta.created,
        "model": meta.model,
        "system_fingerprint": SYSTEM_FINGERPRINT,
        "choices": [
            {
                "text": got.reasoning + got.text,
                "index": 0,
                "logprobs": None,
                "finish_reason": _finish_reason(got.finish, False),
            }
        ],
        "usage": _usage(got.finish.usage),
    }


class Chunker:
    """Turns events into stream chunks, one event at a time.

    `chat=True` makes `chat.completion.chunk` objects (deltas), otherwise
    `text_completion` objects. `feed` raises MeshError on a node failure.
    """

    def __init__(self, meta: ResponseMeta, *, chat: bool, include_usage: bool) -> None:
        self.meta = meta
        self.chat = chat
        self.include_usage = include_usage
        self._tool_calls = 0

    def _chunk(self, choice: dict[str, Any] | None, usage: Usage | None = None) -> dict[str, Any]:
        out: dict[str, Any] = {
            "id": self.meta.id,
            "object": "chat.completion.chunk" if self.chat else "text_completion",
            "created": self.meta.created,
            "model": self.meta.model,
            "system_fingerprint": SYSTEM_FINGERPRINT,
            "choices": [] if choice is None else [choice],
        }
        if self.include_usage:
            # OpenAI sends `usage: null` on every chunk but the last when usage is asked for.
            out["usage"] = None if usage is None else _usage(usage)
        return out

    def _delta(self, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        if self.chat:
            choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish_reason}
        else:
            text = delta.get("content", "") + delta.get("reasoning_content", "")
            choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish_reason}
        return self._chunk(choice)

    def first(self) -> dict[str, Any] | None:
        """The opening chunk (chat only): the assistant role, sent before any token."""
        return self._delta({"role": "assistant", "content": ""}) if self.chat else None

    def feed(self, ev: GenerateEvent) -> list[dict[str, Any]]:
        """The chunks for one event (often none)."""
        if isinstance(ev, TextDelta) and ev.text:
            return [self._delta({"content": ev.text})]
        if isinstance(ev, ReasoningDelta) and ev.text:
            return [self._delta({"reasoning_content": ev.text})]
        if isinstance(ev, ToolCallEvent) and self.chat:
            call = {"index": self._tool_calls, **_tool_call(ev.call)}
            self._tool_calls += 1
            return [self._delta({"tool_calls": [call]})]
        if isinstance(ev, ErrorEvent):
            _raise_failure(ev)
        if isinstance(ev, Finish):
            _raise_failure(ev)
            out = [self._delta({}, _finish_reason(ev, self._tool_calls > 0))]
            if self.include_usage:
                out.append(self._chunk(None, ev.usage))
            return out
        return []


# ---------- endpoints ----------


def _service(request: Request) -> ChatService:
    return cast(ChatService, request.app.state.service)


def _error(
    err: errors.MeshError, *, param: str | None = None, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The OpenAI envelope; `param` fills in when the error itself names no field."""
    return openai_error(err, headers, param=param)


def _param(err: errors.MeshError, prompt_field: str) -> str | None:
    if isinstance(err, errors.ModelNotFound):
        return "model"
    if isinstance(err, errors.PromptTooLong):
        return prompt_field
    return None


@router.post("/v1/chat/completions")
async def chat_completions(request: Request) -> Response:
    """Chat completions, streaming (SSE) or not."""
    name: str | None = None
    try:
        req = await parse_body(request, ChatCompletionRequest, COUNT_LIMITS)
        name = req.model
        prompt, params = to_chat(req)
    except errors.MeshError as err:
        _service(request).rejected("openai", name, err, key=key_name(request))
        return _error(err)
    return await _complete(request, req.model, prompt, params, req.stream, req.include_usage)


@router.post("/v1/completions")
async def completions(request: Request) -> Response:
    """Legacy text completions: the prompt is tokenized as is, no chat template."""
    name: str | None = None
    try:
        req = await parse_body(request, CompletionRequest, COUNT_LIMITS)
        name = req.model
        prompt, params = to_completion(req)
    except errors.MeshError as err:
        _service(request).rejected("openai", name, err, key=key_name(request))
        return _error(err)
    return await _complete(request, req.model, prompt, params, req.stream, req.include_usage)


async def _complete(
    request: Request,
    model: str,
    prompt: ChatPrompt | TextPrompt,
    params: SamplingParams,
    stream: bool,
    include_usage: bool,
) -> Response:
    chat = isinstance(prompt, ChatPrompt)
    service = _service(request)
    try:
        prepared = await service.prepare(
            model, prompt, max_tokens=params.max_tokens, key=caller(request)
        )
    except errors.MeshError as err:
        service.rejected("openai", model, err, key=key_name(request))
        return _error(err, param=_param(err, "messages" if chat else "prompt"))
    headers = prepared.headers
    meta = ResponseMeta(
        f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time()), model
    )
    events = service.generate(
        prepared, params, request_id=meta.id, api="openai", key=key_name(request)
    )
    build = chat_completion if chat else text_completion
    chunker = Chunker(meta, chat=chat, include_usage=include_usage)
    return await respond(
        request,
        events,
        headers=headers,
        stream=(lambda first, rest: _stream(first, rest, chunker)) if stream else None,
        # After the generation: the node that served it, if it moved.
        complete=lambda got: JSONResponse(build(got, meta), headers=prepared.headers),
        error=lambda err, h: _error(err, headers=h),
    )


async def _stream(
    first: GenerateEvent, events: Events, chunker: Chunker
) -> AsyncGenerator[bytes, None]:
    """`data: {chunk}` lines, then `data: [DONE]`."""
    try:
        opening = chunker.first()
        if opening is not None:
            yield sse(None, opening)
        for chunk in chunker.feed(first):
            yield sse(None, chunk)
        async for ev in events:
            for chunk in chunker.feed(ev):
                yield sse(None, chunk)
    except errors.MeshError as err:
        # The status line is gone; the error can only travel as a last chunk.
        yield sse(None, openai_error_body(err))
    finally:
        await close_streams(events)
    yield sse(None, "[DONE]")


# ---------- models ----------

# No creation time is known for local models; a fixed value keeps listings stable.
_CREATED = 0


def _model_object(name: str) -> dict[str, Any]:
    return {"id": name, "object": "model", "created": _CREATED, "owned_by": "macmesh"}


@router.get("/v1/models")
async def list_models(request: Request) -> JSONResponse:
    """Served model ids and aliases; Anthropic's shape when `anthropic-version` is sent."""
    service = _service(request)
    if "anthropic-version" in request.headers:
        # Lazy: the two surfaces share this path, and only this branch needs the other.
        from coordinator.api.anthropic import anthropic_models_body

        return JSONResponse(anthropic_models_body(service, caller(request)))
    names = service.available_names(caller(request))
    return JSONResponse({"object": "list", "data": [_model_object(n) for n in names]})


@router.get("/v1/models/{model_id:path}")
async def get_model(request: Request, model_id: str) -> JSONResponse:
    """One model, by any name that resolves (as on the Anthropic surface); 404 otherwise."""
    try:
        _service(request).resolve_for(model_id, caller(request))
    except errors.MeshError as err:
        return _error(err, param="model")
    return JSONResponse(_model_object(model_id))
