"""The Anthropic Messages API: pure conversion tables, then the official SDK and raw
HTTP against a real coordinator in front of a real node (SmolLM2, greedy, few tokens)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import httpx2
import pytest

from coordinator.api.anthropic import MessageBuilder, signature
from coordinator.api.anthropic_protocol import (
    CountTokensRequest,
    MessagesRequest,
    parse_request,
    to_chat_prompt,
    to_sampling,
)
from mesh import errors
from mesh.types import (
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    Message,
    ReasoningDelta,
    Started,
    TextDelta,
    Tool,
    ToolCall,
    ToolCallEvent,
    Usage,
)
from node.backends.mlx import MLXBackend
from tests.conftest import RunningCoordinator, RunningNode, wait_idle

MODEL = "smollm2"
QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0}  # the 2.x SDK has no sampling arguments: extra_body
WEATHER: dict[str, Any] = {
    "name": "get_weather",
    "description": "Get the current weather in a city",
    "input_schema": {
        "type": "object",
        "properties": {"city": {"type": "string"}},
        "required": ["city"],
    },
}
model = pytest.mark.model


# ---------- request conversion (pure) ----------


def _prompt(**body: Any) -> tuple[Message, ...]:
    req = parse_request({"model": MODEL, "max_tokens": 8, **body}, MessagesRequest)
    return to_chat_prompt(req).messages


CONVERSIONS: list[tuple[str, dict[str, Any], tuple[Message, ...]]] = [
    (
        "system string",
        {"system": "Be brief.", "messages": [{"role": "user", "content": "hi"}]},
        (Message("system", "Be brief."), Message("user", "hi")),
    ),
    (
        "system blocks with cache_control",
        {
            "system": [
                {"type": "text", "text": "A", "cache_control": {"type": "ephemeral"}},
                {"type": "text", "text": "B"},
            ],
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
        },
        (Message("system", "A\nB"), Message("user", "hi")),
    ),
    (
        "images, documents and unknown blocks become markers",
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "image", "source": {"type": "base64", "data": "AAAA"}},
                        {"type": "document", "source": {"type": "text", "data": "x"}},
                        {"type": "search_result", "source": "s", "title": "t", "content": []},
                        {"type": "text", "text": "what is this?"},
                    ],
                }
            ]
        },
        (
            Message(
                "user",
                "[image omitted]\n[document omitted]\n[search_result omitted]\nwhat is this?",
            ),
        ),
    ),
    (
        "assistant: thinking, text, tool_use; redacted thinking dropped",
        {
            "messages": [
                {"role": "user", "content": "weather?"},
                {
                    "role": "assistant",
                    "content": [
                        {"type": "thinking", "thinking": "need a tool", "signature": "sig"},
                        {"type": "redacted_thinking", "data": "opaque"},
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "toolu_1",
                            "name": "get_weather",
                            "input": {"city": "Paris"},
                        },
                    ],
                },
            ]
        },
        (
            Message("user", "weather?"),
            Message(
                "assistant",
                "Checking.",
                reasoning="need a tool",
                tool_calls=(ToolCall("toolu_1", "get_weather", '{"city": "Paris"}'),),
            ),
        ),
    ),
    (
        "tool results first, in order, then the user's text",
        {
            "messages": [
                {
                    "role": "assistant",
                    "content": [
                        {"type": "tool_use", "id": "t1", "name": "a", "input": {}},
                        {"type": "tool_use", "id": "t2", "name": "b", "input": {"x": 1}},
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "and then?"},
                        {"type": "tool_result", "tool_use_id": "t1", "content": "one"},
                        {
                            "type": "tool_result",
                            "tool_use_id": "t2",
                            "is_error": True,
                            "content": [
                                {"type": "text", "text": "bad"},
                                {"type": "image", "source": {}},
                                {"type": "text", "text": "input"},
                            ],
                        },
                    ],
                },
            ]
        },
        (
            Message(
                "assistant",
                tool_calls=(ToolCall("t1", "a", "{}"), ToolCall("t2", "b", '{"x": 1}')),
            ),
            Message("tool", "one", tool_call_id="t1", name="a"),
            Message(
                "tool", "bad\n[image omitted]\ninput", tool_call_id="t2", name="b", is_error=True
            ),
            Message("user", "and then?"),
        ),
    ),
    (
        "system turns inside messages become reminders in the user turn before them",
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "system", "content": "s"},
                {"role": "user", "content": "b"},
                {"role": "user", "content": []},
            ]
        },
        (
            Message("user", "a\n<system-reminder>\ns\n</system-reminder>"),
            Message("user", "b"),
            Message("user", ""),
        ),
    ),
    (
        "leading system turns join the system prompt; one after an assistant turn waits",
        {
            "system": "S",
            "messages": [
                {"role": "system", "content": "t"},
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "system", "content": "r"},
                {"role": "user", "content": "c"},
            ],
        },
        (
            Message("system", "S\nt"),
            Message("user", "a"),
            Message("assistant", "b"),
            Message("user", "<system-reminder>\nr\n</system-reminder>\nc"),
        ),
    ),
]


@pytest.mark.parametrize(
    ("body", "expected"), [c[1:] for c in CONVERSIONS], ids=[c[0] for c in CONVERSIONS]
)
def test_messages_conversion(body: dict[str, Any], expected: tuple[Message, ...]) -> None:
    assert _prompt(**body) == expected


def test_tools_thinking_and_sampling_conversion() -> None:
    server_tool = {"type": "web_search_20250305", "name": "web_search", "max_uses": 2}
    body: dict[str, Any] = {
        "model": MODEL,
        "max_tokens": 9,
        "messages": QUESTION,
        "tools": [WEATHER, server_tool],
        "stop_sequences": ["\n\n"],
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
    }
    req = parse_request(body, MessagesRequest)
    prompt = to_chat_prompt(req)
    assert prompt.tools == (Tool("get_weather", WEATHER["description"], WEATHER["input_schema"]),)
    assert prompt.enable_thinking is None
    params = to_sampling(req)
    assert (params.max_tokens, params.stop, params.temperature) == (9, ("\n\n",), 0.5)
    assert (params.top_p, params.top_k) == (0.9, 40)
    none = parse_request({**body, "tool_choice": {"type": "none"}}, CountTokensRequest)
    assert to_chat_prompt(none).tools == ()
    for thinking, expected in [
        ({"type": "enabled", "budget_tokens": 1024}, True),
        ({"type": "adaptive"}, True),
        ({"type": "disabled"}, False),
    ]:
        req = parse_request({**body, "thinking": thinking}, MessagesRequest)
        assert to_chat_prompt(req).enable_thinking is expected


DROP = object()  # a patch value that removes the field
BAD_BODIES: list[tuple[dict[str, Any], str]] = [
    ({"max_tokens": "x"}, "max_tokens: input should be a valid integer"),
    ({"max_tokens": 0}, "max_tokens: input should be greater than or equal to 1"),
    ({"max_tokens": DROP}, "max_tokens: field required"),
    ({"messages": None}, "messages: input should be a valid list"),
    ({"messages": []}, "messages: list should have at least 1 item"),
    ({"temperature": 1.5}, "temperature: input should be less than or equal to 1"),
    ({"stop_sequences": [""]}, "stop_sequences: stop sequences must not be empty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role: input should be"),
    ({"messages": [{"role": "user"}]}, "messages[0].content: field required"),
    (
        {"messages": [{"role": "user", "content": [{"type": "text"}]}]},
        "messages[0].content[0].text: field required",
    ),
    (
        {"messages": [{"role": "user", "content": [{"text": "x"}]}]},
        "messages[0].content[0].type: field required",
    ),
    ({"messages": [{"role": "user", "content": ["x"]}]}, "messages[0].content[0]: input should be"),
    (
        {
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {
                            "type": "tool_result",
                            "tool_use_id": "t",
                            "content": [{"type": "text", "text": 3}],
                        }
                    ],
                }
            ]
        },
        "messages[0].content[0].content[0].text: input should be a valid string",
    ),
    (
        {
            "messages": [
                {"role": "assistant", "content": [{"type": "tool_result", "tool_use_id": "t"}]}
            ]
        },
        "messages[0].content[0]: tool_result blocks belong in user messages",
    ),
    ({"system": [{"type": "text"}]}, "system[0].text: field required"),
]


@pytest.mark.parametrize(("patch", "message"), BAD_BODIES)
def test_invalid_requests_name_the_field(patch: dict[str, Any], message: str) -> None:
    body = {"model": MODEL, "max_tokens": 8, "messages": QUESTION}
    body.update(patch)
    body = {k: v for k, v in body.items() if v is not DROP}
    with pytest.raises(errors.InvalidRequest) as info:
        req = parse_request(body, MessagesRequest)
        to_chat_prompt(req)
        to_sampling(req)
    assert info.value.message.startswith(message), info.value.message


# ---------- node events -> response (pure) ----------


def _build(events: list[GenerateEvent]) -> tuple[MessageBuilder, list[tuple[str, dict[str, Any]]]]:
    builder = MessageBuilder(message_id="msg_" + "0" * 24, model="claude-x", input_tokens=10)
    out = [builder.start()]
    for event in events:
        out.extend(builder.feed(event))
    return builder, out


MIXED: list[GenerateEvent] = [
    Started("r", MODEL, 10),
    ReasoningDelta("Need "),
    ReasoningDelta("weather."),
    TextDelta("Let me check."),
    ToolCallEvent(ToolCall("call_9", "get_weather", '{"city": "Paris"}')),
    Finish(
        FinishReason.TOOL_CALLS,
        Usage(prompt_tokens=10, completion_tokens=7, cached_prompt_tokens=4),
    ),
]


def test_builder_message_and_stream_events() -> None:
    builder, out = _build(MIXED)
    assert [name for name, _ in out] == [
        "message_start",
        "content_block_start", "content_block_delta", "content_block_delta",
        "content_block_delta", "content_block_stop",  # thinking, then signature_delta
        "content_block_start", "content_block_delta", "content_block_stop",
        "content_block_start", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]  # fmt: skip
    assert all(data["type"] == name for name, data in out)
    assert [d["index"] for n, d in out if n.startswith("content_block")] == [0] * 5 + [1] * 3 + [
        2
    ] * 3
    assert out[4][1]["delta"] == {
        "type": "signature_delta",
        "signature": signature("Need weather."),
    }
    assert out[9][1]["content_block"]["input"] == {}
    assert json.loads(out[10][1]["delta"]["partial_json"]) == {"city": "Paris"}
    body = builder.message()
    thinking, text, tool = body["content"]
    assert thinking == {
        "type": "thinking",
        "thinking": "Need weather.",
        "signature": signature("Need weather."),
    }
    assert text == {"type": "text", "text": "Let me check."}
    assert re.fullmatch(r"toolu_[0-9a-f]{24}", tool["id"])
    assert tool == {
        "type": "tool_use",
        "id": tool["id"],
        "name": "get_weather",
        "input": {"city": "Paris"},
    }
    assert body["stop_reason"] == "tool_use" and body["stop_sequence"] is None
    assert body["usage"] == {
        "input_tokens": 6,  # Anthropic's input_tokens excludes cache reads
        "output_tokens": 7,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 4,
    }
    assert body["model"] == "claude-x"
    anthropic.types.Message.model_validate(body)


def _sdk_over(frames: bytes) -> anthropic.Anthropic:
    def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, content=frames, headers={"content-type": "text/event-stream"})

    transport = httpx2.MockTransport(handler)
    return anthropic.Anthropic(
        base_url="http://test", api_key="x", http_client=httpx2.Client(transport=transport)
    )


def test_sdk_accumulates_the_builders_stream() -> None:
    """The official SDK's stream parser turns our frames back into the same message."""
    from coordinator.api.common import sse

    builder, out = _build(MIXED)
    sdk = _sdk_over(b"".join(sse(name, data) for name, data in out))
    with sdk.messages.stream(model="claude-x", max_tokens=8, messages=QUESTION) as stream:
        final = stream.get_final_message()
    assert final.model_dump(exclude_none=True)["content"] == builder.message()["content"]
    assert final.stop_reason == "tool_use" and final.usage.output_tokens == 7


