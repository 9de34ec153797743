"""A model's files on disk: which files make it, their SHA-256, reading them, deleting them.

The source side of `macmesh models copy` (ModelManifest, ReadModelFile) and
`macmesh models rm` live here; the receiving side is node.models.copy.

Which files make a model: every file of an MLX dir (hidden names skipped:
`.cache/` of `hf download --local-dir`, editor files), or a GGUF file with the
other shards of a split model (`-00001-of-00003.gguf`). Paths in a manifest
are relative to the model's root (the dir, or the folder holding the GGUF),
and ReadModelFile serves only paths a manifest would list, so a peer can never
read outside a model.

SHA-256 is costly (about 1 GB/s per core), so digests are kept per (path,
size, mtime, inode) in `$MACMESH_HOME/file-hashes.json`: a lab that copies one
model to ten Macs hashes it once, even across restarts. Files of the Hugging
Face cache need no hashing at all: huggingface_hub names LFS blobs by their
SHA-256 (and the receiver checks every byte against it anyway).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import re
import shutil
import threading
import uuid
import zlib
from collections.abc import AsyncGenerator, Awaitable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol
from urllib.parse import quote

from mesh.errors import InvalidRequest, ModelLoadError, ModelNotFound
from mesh.types import ModelInfo
from node.config import NodeConfig
from node.models.catalog import Catalog
from node.models.entry import CatalogEntry
from node.models.scan import default_hf_cache
from node.models.transfers import Transfers
from proto import node_pb2 as pb

log = logging.getLogger(__name__)

# Bytes per FileChunk: big enough that per-message costs vanish, far under gRPC's
# 64 MiB message limit (mesh.client.MAX_MESSAGE_BYTES).
CHUNK_BYTES = 1 << 20
# Where digests are remembered, under the node's home.
HASHES_FILE = "file-hashes.json"
_HASHES_MAX = 20_000
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_SHARD = re.compile(r"^(?P<stem>.+)-(?P<n>\d{5})-of-(?P<of>\d{5})\.gguf$", re.IGNORECASE)
# Deleted models are renamed to a hidden name first (atomic: the catalog never sees
# half a model), then removed.
TRASH_PREFIX = ".macmesh-deleting-"
# Unfinished copies (node.models.copy) live under this hidden folder of their destination.
PARTIAL_DIR = ".macmesh-partial"


class NodeParts(Protocol):
    """What copy and rm need of a node (node.service.NodeCore has all of it)."""

    config: NodeConfig
    catalog: Catalog
    transfers: Transfers
    node_id: str
    draining: bool

    def loaded_models(self) -> list[ModelInfo]: ...

    def list_models(self) -> list[ModelInfo]: ...

    def unload(self, model_id: str, *, if_idle: bool = False) -> Awaitable[bool]: ...

    def notify(self) -> None: ...


@dataclass(frozen=True, slots=True)
class ModelFiles:
    """The files of one model, relative to `root`."""

    entry: CatalogEntry
    # dir: an MLX dir (root = the dir); file: GGUF file(s) (root = their folder)
    layout: str
    root: Path
    files: tuple[str, ...]
    # hf-cache models: repo id and snapshot revision
    repo: str = ""
    revision: str = ""


def _hidden(rel: Path) -> bool:
    return any(part.startswith(".") for part in rel.parts)


def _walk(root: Path) -> tuple[str, ...]:
    out: list[str] = []
    for folder, dirs, names in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in names:
            path = Path(folder) / name
            rel = path.relative_to(root)
            if not _hidden(rel) and path.is_file():
                out.append(rel.as_posix())
    return tuple(sorted(out))


def gguf_shards(path: Path) -> list[Path]:
    """`path` and, for the first shard of a split GGUF, the other shards that exist."""
    m = _SHARD.match(path.name)
    if m is None:
        return [path]
    width, total = len(m["n"]), int(m["of"])
    names = [f"{m['stem']}-{i:0{width}d}-of-{m['of']}.gguf" for i in range(1, total + 1)]
    return [path.parent / n for n in names if (path.parent / n).is_file()]


def model_files(entry: CatalogEntry) -> ModelFiles:
    """Which files make `entry` (blocking: lists folders)."""
    repo = revision = ""
    if entry.source == "hf-cache":
        snapshot = entry.path if entry.path.is_dir() else entry.path.parent
        revision = snapshot.name
        repo = snapshot.parent.parent.name.removeprefix("models--").replace("--", "/")
    if entry.path.is_dir():
        return ModelFiles(entry, "dir", entry.path, _walk(entry.path), repo, revision)
    files = tuple(p.name for p in gguf_shards(entry.path))
    return ModelFiles(entry, "file", entry.path.parent, files, repo, revision)


class HashCache:
    """SHA-256 of files, remembered per (path, size, mtime, inode) in a JSON file."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()

    def _load(self) -> dict[str, list[object]]:
        try:
            data = json.loads(self.path.read_text())
        except (OSError, ValueError):
            return {}
        return data if isinstance(data, dict) else {}

    def _save(self, data: dict[str, list[object]]) -> None:
        if len(data) > _HASHES_MAX:  # forget the oldest half (dicts keep insertion order)
            data = dict(list(data.items())[len(data) // 2 :])
        tmp = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            tmp.write_text(json.dumps(data))
            os.replace(tmp, self.path)
        except OSError as exc:  # a read-only home only costs rehashing next time
            log.warning("cannot save file digests to %s: %s", self.path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink()

    def sha256(self, file: Path) -> str:
        """The file's SHA-256 (hex), from the cache when the file has not changed."""
        real = file.resolve()
        if real.parent.name == "blobs" and _HEX64.match(real.name):
            return real.name  # a Hugging Face LFS blob is named by its SHA-256
        st = real.stat()
        stamp: list[object] = [st.st_size, st.st_mtime_ns, st.st_ino]
        with self._lock:
            known = self._load().get(str(real))
        if isinstance(known, list) and known[:3] == stamp and isinstance(known[3], str):
            return known[3]
        digest = file_sha256(real)
        with self._lock:
            data = self._load()
            data.pop(str(real), None)
            data[str(real)] = [*stamp, digest]
            self._save(data)
        return digest


def file_sha256(path: Path, upto: int | None = None) -> str:
    """SHA-256 of `path` (its first `upto` bytes), reading in big blocks."""
    return hash_prefix(path, hashlib.sha256(), upto).hexdigest()


def hash_prefix(path: Path, hasher: hashlib._Hash, upto: int | None = None) -> hashlib._Hash:
    """Feed `hasher` the first `upto` bytes of `path` (all of it when None)."""
    left = upto
    with path.open("rb", buffering=0) as f:
        while left is None or left > 0:
            block = f.read(8 * CHUNK_BYTES if left is None else min(left, 8 * CHUNK_BYTES))
            if not block:
                break
            hasher.update(block)
            if left is not None:
                left -= len(block)
    return hasher


async def _entry(catalog: Catalog, model: str) -> CatalogEntry:
    try:
        return catalog.get(model)
    except ModelNotFound:
        await catalog.refresh()
        return catalog.get(model)


def _manifest(files: ModelFiles, hashes: HashCache) -> pb.ModelManifestResponse:
    e = files.entry
    return pb.ModelManifestResponse(
        model=e.id,
        backend=e.backend,
        source=e.source,
        layout=files.layout,
        files=[
            pb.ModelFile(
                path=rel,
                size=(files.root / rel).stat().st_size,
                sha256=hashes.sha256(files.root / rel),
            )
            for rel in files.files
        ],
        repo=files.repo,
        revision=files.revision,
    )


async def model_manifest(catalog: Catalog, model: str, home: Path) -> pb.ModelManifestResponse:
    """The model's files with sizes and SHA-256 (hashing in a worker thread)."""
    entry = await _entry(catalog, model)
    files = await asyncio.to_thread(model_files, entry)
    try:
        return await asyncio.to_thread(_manifest, files, HashCache(home / HASHES_FILE))
    except OSError as exc:
        raise ModelLoadError(f"cannot read the files of {model!r}: {exc}") from None


def _read(fd: int, offset: int, size: int) -> tuple[bytes, int]:
    data = os.pread(fd, size, offset)
    return data, zlib.crc32(data)


async def read_model_file(
    catalog: Catalog, model: str, path: str, offset: int, chunk_bytes: int = CHUNK_BYTES
) -> AsyncGenerator[pb.FileChunk, None]:
    """One file of `model` from `offset`, in CRC-32-checked chunks.

    Reads run in worker threads, one chunk ahead of what is being sent.
    """
    entry = await _entry(catalog, model)
    files = await asyncio.to_thread(model_files, entry)
    if path not in files.files:
        raise InvalidRequest(f"{path!r} is not a file of model {model!r}", field="path")
    try:
        fd = await asyncio.to_thread(os.open, files.root / path, os.O_RDONLY)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {path} of {model!r}: {exc.strerror or exc}") from None
    pending: asyncio.Future[tuple[bytes, int]] | None = None
    try:
        pos = offset
        pending = asyncio.ensure_future(asyncio.to_thread(_read, fd, pos, chunk_bytes))
        while True:
            data, crc = await pending
            pending = None
            if not data:
                return
            nxt = pos + len(data)
            pending = asyncio.ensure_future(asyncio.to_thread(_read, fd, nxt, chunk_bytes))
            yield pb.FileChunk(data=data, offset=pos, crc32=crc)
            pos = nxt
    finally:
        if pending is not None:
            with contextlib.suppress(OSError, asyncio.CancelledError):
                await pending
        os.close(fd)


# ---------- where copies land ----------


def hub_dir(config: NodeConfig) -> Path:
    """This node's Hugging Face cache (where hf-cache models are copied to)."""
    return config.hf_cache_dir if config.hf_cache_dir is not None else default_hf_cache()


def staging_roots(config: NodeConfig) -> list[Path]:
    """Where copies land: the models dir, the Hugging Face cache."""
    return [config.resolved_models_dir, hub_dir(config)]


def staging_dir(root: Path, model: str) -> Path:
    """Where an unfinished copy of `model` into `root` lives (hidden from the catalog)."""
    return root / PARTIAL_DIR / quote(model, safe="")


async def remove_partial(node: NodeParts, model: str) -> str | None:
    """Delete an unfinished copy of `model`; where it was, None if there is none."""
    for root in staging_roots(node.config):
        staging = staging_dir(root, model)
        if node.transfers.running(str(staging)) is not None:
            raise InvalidRequest(f"a copy of {model!r} into this node is running; wait for it")
        if staging.exists():
            await asyncio.to_thread(shutil.rmtree, staging, True)
            return str(staging)
    return None


# ---------- rm ----------


def _size(path: Path) -> int:
    """Bytes a delete frees: regular files only (a symlink frees its link, not its target)."""
    if path.is_symlink():
        return 0
    if path.is_file():
        return path.stat().st_size
    total = 0
    for folder, _dirs, names in os.walk(path):
        for name in names:
            p = Path(folder) / name
            with contextlib.suppress(OSError):
                if not p.is_symlink():
                    total += p.stat().st_size
    return total


def _remove_tree(path: Path) -> int:
    """Rename `path` out of sight, then delete it; the bytes freed."""
    if path.is_symlink():
        path.unlink()
        return 0
    trash = path.parent / f"{TRASH_PREFIX}{uuid.uuid4().hex[:8]}"
    os.rename(path, trash)
    freed = _size(trash)
    shutil.rmtree(trash, ignore_errors=True)
    return freed


def _links_to(snapshots: Path, target: Path) -> Iterator[Path]:
    for folder, _dirs, names in os.walk(snapshots):
        for name in names:
            p = Path(folder) / name
            with contextlib.suppress(OSError):
                if p.is_symlink() and p.resolve() == target:
                    yield p


def _remove_hf_file(file: Path) -> int:
    """A GGUF in a Hugging Face snapshot: its link, its blob if no other snapshot
    uses it, and the whole repo once no snapshot holds a file."""
    snapshots = file.parent.parent
    repo = snapshots.parent
    freed = 0
    if file.is_symlink():
        blob = file.resolve()
        file.unlink()
        if blob.parent == repo / "blobs" and not any(_links_to(snapshots, blob)):
            freed += _size(blob)
            blob.unlink(missing_ok=True)
    else:
        freed += _size(file)
        file.unlink()
    if not any(p.is_file() for p in snapshots.rglob("*")):
        freed += _remove_tree(repo)
    return freed


def check_deletable(entry: CatalogEntry) -> None:
    """InvalidRequest for models whose files macmesh must not delete."""
    if entry.source == "config":
        raise InvalidRequest(
            f"model {entry.id!r} is {entry.path}, named by a config file; macmesh does not "
            "delete files a config names: edit the config, or delete the files yourself"
        )


def delete_files(files: ModelFiles) -> tuple[str, int]:
    """Delete the model's files (blocking); (what was deleted, bytes freed)."""
    e = files.entry
    check_deletable(e)
    if files.layout == "dir":
        if e.source == "hf-cache":
            repo = files.root.parent.parent
            return str(repo), _remove_tree(repo)
        return str(files.root), _remove_tree(files.root)
    freed = 0
    # Other shards first, the first shard (the model's id) last: never a listed half model.
    for name in reversed(files.files):
        path = files.root / name
        if e.source == "hf-cache":
            freed += _remove_hf_file(path)
        else:
            freed += _size(path)
            path.unlink()
    return str(e.path), freed


async def delete_model(node: NodeParts, model: str, *, force: bool) -> pb.DeleteModelResponse:
    """`macmesh models rm`: refused while loaded unless `force` (which unloads first).

    An unfinished copy of the model goes too: rm of a model that only exists
    half-copied (node.models.copy) cleans that up.
    """
    try:
        entry = await _entry(node.catalog, model)
    except ModelNotFound:
        if any(m.id == model for m in node.list_models()):
            raise InvalidRequest(
                f"model {model!r} is built into this node (not files on disk); nothing to delete"
            ) from None
        where = await remove_partial(node, model)
        if where is None:
            raise
        return pb.DeleteModelResponse(path=where)
    check_deletable(entry)
    loaded = any(m.id == model for m in node.loaded_models())
    if loaded and not force:
        raise ModelLoadError(f"model {model!r} is loaded; unload it first or use --force")
    files = await asyncio.to_thread(model_files, entry)
    if loaded:
        await node.unload(model)
    try:
        path, freed = await asyncio.to_thread(delete_files, files)
    except OSError as exc:
        raise ModelLoadError(f"cannot delete {entry.path}: {exc.strerror or exc}") from None
    await remove_partial(node, model)
    log.info("deleted model %s (%s, %.1f MB freed)", model, path, freed / 1e6)
    # Rescan now, so this node's next state (and coordinators) no longer lists it.
    await asyncio.to_thread(node.catalog.scan)
    node.notify()
    return pb.DeleteModelResponse(path=path, bytes_freed=freed, was_loaded=loaded)
