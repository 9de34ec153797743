"""Incremental parser for a model's streamed output text.

The backend feeds detokenized segments as they arrive; `OutputParser` turns them
into `TextDelta`, `ReasoningDelta` and `ToolCallEvent`s. Two stages:

1. stop sequences cut the raw text (reasoning included): generation ends where
   the first stop string *completes*, which is what a token-by-token generator
   sees; when several complete at the same point, the longest (earliest-starting)
   one is reported. Only a possible partial stop string is held back.
2. the surviving text is split at think / tool-call tags. Tags are never
   emitted; whitespace next to a tag (e.g. the "\\n\\n" after "</think>") is
   dropped; a tag split across segments is held back until it is decided.

The result does not depend on how the text was split into segments. Pure: no
I/O, no mlx; the tool-call parse function is injected.
"""

from __future__ import annotations

import enum
import json
import secrets
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from mesh.types import ReasoningDelta, TextDelta, Tool, ToolCall, ToolCallEvent

Event = TextDelta | ReasoningDelta | ToolCallEvent
# Raw text between the tool-call tags -> one call or a list of calls, each a
# mapping with "name" and "arguments" (a mapping or a JSON object string).
ToolCallParser = Callable[[str], Mapping[str, Any] | Sequence[Mapping[str, Any]]]

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"

# What third-party parsers raise on malformed model output (mlx-lm's own server
# catches only the first); anything else is a bug and propagates.
_PARSE_ERRORS = (ValueError, TypeError, KeyError, IndexError, AttributeError, SyntaxError)


def new_call_id() -> str:
    """A fresh tool-call id: `call_` + 24 hex chars."""
    return "call_" + secrets.token_hex(12)


@dataclass(frozen=True, slots=True)
class ParserConfig:
    """What to look for in one generation's output.

    Tool calls are recognised only when both `tool_call_start` and
    `parse_tool_call` are set; an empty `tool_call_end` means the block runs to
    the end of the output (e.g. Mistral's `[TOOL_CALLS]`).
    """

    stop: tuple[str, ...] = ()
    think_start: str | None = None
    think_end: str | None = None
    start_in_reasoning: bool = False
    tool_call_start: str | None = None
    tool_call_end: str | None = None
    parse_tool_call: ToolCallParser | None = None


class _Mode(enum.Enum):
    TEXT = enum.auto()
    REASONING = enum.auto()
    TOOL = enum.auto()


