"""The Backend protocol: what the node's gRPC service needs from an engine."""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Protocol

from mesh.types import (
    ChatPrompt,
    GenerateEvent,
    GenerateRequest,
    ModelInfo,
    ModelLoad,
    RenderedPrompt,
)


class Backend(Protocol):
    """An inference engine serving some of the node's models.

    Every method may raise `mesh.errors.MeshError` subclasses; anything else is
    a bug. `generate` yields `Started` first and `Finish` last; a failure after
    `Started` is an `ErrorEvent` followed by `Finish(ERROR)`, never an
    exception. Closing the iterator early cancels the generation.
    """

    name: str

    def loaded(self) -> dict[str, ModelInfo]:
        """Models loaded now, by id."""
        ...

    async def load(self, model_id: str) -> tuple[ModelInfo, float]:
        """Load (or find loaded) a model; returns its info and load seconds."""
        ...

    async def unload(self, model_id: str) -> bool:
        """Unload a model; False when it was not loaded."""
        ...

    async def render(
        self, model_id: str, chat: ChatPrompt, include_text: bool = False
    ) -> RenderedPrompt:
        """Apply the model's chat template (with tools) and tokenize."""
        ...

    async def tokenize(self, model_id: str, text: str, add_special_tokens: bool) -> list[int]:
        """Tokenize raw text."""
        ...

    def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        """Stream one generation."""
        ...

    def load_stats(self) -> list[ModelLoad]:
        """Queue depth and measured speeds per loaded model."""
        ...

    async def close(self, grace: float) -> None:
        """Finish or cancel in-flight work within `grace` seconds, free models."""
        ...
