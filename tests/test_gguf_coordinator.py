"""GGUF models end to end: official SDKs -> coordinator -> node -> real llama-server."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from node.models.default import DEFAULT_GGUF_ID
from tests.conftest import RunningCoordinator

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("llama_server_binary")]

MODEL = DEFAULT_GGUF_ID
SYSTEM = ""  # SmolLM2 answers "Paris" greedily once a system turn is present
QUESTION = "What is the capital of France?"
WEATHER_OAI: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Get the current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
WEATHER_ANT: Any = {
    "name": "get_weather",
    "description": "Get the current weather for a city",
    "input_schema": WEATHER_OAI["function"]["parameters"],
}


@pytest.fixture
def oai(coordinator: RunningCoordinator) -> openai.OpenAI:
    return openai.OpenAI(base_url=coordinator.base_url + "/v1", api_key="x", max_retries=0)


@pytest.fixture
def ant(coordinator: RunningCoordinator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=coordinator.base_url, api_key="x", max_retries=0) as c:
        yield c


def test_openai_greedy_paris_streams(oai: openai.OpenAI) -> None:
    messages: Any = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    stream = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        temperature=0,
        max_tokens=24,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert sum(1 for c in chunks if c.choices and c.choices[0].delta.content) > 3
    usage = chunks[-1].usage
    assert usage is not None and usage.prompt_tokens > 0 and usage.completion_tokens > 0


def test_anthropic_greedy_paris_and_exact_count(
    ant: anthropic.Anthropic, coordinator: RunningCoordinator
) -> None:
    ask: Any = [{"role": "user", "content": QUESTION}]
    message = ant.messages.create(
        model=MODEL,
        system=SYSTEM or " ",
        max_tokens=24,
        messages=ask,
        extra_body={"temperature": 0},
    )
    text = "".join(b.text for b in message.content if b.type == "text")
    assert "Paris" in text and message.stop_reason == "end_turn"
    counted = ant.messages.count_tokens(model=MODEL, system=SYSTEM or " ", messages=ask)
    # Anthropic's input_tokens leave out what the prompt cache served.
    usage = message.usage
    assert counted.input_tokens == usage.input_tokens + (usage.cache_read_input_tokens or 0)
    r = httpx.post(
        coordinator.base_url + "/v1/messages",
        json={"model": MODEL, "max_tokens": 4, "messages": ask},
        headers={"anthropic-version": "2023-06-01"},
        timeout=60,
    )
    assert r.headers["x-macmesh-model"] == MODEL


def test_openai_tool_call_round_trip(oai: openai.OpenAI) -> None:
    messages: Any = [
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "What is the weather in Paris?"},
    ]
    first = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=[WEATHER_OAI],
        tool_choice="required",
        temperature=0,
        max_tokens=48,
    )
    choice = first.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls or []
    assert call.type == "function" and call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments), dict) and call.id
    messages += [
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18C and sunny"},
    ]
    second = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=[WEATHER_OAI], temperature=0, max_tokens=24
    )
    assert second.choices[0].finish_reason in ("stop", "length")
    assert second.usage is not None and second.usage.prompt_tokens > first.usage.prompt_tokens  # type: ignore[union-attr]


def test_anthropic_tool_use_round_trip(ant: anthropic.Anthropic) -> None:
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = ant.messages.create(
        model=MODEL,
        system=" ",
        max_tokens=48,
        tools=[WEATHER_ANT],
        tool_choice={"type": "any"},
        messages=ask,
        extra_body={"temperature": 0},
    )
    assert first.stop_reason == "tool_use", first
    (use,) = [b for b in first.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.id.startswith("toolu_")
    assert isinstance(use.input, dict)
    history: Any = [
        *ask,
        {"role": "assistant", "content": [b.model_dump(exclude_none=True) for b in first.content]},
        {
            "role": "user",
            "content": [{"type": "tool_result", "tool_use_id": use.id, "content": "18C, sunny"}],
        },
    ]
    second = ant.messages.create(
        model=MODEL,
        system=" ",
        max_tokens=24,
        tools=[WEATHER_ANT],
        messages=history,
        extra_body={"temperature": 0},
    )
    assert second.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert second.usage.input_tokens > first.usage.input_tokens