def test_builder_stream_ending_without_finish_is_an_error() -> None:
    builder, _ = _build([Started("r", MODEL, 10), TextDelta("x")])
    assert builder.end() == [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        (
            "error",
            {
                "type": "error",
                "error": {
                    "type": "api_error",
                    "message": "the node's stream ended before finishing",
                },
            },
        ),
    ]
    assert builder.end() == []
    done, _ = _build([Finish(FinishReason.STOP, Usage())])
    assert done.end() == [] and done.error is None


@pytest.mark.parametrize(
    ("finish", "stop_reason", "stop_sequence"),
    [
        (Finish(FinishReason.STOP, Usage()), "end_turn", None),
        (Finish(FinishReason.LENGTH, Usage()), "max_tokens", None),
        (
            Finish(FinishReason.STOP_SEQUENCE, Usage(), stop_sequence="\n\n"),
            "stop_sequence",
            "\n\n",
        ),
    ],
)
def test_builder_stop_reasons(finish: Finish, stop_reason: str, stop_sequence: str | None) -> None:
    builder, out = _build([TextDelta("x"), finish])
    assert out[-2][1]["delta"] == {"stop_reason": stop_reason, "stop_sequence": stop_sequence}
    assert builder.message()["usage"]["input_tokens"] == 10  # from prepare when usage has none


