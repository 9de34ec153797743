"""One pass over the places models live: what is there now, and a cheap fingerprint.

`scan_models_dir`, `scan_hf_cache`, `scan_named_paths` and
`node.models.gguf_catalog.scan_gguf_dir` each turn a place into catalog
entries; `fingerprint` stats only directories (and the files directly in the
watched folders), so a watcher can poll it every second and rescan only when
something moved. Nothing here raises for a bad file: a model that is
unreadable, half-copied or corrupt is logged once and left out.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import stat
import struct
import threading
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from node.models.entry import CatalogEntry
from node.models.gguf_catalog import gguf_entry
from node.models.memory import mlx_kv_bytes_per_token

log = logging.getLogger(__name__)

# Largest safetensors header accepted (the format's own reference limit is 100 MB).
_MAX_SAFETENSORS_HEADER = 100_000_000

# MLX dirs already judged, by their fingerprint: a rescan re-reads nothing unchanged.
_mlx_memo: dict[tuple[str, tuple[tuple[str, int, int], ...]], CatalogEntry | None] = {}
_memo_lock = threading.Lock()
_MEMO_MAX = 4096


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


def safetensors_problem(path: Path) -> str | None:
    """Why `path` is not a complete safetensors file, or None when it is.

    The file is an 8-byte header length, a JSON header whose `data_offsets`
    say where each tensor ends, then the data: a half-copied file is shorter
    than its header says.
    """
    try:
        size = path.stat().st_size
        with path.open("rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            (n,) = struct.unpack("<Q", head)
            if n < 2 or n > _MAX_SAFETENSORS_HEADER or 8 + n > size:
                return f"header length {n} does not fit a file of {size} bytes"
            header = json.loads(f.read(n))
    except OSError as exc:
        return f"unreadable ({exc.strerror or exc})"
    except ValueError:
        return "header is not valid JSON"
    if not isinstance(header, dict):
        return "header is not a JSON object"
    end = 0
    for name, info in header.items():
        if name == "__metadata__":
            continue
        offsets = info.get("data_offsets") if isinstance(info, dict) else None
        if not (isinstance(offsets, list) and len(offsets) == 2):
            return f"tensor {name!r} has no data_offsets"
        end = max(end, int(offsets[1]))
    if 8 + n + end > size:
        return f"truncated: {size} bytes, the header needs {8 + n + end}"
    return None


def _weight_files(path: Path) -> list[Path] | str:
    """The safetensors files of dir `path` (per its index, if any), or why there are none."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text()).get("weight_map", {})
            shards = sorted(set(weight_map.values()))
        except (OSError, ValueError, AttributeError):
            return f"{index.name} is not valid JSON"
        files = [path / s for s in shards]
    else:
        files = sorted(path.glob("*.safetensors"))
    return files or "no *.safetensors weights"


def _weights_problem(path: Path) -> str | None:
    """Why the safetensors weights in dir `path` are not servable, or None."""
    files = _weight_files(path)
    if isinstance(files, str):
        return files
    for f in files:
        if not f.is_file():
            return f"{f.name} is missing"
        problem = safetensors_problem(f)
        if problem:
            return f"{f.name}: {problem}"
    return None


_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2}


def activation_bytes(path: Path) -> int:
    """Bytes per value of an MLX model's activations, hence of its KV cache: MLX
    promotes to the widest float dtype they meet, so the widest of the token
    embedding's (scales or weights) and the norms' dtypes; 2 when unreadable."""
    files = _weight_files(path)
    widest = 0
    for f in [] if isinstance(files, str) else files:
        try:
            with f.open("rb") as fh:
                (n,) = struct.unpack("<Q", fh.read(8))
                if n > _MAX_SAFETENSORS_HEADER:
                    continue
                header = json.loads(fh.read(n))
        except (OSError, ValueError, struct.error):
            continue
        for name, info in header.items():
            if not isinstance(info, dict):
                continue
            if name.endswith(("embed_tokens.scales", "embed_tokens.weight", "norm.weight")):
                widest = max(widest, _DTYPE_BYTES.get(str(info.get("dtype")), 0))
    return widest or 2


