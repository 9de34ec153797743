"""GGUF files as catalog entries (served by llama-server, not imported).

The id of a GGUF model is its file name, `.gguf` included, so the name alone
tells a coordinator which backend serves it (routing/aliases.detect_backend).
Headers are read once per (path, size, mtime): a scan every few seconds must
not re-parse vocabularies.
"""

from __future__ import annotations

import logging
import re
import threading
from pathlib import Path

from node.models.entry import CatalogEntry
from node.models.gguf import GGUFHeader, GGUFImportError, read_header
from node.models.memory import gguf_kv_bytes_per_token

log = logging.getLogger(__name__)

# llama.cpp's `general.file_type` (enum llama_ftype) for the common ones.
_FILE_TYPES = {
    0: "F32",
    1: "F16",
    2: "Q4_0",
    3: "Q4_1",
    7: "Q8_0",
    8: "Q5_0",
    9: "Q5_1",
    10: "Q2_K",
    11: "Q3_K_S",
    12: "Q3_K_M",
    13: "Q3_K_L",
    14: "Q4_K_S",
    15: "Q4_K_M",
    16: "Q5_K_S",
    17: "Q5_K_M",
    18: "Q6_K",
    19: "IQ2_XXS",
    20: "IQ2_XS",
    23: "IQ3_XXS",
    25: "IQ4_NL",
    30: "IQ4_XS",
    32: "BF16",
}
# Later shards of a split model and vision projectors are not models of their own.
_NOT_A_MODEL = re.compile(r"(-0000[2-9]|-000[1-9]\d)-of-\d+\.gguf$|^mmproj", re.IGNORECASE)

_cache: dict[tuple[str, int, int], tuple[int, str, int] | None] = {}
_cache_lock = threading.Lock()
_CACHE_MAX = 4096


def _summary(path: Path) -> tuple[int, str, int] | None:
    """(context length, quantization, KV bytes per token) from the header, memoized;
    None if unreadable."""
    try:
        st = path.stat()
    except OSError:
        return None
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _cache_lock:
        if key in _cache:
            return _cache[key]
    try:
        header = read_header(path)
        kv = gguf_kv_bytes_per_token(header.metadata, header.architecture)
        value: tuple[int, str, int] | None = (_context(header), _quant(header), kv)
    except (GGUFImportError, OSError) as exc:
        log.warning("skipping %s: not a readable GGUF (%s)", path, exc)
        value = None
    with _cache_lock:
        if len(_cache) >= _CACHE_MAX:  # a file being copied in makes a key per size
            _cache.clear()
        _cache[key] = value
    return value


def _context(header: GGUFHeader) -> int:
    value = header.metadata.get(f"{header.architecture}.context_length")
    return value if isinstance(value, int) else 0


def _quant(header: GGUFHeader) -> str:
    ftype = header.metadata.get("general.file_type")
    if isinstance(ftype, int) and ftype in _FILE_TYPES:
        return _FILE_TYPES[ftype]
    counts = header.type_counts()
    return next(iter(counts), "")


def context_length_of(path: Path) -> int:
    """The model's trained context length (0 when the header does not say)."""
    summary = _summary(path)
    return summary[0] if summary else 0


def gguf_entry(path: Path, source: str) -> CatalogEntry | None:
    """A catalog entry for a GGUF file, or None when it is not a servable model."""
    if not path.name.lower().endswith(".gguf") or _NOT_A_MODEL.search(path.name):
        return None
    if not path.is_file():
        return None
    summary = _summary(path)
    if summary is None:
        return None
    context, quant, kv = summary
    return CatalogEntry(
        id=path.name,
        backend="gguf",
        source=source,
        path=path,
        size_bytes=path.stat().st_size,
        context_length=context,
        quantization=quant,
        kv_bytes_per_token=kv,
    )


def scan_gguf_dir(directory: Path, source: str) -> dict[str, CatalogEntry]:
    """GGUF files in `directory` and its direct subdirectories, by file name."""
    found: dict[str, CatalogEntry] = {}
    if not directory.is_dir():
        return found
    candidates = sorted(directory.glob("*.gguf")) + sorted(directory.glob("*/*.gguf"))
    for path in candidates:
        if any(part.startswith(".") for part in path.relative_to(directory).parts):
            continue  # in-progress imports and hidden dirs
        entry = gguf_entry(path, source)
        if entry is not None and entry.id not in found:
            found[entry.id] = entry
    return found
