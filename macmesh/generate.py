"""`macmesh generate`: stream one chat completion from a node over gRPC."""

from __future__ import annotations

import argparse
import json
import sys

from mesh.client import NodeClient
from mesh.errors import MeshError
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    GenerateRequest,
    Message,
    ReasoningDelta,
    SamplingParams,
    Started,
    TextDelta,
    ToolCallEvent,
)


async def run_generate(args: argparse.Namespace) -> int:
    """Print the text to stdout as it streams; reasoning and usage go to stderr."""
    messages = []
    if args.system:
        messages.append(Message("system", args.system))
    messages.append(Message("user", args.prompt))
    request = GenerateRequest(
        model=args.model,
        prompt=ChatPrompt(tuple(messages)),
        sampling=SamplingParams(
            temperature=args.temperature,
            top_p=args.top_p,
            top_k=args.top_k,
            min_p=args.min_p,
            max_tokens=args.max_tokens,
            seed=args.seed,
            stop=tuple(args.stop),
        ),
    )
    async with NodeClient(args.node) as client:
        try:
            await client.wait_ready(10.0)
            async for event in client.generate(request):
                if args.json:
                    print(json.dumps({"type": type(event).__name__, **_fields(event)}), flush=True)
                    continue
                if isinstance(event, TextDelta):
                    print(event.text, end="", flush=True)
                elif isinstance(event, ReasoningDelta):
                    print(event.text, end="", file=sys.stderr, flush=True)
                elif isinstance(event, ToolCallEvent):
                    c = event.call
                    print(f"\n[tool call {c.name} {c.arguments}]", flush=True)
                elif isinstance(event, ErrorEvent):
                    print(f"\nerror: {event.code}: {event.message}", file=sys.stderr)
                elif isinstance(event, Finish):
                    u = event.usage
                    tps = (
                        (u.completion_tokens - 1) / u.generation_seconds
                        if (u.generation_seconds > 0 and u.completion_tokens > 1)
                        else 0.0
                    )
                    print()
                    print(
                        f"[{event.reason.value}; prompt {u.prompt_tokens} tok in "
                        f"{u.prompt_seconds:.2f}s, {u.completion_tokens} tok at {tps:.1f} tok/s]",
                        file=sys.stderr,
                    )
                    return 0 if event.reason.value != "error" else 1
                elif isinstance(event, Started):
                    pass
        except MeshError as exc:
            print(f"macmesh: {exc.code}: {exc.message}", file=sys.stderr)
            return 1
    return 1


def _fields(event: object) -> dict[str, object]:
    out: dict[str, object] = {}
    for name in getattr(event, "__slots__", ()):
        value = getattr(event, name)
        if hasattr(value, "__slots__"):
            value = _fields(value)
        elif hasattr(value, "value"):
            value = value.value
        out[name] = value
    return out