@pytest.mark.parametrize(
    ("events", "kind", "message"),
    [
        (
            [ErrorEvent("INTERNAL", "boom"), Finish(FinishReason.ERROR, Usage())],
            "api_error",
            "boom",
        ),
        (
            [
                ErrorEvent("UNAVAILABLE", "the node is shutting down"),
                Finish(FinishReason.CANCELLED, Usage()),
            ],
            "overloaded_error",
            "the node is shutting down",
        ),
        (
            [ErrorEvent("CANCELLED", "gone"), Finish(FinishReason.CANCELLED, Usage())],
            "api_error",
            "gone",
        ),
        ([Finish(FinishReason.ERROR, Usage())], "api_error", "generation ended: error"),
    ],
)
def test_builder_failures(events: list[GenerateEvent], kind: str, message: str) -> None:
    builder, out = _build([TextDelta("partial"), *events])
    assert out[-2:] == [
        ("content_block_stop", {"type": "content_block_stop", "index": 0}),
        ("error", {"type": "error", "error": {"type": kind, "message": message}}),
    ]
    assert builder.error is not None and builder.error.message == message


# ---------- against the real coordinator ----------


@pytest.fixture
def client(coordinator: RunningCoordinator) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=coordinator.base_url, api_key="x", max_retries=0) as c:
        yield c


