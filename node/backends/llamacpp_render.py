"""Rendering and counting chats the way llama-server does (`/apply-template`, `/tokenize`).

Templates that know no tools get them described in the system prompt (and a
grammar when a call is required); recent renders are remembered, because a
coordinator renders a chat (RenderPrompt) right before it generates it.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

from mesh.errors import InvalidRequest, Unavailable
from mesh.types import ChatPrompt
from node.backends.chat_template import build_template_input
from node.backends.llamacpp_server import LlamaServer
from node.backends.llamacpp_wire import error_text, tool_call_grammar, wire_message
from node.backends.sse import SSEError, post_json

# Recent chat renders remembered (RenderMemo).
_RENDER_MEMO = 64


async def post(server: LlamaServer, path: str, body: dict[str, Any]) -> dict[str, Any]:
    """One JSON call to the server; 400 is the caller's fault, anything else the server's."""
    if not server.healthy:
        raise Unavailable(server.crashed or f"llama-server for {server.spec.label} is down")
    try:
        status, data = await post_json("127.0.0.1", server.port, path, body)
    except SSEError as exc:
        raise Unavailable(f"llama-server for {server.spec.label}: {exc}") from None
    if status == 400:
        raise InvalidRequest(f"llama-server: {error_text(data)}")
    if status != 200:
        raise Unavailable(
            f"llama-server for {server.spec.label}: HTTP {status}: {error_text(data)}"
        )
    return data if isinstance(data, dict) else {}


def chat_body(server: LlamaServer, chat: ChatPrompt) -> tuple[dict[str, Any], bool]:
    """The OpenAI-style chat body, and whether tools ride in the system prompt."""
    assert server.info is not None
    native = server.info.supports_tools or not chat.tools
    inp = build_template_input(chat, native_tools=native)
    body: dict[str, Any] = {"messages": [wire_message(m) for m in inp.messages]}
    if inp.tools:
        body["tools"] = inp.tools
    if chat.enable_thinking is not None:
        body["chat_template_kwargs"] = {"enable_thinking": chat.enable_thinking}
    if not chat.add_generation_prompt:
        body["add_generation_prompt"] = False
    if chat.tool_required and chat.tools:
        if native:
            body["tool_choice"] = "required"
        else:
            body["grammar"] = tool_call_grammar([t.name for t in chat.tools])
    return body, not native


async def tokenize_text(server: LlamaServer, text: str, add_special: bool) -> list[int]:
    """`text` tokenized by the server (special tokens parsed)."""
    data = await post(
        server, "/tokenize", {"content": text, "add_special": add_special, "parse_special": True}
    )
    return [int(t) for t in data.get("tokens", [])]


class RenderMemo:
    """Recent renders (token ids, text) by (server, its start, chat body)."""

    def __init__(self) -> None:
        self._renders: OrderedDict[tuple[Any, ...], tuple[list[int], str]] = OrderedDict()

    @staticmethod
    def key(server: LlamaServer, body: dict[str, Any]) -> tuple[Any, ...]:
        return (server.spec.key, server.started_at, json.dumps(body, sort_keys=True))

    def known(self, key: tuple[Any, ...]) -> tuple[list[int], str] | None:
        """A remembered render, or None (no server call)."""
        return self._renders.get(key)

    async def render_ids(
        self,
        server: LlamaServer,
        chat: ChatPrompt,
        body: dict[str, Any] | None = None,
        key: tuple[Any, ...] | None = None,
    ) -> tuple[list[int], str]:
        """`chat` rendered and counted by llama-server; `body`/`key` if already built."""
        body = body if body is not None else chat_body(server, chat)[0]
        key = key if key is not None else self.key(server, body)
        hit = self._renders.get(key)
        if hit is not None:
            self._renders.move_to_end(key)
            return hit
        prompt = str((await post(server, "/apply-template", body)).get("prompt", ""))
        ids = await tokenize_text(server, prompt, True)
        self._renders[key] = (ids, prompt)
        while len(self._renders) > _RENDER_MEMO:
            self._renders.popitem(last=False)
        return ids, prompt
