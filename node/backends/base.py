"""The Backend protocol: what the node's core needs from an engine, and how one is made."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mesh.types import (
    CachedPrefix,
    ChatPrompt,
    GenerateEvent,
    GenerateRequest,
    ModelInfo,
    ModelLoad,
    RenderedPrompt,
)
from node.config import NodeConfig
from node.models.catalog import Catalog


class Backend(Protocol):
    """An inference engine serving some of the node's models.

    Every method may raise `mesh.errors.MeshError` subclasses; anything else is
    a bug. `generate` yields `Started` first and `Finish` last; a failure after
    `Started` is an `ErrorEvent` followed by `Finish(ERROR)`, never an
    exception. Closing the iterator early cancels the generation. The catalog
    entry's `backend` field names the backend that serves it (`name`).
    """

    name: str

    def claims(self, model_id: str) -> bool:
        """Serves `model_id` without asking the catalog (loaded here, or built in)."""
        ...

    def model_dirs(self) -> tuple[Path, ...]:
        """Extra folders the catalog should watch for this backend's models."""
        ...

    def loaded(self) -> dict[str, ModelInfo]:
        """Models loaded now, by id."""
        ...

    def available(self) -> dict[str, ModelInfo]:
        """Models it serves from outside the catalog that are not loaded now, by id."""
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

    def cache_state(self) -> list[CachedPrefix]:
        """The prompt-cache prefixes held, as block hashes, for coordinators' routing."""
        ...

    @property
    def running(self) -> int:
        """Generations under way."""
        ...

    @property
    def waiting(self) -> int:
        """Generations queued behind them."""
        ...

    async def close(self, grace: float) -> None:
        """Finish or cancel in-flight work within `grace` seconds, free models."""
        ...


@dataclass(frozen=True, slots=True)
class BackendContext:
    """What a backend is built from: the node's config, its catalog, the change hook."""

    config: NodeConfig
    catalog: Catalog
    # Call (on the event loop) when anything `NodeState` reports changed.
    on_change: Callable[[], None]


# A backend module's `create`: the backend, or None when this node's config has none.
BackendFactory = Callable[[BackendContext], Backend | None]