def _stat_entries(path: Path) -> list[tuple[os.DirEntry[str], os.stat_result]] | None:
    """Each entry of folder `path` with its stat (links followed); None if unreadable."""
    out: list[tuple[os.DirEntry[str], os.stat_result]] = []
    try:
        with os.scandir(path) as it:
            for e in it:
                with contextlib.suppress(OSError):  # gone, or a dangling link
                    out.append((e, e.stat()))
    except OSError:
        return None
    return out


def _dir_fingerprint(path: Path) -> tuple[tuple[str, int, int], ...]:
    entries = _stat_entries(path) or []
    return tuple(sorted((e.name, st.st_size, st.st_mtime_ns) for e, st in entries))


def mlx_entry(model_id: str, path: Path, source: str) -> CatalogEntry | None:
    """A catalog entry when `path` is a complete MLX/safetensors model dir, else None.

    Memoized on the dir's listing (names, sizes, mtimes), so a rescan of an
    unchanged dir reads nothing; an incomplete one is logged once per change.
    """
    if not path.is_dir():
        return None
    key = (f"{model_id}\0{source}\0{path}", _dir_fingerprint(path))
    with _memo_lock:
        if key in _mlx_memo:
            return _mlx_memo[key]
    entry = _mlx_entry(model_id, path, source, key[1])
    with _memo_lock:
        if len(_mlx_memo) >= _MEMO_MAX:
            _mlx_memo.clear()
        _mlx_memo[key] = entry
    return entry


def _mlx_entry(
    model_id: str, path: Path, source: str, listing: tuple[tuple[str, int, int], ...]
) -> CatalogEntry | None:
    config = _read_config(path)
    if config is None or "model_type" not in config:
        return None  # not a model dir (or not one yet): nothing to say
    problem = _weights_problem(path)
    if problem is not None:
        log.warning("skipping model dir %s: %s", path, problem)
        return None
    return CatalogEntry(
        id=model_id,
        backend="mlx",
        source=source,
        path=path,
        size_bytes=_dir_size(path),
        context_length=_context_length(config),
        quantization=_quantization(config),
        kv_bytes_per_token=mlx_kv_bytes_per_token(config, activation_bytes(path)),
    )


def _dir_size(path: Path) -> int:
    total = 0
    for p in path.rglob("*"):
        try:
            if p.is_file():
                total += p.stat().st_size
        except OSError:
            continue
    return total


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


def _hf_repos(root: Path) -> list[tuple[str, Path]]:
    """(repo id, its snapshot to serve) of every model repo in a Hugging Face hub cache.

    huggingface_hub's layout: `models--ORG--NAME/{blobs,snapshots/REV,refs/main}`.
    The snapshot is the one `refs/main` names, else the newest. Only folders are
    listed here (no file is stat'ed): `scan_cache_dir` stats every cached file,
    which on a cache of thousands of files takes long enough, holding the GIL, to
    slow the node's token streams.
    """
    out: list[tuple[str, Path]] = []
    try:
        repos = sorted(
            (e for e in os.scandir(root) if e.name.startswith("models--") and e.is_dir()),
            key=lambda e: e.name,
        )
    except OSError:
        return out  # no cache (yet)
    for repo in repos:
        snapshots = Path(repo.path) / "snapshots"
        try:
            revs = {e.name: e for e in os.scandir(snapshots) if e.is_dir()}
        except OSError:
            continue
        if not revs:
            continue
        try:
            main = (Path(repo.path) / "refs" / "main").read_text().strip()
        except OSError:
            main = ""
        if main not in revs:
            main = max(revs.values(), key=lambda e: e.stat().st_mtime_ns).name
        out.append((repo.name.removeprefix("models--").replace("--", "/"), snapshots / main))
    return out


