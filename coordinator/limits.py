"""What one HTTP request may hold, and how long a stream may stall (docs/reliability.md).

Every limit is checked before anything reaches a node, and its error names it, in the
calling API's envelope (`coordinator.api.common`):

    limit                        default           error
    request body size            32 MB (--max-body-mb)   413 (RequestTooLarge)
    JSON nesting depth           100               400, field "body"
    messages per request         10,000            400, field "messages"
    tools per request            512               400, field "tools"
    stop sequences per request   16                400, field "stop" / "stop_sequences"
    invalid UTF-8 / JSON         -                 400
    a stream nobody reads        60 s per send     the generation is cancelled on the node

The body limit is Anthropic's own for the Messages API (32 MB), large enough for Claude
Code prompts with images and PDFs, and half the mesh's gRPC message limit. The body is
read in chunks and refused once it passes the limit, so at most the limit plus one
chunk (uvicorn reads 64 KiB at a time) is ever held; a declared Content-Length over
the limit is refused before anything is read. Pure: no I/O.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from mesh import errors
from mesh.sampling import MAX_STOP_SEQUENCES

__all__ = [
    "DEFAULT_MAX_BODY_BYTES",
    "MAX_JSON_DEPTH",
    "MAX_MESSAGES",
    "MAX_STOP_SEQUENCES",
    "MAX_TOOLS",
    "SEND_TIMEOUT_SECONDS",
    "check_counts",
    "decode_json",
]

DEFAULT_MAX_BODY_BYTES = 32 * 2**20
# Deep enough for any real tool schema (rarely past 15 levels), far below where
# Python's json module (about 1,000) would fail with a RecursionError.
MAX_JSON_DEPTH = 100
# Anthropic documents 100,000; local models' contexts fill long before 10,000 turns.
MAX_MESSAGES = 10_000
# OpenAI documents 128 functions; Claude Code with many MCP servers sends a few hundred.
MAX_TOOLS = 512
# Seconds one write to a streaming client may stay blocked (the client stopped reading)
# before the stream is dropped and the node's generation cancelled.
SEND_TIMEOUT_SECONDS = 60.0


def _too_deep(value: Any, limit: int) -> bool:
    """Whether `value` nests containers deeper than `limit` (iterative: no recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        children = item.values() if isinstance(item, dict) else item
        stack.extend((c, depth + 1) for c in children if isinstance(c, dict | list))
    return False


def _has_surrogate(text: str) -> bool:
    return any("\ud800" <= ch <= "\udfff" for ch in text)


def _surrogate_path(value: Any) -> str | None:
    """The path of the first key or string in `value` holding a lone UTF-16 surrogate
    (JSON's `\\ud800` escapes decode to one; it cannot be encoded as UTF-8 for a node)."""
    stack: list[tuple[Any, str]] = [(value, "")]
    while stack:
        item, path = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                return path or "body"
        elif isinstance(item, dict):
            for key, child in item.items():
                where = f"{path}.{key}" if path else str(key)
                if _has_surrogate(key):
                    return path or "body"
                stack.append((child, where))
        elif isinstance(item, list):
            stack.extend((child, f"{path}[{i}]") for i, child in enumerate(item))
    return None


def decode_json(raw: bytes, *, max_depth: int = MAX_JSON_DEPTH) -> Any:
    """`raw` as JSON; InvalidRequest for bad UTF-8, bad JSON or nesting past `max_depth`."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise errors.InvalidRequest(
            f"request body is not valid UTF-8 (byte {exc.start}: {exc.reason})"
        ) from None
    too_deep = errors.InvalidRequest(
        f"JSON nests deeper than {max_depth} levels, the limit", field="body"
    )
    try:
        value = json.loads(text)
    except RecursionError:
        raise too_deep from None
    except ValueError as exc:
        raise errors.InvalidRequest(f"request body is not valid JSON: {exc}") from None
    if isinstance(value, dict | list) and _too_deep(value, max_depth):
        raise too_deep
    # Only `\uD8xx`-style escapes make lone surrogates: skip the walk without one.
    if "\\u" in text and (where := _surrogate_path(value)) is not None:
        raise errors.InvalidRequest(
            "text holds a lone UTF-16 surrogate (an unpaired \\uD800-\\uDFFF escape), "
            "which is not valid Unicode",
            field=where,
        )
    return value


def check_counts(data: Mapping[str, Any], limits: Mapping[str, int]) -> None:
    """InvalidRequest naming the first list field of `data` longer than its limit."""
    for name, limit in limits.items():
        value = data.get(name)
        if isinstance(value, list) and len(value) > limit:
            raise errors.InvalidRequest(
                f"{len(value)} items; the limit is {limit} per request", field=name
            )
