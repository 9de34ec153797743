"""Calling a node over gRPC in tests: build a chat request, collect its events, read them."""

from __future__ import annotations

from mesh.client import NodeClient
from mesh.types import (
    ChatPrompt,
    Finish,
    GenerateEvent,
    GenerateRequest,
    Message,
    SamplingParams,
    TextDelta,
)


def chat(text: str, **sampling: object) -> GenerateRequest:
    """One user message to the default model (`smollm2`) with the given sampling fields."""
    return GenerateRequest(
        model="smollm2",
        prompt=ChatPrompt((Message("user", text),)),
        sampling=SamplingParams(**sampling),  # type: ignore[arg-type]
    )


async def collect(client: NodeClient, req: GenerateRequest) -> list[GenerateEvent]:
    """Every event of one generation."""
    return [ev async for ev in client.generate(req)]


def text_of(events: list[GenerateEvent]) -> str:
    """The text deltas joined."""
    return "".join(e.text for e in events if isinstance(e, TextDelta))


def finish_of(events: list[GenerateEvent]) -> Finish:
    """The final event, which must be Finish."""
    last = events[-1]
    assert isinstance(last, Finish), events
    return last
