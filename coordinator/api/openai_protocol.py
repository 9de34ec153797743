"""OpenAI request models and their conversion to `mesh.types`.

Pure: no I/O. Fields that several shapes share (`content`, `stop`, `tool_choice`,
`prompt`) are typed `Any` and checked here by hand, so an error names the field
as the client wrote it (`messages[2].content[1].type`) rather than pydantic's
union branch (`messages.2.content.list[...]`).
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from coordinator.limits import MAX_MESSAGES, MAX_STOP_SEQUENCES, MAX_TOOLS
from mesh import errors
from mesh.types import (
    ChatPrompt,
    Message,
    SamplingParams,
    TextPrompt,
    Tool,
    ToolCall,
)

# The most items these list fields may hold (`parse_body` checks them first).
COUNT_LIMITS = {"messages": MAX_MESSAGES, "tools": MAX_TOOLS, "stop": MAX_STOP_SEQUENCES}
# Completions' documented default; chat has none (the node's default applies).
COMPLETIONS_DEFAULT_MAX_TOKENS = 16
_UINT32 = 2**32 - 1
_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# Part types that carry text, and the key holding it; any other type is refused by name.
_TEXT_PART_KEYS = {"text": "text", "refusal": "refusal"}


class _Model(BaseModel):
    # Unknown fields are ignored, as OpenAI-compatible servers do.
    model_config = ConfigDict(extra="allow")


class FunctionCall(_Model):
    name: str
    arguments: Any = "{}"


class ChatToolCall(_Model):
    id: str
    type: Literal["function"] = "function"
    function: FunctionCall


class ChatMessage(_Model):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Any = None
    name: str | None = None
    tool_calls: list[ChatToolCall] | None = None
    tool_call_id: str | None = None
    reasoning_content: str | None = None


class FunctionDef(_Model):
    name: str = Field(min_length=1)
    description: str | None = None
    parameters: dict[str, Any] | None = None


class ToolDef(_Model):
    type: Literal["function"]
    function: FunctionDef


class StreamOptions(_Model):
    include_usage: bool = False


class ResponseFormat(_Model):
    type: str


class _Sampling(_Model):
    """Fields both endpoints share."""

    model: str = Field(min_length=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = None
    stop: Any = None
    seed: int | None = None
    n: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # Extensions common to local servers (vLLM, llama.cpp, LM Studio).
    top_k: int | None = Field(default=None, ge=0, le=_UINT32)
    min_p: float | None = None
    repetition_penalty: float | None = None

    @property
    def include_usage(self) -> bool:
        return bool(self.stream and self.stream_options and self.stream_options.include_usage)


class ChatCompletionRequest(_Sampling):
    messages: list[ChatMessage]
    max_tokens: int | None = Field(default=None, gt=0)
    max_completion_tokens: int | None = Field(default=None, gt=0)
    tools: list[ToolDef] | None = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    response_format: ResponseFormat | None = None
    metadata: dict[str, Any] | None = None
    store: bool | None = None
    enable_thinking: bool | None = None
    chat_template_kwargs: dict[str, Any] | None = None


class CompletionRequest(_Sampling):
    prompt: Any
    max_tokens: int | None = Field(default=COMPLETIONS_DEFAULT_MAX_TOKENS, gt=0)
    echo: bool | None = None
    suffix: str | None = None
    logprobs: int | None = None
    best_of: int | None = None


# ---------- requests -> mesh.types ----------


def _reject_common(req: _Sampling) -> None:
    """Refuse what would silently change results if ignored."""
    if req.n is not None and req.n != 1:
        raise errors.InvalidRequest(f"only n=1 is supported, got {req.n}", field="n")
    for name in ("presence_penalty", "frequency_penalty"):
        value = getattr(req, name)
        if value:
            raise errors.InvalidRequest(
                "not supported (only 0); use repetition_penalty instead", field=name
            )
    if req.logit_bias:
        raise errors.InvalidRequest("not supported", field="logit_bias")


def _stop(value: Any) -> tuple[str, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        return tuple(value)
    raise errors.InvalidRequest("must be a string or a list of strings", field="stop")


def _sampling(req: _Sampling, max_tokens: int | None) -> SamplingParams:
    return SamplingParams(
        temperature=req.temperature,
        top_p=req.top_p,
        top_k=req.top_k,
        min_p=req.min_p,
        max_tokens=max_tokens,
        stop=_stop(req.stop),
        # OpenAI takes any int64; the node's PRNG takes uint64.
        seed=None if req.seed is None else req.seed % 2**64,
        repetition_penalty=req.repetition_penalty,
    )


def content_text(content: Any, where: str) -> str:
    """A message's content (string, null or list of parts) as one string."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise errors.InvalidRequest("must be a string, null or a list of parts", field=where)
    texts: list[str] = []
    for j, part in enumerate(content):
        if not isinstance(part, dict) or not isinstance(part.get("type"), str):
            raise errors.InvalidRequest("must be an object with a type", field=f"{where}[{j}]")
        kind = part["type"]
        key = _TEXT_PART_KEYS.get(kind)
        if key is None:
            raise errors.InvalidRequest(
                f"content parts of type {kind!r} are not supported by this server's "
                "text models; send text parts only",
                field=f"{where}[{j}].type",
            )
        text = part.get(key)
        if not isinstance(text, str):
            raise errors.InvalidRequest("must be a string", field=f"{where}[{j}].{key}")
        texts.append(text)
    return "\n".join(texts)


