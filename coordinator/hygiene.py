"""Prompt hygiene: drop client metadata that carries no instruction but breaks prefix reuse.

Prompt caches (llama-server slots, the MLX prompt cache, the coordinator's
prefix index) only reuse a prompt's *prefix*. Claude Code puts a per-session
value at token 0: its first system block is

    x-anthropic-billing-header: cc_version=2.1.197.3f1; cc_entrypoint=sdk-cli;

billing metadata for Anthropic's service, with a suffix that changes between
sessions. Left in, no two sessions share a single cached block, and every new
session, `claude -p` and subagent prefills its ~25k-token prompt again.
vllm-mlx, Ollama, SGLang and claude-code-router strip it for the same reason.

The coordinator applies `clean` to every chat before rendering, so token
counts (`count_tokens`), routing and the caches all see the same prompt.
`"prompt_hygiene": false` in `inference_settings.json` sends prompts verbatim.
What is dropped, and why, is listed in docs/api-anthropic.md.
"""

from __future__ import annotations

import re
from dataclasses import replace

from mesh.types import ChatPrompt, Message

# A whole line: `x-anthropic-billing-header:` then `key=value;` pairs.
_BILLING = re.compile(r"^x-anthropic-billing-header:[^\n]*(?:\n|$)", re.MULTILINE)


def clean_system(text: str) -> str:
    """A system prompt without Claude Code's billing-header line."""
    if "x-anthropic-billing-header:" not in text:
        return text  # the common case costs one substring test
    return _BILLING.sub("", text)


def clean(chat: ChatPrompt) -> tuple[ChatPrompt, int]:
    """`chat` without client metadata, and how many messages changed."""
    changed = 0
    out: list[Message] = []
    for msg in chat.messages:
        if msg.role == "system":
            text = clean_system(msg.content)
            if text != msg.content:
                changed += 1
                if not text.strip():
                    continue  # the block held nothing else
                msg = replace(msg, content=text)
        out.append(msg)
    if not changed:
        return chat, 0
    return replace(chat, messages=tuple(out)), changed
