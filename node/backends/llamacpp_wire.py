"""llama-server's wire format: request bodies, streamed chunks -> events, usage.

Pure translation, no I/O; node.backends.llamacpp does the talking.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mesh.types import (
    FinishReason,
    GenerateEvent,
    ReasoningDelta,
    Usage,
)
from node.backends.outparse import OutputParser
from node.sampling import ResolvedSampling

FINISH = {
    "stop": FinishReason.STOP,
    "length": FinishReason.LENGTH,
    "tool_calls": FinishReason.TOOL_CALLS,
}


@dataclass
class StreamRun:
    """What one generation has seen of llama-server's stream."""

    timings: dict[str, Any]
    finish: str | None = None
    usage_prompt: int = 0
    usage_completion: int = 0
    # /completion only: the stop string llama-server matched.
    stop_word: str = ""


def chunk_events(
    chunk: dict[str, Any], parser: OutputParser, calls: dict[int, dict[str, str]], run: StreamRun
) -> list[GenerateEvent]:
    """Events in one streamed chunk (chat or completion shape)."""
    out: list[GenerateEvent] = []
    usage = chunk.get("usage")
    if isinstance(usage, dict):
        run.usage_prompt = int(usage.get("prompt_tokens") or 0)
        run.usage_completion = int(usage.get("completion_tokens") or 0)
    if "choices" not in chunk:  # /completion
        text = chunk.get("content") or ""
        if text:
            out.extend(parser.feed(text))
        if chunk.get("stop"):
            stop_type = chunk.get("stop_type")
            run.finish = "length" if stop_type == "limit" else "stop"
            if stop_type == "word":
                run.stop_word = str(chunk.get("stopping_word") or "")
            run.usage_prompt = int(chunk.get("tokens_evaluated") or 0)
            run.usage_completion = int(chunk.get("tokens_predicted") or 0)
        return out
    for choice in chunk["choices"]:
        delta = choice.get("delta") or {}
        reasoning = delta.get("reasoning_content")
        if reasoning:
            out.append(ReasoningDelta(reasoning))
        content = delta.get("content")
        if content:
            out.extend(parser.feed(content))
        for tc in delta.get("tool_calls") or ():
            c = calls.setdefault(int(tc.get("index", 0)), {"id": "", "name": "", "args": ""})
            c["id"] = c["id"] or tc.get("id") or ""
            fn = tc.get("function") or {}
            c["name"] += fn.get("name") or ""
            c["args"] += fn.get("arguments") or ""
        if choice.get("finish_reason"):
            run.finish = choice["finish_reason"]
    return out


def chunk_tokens(chunk: dict[str, Any]) -> int:
    """Tokens one streamed chunk generated: llama-server streams one per chunk, so 1
    when it carries text, reasoning or a tool call's delta (either shape), else 0."""
    if "choices" not in chunk:  # /completion
        return 1 if chunk.get("content") else 0
    for choice in chunk["choices"]:
        delta = choice.get("delta") or {}
        if delta.get("content") or delta.get("reasoning_content") or delta.get("tool_calls"):
            return 1
    return 0


def usage_of(run: StreamRun, prompt_tokens: int, queue_s: float) -> Usage:
    t = run.timings
    cached = int(t.get("cache_n") or 0)
    return Usage(
        prompt_tokens=run.usage_prompt or prompt_tokens,
        completion_tokens=run.usage_completion or int(t.get("predicted_n") or 0),
        cached_prompt_tokens=cached,
        prompt_seconds=float(t.get("prompt_ms") or 0.0) / 1000,
        generation_seconds=float(t.get("predicted_ms") or 0.0) / 1000,
        queue_seconds=max(0.0, queue_s),
        draft_tokens=int(t.get("draft_n") or 0),
        accepted_draft_tokens=int(t.get("draft_n_accepted") or 0),
    )


def sampling_body(s: ResolvedSampling, *, chat: bool) -> dict[str, Any]:
    """llama-server's sampling fields; its own defaults (top_k 40, min_p 0.05) never apply."""
    body: dict[str, Any] = {
        "stream": True,
        "cache_prompt": True,
        "temperature": s.temperature,
        "top_p": s.top_p,
        "top_k": s.top_k,
        "min_p": s.min_p,
        "repeat_penalty": s.repetition_penalty,
        "seed": s.seed if s.seed is not None else -1,
    }
    if chat:
        body["max_tokens"] = s.max_tokens
        body["stream_options"] = {"include_usage": True}
        body["reasoning_format"] = "deepseek"  # thinking arrives as reasoning_content
    else:
        # /completion says which stop string ended it (the chat endpoint does not,
        # so chats match stops here, in OutputParser).
        body["n_predict"] = s.max_tokens
        body["stop"] = list(s.stop)
    return body


_JSON_GBNF = r"""
object ::= "{" space ( member ( space "," space member )* )? space "}"
member ::= string space ":" space value
value ::= object | array | string | number | "true" | "false" | "null"
array ::= "[" space ( value ( space "," space value )* )? space "]"
string ::= "\"" ( [^"\\\x7F\x00-\x1F] | "\\" ( ["\\/bfnrt] | "u" [0-9a-fA-F]{4} ) )* "\""
number ::= "-"? ( "0" | [1-9] [0-9]* ) ( "." [0-9]+ )? ( [eE] [-+]? [0-9]+ )?
space ::= [ \n]{0,2}
"""


def tool_call_grammar(names: list[str]) -> str:
    """GBNF that forces one `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`.

    For templates without tool support, where the tools are described in the
    system prompt: llama.cpp's grammar makes "a call is required" hold.
    """
    alternatives = " | ".join(json.dumps(json.dumps(n)) for n in names)
    return (
        'root ::= "<tool_call>" space "{" space "\\"name\\"" space ":" space name space "," '
        'space "\\"arguments\\"" space ":" space object space "}" space "</tool_call>"\n'
        f"name ::= {alternatives}" + _JSON_GBNF
    )


def wire_message(m: dict[str, Any]) -> dict[str, Any]:
    """HF-template message -> OpenAI wire message (llama-server wants string arguments)."""
    calls = m.get("tool_calls")
    if not calls:
        return m
    out = dict(m)
    out["tool_calls"] = [
        {
            **c,
            "function": {
                "name": c["function"]["name"],
                "arguments": json.dumps(c["function"]["arguments"]),
            },
        }
        for c in calls
    ]
    return out


def error_text(data: Any) -> str:
    if isinstance(data, dict):
        err = data.get("error")
        if isinstance(err, dict):
            return str(err.get("message") or err)
        if err:
            return str(err)
    return str(data)[:500]


def json_or_text(raw: bytes) -> Any:
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode("utf-8", "replace")