@pytest.fixture(scope="module")
def greedy(coordinator: RunningCoordinator) -> anthropic.types.Message:
    """One greedy non-streaming answer, shared by the tests that compare against it."""
    with anthropic.Anthropic(base_url=coordinator.base_url, api_key="x", max_retries=0) as c:
        return c.messages.create(model=MODEL, max_tokens=16, messages=QUESTION, extra_body=GREEDY)


def _text(message: anthropic.types.Message) -> str:
    return "".join(b.text for b in message.content if b.type == "text")


@model
def test_text_greedy_and_usage(
    client: anthropic.Anthropic, greedy: anthropic.types.Message
) -> None:
    assert _text(greedy).startswith("The capital of France is Paris")
    assert greedy.stop_reason in ("end_turn", "max_tokens")
    assert re.fullmatch(r"msg_[0-9a-f]{24}", greedy.id)
    assert greedy.model == MODEL and greedy.role == "assistant"
    counted = client.messages.count_tokens(model=MODEL, messages=QUESTION)
    assert (
        greedy.usage.input_tokens + (greedy.usage.cache_read_input_tokens or 0)
        == counted.input_tokens
    )
    assert 0 < greedy.usage.output_tokens <= 16


@model
def test_sdk_stream_matches_greedy(
    client: anthropic.Anthropic, greedy: anthropic.types.Message
) -> None:
    with client.messages.stream(
        model=MODEL, max_tokens=16, messages=QUESTION, extra_body=GREEDY
    ) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text == _text(greedy) == _text(final)
    assert final.stop_reason == greedy.stop_reason and final.usage == greedy.usage


