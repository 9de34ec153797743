"""`CatalogEntry`: one model on disk, as every catalog module describes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from node.models.memory import estimated_bytes


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A model on disk."""

    id: str
    backend: str
    # models-dir | hf-cache | gguf-dir | config (a path a config file names)
    source: str
    path: Path
    size_bytes: int
    context_length: int
    quantization: str
    # KV cache bytes one token costs (node.models.memory); 0 = unknown.
    kv_bytes_per_token: int = 0

    @property
    def estimated_bytes(self) -> int:
        """Weights plus one full-context sequence's KV cache (node.models.memory)."""
        return estimated_bytes(self.size_bytes, self.kv_bytes_per_token, self.context_length)
