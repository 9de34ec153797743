"""Which models this node can serve: the models dir and the Hugging Face cache.

MLX models are directories (config.json + safetensors); GGUF models are
`*.gguf` files (node.models.gguf_catalog), also looked for in the extra
directories `gguf_config.json` names.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import ModelNotFound

log = logging.getLogger(__name__)

# Rescanning costs a directory walk (and a stat of every cached HF file), so a
# burst of lookups shares one scan.
_RESCAN_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class CatalogEntry:
    """A model on disk."""

    id: str
    backend: str
    source: str
    path: Path
    size_bytes: int
    context_length: int
    quantization: str


def _dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


def _read_config(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _quantization(config: dict[str, Any]) -> str:
    q = config.get("quantization") or config.get("quantization_config")
    if isinstance(q, dict) and "bits" in q:
        return f"q{q['bits']} (group {q.get('group_size', '?')})"
    dtype = config.get("torch_dtype") or config.get("dtype")
    return str(dtype) if dtype else ""


def _context_length(config: dict[str, Any]) -> int:
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        value = config.get(key)
        if isinstance(value, int) and value > 0:
            return value
    text = config.get("text_config")
    if isinstance(text, dict):
        return _context_length(text)
    return 0


def mlx_entry(model_id: str, path: Path, source: str) -> CatalogEntry | None:
    """A catalog entry when `path` looks like an MLX/safetensors model dir."""
    if not path.is_dir():
        return None
    config = _read_config(path)
    if config is None or "model_type" not in config:
        return None
    if not any(path.glob("*.safetensors")):
        return None
    return CatalogEntry(
        id=model_id,
        backend="mlx",
        source=source,
        path=path,
        size_bytes=_dir_size(path),
        context_length=_context_length(config),
        quantization=_quantization(config),
    )


def scan_models_dir(models_dir: Path) -> dict[str, CatalogEntry]:
    """MLX model dirs directly under `models_dir` (the dir name is the id)."""
    found: dict[str, CatalogEntry] = {}
    if not models_dir.is_dir():
        return found
    for child in sorted(models_dir.iterdir()):
        if child.name.startswith("."):
            continue  # in-progress imports live in hidden temp dirs
        entry = mlx_entry(child.name, child, "models-dir")
        if entry is not None:
            found[entry.id] = entry
    return found


def scan_hf_cache(cache_dir: Path | None = None) -> dict[str, CatalogEntry]:
    """MLX-loadable models in the Hugging Face cache, by repo id.

    `cache_dir` defaults to huggingface_hub's own (`HF_HUB_CACHE` / `HF_HOME`).
    """
    from huggingface_hub import scan_cache_dir
    from huggingface_hub.errors import CacheNotFound

    try:
        info = scan_cache_dir(cache_dir)
    except CacheNotFound:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("cannot scan the Hugging Face cache: %s", exc)
        return {}
    from node.models.gguf_catalog import gguf_entry

    found: dict[str, CatalogEntry] = {}
    for repo in info.repos:
        if repo.repo_type != "model" or not repo.revisions:
            continue
        newest = max(repo.revisions, key=lambda r: r.last_modified)
        entry = mlx_entry(repo.repo_id, Path(newest.snapshot_path), "hf-cache")
        if entry is not None:
            found[entry.id] = entry
            continue
        for f in newest.files:
            gguf = gguf_entry(Path(f.file_path), "hf-cache")
            if gguf is not None:
                found.setdefault(gguf.id, gguf)
    return found


class Catalog:
    """The node's models on disk; rescans (throttled) when asked for news."""

    def __init__(
        self,
        models_dir: Path,
        *,
        hf_cache: bool = True,
        hf_cache_dir: Path | None = None,
        gguf_dirs: Callable[[], tuple[Path, ...]] = tuple,
    ) -> None:
        self.models_dir = models_dir
        self.hf_cache = hf_cache
        self.hf_cache_dir = hf_cache_dir
        # Called at each rescan: gguf_config.json may change while the node runs.
        self.gguf_dirs = gguf_dirs
        self._entries: dict[str, CatalogEntry] = {}
        self._scanned_at = float("-inf")
        self._lock = threading.Lock()

    def entries(self, *, refresh: bool = True) -> dict[str, CatalogEntry]:
        """All models by id; models-dir entries shadow HF-cache ones."""
        with self._lock:
            now = time.monotonic()
            if refresh and now - self._scanned_at >= _RESCAN_SECONDS:
                from node.models.gguf_catalog import scan_gguf_dir

                found = scan_hf_cache(self.hf_cache_dir) if self.hf_cache else {}
                for extra in self.gguf_dirs():
                    found.update(scan_gguf_dir(extra, "gguf-dir"))
                found.update(scan_gguf_dir(self.models_dir, "models-dir"))
                found.update(scan_models_dir(self.models_dir))
                self._entries = found
                self._scanned_at = now
            return dict(self._entries)

    def get(self, model_id: str) -> CatalogEntry:
        """The entry for `model_id`; ModelNotFound lists what is available."""
        entries = self.entries()
        entry = entries.get(model_id)
        if entry is None:
            raise ModelNotFound(model_id, entries)
        return entry
