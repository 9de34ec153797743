"""`macmesh models copy`, receiving side: pull a model's files from another node.

A copy runs on the DESTINATION node, as a task on its event loop; file I/O,
CRC-32 and SHA-256 run in worker threads:

1. `start_copy` (CopyModel) checks what it can at once: the model is not here
   yet, the source answers and proves the mesh secret, it has the model, and
   the disk has room (less `min_free_disk_bytes`). Then it starts the job and
   returns its `Transfer`; a second request for the same model joins it.
2. The job fetches the source's manifest (files, sizes, SHA-256) and streams
   each file with ReadModelFile into a hidden staging dir on the destination
   filesystem, `<root>/.macmesh-partial/<model>/data/`: 1 MiB chunks, each
   checked against its CRC-32, written and hashed by a writer thread while the
   next chunks arrive (a bad chunk is fetched again from its offset, a few
   times), paced by a token bucket when a bandwidth cap is set.
3. Each file's SHA-256 must match the manifest. Only when every file matched
   is the model renamed into place (one `rename` for a dir), so the catalog
   never sees half a model.

Resume: the staging dir keeps the partial files and the manifest they belong
to (`copy.json`, with the source's address and the bandwidth cap). A node that
starts with unfinished copies starts them again itself (`resume_copies`), and
so does the next copy request of the model (after a failure, a restart, a
kill); either continues each file from its current size, re-hashing the
prefix it has; files whose manifest entry changed start over. A resumed file
whose final SHA-256 does not match (its prefix was damaged) is fetched once
more from the start; a mismatch on a fresh fetch fails the copy ("checksum
mismatch for FILE") and deletes that file. Staging dirs untouched for a week
are removed at the next copy; `macmesh models rm` removes one at once.

Where a copy lands (the model keeps its id): MLX dirs and GGUF files go to the
models dir; models of the Hugging Face cache go to this node's HF cache in the
same layout (`models--ORG--NAME/snapshots/REV/`, plain files, `refs/main`).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import os
import time
import zlib
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import BinaryIO

import grpc

from mesh.auth import channel_credentials
from mesh.client import NodeClient
from mesh.errors import (
    InvalidRequest,
    MeshError,
    ModelLoadError,
    ModelNotFound,
    Unauthenticated,
    Unavailable,
    from_code,
)
from mesh.types import ModelInfo, Transfer
from node.config import NodeConfig
from node.models.files import (
    PARTIAL_DIR,
    NodeParts,
    hash_prefix,
    hub_dir,
    staging_dir,
    staging_roots,
)
from node.models.staging import (
    STATE_FILE,
    CopyFailed,
    ManifestFile,
    Staging,
    check_room,
    safe_rel,
)
from node.models.transfers import TransferJob

log = logging.getLogger(__name__)

# A chunk failing its CRC-32 is fetched again from its offset this many times.
CRC_RETRIES = 3
# Chunks written/hashed by the writer thread while more arrive (memory: this many MiB).
WRITE_AHEAD = 4
# Files streamed at once (a model of many shards; gRPC multiplexes them on one link).
FILES_AT_ONCE = 2
# The checks CopyModel makes before it answers (a source that never answers).
PRECHECK_TIMEOUT = 15.0


class _Stopped(Exception):
    """This node is shutting down: the copy stops, its partial files stay for a resume."""


def _from_source(exc: MeshError, source: str) -> MeshError:
    """An error of a call to the source node, saying so (same class: same status code)."""
    if isinstance(exc, CopyFailed):
        return exc
    return from_code(exc.code, f"source node {source}: {exc.message}")


def credentials(config: NodeConfig) -> grpc.ChannelCredentials | None:
    """TLS for node-to-node calls, as coordinators dial nodes (mesh.auth)."""
    if config.tls_ca or config.tls_cert:
        return channel_credentials(config.tls_ca, config.tls_cert, config.tls_key)
    return None


def _client(config: NodeConfig, address: str, timeout: float | None = None) -> NodeClient:
    return NodeClient(
        address, timeout=timeout, secret=config.secret, credentials=credentials(config)
    )


async def start_copy(
    node: NodeParts, model: str, source_address: str, source_node_id: str, max_bps: int
) -> Transfer:
    """CopyModel: check, start (or join) the copy job, return its record at once."""
    config = node.config
    if not model:
        raise InvalidRequest("field required", field="model")
    if not source_address:
        raise InvalidRequest("field required", field="source_address")
    for root in staging_roots(config):
        job = node.transfers.running(str(staging_dir(root, model)))
        if job is not None:
            return job.record
    source = source_node_id or source_address
    if source_node_id == node.node_id:
        raise InvalidRequest(f"{source} is this node: copy from another node", field="from")
    here = next((m for m in node.list_models() if m.id == model), None)
    if here is not None:
        raise InvalidRequest(
            f"model {model!r} is already on node {node.node_id} ({here.path or 'built in'}); "
            "delete it there first with `macmesh models rm`"
        )
    info = await _source_model(config, model, source, source_address)
    root = config.resolved_models_dir
    if info.source == "hf-cache":
        if config.scan_hf_cache:
            root = hub_dir(config)
        elif info.backend != "gguf":
            raise InvalidRequest(
                f"model {model!r} comes from a Hugging Face cache, and node {node.node_id} does "
                "not serve its HF cache (--no-hf-cache): it could not keep its id here"
            )
    staging = Staging(root, config.resolved_models_dir, model)
    staged = await asyncio.to_thread(staging.staged_bytes)
    await asyncio.to_thread(
        check_room, config, root, max(info.size_bytes - staged, 0), f"{model!r} on {node.node_id}"
    )
    key = str(staging.dir)
    job = node.transfers.running(key)  # joined while we checked
    if job is not None:
        return job.record
    job = node.transfers.start("copy", model, f"node:{source}", key=key)
    copy = CopyJob(node, job, model, source, source_address, root, max_bps)
    job.task = asyncio.create_task(copy.run(), name=f"copy {model}")
    return job.record


async def resume_copies(node: NodeParts) -> int:
    """Start again every copy a stop interrupted, from its staging record (the source's
    address as last used); returns how many started. One that cannot start (the source
    is gone, the model got here meanwhile) is logged; its partial files stay for the
    next request, `macmesh models rm`, or the week-old cleanup."""
    started = 0
    for root in staging_roots(node.config):
        for state_file in sorted((root / PARTIAL_DIR).glob(f"*/{STATE_FILE}")):
            try:
                state = json.loads(state_file.read_text())
                model, address = str(state["model"]), str(state["address"])
                source, max_bps = str(state.get("source", "")), int(state.get("max_bps", 0))
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("copy: unreadable %s (%s); not resumed", state_file, exc)
                continue
            try:
                await start_copy(node, model, address, source, max_bps)
            except MeshError as exc:
                log.warning("copy: cannot resume %r from %s: %s", model, source, exc.message)
                continue
            log.info("copy: resuming %r from %s", model, source)
            started += 1
    return started


async def _source_model(config: NodeConfig, model: str, source: str, address: str) -> ModelInfo:
    try:
        async with _client(config, address, PRECHECK_TIMEOUT) as client:
            models = await client.list_models()
    except Unauthenticated as exc:
        raise Unauthenticated(f"source node {source} ({address}): {exc.message}") from None
    except MeshError as exc:
        raise Unavailable(f"cannot reach source node {source} ({address}): {exc.message}") from None
    info = next((m for m in models if m.id == model), None)
    if info is None:
        raise ModelNotFound(model, [m.id for m in models])
    if not info.path:
        raise InvalidRequest(f"model {model!r} is built into node {source}: it has no files")
    return info


class TokenBucket:
    """Bandwidth cap: `rate` bytes per second on average, bursts of a quarter second."""

    def __init__(self, rate: int) -> None:
        self.rate = rate
        self.capacity = max(rate / 4, 1.0)
        self.tokens = 0.0
        self.last = time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.tokens = min(self.capacity, self.tokens + (now - self.last) * self.rate) - n
        self.last = now
        if self.tokens < 0:
            await asyncio.sleep(-self.tokens / self.rate)


class _Writer:
    """Appends checked chunks to a partial file and its running SHA-256, in one worker
    thread (so in order). A chunk whose CRC-32 does not fit is not written, nor is
    anything after it: `bad_at` says where to fetch again from."""

    def __init__(self, f: BinaryIO, hasher: hashlib._Hash) -> None:
        self.f = f
        self.hasher = hasher
        self.bad_at: int | None = None
        self.pool = ThreadPoolExecutor(1, thread_name_prefix="copy-write")

    def _put(self, offset: int, data: bytes, crc: int) -> None:
        if self.bad_at is not None:
            return
        if zlib.crc32(data) != crc:
            self.bad_at = offset
            return
        self.f.write(data)
        self.hasher.update(data)

    def put(self, offset: int, data: bytes, crc: int) -> asyncio.Future[None]:
        return asyncio.get_running_loop().run_in_executor(self.pool, self._put, offset, data, crc)

    def _finish(self) -> None:
        self.f.flush()
        os.fsync(self.f.fileno())

    async def finish(self) -> None:
        """Flush to disk: a model is installed only once its bytes are durable."""
        await asyncio.get_running_loop().run_in_executor(self.pool, self._finish)

    def close(self) -> None:
        self.pool.submit(self.f.close)
        self.pool.shutdown(wait=True)


class CopyJob:
    """One copy into this node; `run` is its task."""

    def __init__(
        self,
        node: NodeParts,
        job: TransferJob,
        model: str,
        source: str,
        address: str,
        root: Path,
        max_bps: int,
    ) -> None:
        self.node = node
        self.job = job
        self.model = model
        self.source = source
        self.address = address
        self.root = root
        self.staging = Staging(root, node.config.resolved_models_dir, model)
        self.data = self.staging.data
        self.bucket = TokenBucket(max_bps)
        self.done = 0
        self.total = 0
        # Seconds per phase, for the node's log (where the time of a slow copy went).
        self.phases: dict[str, float] = {}

    async def run(self) -> None:
        """The copy, start to end; every outcome lands in the transfer record."""
        stopped = "this node shut down; copy again to resume where it stopped"
        try:
            path = await self._copy()
        except _Stopped:
            self.job.fail(stopped)
        except asyncio.CancelledError:
            self.job.fail(stopped)
            raise
        except MeshError as exc:
            self.job.fail(exc.message)
        except OSError as exc:
            self.job.fail(f"copy into {self.staging.dir}: {exc}")
        except Exception as exc:  # the task's last stop: never a job left "running"
            log.exception("copy of %s failed", self.model)
            self.job.fail(f"internal error: {exc!r}")
        else:
            self.job.done(str(path), self.model)
            log.info(
                "copied %s from %s to %s: %.1f MB in %s",
                self.model,
                self.source,
                path,
                self.total / 1e6,
                ", ".join(f"{k} {v:.2f}s" for k, v in self.phases.items()),
            )

    def _check(self) -> None:
        if self.node.draining:
            raise _Stopped

    async def _copy(self) -> Path:
        config = self.node.config
        t0 = time.perf_counter()
        async with _client(config, self.address) as client:
            try:
                manifest = await client.model_manifest(self.model)
            except MeshError as exc:
                raise _from_source(exc, self.source) from None
            files = [ManifestFile(safe_rel(f.path), f.size, f.sha256) for f in manifest.files]
            if not files:
                raise CopyFailed(f"source node {self.source} lists no files for {self.model!r}")
            record = {
                "source": self.source,
                "address": self.address,
                "max_bps": self.bucket.rate,
                "layout": manifest.layout,
                "repo": manifest.repo,
                "revision": manifest.revision,
            }
            have = await asyncio.to_thread(self.staging.prepare, record, files)
            self.total = sum(f.size for f in files)
            self.done = sum(have.values())
            await asyncio.to_thread(
                check_room, config, self.root, self.total - self.done, repr(self.model)
            )
            self.job.progress(self.done, self.total)
            t1 = time.perf_counter()
            self.phases["manifest"] = t1 - t0
            gate = asyncio.Semaphore(FILES_AT_ONCE)

            async def one(f: ManifestFile) -> None:
                async with gate:
                    await self._fetch(client, f, have.get(f.path, 0))

            try:  # the first failure cancels the other files' streams
                async with asyncio.TaskGroup() as group:
                    for f in files:
                        group.create_task(one(f))
            except ExceptionGroup as failed:
                raise failed.exceptions[0] from None
        t2 = time.perf_counter()
        self.phases["transfer"] = t2 - t1
        self._check()
        path = await asyncio.to_thread(
            self.staging.install, manifest.layout, manifest.repo, manifest.revision, files
        )
        await asyncio.to_thread(self.node.catalog.scan)
        self.phases["install"] = time.perf_counter() - t2
        if self.model not in self.node.catalog.entries():
            raise ModelLoadError(
                f"copied {self.model!r} to {path}, but this node does not list it "
                "(see the node's log for why)"
            )
        return path

    async def _fetch(self, client: NodeClient, f: ManifestFile, have: int) -> None:
        """One file into the staging dir, its SHA-256 checked (see the module docstring)."""
        part = self.data / f.path
        while True:
            self._check()
            hasher = hashlib.sha256()
            if have:
                await asyncio.to_thread(hash_prefix, part, hasher, have)
            await self._receive(client, f, part, have, hasher)
            got = hasher.hexdigest()
            if got == f.sha256:
                return
            await asyncio.to_thread(part.unlink)
            self.done -= f.size
            if not have:  # fetched whole and still wrong: the source's file is not its manifest
                self.job.progress(self.done)
                raise CopyFailed(
                    f"checksum mismatch for {f.path}: SHA-256 {got[:16]}..., the source's "
                    f"manifest says {f.sha256[:16]}... (its file changed or is corrupt); "
                    "nothing was installed"
                )
            log.warning(
                "copy of %s: %s resumed from %d bytes failed its SHA-256; fetching it whole",
                self.model,
                f.path,
                have,
            )
            have = 0
            self.job.progress(self.done)

    async def _receive(
        self, client: NodeClient, f: ManifestFile, part: Path, have: int, hasher: hashlib._Hash
    ) -> None:
        """Stream `f` from `have` on into `part`, feeding `hasher`."""
        part.parent.mkdir(parents=True, exist_ok=True)
        fh: BinaryIO = await asyncio.to_thread(part.open, "r+b" if have else "wb")
        fh.seek(have)
        fh.truncate()
        writer = _Writer(fh, hasher)
        pending: deque[asyncio.Future[None]] = deque()
        pos, bad = have, 0
        try:
            while pos < f.size:
                stream = client.read_model_file(self.model, f.path, pos)
                async with contextlib.aclosing(stream):
                    async for chunk in stream:
                        self._check()
                        if chunk.offset != pos:
                            raise CopyFailed(
                                f"source sent {f.path} at offset {chunk.offset}, expected {pos}"
                            )
                        data = chunk.data  # (a copy per access: once)
                        if len(data) > f.size - pos:  # the file grew at the source
                            data = data[: f.size - pos]
                        pending.append(writer.put(pos, data, chunk.crc32))
                        pos += len(data)
                        self.done += len(data)
                        self.job.progress(self.done, self.total)
                        if len(pending) > WRITE_AHEAD:
                            await pending.popleft()
                        if writer.bad_at is not None or pos >= f.size:
                            break
                        await self.bucket.take(len(data))
                while pending:
                    await pending.popleft()
                if writer.bad_at is not None:
                    bad += 1
                    if bad > CRC_RETRIES:
                        raise CopyFailed(
                            f"chunk at offset {writer.bad_at} of {f.path} failed its CRC-32 "
                            f"check {bad} times; the link corrupts data"
                        )
                    log.warning("bad chunk at %d of %s; fetching again", writer.bad_at, f.path)
                    self.done -= pos - writer.bad_at
                    pos, writer.bad_at = writer.bad_at, None
                elif pos < f.size:
                    raise CopyFailed(
                        f"{f.path} on source node {self.source} ended at {pos} bytes; "
                        f"its manifest says {f.size} (did it change while copying?)"
                    )
            await writer.finish()
        except MeshError as exc:
            raise _from_source(exc, self.source) from None
        finally:
            for fut in pending:  # queued writes end before the file closes
                with contextlib.suppress(OSError):
                    await fut
            writer.close()