@model
async def test_async_sdk_stream(
    coordinator: RunningCoordinator, greedy: anthropic.types.Message
) -> None:
    async with (
        anthropic.AsyncAnthropic(base_url=coordinator.base_url, api_key="x", max_retries=0) as c,
        c.messages.stream(
            model=MODEL, max_tokens=16, messages=QUESTION, extra_body=GREEDY
        ) as stream,
    ):
        text = "".join([t async for t in stream.text_stream])
    assert text == _text(greedy)


def _frames(response: httpx.Response) -> list[tuple[str, dict[str, Any]]]:
    """Each SSE frame as (event, data); asserts every frame names its event."""
    frames = []
    for raw in response.read().decode().split("\n\n"):
        if not raw.strip():
            continue
        lines = raw.split("\n")
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), raw
        frames.append((lines[0][7:], json.loads(lines[1][6:])))
    return frames


@model
def test_raw_stream_event_order(coordinator: RunningCoordinator) -> None:
    body = {"model": MODEL, "max_tokens": 4, "stream": True, "messages": QUESTION, **GREEDY}
    url = coordinator.base_url + "/anthropic/v1/messages?beta=true"
    with httpx.stream("POST", url, json=body, timeout=120) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-macmesh-node"] and r.headers["x-macmesh-model"] == MODEL
        frames = _frames(r)
    names = [n for n, _ in frames]
    assert names[:2] == ["message_start", "ping"]
    rest = [n for n in names[2:] if n != "ping"]  # pings continue until the first token
    assert names.index("content_block_start") == len(names) - len(rest)
    assert rest == ["content_block_start"] + ["content_block_delta"] * 4 + [
        "content_block_stop", "message_delta", "message_stop"
    ]  # fmt: skip
    assert all(data["type"] == name for name, data in frames)
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["usage"]["input_tokens"] > 0
    assert start["model"] == MODEL and start["stop_reason"] is None
    text = "".join(d["delta"]["text"] for n, d in frames if n == "content_block_delta")
    assert text == "The capital of France"
    delta = frames[-2][1]
    assert delta["delta"] == {"stop_reason": "max_tokens", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4


@model
def test_stop_sequence_and_max_tokens(client: anthropic.Anthropic) -> None:
    stopped = client.messages.create(
        model=MODEL, max_tokens=16, messages=QUESTION, stop_sequences=[" Paris"], extra_body=GREEDY
    )
    assert (stopped.stop_reason, stopped.stop_sequence) == ("stop_sequence", " Paris")
    assert _text(stopped) == "The capital of France is"
    short = client.messages.create(model=MODEL, max_tokens=3, messages=QUESTION, extra_body=GREEDY)
    assert (short.stop_reason, short.stop_sequence) == ("max_tokens", None)
    assert short.usage.output_tokens == 3


def _assert_valid(message: anthropic.types.Message) -> None:
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use", "stop_sequence")
    for block in message.content:
        assert block.type in ("text", "tool_use", "thinking")
        if block.type == "tool_use":
            assert re.fullmatch(r"toolu_[0-9a-f]{24}", block.id) and isinstance(block.input, dict)
    if message.stop_reason == "tool_use":
        assert any(b.type == "tool_use" for b in message.content)


@model
def test_tool_round_trip(client: anthropic.Anthropic) -> None:
    server_tool: Any = {"type": "web_search_20250305", "name": "web_search", "max_uses": 1}
    tools: Any = [WEATHER, server_tool]
    ask: Any = [{"role": "user", "content": "What is the weather in Paris?"}]
    _assert_valid(client.messages.create(model=MODEL, max_tokens=8, tools=tools, messages=ask))
    with_tools = client.messages.count_tokens(model=MODEL, messages=ask, tools=tools)
    without = client.messages.count_tokens(model=MODEL, messages=ask)
    assert with_tools.input_tokens > without.input_tokens  # the tool is in the prompt
    calls = [
        {"type": "tool_use", "id": f"toolu_0{i}", "name": "get_weather", "input": {"city": c}}
        for i, c in ((1, "Paris"), (2, "Lyon"))
    ]
    history: Any = [
        *ask,
        {"role": "assistant", "content": [{"type": "text", "text": "Checking."}, *calls]},
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01", "content": "18C, sunny"},
                {
                    "type": "tool_result",
                    "tool_use_id": "toolu_02",
                    "is_error": True,
                    "content": [{"type": "text", "text": "error: service down"}],
                },
                {"type": "text", "text": "Summarise."},
            ],
        },
    ]
    answer = client.messages.create(
        model=MODEL, max_tokens=4, tools=tools, tool_choice={"type": "auto"}, messages=history
    )
    _assert_valid(answer)
    counted = client.messages.count_tokens(model=MODEL, messages=history, tools=tools)
    assert answer.usage.input_tokens == counted.input_tokens > with_tools.input_tokens