def scan_hf_cache(cache_dir: Path | None = None) -> dict[str, CatalogEntry]:
    """MLX-loadable models (by repo id) and GGUF files (by file name) in the HF cache.

    `cache_dir` defaults to huggingface_hub's (`HF_HUB_CACHE`, else `$HF_HOME/hub`).
    """
    found: dict[str, CatalogEntry] = {}
    for repo_id, snapshot in _hf_repos(cache_dir if cache_dir is not None else default_hf_cache()):
        entry = mlx_entry(repo_id, snapshot, "hf-cache")
        if entry is not None:
            found[entry.id] = entry
            continue
        try:
            names = sorted(n for n in os.listdir(snapshot) if n.lower().endswith(".gguf"))
        except OSError:
            continue
        for name in names:
            gguf = gguf_entry(snapshot / name, "hf-cache")
            if gguf is not None:
                found.setdefault(gguf.id, gguf)
    return found


def hf_fingerprint(root: Path) -> list[tuple[str, int, int]]:
    """What `scan_hf_cache` depends on, by folder stats only: each repo, its snapshots
    folder, each snapshot (a file landing there changes its mtime) and `refs/main`."""
    out: list[tuple[str, int, int]] = []
    paths: list[Path] = [root]
    try:
        repos = [Path(e.path) for e in os.scandir(root) if e.name.startswith("models--")]
    except OSError:
        repos = []
    for repo in repos:
        snaps = repo / "snapshots"
        paths += [repo, snaps, repo / "refs" / "main"]
        with contextlib.suppress(OSError):
            paths += [Path(e.path) for e in os.scandir(snaps)]
    for path in paths:
        try:
            st = path.stat()
            out.append((str(path), st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((str(path), -1, -1))
    return out


def scan_named_paths(paths: Iterable[Path]) -> dict[str, CatalogEntry]:
    """Models that config files name by path: a `.gguf` file or an MLX dir, where it exists.

    A path that does not exist on this machine is no error here: in a lab the
    same config names files that only some Macs have.
    """
    found: dict[str, CatalogEntry] = {}
    for path in paths:
        if path.name.lower().endswith(".gguf"):
            entry = gguf_entry(path, "config")
        else:
            entry = mlx_entry(path.name, path, "config")
        if entry is not None:
            found.setdefault(entry.id, entry)
    return found


def hf_home() -> Path:
    """`$HF_HOME`, else `~/.cache/huggingface` (huggingface_hub's rule)."""
    home = os.environ.get("HF_HOME")
    if home:
        return Path(home).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "huggingface"


def default_hf_cache() -> Path:
    """Where huggingface_hub keeps models: `$HF_HUB_CACHE`, else `hf_home()/hub`."""
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE")
    return Path(hub).expanduser() if hub else hf_home() / "hub"


def fingerprint(
    dirs: Iterable[tuple[Path, int]], files: Iterable[Path], hf_hub: Path | None = None
) -> int:
    """A hash of what a rescan would look at, at the cost of stats only.

    `dirs`: (folder, depth): every entry down to `depth` levels below the
    folder, with its size and mtime (a file being copied in changes size; a
    new file or a finished download changes its folder's mtime). `files`:
    paths stat'ed one by one (config-named models, which may appear later).
    `hf_hub`: a Hugging Face cache, by `hf_fingerprint`.
    """
    acc: list[tuple[str, int, int]] = []

    def walk(path: Path, depth: int) -> None:
        entries = _stat_entries(path)
        if entries is None:
            acc.append((str(path), -1, -1))
            return
        for e, st in entries:
            acc.append((e.path, st.st_size, st.st_mtime_ns))
            if stat.S_ISDIR(st.st_mode) and depth > 1:
                walk(Path(e.path), depth - 1)

    for folder, depth in dirs:
        walk(folder, depth)
    for f in files:
        try:
            st = f.stat()
            acc.append((str(f), st.st_size, st.st_mtime_ns))
        except OSError:
            acc.append((str(f), -1, -1))
    if hf_hub is not None:
        acc += hf_fingerprint(hf_hub)
    return hash(tuple(acc))
