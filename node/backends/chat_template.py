"""Turn a `ChatPrompt` into what Hugging Face chat templates expect.

Templates that know tools get them natively (`tools=`, OpenAI-shaped
`tool_calls`, `role: tool` turns). Templates that ignore tools would silently
drop them, so for those the tools are described in the system message and
earlier calls/results are rendered in the same `<tool_call>` /
`<tool_response>` text convention the model is told to answer in.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mesh.errors import InvalidRequest
from mesh.types import ChatPrompt, Message, Tool
from node.backends.outparse import tool_prompt

ROLES = ("system", "user", "assistant", "tool")
FALLBACK_TOOL_START = "<tool_call>"
FALLBACK_TOOL_END = "</tool_call>"


@dataclass(frozen=True, slots=True)
class TemplateInput:
    """Arguments for `tokenizer.apply_chat_template`."""

    messages: list[dict[str, Any]]
    tools: list[dict[str, Any]] | None


def template_supports_tools(chat_template: object) -> bool:
    """Whether a chat template renders a `tools` variable at all."""
    if isinstance(chat_template, dict):
        return any(template_supports_tools(t) for t in chat_template.values())
    return isinstance(chat_template, str) and "tools" in chat_template


def validate_chat(chat: ChatPrompt) -> None:
    """Raise InvalidRequest naming the field for a malformed chat."""
    if not chat.messages:
        raise InvalidRequest("at least one message is required", field="messages")
    for i, m in enumerate(chat.messages):
        if m.role not in ROLES:
            raise InvalidRequest(
                f"unknown role {m.role!r} (expected one of {', '.join(ROLES)})",
                field=f"messages[{i}].role",
            )
        for call in m.tool_calls:
            _arguments(call.arguments, f"messages[{i}].tool_calls[{call.name}].arguments")
    seen: set[str] = set()
    for t in chat.tools:
        if t.name in seen:
            raise InvalidRequest(f"duplicate tool name {t.name!r}", field="tools")
        seen.add(t.name)


def _arguments(raw: str, field: str) -> dict[str, Any]:
    if not raw:
        return {}
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"not valid JSON ({exc.msg})", field=field) from None
    if not isinstance(value, dict):
        raise InvalidRequest("must be a JSON object", field=field)
    return value


def _openai_tool(t: Tool) -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": t.name,
            "description": t.description,
            "parameters": t.parameters or {"type": "object", "properties": {}},
        },
    }


def _native_message(m: Message) -> dict[str, Any]:
    out: dict[str, Any] = {"role": m.role, "content": m.content}
    if m.role == "assistant":
        if m.reasoning:
            out["reasoning_content"] = m.reasoning
        if m.tool_calls:
            out["tool_calls"] = [
                {
                    "id": c.id,
                    "type": "function",
                    "function": {"name": c.name, "arguments": _arguments(c.arguments, "")},
                }
                for c in m.tool_calls
            ]
    elif m.role == "tool":
        if m.tool_call_id:
            out["tool_call_id"] = m.tool_call_id
        if m.name:
            out["name"] = m.name
    return out


def _fallback_message(m: Message) -> dict[str, Any]:
    if m.role == "assistant" and m.tool_calls:
        calls = "".join(
            f"{FALLBACK_TOOL_START}"
            + json.dumps({"name": c.name, "arguments": _arguments(c.arguments, "")})
            + f"{FALLBACK_TOOL_END}"
            for c in m.tool_calls
        )
        text = f"{m.content}\n{calls}" if m.content else calls
        return {"role": "assistant", "content": text}
    if m.role == "tool":
        # Many templates reject a `tool` role; a user turn carries the result.
        status = ' status="error"' if m.is_error else ""
        name = f' name="{m.name}"' if m.name else ""
        return {
            "role": "user",
            "content": f"<tool_response{name}{status}>\n{m.content}\n</tool_response>",
        }
    return {"role": m.role, "content": m.content}


def build_template_input(chat: ChatPrompt, *, native_tools: bool) -> TemplateInput:
    """Messages (and tools) for the template; see the module docstring."""
    validate_chat(chat)
    if native_tools:
        tools = [_openai_tool(t) for t in chat.tools] or None
        return TemplateInput([_native_message(m) for m in chat.messages], tools)
    messages = [_fallback_message(m) for m in chat.messages]
    if chat.tools:
        section = tool_prompt(chat.tools)
        if messages[0]["role"] == "system":
            messages[0] = {
                "role": "system",
                "content": f"{messages[0]['content']}\n\n{section}".lstrip(),
            }
        else:
            messages.insert(0, {"role": "system", "content": section})
    return TemplateInput(messages, None)