@model
def test_claude_code_fields_are_accepted(
    coordinator: RunningCoordinator, client: anthropic.Anthropic
) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [
            {
                "role": "user",
                "content": [{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}],
            }
        ],
        "system": [
            {
                "type": "text",
                "text": "Be brief.",
                "cache_control": {"type": "ephemeral", "ttl": "1h"},
            }
        ],
        "metadata": {"user_id": "user_abc"},
        "thinking": {"type": "enabled", "budget_tokens": 1024},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "low"},
        "service_tier": "auto",
        "container": None,
        "mcp_servers": [],
        "cache_control": {"type": "ephemeral"},
        "a_field_from_the_future": {"x": 1},
        "stream": False,
    }
    headers = {
        "anthropic-version": "2023-06-01",
        "anthropic-beta": "claude-code-20250219,interleaved-thinking-2025-05-14,context-1m",
        "x-app": "cli",
    }
    r = httpx.post(
        coordinator.base_url + "/v1/messages?beta=true", json=body, headers=headers, timeout=120
    )
    assert r.status_code == 200, r.text
    assert r.json()["type"] == "message"
    sdk = client.messages.create(
        model=MODEL,
        max_tokens=2,
        messages=QUESTION,
        thinking={"type": "disabled"},
        metadata={"user_id": "u"},
        output_config={"effort": "low"},
        extra_headers={"anthropic-beta": "whatever-2099-01-01"},
    )
    assert sdk.usage.output_tokens <= 2


def _post_raw(coordinator: RunningCoordinator, path: str, raw: bytes) -> dict[str, Any]:
    r = httpx.post(
        coordinator.base_url + path, content=raw, headers={"content-type": "application/json"}
    )
    assert r.status_code == 400, r.text
    err: dict[str, Any] = r.json()
    assert err["type"] == "error" and err["error"]["type"] == "invalid_request_error"
    return err


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"{not json", "request body is not valid JSON"),
        (b"", "request body is empty"),
        (b"[]", "request body must be a JSON object"),
        (
            {"model": MODEL, "max_tokens": "x", "messages": QUESTION},
            "max_tokens: input should be a valid integer",
        ),
        ({"model": MODEL, "max_tokens": 8}, "messages: field required"),
        ({"model": MODEL, "messages": QUESTION}, "max_tokens: field required"),
        (
            {"model": MODEL, "max_tokens": 8, "messages": QUESTION, "temperature": 1.5},
            "temperature: input should be",
        ),
        ({"max_tokens": 8, "messages": QUESTION}, "model: field required"),
    ],
)
def test_bad_requests_are_400(coordinator: RunningCoordinator, body: Any, message: str) -> None:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    err = _post_raw(coordinator, "/v1/messages", raw)
    assert err["error"]["message"].startswith(message), err


def test_bad_count_tokens_requests_are_400(coordinator: RunningCoordinator) -> None:
    path = "/anthropic/v1/messages/count_tokens"
    err = _post_raw(coordinator, path, b"{")
    assert err["error"]["message"].startswith("request body is not valid JSON")
    err = _post_raw(
        coordinator, path, json.dumps({"model": MODEL, "messages": [{"role": "user"}]}).encode()
    )
    assert err["error"]["message"] == "messages[0].content: field required"


