"""The OpenAI surface through the official SDK, against a real coordinator and node.

SmolLM2-135M on MLX CPU is slow: short prompts, few tokens. Conversion and
response assembly are also tested directly (pure, table-driven).
"""

from __future__ import annotations

import json
import re
from typing import Any

import httpx
import openai
import pytest

from coordinator.api.openai import Chunker, ResponseMeta, chat_completion, text_completion
from coordinator.api.openai_protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    to_chat,
    to_completion,
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
from tests.conftest import RunningCoordinator, RunningNode, wait_idle

pytestmark = pytest.mark.model

MODEL = "smollm2"
PARIS = "What is the capital of France?"
WEATHER_TOOL: Any = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather for a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}},
            "required": ["city"],
        },
    },
}
TOOLS: Any = [WEATHER_TOOL]


@pytest.fixture
def oai(coordinator: RunningCoordinator) -> openai.OpenAI:
    return openai.OpenAI(base_url=coordinator.base_url + "/v1", api_key="x", max_retries=0)


def user(text: str) -> list[Any]:
    return [{"role": "user", "content": text}]


def sse_lines(body: str) -> list[str]:
    """The `data:` payloads of an SSE body; fails on anything else."""
    out = []
    for block in body.split("\n\n"):
        if block:
            assert block.startswith("data: ") and "\n" not in block, block
            out.append(block[len("data: ") :])
    return out


# ---------- chat completions ----------


def test_chat_greedy_paris(oai: openai.OpenAI) -> None:
    raw = oai.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(PARIS), temperature=0, max_tokens=10
    )
    assert raw.headers["x-macmesh-model"] == MODEL and raw.headers["x-macmesh-node"]
    resp = raw.parse()
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    assert resp.model == MODEL and resp.system_fingerprint == "macmesh-0.1.0"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.tool_calls is None
    assert choice.message.content is not None
    assert choice.message.content.startswith("The capital of France is Paris")
    assert choice.finish_reason in ("stop", "length")
    u = resp.usage
    assert u is not None and u.prompt_tokens > 10 and 0 < u.completion_tokens <= 10
    assert u.total_tokens == u.prompt_tokens + u.completion_tokens
    assert u.prompt_tokens_details is not None and u.prompt_tokens_details.cached_tokens == 0


