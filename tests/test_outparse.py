"""Tests for node.backends.outparse: every case is fed whole, split at every
boundary, one char at a time and in random chunks; all must give the same events."""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Iterator, Sequence
from typing import Any

import pytest
from mlx_lm.tool_parsers import json_tools, qwen3_coder

from mesh.types import ReasoningDelta, TextDelta, Tool, ToolCall, ToolCallEvent
from node.backends.outparse import (
    Event,
    OutputParser,
    ParserConfig,
    json_tool_call_parser,
    new_call_id,
    prompt_opens_reasoning,
    tool_prompt,
)

T, R = TextDelta, ReasoningDelta


def call(n: int, name: str, arguments: str) -> ToolCallEvent:
    return ToolCallEvent(ToolCall(id=f"call_{n}", name=name, arguments=arguments))


def merge(events: Sequence[Event]) -> list[Event]:
    out: list[Event] = []
    for e in events:
        if out and type(e) is type(out[-1]) and isinstance(e, TextDelta | ReasoningDelta):
            out[-1] = type(e)(out[-1].text + e.text)  # type: ignore[union-attr]
        else:
            out.append(e)
    return out


def run(config: ParserConfig, chunks: Sequence[str]) -> tuple[list[Event], OutputParser]:
    """Feed `chunks`, then finish; checks per-call invariants, returns merged events."""
    ids = (f"call_{i}" for i in range(100))
    parser = OutputParser(config, new_id=lambda: next(ids))
    events: list[Event] = []
    for batch in [*(parser.feed(c) for c in chunks), parser.finish()]:
        assert merge(batch) == batch, "adjacent same-kind deltas within one call"
        assert all(e.text for e in batch if isinstance(e, TextDelta | ReasoningDelta))
        events += batch
    assert parser.finish() == []
    return merge(events), parser


def splits(text: str) -> Iterator[list[str]]:
    yield [text]
    yield list(text)
    for i in range(len(text) + 1):
        yield [text[:i], text[i:]]
    rng = random.Random(len(text))
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), min(len(text) - 1, rng.randint(1, 6))))
        yield [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]


THINK: dict[str, Any] = {"think_start": "<think>", "think_end": "</think>"}
HERMES: dict[str, Any] = {
    "tool_call_start": "<tool_call>",
    "tool_call_end": "</tool_call>",
    "parse_tool_call": json_tool_call_parser,
}
WEATHER = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
            },
        },
    }
]
QWEN3_CODER_BLOCK = (
    "<tool_call>\n<function=get_weather>\n<parameter=city>\nParis\n</parameter>\n"
    "<parameter=days>\n3\n</parameter>\n</function>\n</tool_call>"
)


def mlx_json(text: str) -> Any:
    return json_tools.parse_tool_call(text)  # type: ignore[no-untyped-call]


def mistral_like(text: str) -> dict[str, Any]:
    name, args = text.split("[ARGS]")
    return {"name": name, "arguments": args}


