"""Anthropic Messages request models and their conversion to `mesh.types`.

Pure: no I/O. A request becomes one `ChatPrompt` + `SamplingParams`.

Content blocks are a tagged union keyed on `type`. Pydantic puts the tag in an
error's location (`messages.0.content.1.text.text`); `parse_request` drops it so
errors name the field as the client wrote it (`messages[0].content[1].text`).
Unknown fields anywhere are accepted and ignored (`extra="allow"`): clients such
as Claude Code send new ones (cache_control, context_management, ...) all the time.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    ValidationError,
)

from coordinator.limits import MAX_MESSAGES, MAX_STOP_SEQUENCES, MAX_TOOLS
from mesh import errors
from mesh.sampling import check_sampling
from mesh.types import ChatPrompt, Message, SamplingParams, Tool, ToolCall

R = TypeVar("R", bound="ChatRequest")

# The most items these list fields may hold (checked before validation).
COUNT_LIMITS = {
    "messages": MAX_MESSAGES,
    "tools": MAX_TOOLS,
    "stop_sequences": MAX_STOP_SEQUENCES,
}

# Prefix of the union tags; `parse_request` strips these from error locations.
_TAG = "block:"
_KNOWN_BLOCKS = frozenset(
    {"text", "image", "document", "tool_use", "tool_result", "thinking", "redacted_thinking"}
)


class _Open(BaseModel):
    # Unknown fields are accepted and ignored, never rejected.
    model_config = ConfigDict(extra="allow")


class TextBlock(_Open):
    type: Literal["text"]
    text: str


class ImageBlock(_Open):
    type: Literal["image"]


class DocumentBlock(_Open):
    type: Literal["document"]


class ThinkingBlock(_Open):
    type: Literal["thinking"]
    thinking: str
    signature: str = ""


class RedactedThinkingBlock(_Open):
    type: Literal["redacted_thinking"]


class ToolUseBlock(_Open):
    type: Literal["tool_use"]
    id: str
    name: str
    input: dict[str, Any] = Field(default_factory=dict)


class OtherBlock(_Open):
    """A block type this server does not know (server tools, search results...)."""

    type: str


def _block_tag(value: Any) -> str:
    kind = value.get("type") if isinstance(value, dict) else getattr(value, "type", None)
    # Not a string (`{"type": {}}`): "other", whose validation names the field.
    return _TAG + (kind if isinstance(kind, str) and kind in _KNOWN_BLOCKS else "other")


def _blocks(value: Any) -> Any:
    # `content` may be a plain string: the same as one text block.
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


ResultPart = Annotated[
    Annotated[TextBlock, Tag(_TAG + "text")]
    | Annotated[ImageBlock, Tag(_TAG + "image")]
    | Annotated[DocumentBlock, Tag(_TAG + "document")]
    | Annotated[OtherBlock, Tag(_TAG + "other")],
    Discriminator(_block_tag),
]


class ToolResultBlock(_Open):
    type: Literal["tool_result"]
    tool_use_id: str
    content: Annotated[list[ResultPart], BeforeValidator(_blocks)] = Field(default_factory=list)
    is_error: bool = False


Block = Annotated[
    Annotated[TextBlock, Tag(_TAG + "text")]
    | Annotated[ImageBlock, Tag(_TAG + "image")]
    | Annotated[DocumentBlock, Tag(_TAG + "document")]
    | Annotated[ToolUseBlock, Tag(_TAG + "tool_use")]
    | Annotated[ToolResultBlock, Tag(_TAG + "tool_result")]
    | Annotated[ThinkingBlock, Tag(_TAG + "thinking")]
    | Annotated[RedactedThinkingBlock, Tag(_TAG + "redacted_thinking")]
    | Annotated[OtherBlock, Tag(_TAG + "other")],
    Discriminator(_block_tag),
]


class InputMessage(_Open):
    # "system" is not Anthropic's, but some clients put system turns in `messages`.
    role: Literal["user", "assistant", "system"]
    content: Annotated[list[Block], BeforeValidator(_blocks)]


class SystemBlock(_Open):
    type: Literal["text"] = "text"
    text: str


class ToolParam(_Open):
    name: str
    description: str = ""
    # Server tools (web_search, text_editor, ...) have a `type` and no schema.
    input_schema: dict[str, Any] | None = None
    type: str | None = None


class ToolChoice(_Open):
    type: str = "auto"
    name: str | None = None


class ThinkingConfig(_Open):
    type: str
    budget_tokens: int | None = None


class ChatRequest(_Open):
    """What `/v1/messages` and `/v1/messages/count_tokens` share."""

    model: str = Field(min_length=1)
    messages: list[InputMessage] = Field(min_length=1)
    system: Annotated[list[SystemBlock], BeforeValidator(_blocks)] | None = None
    tools: list[ToolParam] | None = None
    tool_choice: ToolChoice | None = None
    thinking: ThinkingConfig | None = None


class MessagesRequest(ChatRequest):
    """`POST /v1/messages`."""

    max_tokens: int = Field(ge=1)
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: float | None = Field(default=None, ge=0.0, le=1.0)
    top_p: float | None = Field(default=None, ge=0.0, le=1.0)
    top_k: int | None = Field(default=None, ge=0)
    metadata: dict[str, Any] | None = None


class CountTokensRequest(ChatRequest):
    """`POST /v1/messages/count_tokens`: a message request without sampling."""


# ---------- parsing ----------


def _field(loc: tuple[int | str, ...]) -> str:
    out = ""
    for part in loc:
        if isinstance(part, str) and part.startswith(_TAG):
            continue  # a union branch, not something the client wrote
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else part
    return out


def parse_request(data: dict[str, Any], model: type[R]) -> R:
    """Validate a decoded JSON body; InvalidRequest names the first bad field."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        msg = "field required" if first["type"] == "missing" else first["msg"]
        msg = msg[:1].lower() + msg[1:]
        raise errors.InvalidRequest(msg, field=_field(tuple(first["loc"]))) from None


