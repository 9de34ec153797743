"""The node's core: catalog + backends + live state, independent of gRPC."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import socket
import time
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

import psutil
from prometheus_client import CollectorRegistry

from mesh.audio import AudioChunk, SpeakRequest, TranscribeRequest, Transcription
from mesh.errors import InvalidRequest, ModelLoadError, ModelNotFound, Overloaded, Unavailable
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    GenerateEvent,
    GenerateRequest,
    Memory,
    ModelInfo,
    ModelLoad,
    NodeState,
    RenderedPrompt,
    Started,
    Transfer,
)
from mesh.version import __version__
from node.backends.base import Backend, BackendContext
from node.backends.group import GroupBackend
from node.backends.registry import FACTORIES
from node.backends.speech import SpeechBackend
from node.config import NodeConfig
from node.metrics import NodeMetrics, RequestMetrics
from node.models.catalog import Catalog
from node.models.copy import resume_copies, start_copy
from node.models.files import delete_model, model_manifest, read_model_file
from node.models.named import NamedPaths
from node.models.transfers import Transfers
from proto import node_pb2 as pb

log = logging.getLogger(__name__)

B = TypeVar("B")

# How long an unload waits for the model's requests in flight before it unloads anyway.
UNLOAD_GRACE = 120.0


def load_or_create_node_id(home: Path) -> str:
    """A node id that survives restarts: kept in `$MACMESH_HOME/node_id`."""
    path = home / "node_id"
    try:
        existing = path.read_text().strip()
    except FileNotFoundError:
        existing = ""
    if existing:
        return existing
    host = socket.gethostname().split(".")[0].lower() or "node"
    node_id = f"{host}-{uuid.uuid4().hex[:8]}"
    home.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(node_id + "\n")
    os.replace(tmp, path)
    return node_id


def framework_memory() -> int:
    """Bytes MLX holds now (0 when MLX is unavailable)."""
    try:
        import mlx.core as mx
    except ImportError:
        return 0
    return int(mx.get_active_memory())


class NodeCore:
    """What the gRPC servicer calls; owns the backends and the node's state."""

    def __init__(self, config: NodeConfig, *, metrics: NodeMetrics | None = None) -> None:
        """`metrics` None: record into a registry of its own (nobody scrapes it)."""
        self.config = config
        self.node_id = load_or_create_node_id(config.home)
        self.metrics = NodeMetrics(CollectorRegistry()) if metrics is None else metrics
        # Reported in the state so coordinators can list it for Prometheus (0 = none).
        self.metrics_port = 0
        # Model id -> seconds its latest load took (`macmesh_model_load_seconds`).
        self.load_seconds: dict[str, float] = {}
        # Model paths that config files name: this home's and each coordinator's.
        self.named_paths = NamedPaths(config.home)
        self.catalog = Catalog(
            config.resolved_models_dir,
            hf_cache=config.scan_hf_cache,
            hf_cache_dir=config.hf_cache_dir,
            gguf_dirs=self._model_dirs,
            named_paths=self.named_paths,
        )
        self.draining = False
        self._sequence = 0
        self._changed = asyncio.Event()
        # Downloads and copies into this node (node.models.pull / node.models.copy).
        self.transfers = Transfers(self.notify)
        # Per model: requests in flight here, and when one last ran (monotonic), for
        # idle TTLs and LRU eviction; models being unloaded refuse new requests.
        self._active: dict[str, int] = {}
        self._last_used: dict[str, float] = {}
        self._unloading: set[str] = set()
        self._resuming: asyncio.Task[int] | None = None
        context = BackendContext(config, self.catalog, self.notify)
        # In lookup order (node.backends.registry); each backend's `name` is the
        # catalog's `backend` value for the models it serves.
        self.backends: list[Backend] = [b for make in FACTORIES if (b := make(context)) is not None]
        for backend in self.backends:  # built-in models (simulated ones) load in no time
            self.load_seconds.update(dict.fromkeys(backend.loaded(), 0.0))

    def backend(self, kind: type[B]) -> B:
        """This node's backend of class `kind` (typed, for tests and tools); KeyError if none."""
        for b in self.backends:
            if isinstance(b, kind):
                return b
        raise KeyError(f"no {kind.__name__} on this node")

    def _model_dirs(self) -> tuple[Path, ...]:
        # Called by the catalog's watcher before and after the backends exist.
        return tuple(d for b in getattr(self, "backends", ()) for d in b.model_dirs())

    async def start(self) -> None:
        """Scan the catalog once (in a thread), then keep it current from its watcher.

        After this the first state a coordinator sees lists every model on disk.
        """
        loop = asyncio.get_running_loop()
        self.transfers.attach(loop)
        await asyncio.to_thread(self.catalog.scan)

        def changed() -> None:  # on the watcher thread
            with contextlib.suppress(RuntimeError):  # the loop closed under us
                loop.call_soon_threadsafe(self.notify)

        self.catalog.start(changed)
        # Copies a stop interrupted go on by themselves (their sources may take a while).
        self._resuming = asyncio.create_task(resume_copies(self), name="resume copies")

    def push_model_paths(self, paths: Sequence[str]) -> int:
        """A coordinator's config paths, served where they exist; token for withdrawal."""
        token = self.named_paths.push(paths)
        if paths:
            self.catalog.wake()
        return token

    def withdraw_model_paths(self, token: int) -> None:
        self.named_paths.withdraw(token)
        self.catalog.wake()

    # ---------- state ----------

    def notify(self) -> None:
        """Wake state watchers: something coordinators care about changed."""
        # A fresh Event per change, so every watcher sees every change.
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    def change_event(self) -> asyncio.Event:
        """Set at the next change; take it before reading a snapshot."""
        return self._changed

    def memory(self) -> Memory:
        """The machine's memory now, and what MLX holds."""
        vm = psutil.virtual_memory()
        return Memory(
            total_bytes=vm.total,
            used_bytes=vm.total - vm.available,
            available_bytes=vm.available,
            framework_bytes=framework_memory(),
            budget_bytes=self.config.memory_budget or 0,
        )

    def load_stats(self) -> list[ModelLoad]:
        """Queue depth and measured speeds of every loaded model."""
        return [x for b in self.backends for x in b.load_stats()]

    def loaded_models(self) -> list[ModelInfo]:
        """The models loaded now (no catalog scan)."""
        return [info for b in self.backends for info in b.loaded().values()]

    def snapshot(self) -> NodeState:
        self._sequence += 1
        return NodeState(
            node_id=self.node_id,
            version=__version__,
            sequence=self._sequence,
            timestamp=time.time(),
            models=tuple(self.list_models()),
            memory=self.memory(),
            load=tuple(self.load_stats()),
            running=sum(b.running for b in self.backends),
            waiting=sum(b.waiting for b in self.backends),
            draining=self.draining,
            cache=tuple(c for b in self.backends for c in b.cache_state()),
            metrics_port=self.metrics_port,
            transfers=self.transfers.snapshot(),
            groups=tuple(self.groups.ranks()),
        )

    # ---------- models ----------

    def list_models(self) -> list[ModelInfo]:
        """Every model on disk (as of the catalog's last scan) and every loaded one."""
        loaded: dict[str, ModelInfo] = {}
        for b in reversed(self.backends):  # earlier backends win a shared name
            loaded.update(b.loaded())
        seen = set(loaded) | set(self.catalog.entries())
        out: list[ModelInfo] = []
        for mid, entry in sorted(self.catalog.entries().items()):
            info = loaded.pop(mid, None)
            out.append(
                info
                if info is not None
                else ModelInfo(
                    id=mid,
                    backend=entry.backend,
                    source=entry.source,
                    path=str(entry.path),
                    size_bytes=entry.size_bytes,
                    context_length=entry.context_length,
                    quantization=entry.quantization,
                    estimated_bytes=entry.estimated_bytes,
                    kv_bytes_per_token=entry.kv_bytes_per_token,
                )
            )
        out.extend(loaded.values())  # loaded from outside the catalog (built in, by path)
        for b in self.backends:  # served outside the catalog, not loaded now
            out.extend(i for mid, i in sorted(b.available().items()) if mid not in seen)
        return [self._with_idle(i) if i.loaded else i for i in out]

    def _with_idle(self, info: ModelInfo) -> ModelInfo:
        if self._active.get(info.id):
            return info
        last = self._last_used.setdefault(info.id, time.monotonic())
        return replace(info, idle_seconds=round(time.monotonic() - last, 3))

    def resident_bytes(self) -> dict[str, int]:
        """What each loaded model and group rank takes, by the memory model (measured where
        smaller)."""
        out = {
            i.id: i.estimated_bytes or i.memory_bytes or i.size_bytes
            for i in self.loaded_models()
            if i.backend != GroupBackend.name  # counted as its rank's share below
        }
        out.update(self.groups.shares())
        return out

    @property
    def groups(self) -> GroupBackend:
        """This node's group ranks (node.backends.group)."""
        return self.backend(GroupBackend)

    def check_group_room(self, name: str, need: int) -> None:
        """Refuse a group rank past `--memory-budget` (Overloaded, naming what is held)."""
        resident = self.resident_bytes()
        resident.pop(f"group:{name}", None)  # a down rank of the same group is replaced
        self._refuse_past_budget(f"group {name!r} needs about", need, resident)

    def _check_room(self, backend: Backend, model_id: str) -> None:
        """Refuse a load past `--memory-budget` (Overloaded: a coordinator tries elsewhere)."""
        if not self.config.memory_budget or model_id in backend.loaded():
            return
        info = next((m for m in self.list_models() if m.id == model_id), None)
        need = (info.estimated_bytes or info.size_bytes) if info is not None else 0
        self._refuse_past_budget(f"model {model_id!r} needs about", need, self.resident_bytes())

    def _refuse_past_budget(self, what: str, need: int, resident: dict[str, int]) -> None:
        """Overloaded when `need` more bytes would take `resident` past the budget; the
        message is `what` (e.g. "model 'x' needs about") with the sizes and what is held."""
        budget = self.config.memory_budget
        used = sum(resident.values())
        if budget and need and used + need > budget:
            held = ", ".join(f"{m} {b / 2**30:.2f} GiB" for m, b in sorted(resident.items()))
            raise Overloaded(
                f"{what} {need / 2**30:.2f} GiB, but this node's memory budget is "
                f"{budget / 2**30:.2f} GiB with {used / 2**30:.2f} GiB in use"
                + (f" ({held})" if held else "")
            )

    async def _backend(self, model_id: str) -> Backend:
        """The backend for `model_id`; a model the last scan missed gets one rescan.

        A model not loaded must fit the memory budget (it loads on first use).
        """
        try:
            backend = self._backend_for(model_id)
        except ModelNotFound:
            await self.catalog.refresh()
            backend = self._backend_for(model_id)
        self._check_room(backend, model_id)
        return backend

    def _backend_for(self, model_id: str) -> Backend:
        # Loaded and built-in models skip the catalog: no lookup on the request path.
        for b in self.backends:
            if b.claims(model_id):
                return b
        entry = self.catalog.get(model_id)
        for b in self.backends:
            if b.name == entry.backend:
                return b
        raise ModelLoadError(f"no backend on this node serves {entry.backend} models")

    async def load(self, model_id: str) -> tuple[ModelInfo, float]:
        backend = await self._backend(model_id)
        was_loaded = model_id in backend.loaded()
        info, seconds = await backend.load(model_id)
        if not was_loaded:
            self.load_seconds[info.id] = seconds
            self._last_used[info.id] = time.monotonic()
        self.notify()
        return info, seconds

    async def unload(self, model_id: str, *, if_idle: bool = False) -> bool:
        """Unload `model_id`.

        `if_idle`: refuse (ModelLoadError) while a request for it runs or waits here,
        as evictions and idle TTLs need. Otherwise new requests for it are refused
        (Unavailable: coordinators retry on another node) while those in flight
        finish, for up to UNLOAD_GRACE seconds; then it unloads.
        """
        backend = self._backend_for(model_id)
        busy = self._active.get(model_id, 0)
        if if_idle and busy:
            raise ModelLoadError(
                f"model {model_id!r} has {busy} request(s) in flight here; not unloaded"
            )
        self._unloading.add(model_id)
        self.notify()
        try:
            deadline = time.monotonic() + UNLOAD_GRACE
            while self._active.get(model_id, 0) and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            was = await backend.unload(model_id)
        finally:
            self._unloading.discard(model_id)
        if was:
            self.load_seconds.pop(model_id, None)
            self._last_used.pop(model_id, None)
            log.info("unloaded %s", model_id)
        self.notify()
        return was

    # ---------- model files ----------

    async def pull(self, repo: str, file: str, revision: str) -> Transfer:
        """Start downloading a Hub repo (or one file) into the HF cache (node.models.pull)."""
        from node.models.pull import start_pull

        return start_pull(
            self.transfers, self.catalog, self.config.hf_cache_dir, repo, file, revision
        )

    async def copy(
        self, model: str, source_address: str, source_node_id: str, max_bytes_per_second: int
    ) -> Transfer:
        """Start copying `model` from another node onto this one (node.models.copy)."""
        return await start_copy(self, model, source_address, source_node_id, max_bytes_per_second)

    async def delete(self, model: str, *, force: bool) -> pb.DeleteModelResponse:
        """Delete a model's files (refused while loaded unless `force`)."""
        return await delete_model(self, model, force=force)

    async def manifest(self, model: str) -> pb.ModelManifestResponse:
        """The model's files with sizes and SHA-256 (a copy's source side)."""
        return await model_manifest(self.catalog, model, self.config.home)

    def read_file(self, model: str, path: str, offset: int) -> AsyncGenerator[pb.FileChunk, None]:
        """One file of a model from `offset`, in checksummed chunks (a copy's source side)."""
        return read_model_file(self.catalog, model, path, offset)

    async def render(self, model_id: str, chat: ChatPrompt, include_text: bool) -> RenderedPrompt:
        backend = await self._backend(model_id)
        return await backend.render(model_id, chat, include_text)

    async def tokenize(self, model_id: str, text: str, add_special_tokens: bool) -> list[int]:
        backend = await self._backend(model_id)
        return await backend.tokenize(model_id, text, add_special_tokens)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        """The backend's stream, with state notifications at start and end, and metrics."""
        arrived = time.perf_counter()
        if self.draining:
            raise Unavailable("the node is shutting down")
        model = request.model
        if model in self._unloading:
            raise Unavailable(f"model {model!r} is being unloaded on this node")
        self._active[model] = self._active.get(model, 0) + 1
        self._last_used[model] = time.monotonic()
        try:
            backend = await self._backend(model)
        except BaseException:
            self._release(model)
            raise
        stream = backend.generate(request)
        rec: RequestMetrics | None = None
        try:
            async for event in stream:
                if isinstance(event, Started | Finish):
                    self.notify()
                    if isinstance(event, Started):
                        rec = self._accepted(event, arrived)
                    elif rec is not None:
                        rec.finish = event
                elif rec is not None and not isinstance(event, ErrorEvent):
                    rec.output()
                yield event
        finally:
            await stream.aclose()
            self._release(model)
            # After the last event went out: observing costs the caller nothing.
            if rec is not None:
                rec.close()

    # ---------- voice (node.backends.speech) ----------

    async def _speech(self, model: str) -> SpeechBackend:
        if self.draining:
            raise Unavailable("the node is shutting down")
        backend = await self._backend(model)
        if not isinstance(backend, SpeechBackend):
            raise InvalidRequest(
                f"model {model!r} is a chat model, not a speech model: use a speech-to-text "
                "model with /v1/audio/transcriptions and a text-to-speech one with "
                "/v1/audio/speech",
                field="model",
            )
        return backend

    async def transcribe(self, request: TranscribeRequest) -> Transcription:
        backend = await self._speech(request.model)
        self._active[request.model] = self._active.get(request.model, 0) + 1
        self.notify()
        try:
            return await backend.transcribe(request)
        finally:
            self._release(request.model)

    async def speak(self, request: SpeakRequest) -> AsyncGenerator[AudioChunk, None]:
        """Speech chunks; errors before the first chunk raise `MeshError`."""
        backend = await self._speech(request.model)
        backend.check_speak(request)
        self._active[request.model] = self._active.get(request.model, 0) + 1
        self.notify()
        stream = backend.speak(request)
        try:
            async for chunk in stream:
                yield chunk
        finally:
            await stream.aclose()
            self._release(request.model)

    def _release(self, model: str) -> None:
        self._active[model] -= 1
        if not self._active[model]:
            del self._active[model]
        self._last_used[model] = time.monotonic()
        self.notify()  # idle now: placement may evict it, TTLs start counting

    def _accepted(self, started: Started, arrived: float) -> RequestMetrics:
        """A request the backend took: its metrics, bound to the model's real id."""
        if started.model not in self.load_seconds:
            # Loaded by this request (Generate loads on first use): arrival to queued.
            self.load_seconds[started.model] = time.perf_counter() - arrived
        rec = self.metrics.request(started.model, arrived)
        rec.prompt_tokens = started.prompt_tokens
        return rec

    async def preload(self) -> None:
        for model_id in self.config.preload:
            info, seconds = await self.load(model_id)
            log.info("preloaded %s (%.1f MB) in %.2fs", info.id, info.memory_bytes / 1e6, seconds)

    async def close(self, grace: float) -> None:
        """Drain: refuse new requests, give in-flight ones `grace` s, free models."""
        self.draining = True
        self.notify()
        if self._resuming is not None:
            self._resuming.cancel()
        await asyncio.gather(*(b.close(grace) for b in self.backends))
        await asyncio.to_thread(self.catalog.stop)