# (id, config kwargs, text, expected events, stop_sequence, tool_calls)
CASES: list[tuple[str, dict[str, Any], str, list[Event], str, int]] = [
    ("plain", {}, "Hello, world", [T("Hello, world")], "", 0),
    ("leading and trailing space kept", {}, " world\n", [T(" world\n")], "", 0),
    ("unicode", {"stop": ("🛑",)}, "héllo 👋 🛑 bye", [T("héllo 👋 ")], "🛑", 0),
    # -- stop sequences
    ("stop", {"stop": ("STOP",)}, "Hello STOP world", [T("Hello ")], "STOP", 0),
    ("stop at start", {"stop": ("STOP",)}, "STOP world", [], "STOP", 0),
    ("false stop prefix", {"stop": ("STOP",)}, "a STO b ST", [T("a STO b ST")], "", 0),
    ("false prefix then stop", {"stop": ("STOP",)}, "STSTOP", [T("ST")], "STOP", 0),
    (
        "overlapping prefixes",
        {"stop": ("<|end|>", "<|eot|>")},
        "hi <|e x <|eot|> more <|end|>",
        [T("hi <|e x ")],
        "<|eot|>",
        0,
    ),
    # The first stop to *complete* ends generation, as a token stream sees it.
    ("first completed wins", {"stop": ("abcd", "bc")}, "xabcdy", [T("xa")], "bc", 0),
    ("prefix stop completes first", {"stop": ("abc", "ab")}, "xabcd", [T("x")], "ab", 0),
    ("same end: longest wins", {"stop": ("cd", "bcd")}, "abcde", [T("a")], "bcd", 0),
    ("same end: longest wins 2", {"stop": ("ab", "aab")}, "aaab", [T("a")], "aab", 0),
    ("empty stop ignored", {"stop": ("",)}, "abc", [T("abc")], "", 0),
    (
        "stop inside reasoning",
        {**THINK, "stop": ("END",)},
        "<think>abc END def</think>text",
        [R("abc ")],
        "END",
        0,
    ),
    (
        "stop is applied before tags",
        {**THINK, "stop": ("</think>",)},
        "<think>a</think>b",
        [R("a")],
        "</think>",
        0,
    ),
    # -- reasoning
    (
        "think",
        THINK,
        "<think>\nLet me think.\n</think>\n\nAnswer.",
        [R("Let me think."), T("Answer.")],
        "",
        0,
    ),
    (
        "start in reasoning",
        {**THINK, "start_in_reasoning": True},
        "\nHmm.\n</think>\n\nHi",
        [R("Hmm."), T("Hi")],
        "",
        0,
    ),
    ("empty reasoning", THINK, "<think>\n\n</think>\n\nHi", [T("Hi")], "", 0),
    ("stray think end at start", THINK, "\n</think>\n\nHi", [T("Hi")], "", 0),
    ("stray think end after text", THINK, "Hmm.\n</think>\n\nHi", [T("Hmm.\n\n\nHi")], "", 0),
    ("partial tag is text", THINK, "a <thin b <thi", [T("a <thin b <thi")], "", 0),
    ("unterminated reasoning", THINK, "<think>abc</thi", [R("abc</thi")], "", 0),
    (
        "two think blocks",
        THINK,
        "<think>a</think>b<think>c</think>d",
        [R("a"), T("b"), R("c"), T("d")],
        "",
        0,
    ),
    (
        "tool call inside reasoning is reasoning",
        {**THINK, **HERMES},
        '<think>maybe <tool_call>{"name":"f"}</tool_call></think>ok',
        [R('maybe <tool_call>{"name":"f"}</tool_call>'), T("ok")],
        "",
        0,
    ),
    # -- tool calls
    (
        "tool call dict args",
        HERMES,
        'I will check.\n\n<tool_call>\n{"name": "get_weather", "arguments": '
        '{"city": "Paris", "unit": "°C"}}\n</tool_call>',
        [T("I will check."), call(0, "get_weather", '{"city":"Paris","unit":"°C"}')],
        "",
        1,
    ),
    (
        "tool call string args",
        HERMES,
        '<tool_call>{"name": "f", "arguments": "{\\"a\\": [1, 2]}"}</tool_call>',
        [call(0, "f", '{"a":[1,2]}')],
        "",
        1,
    ),
    (
        "tool call without args",
        HERMES,
        '<tool_call>{"name": "now"}</tool_call>',
        [call(0, "now", "{}")],
        "",
        1,
    ),
    (
        "two tool calls",
        {**THINK, **HERMES},
        '<think>plan</think>\n\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
        '<tool_call>\n{"name": "b", "arguments": {}}\n</tool_call>\n',
        [R("plan"), call(0, "a", '{"x":1}'), call(1, "b", "{}")],
        "",
        2,
    ),
    (
        "text after tool call",
        HERMES,
        '<tool_call>{"name": "a"}</tool_call>\n\nDone.',
        [call(0, "a", "{}"), T("Done.")],
        "",
        1,
    ),
    (
        "malformed json kept as text",
        HERMES,
        'Hi <tool_call>{"name": "f", "arguments": {bad}}</tool_call> bye',
        [T('Hi <tool_call>{"name": "f", "arguments": {bad}}</tool_call> bye')],
        "",
        0,
    ),
    (
        "non-object arguments kept as text",
        HERMES,
        '<tool_call>{"name": "f", "arguments": [1]}</tool_call>',
        [T('<tool_call>{"name": "f", "arguments": [1]}</tool_call>')],
        "",
        0,
    ),
    (
        "missing name kept as text",
        HERMES,
        '<tool_call>{"arguments": {}}</tool_call>',
        [T('<tool_call>{"arguments": {}}</tool_call>')],
        "",
        0,
    ),
    (
        "unterminated tool call parsed at finish",
        HERMES,
        'ok <tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_',
        [T("ok"), call(0, "f", '{"a":1}')],
        "",
        1,
    ),
    (
        "unterminated malformed tool call is text",
        HERMES,
        '<tool_call>{"name": "f", "argu',
        [T('<tool_call>{"name": "f", "argu')],
        "",
        0,
    ),
    (
        "stop cuts a tool call",
        {**HERMES, "stop": ("</tool_call>",)},
        '<tool_call>{"name": "f"}</tool_call> never',
        [call(0, "f", "{}")],
        "</tool_call>",
        1,
    ),
    (
        "no parser: tags are text",
        {"tool_call_start": "<tool_call>", "tool_call_end": "</tool_call>"},
        '<tool_call>{"name": "f"}</tool_call>',
        [T('<tool_call>{"name": "f"}</tool_call>')],
        "",
        0,
    ),
    (
        "block to the end (empty end tag)",
        {"tool_call_start": "[TOOL_CALLS]", "tool_call_end": "", "parse_tool_call": mistral_like},
        'Sure.[TOOL_CALLS]f[ARGS]{"a": true}',
        [T("Sure."), call(0, "f", '{"a":true}')],
        "",
        1,
    ),
    (
        "mlx_lm json_tools",
        {**HERMES, "parse_tool_call": mlx_json},
        '<tool_call>\n{"name": "f", "arguments": {"q": "x"}}\n</tool_call>',
        [call(0, "f", '{"q":"x"}')],
        "",
        1,
    ),
    (
        "mlx_lm qwen3_coder",
        {
            **HERMES,
            "parse_tool_call": functools.partial(qwen3_coder.parse_tool_call, tools=WEATHER),
        },
        f"Checking.\n{QWEN3_CODER_BLOCK}",
        [T("Checking."), call(0, "get_weather", '{"city":"Paris","days":3}')],
        "",
        1,
    ),
    (
        "mlx_lm qwen3_coder malformed",
        {**HERMES, "parse_tool_call": qwen3_coder.parse_tool_call},
        "<tool_call>\nno function\n</tool_call>",
        [T("<tool_call>\nno function\n</tool_call>")],
        "",
        0,
    ),
]


