"""The only place that converts between protobuf messages and `mesh.types`."""

from __future__ import annotations

import json
from typing import Any

import grpc

from mesh import errors
from mesh.audio import (
    KIND_CHAT,
    AudioChunk,
    SpeakRequest,
    TranscribeRequest,
    Transcription,
    TranscriptSegment,
)
from mesh.types import (
    CachedPrefix,
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    GroupRank,
    Memory,
    Message,
    ModelInfo,
    ModelLoad,
    NodeState,
    ReasoningDelta,
    RenderedPrompt,
    SamplingParams,
    Started,
    TextDelta,
    TextPrompt,
    TokenPrompt,
    Tool,
    ToolCall,
    ToolCallEvent,
    Transfer,
    Usage,
)
from proto import node_pb2 as pb

# ---------- status codes ----------


def status_code(err: errors.MeshError) -> grpc.StatusCode:
    """The gRPC status code for a mesh error."""
    return getattr(grpc.StatusCode, err.code, grpc.StatusCode.INTERNAL)  # type: ignore[no-any-return]


def error_from_status(code: grpc.StatusCode, details: str) -> errors.MeshError:
    """Rebuild a mesh error from a gRPC status."""
    return errors.from_code(code.name, details or code.name)


# ---------- prompts ----------


def _tool_to_pb(tool: Tool) -> pb.Tool:
    return pb.Tool(
        name=tool.name,
        description=tool.description,
        parameters_json=json.dumps(tool.parameters) if tool.parameters else "",
    )


def _tool_from_pb(msg: pb.Tool) -> Tool:
    if not msg.name:
        raise errors.InvalidRequest("tool name is empty", field="tools.name")
    params: dict[str, Any] = {}
    if msg.parameters_json:
        try:
            loaded = json.loads(msg.parameters_json)
        except json.JSONDecodeError as exc:
            raise errors.InvalidRequest(
                f"not valid JSON ({exc.msg})", field=f"tools[{msg.name}].parameters"
            ) from None
        if not isinstance(loaded, dict):
            raise errors.InvalidRequest(
                "must be a JSON object", field=f"tools[{msg.name}].parameters"
            )
        params = loaded
    return Tool(name=msg.name, description=msg.description, parameters=params)


def _message_to_pb(m: Message) -> pb.Message:
    return pb.Message(
        role=m.role,
        content=m.content,
        reasoning=m.reasoning,
        tool_calls=[
            pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments) for c in m.tool_calls
        ],
        tool_call_id=m.tool_call_id,
        name=m.name,
        is_error=m.is_error,
    )


def _message_from_pb(m: pb.Message) -> Message:
    return Message(
        role=m.role,
        content=m.content,
        reasoning=m.reasoning,
        tool_calls=tuple(
            ToolCall(id=c.id, name=c.name, arguments=c.arguments_json) for c in m.tool_calls
        ),
        tool_call_id=m.tool_call_id,
        name=m.name,
        is_error=m.is_error,
    )


def chat_to_pb(chat: ChatPrompt) -> pb.ChatPrompt:
    msg = pb.ChatPrompt(
        messages=[_message_to_pb(m) for m in chat.messages],
        tools=[_tool_to_pb(t) for t in chat.tools],
        add_generation_prompt=chat.add_generation_prompt,
        tool_required=chat.tool_required,
    )
    if chat.enable_thinking is not None:
        msg.enable_thinking = chat.enable_thinking
    return msg


def chat_from_pb(msg: pb.ChatPrompt) -> ChatPrompt:
    return ChatPrompt(
        messages=tuple(_message_from_pb(m) for m in msg.messages),
        tools=tuple(_tool_from_pb(t) for t in msg.tools),
        enable_thinking=msg.enable_thinking if msg.HasField("enable_thinking") else None,
        add_generation_prompt=(
            msg.add_generation_prompt if msg.HasField("add_generation_prompt") else True
        ),
        tool_required=msg.tool_required,
    )


def _sampling_to_pb(s: SamplingParams) -> pb.SamplingParams:
    msg = pb.SamplingParams(stop=list(s.stop))
    for name in ("temperature", "top_p", "top_k", "min_p", "max_tokens", "seed"):
        value = getattr(s, name)
        if value is not None:
            setattr(msg, name, value)
    if s.repetition_penalty is not None:
        msg.repetition_penalty = s.repetition_penalty
    return msg


def _sampling_from_pb(msg: pb.SamplingParams) -> SamplingParams:
    def opt(name: str) -> Any:
        return getattr(msg, name) if msg.HasField(name) else None  # type: ignore[arg-type]

    return SamplingParams(
        temperature=opt("temperature"),
        top_p=opt("top_p"),
        top_k=opt("top_k"),
        min_p=opt("min_p"),
        max_tokens=opt("max_tokens"),
        stop=tuple(msg.stop),
        seed=opt("seed"),
        repetition_penalty=opt("repetition_penalty"),
    )