# ---------- request -> ChatPrompt ----------


def _omitted(kind: str) -> str:
    # Local text models cannot see images or documents; say so instead of refusing.
    return f"[{kind} omitted]"


def _result_text(block: ToolResultBlock) -> str:
    parts = [p.text if isinstance(p, TextBlock) else _omitted(p.type) for p in block.content]
    return "\n".join(parts)


def _user_messages(msg: InputMessage, where: str, names: dict[str, str]) -> list[Message]:
    # Tool results answer the previous assistant turn, so they come first, in order.
    tools: list[Message] = []
    texts: list[str] = []
    for i, block in enumerate(msg.content):
        if isinstance(block, ToolResultBlock):
            tools.append(
                Message(
                    role="tool",
                    content=_result_text(block),
                    tool_call_id=block.tool_use_id,
                    name=names.get(block.tool_use_id, ""),
                    is_error=block.is_error,
                )
            )
        elif isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ToolUseBlock):
            raise errors.InvalidRequest(
                "tool_use blocks belong in assistant messages", field=f"{where}.content[{i}]"
            )
        elif isinstance(block, ThinkingBlock | RedactedThinkingBlock):
            continue  # only meaningful in assistant turns
        else:
            texts.append(_omitted(block.type))
    if texts or not tools:
        tools.append(Message(role=msg.role, content="\n".join(texts)))
    return tools


def _assistant_message(msg: InputMessage, where: str, names: dict[str, str]) -> Message:
    texts: list[str] = []
    reasoning: list[str] = []
    calls: list[ToolCall] = []
    for i, block in enumerate(msg.content):
        if isinstance(block, TextBlock):
            texts.append(block.text)
        elif isinstance(block, ThinkingBlock):
            reasoning.append(block.thinking)
        elif isinstance(block, ToolUseBlock):
            names[block.id] = block.name
            calls.append(ToolCall(block.id, block.name, json.dumps(block.input)))
        elif isinstance(block, ToolResultBlock):
            raise errors.InvalidRequest(
                "tool_result blocks belong in user messages", field=f"{where}.content[{i}]"
            )
        elif isinstance(block, RedactedThinkingBlock):
            continue  # encrypted by another provider: nothing a local model can read
        else:
            texts.append(_omitted(block.type))
    return Message(
        role="assistant",
        content="\n".join(texts),
        reasoning="\n".join(reasoning),
        tool_calls=tuple(calls),
    )