def _arguments(value: Any, where: str) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, dict):  # lenient: some clients send the object itself
        return json.dumps(value)
    raise errors.InvalidRequest("must be a JSON-encoded string", field=where)


def to_message(m: ChatMessage, i: int) -> Message:
    """One OpenAI message as a `Message` (developer becomes system)."""
    where = f"messages[{i}]"
    text = content_text(m.content, f"{where}.content")
    name = m.name or ""
    if m.role == "tool":
        if not m.tool_call_id:
            raise errors.InvalidRequest("field required", field=f"{where}.tool_call_id")
        return Message("tool", text, tool_call_id=m.tool_call_id, name=name)
    if m.role != "assistant":
        return Message(_ROLES[m.role], text, name=name)
    calls = tuple(
        ToolCall(
            c.id,
            c.function.name,
            _arguments(c.function.arguments, f"{where}.tool_calls[{k}].function.arguments"),
        )
        for k, c in enumerate(m.tool_calls or ())
    )
    return Message(
        "assistant", text, reasoning=m.reasoning_content or "", tool_calls=calls, name=name
    )


def _tools(req: ChatCompletionRequest) -> tuple[Tool, ...]:
    tools = tuple(
        Tool(t.function.name, t.function.description or "", t.function.parameters or {})
        for t in req.tools or ()
    )
    choice = req.tool_choice
    if choice is None or choice in ("auto", "required"):
        # "required" is enforced where the engine can (GGUF grammar); see ChatPrompt.
        return tools
    if choice == "none":
        return ()
    if isinstance(choice, dict) and isinstance(choice.get("function"), dict):
        wanted = choice["function"].get("name")
        # A named function: offer only that one (and require a call).
        named = tuple(t for t in tools if t.name == wanted)
        if not named:
            raise errors.InvalidRequest(f"no tool named {wanted!r} in tools", field="tool_choice")
        return named
    raise errors.InvalidRequest(
        "must be 'none', 'auto', 'required' or {\"type\": \"function\", \"function\": "
        '{"name": ...}}',
        field="tool_choice",
    )


def to_chat(req: ChatCompletionRequest) -> tuple[ChatPrompt, SamplingParams]:
    """The chat prompt and sampling for a chat completion; InvalidRequest names the field."""
    _reject_common(req)
    if req.logprobs or req.top_logprobs:
        raise errors.InvalidRequest("logprobs are not supported", field="logprobs")
    if req.response_format is not None and req.response_format.type != "text":
        raise errors.InvalidRequest(
            f"{req.response_format.type!r} is not supported yet; only 'text'",
            field="response_format.type",
        )
    if req.model_extra and "functions" in req.model_extra:
        raise errors.InvalidRequest("deprecated and not supported; use tools", field="functions")
    if not req.messages:
        raise errors.InvalidRequest("must not be empty", field="messages")
    thinking = req.enable_thinking
    kwargs = req.chat_template_kwargs or {}
    if thinking is None and "enable_thinking" in kwargs:
        thinking = kwargs["enable_thinking"]
        if not isinstance(thinking, bool):
            raise errors.InvalidRequest(
                "must be a boolean", field="chat_template_kwargs.enable_thinking"
            )
    limits = [n for n in (req.max_tokens, req.max_completion_tokens) if n is not None]
    tools = _tools(req)
    choice = req.tool_choice
    prompt = ChatPrompt(
        messages=tuple(to_message(m, i) for i, m in enumerate(req.messages)),
        tools=tools,
        enable_thinking=thinking,
        tool_required=bool(tools) and (choice == "required" or isinstance(choice, dict)),
    )
    return prompt, _sampling(req, min(limits) if limits else None)


def to_completion(req: CompletionRequest) -> tuple[TextPrompt, SamplingParams]:
    """The raw prompt and sampling for a legacy completion."""
    _reject_common(req)
    if req.echo:
        raise errors.InvalidRequest("echo is not supported", field="echo")
    if req.suffix:
        raise errors.InvalidRequest("suffix (fill-in-the-middle) is not supported", field="suffix")
    if req.logprobs is not None:
        raise errors.InvalidRequest("logprobs are not supported", field="logprobs")
    if req.best_of is not None and req.best_of != 1:
        raise errors.InvalidRequest(
            f"only best_of=1 is supported, got {req.best_of}", field="best_of"
        )
    prompt = req.prompt
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        raise errors.InvalidRequest(
            "must be a string or a list of exactly one string (batches and token ids are "
            "not supported)",
            field="prompt",
        )
    if not prompt:
        raise errors.InvalidRequest("must not be empty", field="prompt")
    return TextPrompt(prompt), _sampling(req, req.max_tokens)