class OutputParser:
    """Turns streamed output text into events; see the module docstring.

    Call `feed` per segment and `finish` once at the end (also after `stopped`
    turns true: feed then ignores further text, and finish flushes what is held).
    """

    def __init__(self, config: ParserConfig, *, new_id: Callable[[], str] = new_call_id) -> None:
        self.stopped = False
        self.stop_sequence = ""
        self.tool_calls = 0
        self._new_id = new_id
        self._stops = tuple(s for s in config.stop if s)
        self._think_start = config.think_start or ""
        self._think_end = config.think_end or ""
        self._parse = config.parse_tool_call
        self._tool_start = (config.tool_call_start or "") if self._parse else ""
        self._tool_end = config.tool_call_end or ""
        self._text_tags = tuple(
            t for t in (self._think_start, self._think_end, self._tool_start) if t
        )
        reasoning = config.start_in_reasoning and bool(self._think_end)
        self._mode = _Mode.REASONING if reasoning else _Mode.TEXT
        self._stop_buf = ""  # possible start of a stop string
        self._buf = ""  # undecided text: a partial tag, or the open tool-call body
        self._scan = 0  # where to resume looking for the tool-call end tag
        self._strip = reasoning  # drop leading whitespace (just after a tag)
        self._held = ""  # trailing whitespace, dropped if a tag follows it
        self._tool_ws = ""  # whitespace dropped before a tool call, restored on failure
        self._any_text = False  # non-whitespace text emitted
        self._finished = False

    def feed(self, text: str) -> list[Event]:
        """Consume one segment; returns the events it completes."""
        if self.stopped or self._finished or not text:
            return []
        out: list[Event] = []
        self._split(self._cut_stop(text), out)
        return _merge(out)

    def finish(self) -> list[Event]:
        """End of generation: flush everything held back. Idempotent."""
        if self._finished:
            return []
        self._finished = True
        out: list[Event] = []
        self._split(self._stop_buf, out)  # an unmatched stop prefix is real text
        self._stop_buf = ""
        kind = ReasoningDelta if self._mode is _Mode.REASONING else TextDelta
        if self._mode is _Mode.TOOL:
            body = self._buf
            # Models often hit EOS/max_tokens right before (or inside) the end tag.
            body = body[: len(body) - _partial_len(body, (self._tool_end,))]
            self._tool_block(body, self._tool_start + self._buf, out)
        else:
            self._emit(kind, self._buf, out)
        if self._held:  # trailing whitespace at the very end is real output
            out.append(kind(self._held))
        self._buf = self._held = ""
        return _merge(out)

    # ---- stage 1: stop sequences ----

    def _cut_stop(self, text: str) -> str:
        if not self._stops:
            return text
        buf = self._stop_buf + text
        best: tuple[int, int, str] | None = None  # (end, -length, stop)
        for s in self._stops:
            i = buf.find(s)
            if i >= 0 and (best is None or (i + len(s), -len(s)) < best[:2]):
                best = (i + len(s), -len(s), s)
        if best is not None:
            self.stopped, self.stop_sequence, self._stop_buf = True, best[2], ""
            return buf[: best[0] + best[1]]
        keep = _partial_len(buf, self._stops)
        self._stop_buf = buf[len(buf) - keep :]
        return buf[: len(buf) - keep]

    # ---- stage 2: think and tool-call tags ----

    def _split(self, text: str, out: list[Event]) -> None:
        self._buf += text
        while True:
            buf = self._buf
            if self._mode is _Mode.TOOL:
                if not self._tool_end:
                    return  # the block runs to the end of the output
                i = buf.find(self._tool_end, self._scan)
                if i < 0:
                    self._scan = max(0, len(buf) - len(self._tool_end) + 1)
                    return
                raw = self._tool_start + buf[: i + len(self._tool_end)]
                self._buf, self._scan, self._mode = buf[i + len(self._tool_end) :], 0, _Mode.TEXT
                self._tool_block(buf[:i], raw, out)
                continue
            kind: type[TextDelta | ReasoningDelta] = TextDelta
            tags = self._text_tags
            if self._mode is _Mode.REASONING:
                kind, tags = ReasoningDelta, (self._think_end,)
            found = _find_tag(buf, tags)
            if found is None:
                keep = _partial_len(buf, tags)
                self._emit(kind, buf[: len(buf) - keep], out)
                self._buf = buf[len(buf) - keep :]
                return
            i, tag = found
            self._emit(kind, buf[:i], out)
            self._buf = buf[i + len(tag) :]
            if kind is TextDelta and tag == self._think_end and self._any_text:
                # A stray "</think>" after real text (the prompt opened the block
                # but the caller did not say so): dropped, the layout around kept.
                continue
            self._tool_ws = self._held
            self._held, self._strip = "", True  # whitespace around a tag is layout
            if tag == self._tool_start:
                self._mode = _Mode.TOOL
            elif tag == self._think_start and kind is TextDelta:
                self._mode = _Mode.REASONING
            else:  # "</think>", closing reasoning or an empty block the prompt opened
                self._mode = _Mode.TEXT

    def _emit(self, kind: type[TextDelta | ReasoningDelta], text: str, out: list[Event]) -> None:
        if self._strip:
            text = text.lstrip()
            if not text:
                return
            self._strip = False
        text = self._held + text
        body = text.rstrip()
        self._held = text[len(body) :]  # held until non-whitespace follows
        if body:
            out.append(kind(body))
            self._any_text = self._any_text or kind is TextDelta

    def _tool_block(self, body: str, raw: str, out: list[Event]) -> None:
        calls = self._parse_calls(body)
        if calls is None:  # keep the model's output rather than lose it
            self._strip = False
            self._emit(TextDelta, self._tool_ws + raw, out)
            return
        self.tool_calls += len(calls)
        out.extend(ToolCallEvent(c) for c in calls)

    def _parse_calls(self, body: str) -> list[ToolCall] | None:
        assert self._parse is not None  # TOOL mode needs a parser
        try:
            parsed = self._parse(body)
        except _PARSE_ERRORS:
            return None
        items = [parsed] if isinstance(parsed, Mapping) else parsed
        if not isinstance(items, Sequence) or isinstance(items, str) or not items:
            return None
        calls = []
        for item in items:
            if not isinstance(item, Mapping):
                return None
            name, args = item.get("name"), item.get("arguments")
            if not isinstance(name, str) or not name:
                return None
            arguments = _compact_args(args)
            if arguments is None:
                return None
            calls.append(ToolCall(id=self._new_id(), name=name, arguments=arguments))
        return calls