def _reminder(text: str) -> str:
    return f"<system-reminder>\n{text}\n</system-reminder>"


def _fold_system_turns(turns: list[Message], system: list[str]) -> list[Message]:
    """System turns inside `messages` (Claude Code sends one for model names it does not
    know): leading ones join the system prompt; later ones become `<system-reminder>`
    text in the user turn before them (else after them), which is what Claude Code
    itself sends to servers that refuse the role. Chat templates that allow a system
    message only first (Gemma, Llama, Mistral ...) would otherwise fail the request."""
    out: list[Message] = []
    pending: list[str] = []
    for msg in turns:
        if msg.role == "system":
            if not out and not pending:
                system.append(msg.content)
            elif out and out[-1].role == "user":
                out[-1] = replace(out[-1], content=f"{out[-1].content}\n{_reminder(msg.content)}")
            else:
                pending.append(_reminder(msg.content))
            continue
        if pending and msg.role == "user":
            msg = replace(msg, content="\n".join([*pending, msg.content]))
            pending = []
        out.append(msg)
    if pending:
        out.append(Message(role="user", content="\n".join(pending)))
    return out


def to_messages(request: ChatRequest) -> tuple[Message, ...]:
    """The conversation as internal messages: system first, then every turn in order."""
    turns: list[Message] = []
    names: dict[str, str] = {}  # tool_use id -> tool name, for the tool results
    for i, msg in enumerate(request.messages):
        where = f"messages[{i}]"
        if msg.role == "assistant":
            turns.append(_assistant_message(msg, where, names))
        else:
            turns.extend(_user_messages(msg, where, names))
    system = [b.text for b in request.system or ()]
    turns = _fold_system_turns(turns, system)
    if any(system):
        turns.insert(0, Message(role="system", content="\n".join(system)))
    return tuple(turns)


def to_tools(request: ChatRequest) -> tuple[Tool, ...]:
    """Client tools with a schema; server tools are skipped; tool_choice none sends none."""
    if request.tool_choice is not None and request.tool_choice.type == "none":
        return ()
    return tuple(
        Tool(name=t.name, description=t.description, parameters=t.input_schema)
        for t in request.tools or ()
        if t.input_schema is not None
    )


def to_chat_prompt(request: ChatRequest) -> ChatPrompt:
    """The internal prompt for a messages (or count_tokens) request."""
    thinking: bool | None = None
    if request.thinking is not None:
        thinking = request.thinking.type != "disabled"
    tools = to_tools(request)
    choice = request.tool_choice
    if choice is not None and choice.type == "tool":
        # A named tool: offer only that one, and require the call.
        tools = tuple(t for t in tools if t.name == choice.name)
        if not tools:
            raise errors.InvalidRequest(
                f"no tool named {choice.name!r} in tools", field="tool_choice.name"
            )
    required = bool(tools) and choice is not None and choice.type in ("any", "tool")
    return ChatPrompt(
        messages=to_messages(request),
        tools=tools,
        enable_thinking=thinking,
        tool_required=required,
    )


def to_sampling(request: MessagesRequest) -> SamplingParams:
    """Sampling for the request; InvalidRequest names the Anthropic field."""
    params = SamplingParams(
        temperature=request.temperature,
        top_p=request.top_p,
        top_k=request.top_k,
        max_tokens=request.max_tokens,
        stop=tuple(request.stop_sequences or ()),
    )
    try:
        check_sampling(params, prefix="")
    except errors.InvalidRequest as exc:
        field = {"stop": "stop_sequences"}.get(exc.field, exc.field)
        message = exc.message.removeprefix(f"{exc.field}: ")
        raise errors.InvalidRequest(message, field=field) from None
    return params