def request_to_pb(req: GenerateRequest) -> pb.GenerateRequest:
    """Encode a generation request for the wire."""
    msg = pb.GenerateRequest(
        model=req.model,
        sampling=_sampling_to_pb(req.sampling),
        request_id=req.request_id,
        tools=[_tool_to_pb(t) for t in req.tools],
        draft_model=req.draft_model,
    )
    prompt = req.prompt
    if isinstance(prompt, ChatPrompt):
        msg.chat.CopyFrom(chat_to_pb(prompt))
    elif isinstance(prompt, TextPrompt):
        msg.text = prompt.text
    else:
        msg.tokens.ids.extend(prompt.ids)
    return msg


def request_from_pb(msg: pb.GenerateRequest) -> GenerateRequest:
    """Decode a generation request; raises InvalidRequest for a missing prompt."""
    which = msg.WhichOneof("input")
    prompt: ChatPrompt | TextPrompt | TokenPrompt
    if which == "chat":
        prompt = chat_from_pb(msg.chat)
    elif which == "text":
        prompt = TextPrompt(msg.text)
    elif which == "tokens":
        prompt = TokenPrompt(tuple(msg.tokens.ids))
    else:
        raise errors.InvalidRequest("one of chat, text or tokens is required", field="input")
    return GenerateRequest(
        model=msg.model,
        prompt=prompt,
        sampling=_sampling_from_pb(msg.sampling),
        request_id=msg.request_id,
        tools=tuple(_tool_from_pb(t) for t in msg.tools),
        draft_model=msg.draft_model,
    )


# ---------- events ----------

_FINISH_TO_PB = {
    FinishReason.STOP: pb.FINISH_REASON_STOP,
    FinishReason.LENGTH: pb.FINISH_REASON_LENGTH,
    FinishReason.STOP_SEQUENCE: pb.FINISH_REASON_STOP_SEQUENCE,
    FinishReason.TOOL_CALLS: pb.FINISH_REASON_TOOL_CALLS,
    FinishReason.CANCELLED: pb.FINISH_REASON_CANCELLED,
    FinishReason.ERROR: pb.FINISH_REASON_ERROR,
}
_FINISH_FROM_PB = {v: k for k, v in _FINISH_TO_PB.items()}


def _usage_to_pb(u: Usage) -> pb.Usage:
    return pb.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
        prompt_seconds=u.prompt_seconds,
        generation_seconds=u.generation_seconds,
        queue_seconds=u.queue_seconds,
        draft_tokens=u.draft_tokens,
        accepted_draft_tokens=u.accepted_draft_tokens,
    )


def _usage_from_pb(u: pb.Usage) -> Usage:
    return Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        cached_prompt_tokens=u.cached_prompt_tokens,
        prompt_seconds=u.prompt_seconds,
        generation_seconds=u.generation_seconds,
        queue_seconds=u.queue_seconds,
        draft_tokens=u.draft_tokens,
        accepted_draft_tokens=u.accepted_draft_tokens,
    )


def event_to_pb(ev: GenerateEvent) -> pb.GenerateEvent:
    """Encode one generation event."""
    if isinstance(ev, TextDelta):
        return pb.GenerateEvent(text=ev.text)
    if isinstance(ev, ReasoningDelta):
        return pb.GenerateEvent(reasoning=ev.text)
    if isinstance(ev, ToolCallEvent):
        c = ev.call
        return pb.GenerateEvent(
            tool_call=pb.ToolCall(id=c.id, name=c.name, arguments_json=c.arguments)
        )
    if isinstance(ev, Started):
        return pb.GenerateEvent(
            started=pb.Started(
                request_id=ev.request_id,
                model=ev.model,
                prompt_tokens=ev.prompt_tokens,
                queue_position=ev.queue_position,
            )
        )
    if isinstance(ev, ErrorEvent):
        return pb.GenerateEvent(error=pb.Error(code=ev.code, message=ev.message))
    return pb.GenerateEvent(
        finish=pb.Finish(
            reason=_FINISH_TO_PB[ev.reason],
            stop_sequence=ev.stop_sequence,
            usage=_usage_to_pb(ev.usage),
        )
    )


