"""Prompts and output parsing for mlx-lm tokenizers: chat rendering and the parser config.

Shared by the MLX backend and node groups (node.backends.group), which render
with the same tokenizer wrapper and parse the same output conventions.
"""

from __future__ import annotations

import asyncio
from dataclasses import replace
from typing import Any

from mesh.errors import InvalidRequest
from mesh.types import ChatPrompt, Prompt, TextPrompt, Tool
from node.backends.chat_template import build_template_input
from node.backends.common import with_fallback_tools
from node.backends.outparse import ParserConfig, prompt_opens_reasoning


def render_chat(tok: Any, model_id: str, native_tools: bool, chat: ChatPrompt) -> list[int]:
    """`chat` through the model's chat template (with tools), tokenized; InvalidRequest
    when the model has no template or the template rejects the messages."""
    from jinja2 import TemplateError

    inp = build_template_input(chat, native_tools=native_tools)
    kwargs: dict[str, Any] = {}
    if chat.enable_thinking is not None:
        kwargs["enable_thinking"] = chat.enable_thinking
    if inp.tools is not None:
        kwargs["tools"] = inp.tools
    if not getattr(tok, "chat_template", None):
        raise InvalidRequest(
            f"model {model_id!r} has no chat template; send a text prompt instead",
            field="chat",
        )
    try:
        text = tok.apply_chat_template(
            inp.messages,
            add_generation_prompt=chat.add_generation_prompt,
            continue_final_message=not chat.add_generation_prompt,
            tokenize=False,
            **kwargs,
        )
    except TemplateError as exc:
        raise InvalidRequest(f"the chat template rejected the messages: {exc}") from None
    except ValueError as exc:
        raise InvalidRequest(str(exc), field="messages") from None
    return list(tok.encode(text, add_special_tokens=False))


async def prompt_ids(tok: Any, model_id: str, native_tools: bool, prompt: Prompt) -> list[int]:
    """The token ids a request's prompt stands for: a chat rendered (in a thread), text
    encoded, or token ids checked against the vocabulary; InvalidRequest naming the field."""
    if isinstance(prompt, ChatPrompt):
        return await asyncio.to_thread(render_chat, tok, model_id, native_tools, prompt)
    if isinstance(prompt, TextPrompt):
        if not prompt.text:
            raise InvalidRequest("must not be empty", field="text")
        return list(tok.encode(prompt.text, add_special_tokens=True))
    ids = list(prompt.ids)
    vocab = len(tok)
    bad = next((t for t in ids if t >= vocab), None)
    if bad is not None:
        raise InvalidRequest(f"token id {bad} >= vocabulary size {vocab}", field="tokens")
    return ids


def parser_config(
    tok: Any,
    native_tools: bool,
    prompt_ids: list[int],
    tools: tuple[Tool, ...],
    stop: tuple[str, ...],
) -> ParserConfig:
    """What to look for in the output: stop strings, the think block, tool calls."""
    cfg = ParserConfig(stop=stop)
    if tok.has_thinking:
        # Templates like Qwen3 / DeepSeek-R1 open the think block in the prompt.
        tail = tok.decode(prompt_ids[-16:]) if prompt_ids else ""
        cfg = replace(
            cfg,
            think_start=tok.think_start,
            think_end=tok.think_end,
            start_in_reasoning=prompt_opens_reasoning(tail, tok.think_start, tok.think_end),
        )
    if tools:
        if native_tools and tok.has_tool_calling:
            parser = tok.tool_parser
            raw_tools = [
                {"type": "function", "function": {"name": t.name, "parameters": t.parameters}}
                for t in tools
            ]

            def parse(text: str) -> list[dict[str, Any]]:
                out = parser(text, raw_tools)
                return out if isinstance(out, list) else [out]

            cfg = replace(
                cfg,
                tool_call_start=tok.tool_call_start,
                tool_call_end=tok.tool_call_end,
                parse_tool_call=parse,
            )
        else:
            cfg = with_fallback_tools(cfg)
    return cfg
