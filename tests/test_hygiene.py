"""Prompt hygiene: Claude Code's per-session metadata never reaches the model or the caches."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import anthropic
import httpx

from coordinator.hygiene import clean, clean_system
from mesh.types import ChatPrompt, Message
from tests.conftest import RunningCoordinator

DATA = Path(__file__).parent / "data"
BILLING = "x-anthropic-billing-header: cc_version=2.1.197.3f1; cc_entrypoint=sdk-cli;"


def test_the_billing_header_line_goes_and_nothing_else() -> None:
    system = f"{BILLING}\nYou are Claude Code.\nx-anthropic-billing-header is a header."
    assert clean_system(system) == "You are Claude Code.\nx-anthropic-billing-header is a header."
    assert clean_system("no header here") == "no header here"
    chat = ChatPrompt(
        (Message("system", BILLING), Message("system", "Rules."), Message("user", BILLING))
    )
    cleaned, changed = clean(chat)
    # A system message that held only the header is gone; user text is the user's own.
    assert changed == 1
    assert cleaned.messages == (Message("system", "Rules."), Message("user", BILLING))
    same, none = clean(ChatPrompt((Message("user", "hi"),)))
    assert none == 0 and same.messages == (Message("user", "hi"),)


def _session(suffix: str) -> dict[str, Any]:
    return {
        "model": "smollm2",
        "max_tokens": 8,
        "system": [
            {
                "type": "text",
                "text": f"x-anthropic-billing-header: cc_version=2.1.197.{suffix}; "
                "cc_entrypoint=sdk-cli;",
            },
            {
                "type": "text",
                "text": "You are a helpful assistant.",
                "cache_control": {"type": "ephemeral"},
            },
        ],
        "messages": [{"role": "user", "content": "What is the capital of France?"}],
    }


def test_two_sessions_count_the_same_and_verbatim_differs(
    coordinator: RunningCoordinator,
) -> None:
    base = coordinator.base_url
    client = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0)
    plain = {
        **_session("000"),
        "system": [{"type": "text", "text": "You are a helpful assistant."}],
    }

    def count(body: dict[str, Any]) -> int:
        return client.messages.count_tokens(
            model=body["model"], system=body["system"], messages=body["messages"]
        ).input_tokens

    a, b, c = count(_session("3f1")), count(_session("a07")), count(plain)
    assert a == b == c, "the header is dropped before counting: the model never sees it"
    settings = httpx.get(f"{base}/api/inference-settings").json()
    settings.pop("error", None)
    r = httpx.put(f"{base}/api/inference-settings", json={**settings, "prompt_hygiene": False})
    assert r.status_code == 200, r.text
    try:
        assert count(_session("3f1")) > c  # verbatim: the model sees the header line
    finally:
        httpx.put(f"{base}/api/inference-settings", json=settings)
    bad = httpx.put(f"{base}/api/inference-settings", json={"prompt_hygiene": "yes"})
    assert bad.status_code == 400 and "prompt_hygiene" in bad.json()["error"]["message"]


def _captured(name: str) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((DATA / name).read_text())
    return body


def _chat(body: dict[str, Any]) -> ChatPrompt:
    from coordinator.api.anthropic_protocol import MessagesRequest, parse_request, to_chat_prompt

    return to_chat_prompt(parse_request(body, MessagesRequest))


def test_captured_claude_code_sessions_share_their_prefix_after_cleaning() -> None:
    """Real Claude Code 2.1.197 bodies (`claude -p`, captured on loopback).

    The header's 3 hex digits hash characters of the session's first prompt, so a
    session that starts with another prompt differs at token 0 ("84c" is what
    `claude -p "what is 2+2"` sent); cleaned, both prompts are the same.
    """
    one = _captured("claude_code_2.1.197_request.json")
    other = json.loads(json.dumps(one))
    header = other["system"][0]["text"]
    assert header == "x-anthropic-billing-header: cc_version=2.1.197.123; cc_entrypoint=sdk-cli;"
    other["system"][0]["text"] = header.replace(".123;", ".84c;")
    raw_one, raw_other = _chat(one), _chat(other)
    assert raw_one.messages[0] != raw_other.messages[0], "raw, they differ at token 0"
    clean_one, clean_other = clean(raw_one)[0], clean(raw_other)[0]
    assert clean_one == clean_other
    system = clean_one.messages[0]
    assert system.role == "system" and "x-anthropic-billing-header" not in system.content
    assert system.content.startswith("You are a Claude agent")
    # The second session and the --continue turn extend the same cleaned prompt.
    two = clean(_chat(_captured("claude_code_2.1.197_request_session2.json")))[0]
    assert two == clean_one
    turn = clean(_chat(_captured("claude_code_2.1.197_request_continue.json")))[0]
    assert turn.tools == clean_one.tools
    assert turn.messages[: len(clean_one.messages)] == clean_one.messages
    # Its mid-conversation system turn (agent types) became a reminder in the user turn.
    assert all(m.role != "system" for m in clean_one.messages[1:])
    assert "<system-reminder>\nAvailable agent types" in clean_one.messages[1].content