def event_from_pb(msg: pb.GenerateEvent) -> GenerateEvent:
    """Decode one generation event."""
    which = msg.WhichOneof("event")
    if which == "text":
        return TextDelta(msg.text)
    if which == "reasoning":
        return ReasoningDelta(msg.reasoning)
    if which == "tool_call":
        c = msg.tool_call
        return ToolCallEvent(ToolCall(id=c.id, name=c.name, arguments=c.arguments_json))
    if which == "started":
        s = msg.started
        return Started(
            request_id=s.request_id,
            model=s.model,
            prompt_tokens=s.prompt_tokens,
            queue_position=s.queue_position,
        )
    if which == "error":
        return ErrorEvent(code=msg.error.code, message=msg.error.message)
    if which == "finish":
        f = msg.finish
        return Finish(
            reason=_FINISH_FROM_PB.get(f.reason, FinishReason.ERROR),
            usage=_usage_from_pb(f.usage),
            stop_sequence=f.stop_sequence,
        )
    raise errors.BackendError("empty generation event from node")


# ---------- models, prompts, state ----------


def model_to_pb(m: ModelInfo) -> pb.ModelInfo:
    return pb.ModelInfo(
        id=m.id,
        backend=m.backend,
        source=m.source,
        path=m.path,
        loaded=m.loaded,
        size_bytes=m.size_bytes,
        context_length=m.context_length,
        quantization=m.quantization,
        supports_tools=m.supports_tools,
        supports_thinking=m.supports_thinking,
        memory_bytes=m.memory_bytes,
        estimated_bytes=m.estimated_bytes,
        kv_bytes_per_token=m.kv_bytes_per_token,
        estimate_error=m.estimate_error,
        idle_seconds=m.idle_seconds,
        kind=m.kind,
    )


def model_from_pb(m: pb.ModelInfo) -> ModelInfo:
    return ModelInfo(
        id=m.id,
        backend=m.backend,
        source=m.source,
        path=m.path,
        loaded=m.loaded,
        size_bytes=m.size_bytes,
        context_length=m.context_length,
        quantization=m.quantization,
        supports_tools=m.supports_tools,
        supports_thinking=m.supports_thinking,
        memory_bytes=m.memory_bytes,
        estimated_bytes=m.estimated_bytes,
        kv_bytes_per_token=m.kv_bytes_per_token,
        estimate_error=m.estimate_error,
        idle_seconds=m.idle_seconds,
        kind=m.kind or KIND_CHAT,  # an older node's models are chat models
    )


def rendered_to_pb(r: RenderedPrompt) -> pb.RenderPromptResponse:
    return pb.RenderPromptResponse(
        token_ids=list(r.token_ids),
        token_count=r.token_count,
        text=r.text,
        context_length=r.context_length,
    )


def rendered_from_pb(msg: pb.RenderPromptResponse) -> RenderedPrompt:
    return RenderedPrompt(
        token_ids=tuple(msg.token_ids), context_length=msg.context_length, text=msg.text
    )


def state_to_pb(s: NodeState) -> pb.NodeState:
    return pb.NodeState(
        node_id=s.node_id,
        version=s.version,
        sequence=s.sequence,
        timestamp=s.timestamp,
        models=[model_to_pb(m) for m in s.models],
        memory=pb.Memory(
            total_bytes=s.memory.total_bytes,
            used_bytes=s.memory.used_bytes,
            available_bytes=s.memory.available_bytes,
            framework_bytes=s.memory.framework_bytes,
            budget_bytes=s.memory.budget_bytes,
        ),
        load=[
            pb.ModelLoad(
                model=x.model,
                running=x.running,
                waiting=x.waiting,
                queued_prefill_tokens=x.queued_prefill_tokens,
                prefill_tokens_per_second=x.prefill_tokens_per_second,
                decode_tokens_per_second=x.decode_tokens_per_second,
                draft_tokens=x.draft_tokens,
                accepted_draft_tokens=x.accepted_draft_tokens,
                aggregate_decode_tokens_per_second=x.aggregate_decode_tokens_per_second,
            )
            for x in s.load
        ],
        running=s.running,
        waiting=s.waiting,
        draining=s.draining,
        cache=[
            pb.CachedPrefix(model=c.model, block_size=c.block_size, block_hashes=c.block_hashes)
            for c in s.cache
        ],
        metrics_port=s.metrics_port,
        transfers=[transfer_to_pb(t) for t in s.transfers],
        groups=[group_rank_to_pb(g) for g in s.groups],
    )