@model
def test_unknown_model_is_404(client: anthropic.Anthropic) -> None:
    with pytest.raises(anthropic.NotFoundError) as info:
        client.messages.create(model="claude-nope-4", max_tokens=4, messages=QUESTION, stream=True)
    body: Any = info.value.body
    assert body["error"]["type"] == "not_found_error"
    assert "'claude-nope-4'" in body["error"]["message"] and MODEL in body["error"]["message"]


@model
def test_prompt_too_long_is_400(client: anthropic.Anthropic) -> None:
    long: Any = [{"role": "user", "content": "hello " * 9000}]
    counted = client.messages.count_tokens(model=MODEL, messages=long).input_tokens
    assert counted > 8192  # counting still answers for a prompt that would not fit
    for stream in (False, True):
        with pytest.raises(anthropic.BadRequestError) as info:
            client.messages.create(model=MODEL, max_tokens=4, messages=long, stream=stream)
        body: Any = info.value.body
        assert body["error"] == {
            "type": "invalid_request_error",
            "message": f"prompt is too long: {counted} tokens > 8192 maximum",
        }


@model
def test_max_tokens_above_the_context_is_clamped(client: anthropic.Anthropic) -> None:
    with client.messages.stream(
        model=MODEL,
        max_tokens=1_000_000,
        messages=QUESTION,
        stop_sequences=[" is"],
        extra_body=GREEDY,
    ) as s:
        assert s.get_final_message().stop_reason in ("stop_sequence", "end_turn")


@model
@pytest.mark.parametrize(
    "leave_at",
    [
        "event: ping",  # still prefilling: the task awaiting the node's first output is cancelled
        "event: content_block_delta",  # generating
    ],
)
def test_stream_disconnect_cancels_generation(
    coordinator: RunningCoordinator, node: RunningNode, leave_at: str
) -> None:
    assert node.server.core is not None
    before = node.server.core.backend(MLXBackend).tokens_generated
    body = {
        "model": MODEL,
        "max_tokens": 300,
        "stream": True,
        "messages": [{"role": "user", "content": "Tell a long story."}],
    }
    with (
        httpx.Client(timeout=120) as http,
        http.stream("POST", coordinator.base_url + "/v1/messages", json=body) as r,
    ):
        for line in r.iter_lines():
            if line == leave_at:
                break  # leaving closes the half-read response, and so the connection
    wait_idle(node, quiet=1.0)
    assert node.server.core.backend(MLXBackend).tokens_generated - before < 100


@model
def test_non_stream_disconnect_cancels_generation(
    coordinator: RunningCoordinator, node: RunningNode
) -> None:
    assert node.server.core is not None
    before = node.server.core.backend(MLXBackend).tokens_generated
    body = {
        "model": MODEL,
        "max_tokens": 300,
        "messages": [{"role": "user", "content": "Tell a long story."}],
    }
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            coordinator.base_url + "/v1/messages", json=body, timeout=httpx.Timeout(60, read=4)
        )
    wait_idle(node, quiet=1.0)
    assert node.server.core.backend(MLXBackend).tokens_generated - before < 100


@model
def test_models(coordinator: RunningCoordinator) -> None:
    listing = httpx.get(coordinator.base_url + "/anthropic/v1/models").json()
    ids = [MODEL, "smollm2.gguf"]  # the embedded model, as MLX and as GGUF
    assert listing == {
        "data": [
            {"type": "model", "id": i, "display_name": i, "created_at": "1970-01-01T00:00:00Z"}
            for i in ids
        ],
        "has_more": False,
        "first_id": ids[0],
        "last_id": ids[-1],
    }
    # GET /v1/models belongs to the OpenAI router, which answers Anthropic clients in kind.
    versioned = httpx.get(
        coordinator.base_url + "/v1/models", headers={"anthropic-version": "2023-06-01"}
    )
    assert versioned.json() == listing
    # The SDK pointed at the /anthropic prefix works for everything.
    with anthropic.Anthropic(
        base_url=coordinator.base_url + "/anthropic", api_key="x", max_retries=0
    ) as c:
        assert [m.id for m in c.models.list()] == ids
        assert c.models.retrieve(MODEL).display_name == MODEL
        with pytest.raises(anthropic.NotFoundError):
            c.models.retrieve("nope")
        assert c.messages.count_tokens(model=MODEL, messages=QUESTION).input_tokens > 0