def test_chat_stream_with_usage(oai: openai.OpenAI, coordinator: RunningCoordinator) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": user(PARIS), "temperature": 0}
    whole = oai.chat.completions.create(max_tokens=6, **kwargs).choices[0].message.content
    chunks = list(
        oai.chat.completions.create(
            max_tokens=6, stream=True, stream_options={"include_usage": True}, **kwargs
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole
    assert [c.choices[0].finish_reason for c in chunks[-2:-1]] == ["length"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 6
    assert len({c.id for c in chunks}) == 1 and chunks[0].object == "chat.completion.chunk"

    # The wire itself: data lines only, the role first, [DONE] last.
    with httpx.stream(
        "POST",
        coordinator.base_url + "/v1/chat/completions",
        json={**kwargs, "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}},
        timeout=60,
    ) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["x-macmesh-node"]
        payloads = sse_lines(r.read().decode())
    assert payloads[-1] == "[DONE]"
    parsed = [json.loads(p) for p in payloads[:-1]]
    assert parsed[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert parsed[-2]["choices"][0]["finish_reason"] == "length"
    assert parsed[-2]["choices"][0]["delta"] == {}
    assert parsed[-1]["choices"] == [] and parsed[-1]["usage"]["completion_tokens"] == 4
    assert all(p["usage"] is None for p in parsed[:-1])


async def test_async_client_streams(coordinator: RunningCoordinator) -> None:
    client = openai.AsyncOpenAI(base_url=coordinator.base_url + "/v1", api_key="x", max_retries=0)
    async with client:
        stream = await client.chat.completions.create(
            model=MODEL, messages=user(PARIS), temperature=0, max_tokens=7, stream=True
        )
        text = "".join([c.choices[0].delta.content or "" async for c in stream])
    assert text.startswith("The capital of France is")


def test_stop_max_tokens_and_seed(oai: openai.OpenAI) -> None:
    kwargs: dict[str, Any] = {"model": MODEL, "messages": user(PARIS)}
    stopped = oai.chat.completions.create(temperature=0, max_tokens=8, stop=" of France", **kwargs)
    assert stopped.choices[0].message.content == "The capital"
    assert stopped.choices[0].finish_reason == "stop"

    short = oai.chat.completions.create(temperature=0, max_tokens=3, **kwargs)
    assert short.choices[0].finish_reason == "length"
    assert short.usage is not None and short.usage.completion_tokens == 3

    seeded = {"temperature": 1.0, "seed": 77, "max_tokens": 6, **kwargs}
    a = oai.chat.completions.create(**seeded).choices[0].message.content
    b = oai.chat.completions.create(**seeded).choices[0].message.content
    assert a and a == b


def test_tool_round_trip(oai: openai.OpenAI) -> None:
    """A call and its result sent back in wire format (prefill is slow here: one turn)."""
    messages: list[Any] = [
        *user("What is the weather in Paris?"),
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": "Sunny, 24 C"},
    ]
    resp = oai.chat.completions.create(
        model=MODEL,
        messages=messages,
        tools=TOOLS,
        tool_choice="auto",
        parallel_tool_calls=False,
        temperature=0,
        max_tokens=6,
    )
    choice = resp.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert choice.message.content or choice.message.tool_calls
    # tool_choice "none" sends no tools, so the prompt loses their description.
    without = oai.chat.completions.create(
        model=MODEL, messages=messages, tools=TOOLS, tool_choice="none", max_tokens=1
    )
    assert resp.usage is not None and without.usage is not None
    assert without.usage.prompt_tokens < resp.usage.prompt_tokens


# ---------- completions and models ----------


def test_completions(oai: openai.OpenAI) -> None:
    resp = oai.completions.create(
        model=MODEL, prompt="The capital of France is", temperature=0, max_tokens=3
    )
    assert resp.object == "text_completion" and resp.id.startswith("cmpl-")
    assert "Paris" in resp.choices[0].text and resp.choices[0].finish_reason == "length"
    assert resp.usage is not None and resp.usage.completion_tokens == 3

    chunks = list(
        oai.completions.create(
            model=MODEL,
            prompt=["The capital of France is"],
            temperature=0,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == resp.choices[0].text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None


def test_models(oai: openai.OpenAI) -> None:
    listed = oai.models.list()
    ids = [m.id for m in listed.data]
    assert MODEL in ids and all(m.owned_by == "macmesh" for m in listed.data)
    one = oai.models.retrieve(MODEL)
    assert one.id == MODEL and one.object == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        oai.models.retrieve("no-such-model")
    assert exc.value.code == "model_not_found"


def test_models_in_anthropic_shape(coordinator: RunningCoordinator) -> None:
    """Same path, Anthropic's shape when the client says it speaks Anthropic."""
    r = httpx.get(coordinator.base_url + "/v1/models", headers={"anthropic-version": "2023-06-01"})
    body = r.json()
    assert r.status_code == 200 and "object" not in body and body["has_more"] is False
    assert any(m["id"] == MODEL and m["type"] == "model" for m in body["data"])


# ---------- errors ----------

LONG = "hello " * 9000


# fmt: off
BAD_CHAT: list[Any] = [
    (b"{not json", 400, None, None, "not valid JSON"),
    ({"model": MODEL, "messages": "hi"}, 400, "messages", None, "valid list"),
    ({"model": MODEL, "messages": user("x"), "temperature": "hot"}, 400, "temperature",
     None, "number"),
    ({"model": MODEL}, 400, "messages", None, "field required"),
    ({"messages": user("x")}, 400, "model", None, "field required"),
    ({"model": MODEL, "messages": user("x"), "n": 2}, 400, "n", None, "n=1"),
    ({"model": MODEL, "messages": user("x"), "temperature": 3}, 400, "temperature", None,
     "less than or equal to 2"),
    ({"model": MODEL, "messages": user("x"), "logprobs": True}, 400, "logprobs", None,
     "not supported"),
    ({"model": MODEL, "messages": user("x"), "response_format": {"type": "json_object"}},
     400, "response_format.type", None, "not supported yet"),
    ({"model": MODEL, "messages": user("x"), "presence_penalty": 0.5}, 400,
     "presence_penalty", None, "not supported"),
    ({"model": MODEL, "messages": [{"role": "user", "content": [
        {"type": "text", "text": "what is this?"},
        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
    ]}]}, 400, "messages[0].content[1].type", None, "'image_url'"),
    ({"model": MODEL, "messages": user("x"), "top_p": 0}, 400, "top_p", None, "(0, 1]"),
    ({"model": MODEL, "messages": user("x"), "logit_bias": {"42": 5}}, 400, "logit_bias", None,
     "not supported"),
    ({"model": "nope", "messages": user("x")}, 404, "model", "model_not_found",
     "available: smollm2"),
    ({"model": MODEL, "messages": user(LONG)}, 400, "messages", "context_length_exceeded",
     "prompt is too long: "),
]
# fmt: on


@pytest.mark.parametrize(("body", "status", "param", "code", "message"), BAD_CHAT)
def test_bad_chat_requests(
    coordinator: RunningCoordinator,
    body: Any,
    status: int,
    param: str | None,
    code: str | None,
    message: str,
) -> None:
    url = coordinator.base_url + "/v1/chat/completions"
    if isinstance(body, bytes):
        r = httpx.post(url, content=body, headers={"content-type": "application/json"})
    else:
        r = httpx.post(url, json=body, timeout=60)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param and err["code"] == code, err
    assert message in err["message"], err
    assert err["type"] == "invalid_request_error"


def test_prompt_too_long_counts_tokens(oai: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        oai.chat.completions.create(model=MODEL, messages=user(LONG), max_tokens=1)
    assert exc.value.code == "context_length_exceeded"
    found = re.search(r"prompt is too long: (\d+) tokens > (\d+) maximum", exc.value.message)
    assert found, exc.value.message
    tokens, maximum = int(found[1]), int(found[2])
    assert tokens > maximum >= 2048


@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"echo": True}, "echo"),
        ({"suffix": "end"}, "suffix"),
        ({"logprobs": 1}, "logprobs"),
        ({"n": 3}, "n"),
        ({"prompt": ["a", "b"]}, "prompt"),
        ({"prompt": [1, 2, 3]}, "prompt"),
        ({"prompt": ""}, "prompt"),
    ],
)
def test_bad_completion_requests(
    coordinator: RunningCoordinator, extra: dict[str, Any], param: str
) -> None:
    body = {"model": MODEL, "prompt": "hi", **extra}
    r = httpx.post(coordinator.base_url + "/v1/completions", json=body)
    assert r.status_code == 400 and r.json()["error"]["param"] == param, r.text


# ---------- cancellation ----------


def test_disconnect_cancels_stream(coordinator: RunningCoordinator, node: RunningNode) -> None:
    body = {"model": MODEL, "messages": user("Tell me a long story."), "max_tokens": 300,
            "stream": True}  # fmt: skip
    with httpx.stream(
        "POST", coordinator.base_url + "/v1/chat/completions", json=body, timeout=60
    ) as r:
        lines = r.iter_lines()
        got = [line for line, _ in zip(lines, range(6), strict=False) if line.startswith("data")]
        assert len(got) >= 2
    wait_idle(node)


def test_disconnect_cancels_non_stream(coordinator: RunningCoordinator, node: RunningNode) -> None:
    body = {"model": MODEL, "messages": user("Tell me a long story."), "max_tokens": 300}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(coordinator.base_url + "/v1/chat/completions", json=body, timeout=1.5)
    wait_idle(node)


# ---------- pure: requests -> mesh.types ----------


def chat_req(**fields: Any) -> ChatCompletionRequest:
    return ChatCompletionRequest.model_validate({"model": MODEL, **fields})


# fmt: off
MESSAGES: list[Any] = [
    ({"role": "system", "content": "be brief"}, Message("system", "be brief")),
    ({"role": "developer", "content": "be brief"}, Message("system", "be brief")),
    ({"role": "user", "content": "hi", "name": "ann"}, Message("user", "hi", name="ann")),
    ({"role": "user", "content": [{"type": "text", "text": "a"},
                                  {"type": "text", "text": "b"}]}, Message("user", "a\nb")),
    ({"role": "user", "content": None}, Message("user", "")),
    ({"role": "assistant", "content": "ok", "reasoning_content": "hmm"},
     Message("assistant", "ok", reasoning="hmm")),
    ({"role": "assistant", "content": [{"type": "refusal", "refusal": "no"}]},
     Message("assistant", "no")),
    ({"role": "assistant", "content": None, "tool_calls": [
        {"id": "c1", "type": "function",
         "function": {"name": "f", "arguments": "{\"a\": 1}"}}]},
     Message("assistant", "", tool_calls=(ToolCall("c1", "f", '{"a": 1}'),))),
    ({"role": "assistant", "tool_calls": [
        {"id": "c1", "function": {"name": "f", "arguments": {"a": 1}}}]},
     Message("assistant", "", tool_calls=(ToolCall("c1", "f", '{"a": 1}'),))),
    ({"role": "tool", "tool_call_id": "c1", "content": "42"},
     Message("tool", "42", tool_call_id="c1")),
    ({"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
     Message("tool", "42", tool_call_id="c1")),
]
# fmt: on


@pytest.mark.parametrize(("message", "expected"), MESSAGES)
def test_message_conversion(message: dict[str, Any], expected: Message) -> None:
    prompt, _ = to_chat(chat_req(messages=[message]))
    assert prompt.messages == (expected,)


# fmt: off
BAD_MESSAGES: list[Any] = [
    ({"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]},
     "messages[0].content[0].type"),
    ({"role": "user", "content": [{"type": "file", "file": {}}]},
     "messages[0].content[0].type"),
    ({"role": "user", "content": [{"text": "no type"}]}, "messages[0].content[0]"),
    ({"role": "user", "content": [{"type": "text", "text": 5}]},
     "messages[0].content[0].text"),
    ({"role": "user", "content": 5}, "messages[0].content"),
    ({"role": "tool", "content": "42"}, "messages[0].tool_call_id"),
    ({"role": "assistant", "tool_calls": [{"id": "c", "function": {"name": "f",
                                                                    "arguments": 5}}]},
     "messages[0].tool_calls[0].function.arguments"),
]
# fmt: on


@pytest.mark.parametrize(("message", "field"), BAD_MESSAGES)
def test_message_conversion_errors(message: dict[str, Any], field: str) -> None:
    with pytest.raises(errors.InvalidRequest) as exc:
        to_chat(chat_req(messages=[message]))
    assert exc.value.field == field


def test_tools_sampling_and_thinking() -> None:
    base = {"messages": user("x"), "tools": [WEATHER_TOOL]}
    weather = Tool(
        "get_weather", "Current weather for a city", WEATHER_TOOL["function"]["parameters"]
    )
    for choice, tools in [
        (None, (weather,)),
        ("auto", (weather,)),
        ("required", (weather,)),
        ("none", ()),
        ({"type": "function", "function": {"name": "get_weather"}}, (weather,)),
    ]:
        assert to_chat(chat_req(**base, tool_choice=choice))[0].tools == tools, choice
    for bad in ("sometimes", {"type": "function", "function": {"name": "other"}}):
        with pytest.raises(errors.InvalidRequest, match="tool_choice"):
            to_chat(chat_req(**base, tool_choice=bad))

    prompt, s = to_chat(
        chat_req(messages=user("x"), max_tokens=50, max_completion_tokens=20, stop="END",
                 seed=-1, temperature=0.5, top_k=40, min_p=0.1, repetition_penalty=1.1,
                 chat_template_kwargs={"enable_thinking": False}, user="u", metadata={"a": "b"},
                 store=False, parallel_tool_calls=True, some_future_field=1)
    )  # fmt: skip
    assert (s.max_tokens, s.stop, s.seed, s.temperature) == (20, ("END",), 2**64 - 1, 0.5)
    assert (s.top_k, s.min_p, s.repetition_penalty) == (40, 0.1, 1.1)
    assert prompt.enable_thinking is False
    assert to_chat(chat_req(messages=user("x"), enable_thinking=True))[0].enable_thinking
    assert to_chat(chat_req(messages=user("x"), stop=["a", "b"]))[1].stop == ("a", "b")
    assert to_chat(chat_req(messages=user("x")))[1].max_tokens is None

    text, s = to_completion(CompletionRequest.model_validate({"model": MODEL, "prompt": ["hi"]}))
    assert text.text == "hi" and s.max_tokens == 16


# ---------- pure: events -> responses ----------

META = ResponseMeta("chatcmpl-abc", 1700000000, MODEL)
TOOL_EVENTS: list[GenerateEvent] = [
    Started("r", MODEL, 12),
    ReasoningDelta("think"),
    TextDelta("Let me check."),
    ToolCallEvent(ToolCall("call_1", "get_weather", '{"city": "Paris"}')),
    Finish(FinishReason.TOOL_CALLS, Usage(prompt_tokens=12, completion_tokens=9)),
]


def test_tool_call_response_assembly() -> None:
    body = chat_completion(TOOL_EVENTS, META)
    choice = body["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    assert choice["message"] == {
        "role": "assistant",
        "content": "Let me check.",
        "tool_calls": [
            {
                "id": "call_1",
                "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
            }
        ],
        "reasoning_content": "think",
    }
    assert body["usage"]["total_tokens"] == 21
    only_call = [TOOL_EVENTS[0], TOOL_EVENTS[3], TOOL_EVENTS[4]]
    assert chat_completion(only_call, META)["choices"][0]["message"]["content"] is None
    stop_seq: list[GenerateEvent] = [
        TextDelta("x"),
        Finish(FinishReason.STOP_SEQUENCE, Usage(), "y"),
    ]
    assert chat_completion(stop_seq, META)["choices"][0]["finish_reason"] == "stop"
    assert text_completion(stop_seq, META)["choices"][0]["text"] == "x"


def test_tool_call_stream_chunks() -> None:
    chunker = Chunker(META, chat=True, include_usage=True)
    first = chunker.first()
    assert first is not None and first["choices"][0]["delta"]["role"] == "assistant"
    chunks = [c for ev in TOOL_EVENTS for c in chunker.feed(ev)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas == [
        {"reasoning_content": "think"},
        {"content": "Let me check."},
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ]
        },
        {},
    ]
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 9
    assert all(c["object"] == "chat.completion.chunk" for c in chunks)


def test_node_failures_become_errors() -> None:
    failed: list[GenerateEvent] = [
        Started("r", MODEL, 3),
        TextDelta("a"),
        ErrorEvent("INTERNAL", "engine died"),
        Finish(FinishReason.ERROR, Usage()),
    ]
    with pytest.raises(errors.BackendError, match="engine died"):
        chat_completion(failed, META)
    chunker = Chunker(META, chat=False, include_usage=False)
    assert chunker.feed(failed[1])[0]["choices"][0]["text"] == "a"
    with pytest.raises(errors.BackendError, match="engine died"):
        chunker.feed(failed[2])
    with pytest.raises(errors.BackendError):
        chat_completion([Finish(FinishReason.CANCELLED, Usage())], META)


def test_one_model_by_name_agrees_with_the_anthropic_surface(
    coordinator: RunningCoordinator,
) -> None:
    """`GET /v1/models/{id}` answers for any name that resolves, like Anthropic's route."""
    base = coordinator.base_url
    ok = httpx.get(f"{base}/v1/models/{MODEL}")
    assert ok.status_code == 200 and ok.json()["id"] == MODEL
    assert httpx.get(f"{base}/anthropic/v1/models/{MODEL}").status_code == 200
    r = httpx.post(f"{base}/api/aliases", json={"alias": "lab-*", "model": MODEL})
    assert r.status_code == 200, r.text
    try:
        wild = httpx.get(f"{base}/v1/models/lab-fast")  # resolves through the wildcard
        assert wild.status_code == 200 and wild.json()["id"] == "lab-fast"
        assert httpx.get(f"{base}/anthropic/v1/models/lab-fast").status_code == 200
    finally:
        httpx.delete(f"{base}/api/aliases/lab-*")
    missing = httpx.get(f"{base}/v1/models/no-such-model")
    assert missing.status_code == 404
    err = missing.json()["error"]
    assert (err["code"], err["param"]) == ("model_not_found", "model")
    assert httpx.get(f"{base}/anthropic/v1/models/no-such-model").status_code == 404