def state_from_pb(msg: pb.NodeState) -> NodeState:
    mem = msg.memory
    return NodeState(
        node_id=msg.node_id,
        version=msg.version,
        sequence=msg.sequence,
        timestamp=msg.timestamp,
        models=tuple(model_from_pb(m) for m in msg.models),
        memory=Memory(
            total_bytes=mem.total_bytes,
            used_bytes=mem.used_bytes,
            available_bytes=mem.available_bytes,
            framework_bytes=mem.framework_bytes,
            budget_bytes=mem.budget_bytes,
        ),
        load=tuple(
            ModelLoad(
                model=x.model,
                running=x.running,
                waiting=x.waiting,
                queued_prefill_tokens=x.queued_prefill_tokens,
                prefill_tokens_per_second=x.prefill_tokens_per_second,
                decode_tokens_per_second=x.decode_tokens_per_second,
                draft_tokens=x.draft_tokens,
                accepted_draft_tokens=x.accepted_draft_tokens,
                aggregate_decode_tokens_per_second=x.aggregate_decode_tokens_per_second,
            )
            for x in msg.load
        ),
        running=msg.running,
        waiting=msg.waiting,
        draining=msg.draining,
        cache=tuple(CachedPrefix(c.model, c.block_size, tuple(c.block_hashes)) for c in msg.cache),
        metrics_port=msg.metrics_port,
        transfers=tuple(transfer_from_pb(t) for t in msg.transfers),
        groups=tuple(group_rank_from_pb(g) for g in msg.groups),
    )


def group_rank_to_pb(g: GroupRank) -> pb.GroupRank:
    return pb.GroupRank(
        name=g.name,
        model=g.model,
        rank=g.rank,
        size=g.size,
        members=list(g.members),
        strategy=g.strategy,
        backend=g.backend,
        state=g.state,
        detail=g.detail,
        memory_bytes=g.memory_bytes,
        host=g.host,
        started_at=g.started_at,
    )


def group_rank_from_pb(m: pb.GroupRank) -> GroupRank:
    return GroupRank(
        name=m.name,
        model=m.model,
        rank=m.rank,
        size=m.size,
        members=tuple(m.members),
        strategy=m.strategy,
        backend=m.backend,
        state=m.state,
        detail=m.detail,
        memory_bytes=m.memory_bytes,
        host=m.host,
        started_at=m.started_at,
    )


def transfer_to_pb(t: Transfer) -> pb.Transfer:
    return pb.Transfer(
        id=t.id,
        kind=t.kind,
        model=t.model,
        source=t.source,
        state=t.state,
        bytes_done=t.bytes_done,
        bytes_total=t.bytes_total,
        error=t.error,
        started=t.started,
        finished=t.finished,
        path=t.path,
    )


def transfer_from_pb(m: pb.Transfer) -> Transfer:
    return Transfer(
        id=m.id,
        kind=m.kind,
        model=m.model,
        source=m.source,
        state=m.state,
        bytes_done=m.bytes_done,
        bytes_total=m.bytes_total,
        error=m.error,
        started=m.started,
        finished=m.finished,
        path=m.path,
    )


# ---------- voice ----------


def transcribe_request_to_pb(r: TranscribeRequest) -> pb.TranscribeRequest:
    return pb.TranscribeRequest(
        model=r.model,
        audio=r.audio,
        format=r.format,
        language=r.language,
        request_id=r.request_id,
    )


def transcribe_request_from_pb(m: pb.TranscribeRequest) -> TranscribeRequest:
    return TranscribeRequest(
        model=m.model,
        audio=m.audio,
        format=m.format,
        language=m.language,
        request_id=m.request_id,
    )


def transcription_to_pb(t: Transcription) -> pb.TranscribeResponse:
    return pb.TranscribeResponse(
        text=t.text,
        segments=[pb.TranscriptSegment(start=s.start, end=s.end, text=s.text) for s in t.segments],
        duration=t.duration,
        seconds=t.seconds,
        language=t.language,
    )


def transcription_from_pb(m: pb.TranscribeResponse) -> Transcription:
    return Transcription(
        text=m.text,
        segments=tuple(TranscriptSegment(s.start, s.end, s.text) for s in m.segments),
        duration=m.duration,
        seconds=m.seconds,
        language=m.language,
    )


def speak_request_to_pb(r: SpeakRequest) -> pb.SpeakRequest:
    return pb.SpeakRequest(
        model=r.model,
        input=r.input,
        voice=r.voice,
        speed=r.speed,
        format=r.format,
        request_id=r.request_id,
    )


def speak_request_from_pb(m: pb.SpeakRequest) -> SpeakRequest:
    return SpeakRequest(
        model=m.model,
        input=m.input,
        voice=m.voice,
        speed=m.speed or 1.0,
        format=m.format or "wav",
        request_id=m.request_id,
    )


def audio_chunk_to_pb(c: AudioChunk) -> pb.AudioChunk:
    return pb.AudioChunk(data=c.data, sample_rate=c.sample_rate, content_type=c.content_type)


def audio_chunk_from_pb(m: pb.AudioChunk) -> AudioChunk:
    return AudioChunk(data=m.data, sample_rate=m.sample_rate, content_type=m.content_type)
