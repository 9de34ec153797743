"""`CatalogEntry`: one model on disk, as every catalog module describes it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


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