def _compact_args(args: object) -> str | None:
    """Arguments as a compact JSON object string; None if they are not an object."""
    if args is None or (isinstance(args, str) and not args.strip()):
        return "{}"
    try:
        if isinstance(args, str):
            args = json.loads(args)
        if not isinstance(args, Mapping):
            return None
        return json.dumps(dict(args), separators=(",", ":"), ensure_ascii=False, allow_nan=False)
    except (ValueError, TypeError):  # not JSON, or values JSON cannot encode
        return None


def _find_tag(buf: str, tags: Sequence[str]) -> tuple[int, str] | None:
    """The earliest tag in `buf` (longest on a tie), as (index, tag)."""
    best: tuple[int, str] | None = None
    for tag in tags:
        i = buf.find(tag)
        if i >= 0 and (best is None or (i, -len(tag)) < (best[0], -len(best[1]))):
            best = (i, tag)
    return best


def _partial_len(buf: str, tags: Sequence[str]) -> int:
    """Length of the longest suffix of `buf` that is a proper prefix of a tag."""
    longest = max((len(t) for t in tags), default=0)
    for k in range(min(len(buf), longest - 1), 0, -1):
        suffix = buf[-k:]
        if any(len(t) > k and t.startswith(suffix) for t in tags):
            return k
    return 0


def _merge(events: list[Event]) -> list[Event]:
    out: list[Event] = []
    for e in events:
        last = out[-1] if out else None
        if isinstance(e, TextDelta) and isinstance(last, TextDelta):
            out[-1] = TextDelta(last.text + e.text)
        elif isinstance(e, ReasoningDelta) and isinstance(last, ReasoningDelta):
            out[-1] = ReasoningDelta(last.text + e.text)
        else:
            out.append(e)
    return out


def prompt_opens_reasoning(prompt: str, think_start: str, think_end: str) -> bool:
    """True when the rendered prompt leaves a think block open (R1/Qwen3 templates).

    Use it to set `ParserConfig.start_in_reasoning`: the model's output then
    begins inside the block and contains only the closing tag.
    """
    return bool(think_start) and prompt.rfind(think_start) > prompt.rfind(think_end)


def json_tool_call_parser(text: str) -> list[dict[str, Any]]:
    """Parse a Hermes/Qwen tool-call block: JSON objects (or lists of them).

    Accepts one `{"name": ..., "arguments": {...}}`, a JSON list of those, or
    several objects one after another; `parameters` is read as `arguments`.
    Raises ValueError when the block is anything else.
    """
    decoder = json.JSONDecoder()
    calls: list[dict[str, Any]] = []
    text, pos = text.strip(), 0
    while pos < len(text):
        value, pos = decoder.raw_decode(text, pos)
        for item in value if isinstance(value, list) else [value]:
            if not isinstance(item, dict) or not isinstance(item.get("name"), str):
                raise ValueError("a tool call must be an object with a name")
            if "arguments" not in item and "parameters" in item:
                item = {**item, "arguments": item["parameters"]}
            calls.append(item)
        while pos < len(text) and text[pos] in " \t\r\n,":
            pos += 1
    if not calls:
        raise ValueError("empty tool call")
    return calls


def tool_prompt(tools: Sequence[Tool]) -> str:
    """A system-prompt section describing `tools` in the Hermes/Qwen format.

    For models whose chat template ignores tools: the answer is expected as
    `<tool_call>{"name": ..., "arguments": {...}}</tool_call>` blocks, which
    `json_tool_call_parser` reads back. Empty when there are no tools.
    """
    if not tools:
        return ""
    specs = "\n".join(
        json.dumps(
            {
                "type": "function",
                "function": {
                    "name": t.name,
                    "description": t.description,
                    "parameters": t.parameters or {"type": "object", "properties": {}},
                },
            },
            ensure_ascii=False,
        )
        for t in tools
    )
    return (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{specs}\n</tools>\n\n"
        "For each function call, return a json object with function name and arguments "
        f"within {TOOL_CALL_START}{TOOL_CALL_END} XML tags:\n"
        f'{TOOL_CALL_START}\n{{"name": <function-name>, "arguments": <args-json-object>}}\n'
        f"{TOOL_CALL_END}"
    )