@pytest.mark.parametrize(
    ("config", "text", "expected", "stop_sequence", "tool_calls"),
    [pytest.param(*case[1:], id=case[0]) for case in CASES],
)
def test_any_split_gives_the_same_events(
    config: dict[str, Any], text: str, expected: list[Event], stop_sequence: str, tool_calls: int
) -> None:
    cfg = ParserConfig(**config)
    for chunks in splits(text):
        events, parser = run(cfg, chunks)
        assert events == expected, chunks
        assert (parser.stopped, parser.stop_sequence) == (bool(stop_sequence), stop_sequence)
        assert parser.tool_calls == tool_calls


@pytest.mark.parametrize(
    ("config", "chunk", "expected"),
    [
        ({"stop": ("STOP",)}, "abcST", [T("abc")]),  # only the possible prefix is held
        ({"stop": ("STOP",)}, "xyz", [T("xyz")]),  # no fixed window
        (THINK, "a<th", [T("a")]),
        ({**THINK, "start_in_reasoning": True}, "hm</", [R("hm")]),
        (HERMES, 'a<tool_call>{"name"', [T("a")]),
    ],
)
def test_holds_back_only_a_possible_prefix(
    config: dict[str, Any], chunk: str, expected: list[Event]
) -> None:
    assert OutputParser(ParserConfig(**config)).feed(chunk) == expected


def test_feed_after_stop_is_ignored_and_finish_is_idempotent() -> None:
    parser = OutputParser(ParserConfig(stop=("\n\n",)))
    assert parser.feed("one\n") == [T("one")]
    assert parser.feed("\ntwo") == []
    assert parser.stopped and parser.stop_sequence == "\n\n"
    assert parser.feed("three") == []
    assert parser.finish() == []
    assert parser.finish() == []


def test_default_call_id() -> None:
    assert re.fullmatch(r"call_[0-9a-f]{24}", new_call_id())
    events = OutputParser(ParserConfig(**HERMES)).feed('<tool_call>{"name": "f"}</tool_call>')
    assert isinstance(events[0], ToolCallEvent)
    assert re.fullmatch(r"call_[0-9a-f]{24}", events[0].call.id)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('{"name": "f", "arguments": {"a": 1}}', [{"name": "f", "arguments": {"a": 1}}]),
        ('\n[{"name": "f"}, {"name": "g"}]\n', [{"name": "f"}, {"name": "g"}]),
        ('{"name": "f"}\n{"name": "g"}', [{"name": "f"}, {"name": "g"}]),
        (
            '{"name": "f", "parameters": {"a": 1}}',
            [{"name": "f", "parameters": {"a": 1}, "arguments": {"a": 1}}],
        ),
    ],
)
def test_json_tool_call_parser(text: str, expected: list[dict[str, Any]]) -> None:
    assert json_tool_call_parser(text) == expected


@pytest.mark.parametrize("text", ["", "[]", '"f"', '{"arguments": {}}', '{"name": 1}', "{bad"])
def test_json_tool_call_parser_rejects(text: str) -> None:
    with pytest.raises(ValueError):
        json_tool_call_parser(text)


def test_tool_prompt() -> None:
    tools = [
        Tool("get_weather", "Weather for a city", {"type": "object", "properties": {"city": {}}}),
        Tool("now"),
    ]
    prompt = tool_prompt(tools)
    specs = prompt.split("<tools>\n")[1].split("\n</tools>")[0].splitlines()
    assert [json.loads(s)["function"] for s in specs] == [
        {
            "name": "get_weather",
            "description": "Weather for a city",
            "parameters": tools[0].parameters,
        },
        {"name": "now", "description": "", "parameters": {"type": "object", "properties": {}}},
    ]
    assert "<tool_call>" in prompt and "</tool_call>" in prompt
    assert tool_prompt([]) == ""


@pytest.mark.parametrize(
    ("prompt", "expected"),
    [
        ("<|User|>hi<|Assistant|><think>\n", True),
        ("<|im_start|>assistant\n<think>\n\n</think>\n\n", False),
        ("<|im_start|>assistant\n", False),
        ("<think>old</think> user: <think>", True),
    ],
)
def test_prompt_opens_reasoning(prompt: str, expected: bool) -> None:
    assert prompt_opens_reasoning(prompt, "<think>", "</think>") is expected
