"""MLX backend: models loaded with mlx-lm, driven by the engine thread
(node.backends.mlx_engine: continuous batching per model).

Each model has a prompt cache (`node.cache`, tuned by `MLX_CACHE_*` read at
construction); `cache_state` reports its block hashes for coordinators.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncGenerator, Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from mesh.errors import (
    InvalidRequest,
    ModelLoadError,
    ModelNotFound,
    Unavailable,
)
from mesh.types import (
    CachedPrefix,
    ChatPrompt,
    Finish,
    GenerateEvent,
    GenerateRequest,
    ModelInfo,
    ModelLoad,
    RenderedPrompt,
    Started,
    Tool,
)
from node.backends.base import BackendContext
from node.backends.chat_template import template_supports_tools
from node.backends.common import check_prompt, drain, request_id, room
from node.backends.mlx_draft import check_draft_tokenizer, check_speculative_cache
from node.backends.mlx_engine import Engine
from node.backends.mlx_job import GenJob
from node.backends.mlx_prompt import parser_config, prompt_ids, render_chat
from node.backends.outparse import ParserConfig
from node.backends.stats import ModelStats
from node.cache import CacheConfig, PromptCaches
from node.config import DEFAULT_NUM_DRAFT_TOKENS, DEFAULT_PREFILL_CHUNK, SamplingDefaults
from node.models.catalog import Catalog, CatalogEntry
from node.models.memory import estimate_error
from node.sampling import resolve_sampling

log = logging.getLogger(__name__)


@dataclass
class LoadedModel:
    """A model in memory with what rendering and parsing need to know about it."""

    entry: CatalogEntry
    model: Any
    tokenizer: Any
    context_length: int
    memory_bytes: int
    native_tools: bool
    stats: ModelStats

    def info(self) -> ModelInfo:
        tok = self.tokenizer
        return ModelInfo(
            id=self.entry.id,
            backend="mlx",
            source=self.entry.source,
            path=str(self.entry.path),
            loaded=True,
            size_bytes=self.entry.size_bytes,
            context_length=self.context_length,
            quantization=self.entry.quantization,
            supports_tools=True,
            supports_thinking=bool(tok.has_thinking),
            memory_bytes=self.memory_bytes,
            estimated_bytes=self.entry.estimated_bytes,
            kv_bytes_per_token=self.entry.kv_bytes_per_token,
            # What a load measures is the weights: against their size on disk.
            estimate_error=estimate_error(self.memory_bytes, self.entry.size_bytes),
        )


def _out_of_memory(entry: CatalogEntry, exc: BaseException) -> ModelLoadError:
    """What a load that ran out of memory reports; what it allocated is freed first, so the
    node keeps serving its other models."""
    _unload_on_engine()
    return ModelLoadError(
        f"out of memory loading {entry.id!r} (estimated {entry.estimated_bytes / 2**30:.2f} GiB "
        f"resident): {exc}; unload a model or set --memory-budget so placement avoids this node"
    )


def _load_on_engine(entry: CatalogEntry) -> LoadedModel:
    """mlx_lm.load plus what we derive from it; runs on the engine thread."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm import load

    try:
        loaded: Any = load(str(entry.path), return_config=True)
        model, tokenizer, config = loaded
        # Materialized here, so running out of memory shows now, not in a first request.
        mx.eval(model.parameters())
    except MemoryError as exc:
        raise _out_of_memory(entry, exc) from exc
    except (OSError, ValueError, KeyError, RuntimeError) as exc:
        if "memory" in str(exc).lower() or "bad_alloc" in str(exc):
            # Metal: "Insufficient Memory"; CPU: std::bad_alloc surfaces as RuntimeError.
            raise _out_of_memory(entry, exc) from exc
        raise ModelLoadError(f"cannot load {entry.id!r} from {entry.path}: {exc}") from exc
    params: list[tuple[str, Any]] = tree_flatten(model.parameters())  # type: ignore[assignment]
    memory = sum(int(v.nbytes) for _, v in params)
    context = entry.context_length or int(getattr(tokenizer, "model_max_length", 0) or 0)
    if not context or context > 10_000_000:
        context = int(config.get("max_position_embeddings", 4096))
    return LoadedModel(
        entry=entry,
        model=model,
        tokenizer=tokenizer,
        context_length=context,
        memory_bytes=memory,
        native_tools=template_supports_tools(getattr(tokenizer, "chat_template", None)),
        stats=ModelStats(),
    )


def _unload_on_engine() -> None:
    import gc

    import mlx.core as mx

    gc.collect()
    mx.clear_cache()


class MLXBackend:
    """Serves the catalog's MLX models; one engine thread owns all of them."""

    name = "mlx"

    def __init__(
        self,
        catalog: Catalog,
        *,
        defaults: SamplingDefaults,
        max_running: int = 4,
        max_waiting: int = 256,
        batching: bool = True,
        prefill_chunk: int = DEFAULT_PREFILL_CHUNK,
        kv_budget: int | None = None,
        num_draft_tokens: int = DEFAULT_NUM_DRAFT_TOKENS,
        cache_config: CacheConfig | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`cache_config` None: the defaults; `on_change` is called on the event loop
        when what `cache_state` reports changed."""
        self.catalog = catalog
        self.defaults = defaults
        # Speculative decoding: tokens a draft proposes per round.
        if num_draft_tokens < 1:
            raise ValueError(f"num_draft_tokens must be >= 1, got {num_draft_tokens}")
        self.num_draft_tokens = num_draft_tokens
        self._on_change = on_change
        # The loop generations run on: cache changes (engine thread) are posted to it.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._caches = PromptCaches(
            cache_config if cache_config is not None else CacheConfig(),
            on_change=self._cache_changed,
        )
        self._engine = Engine(
            max_running=max_running,
            max_waiting=max_waiting,
            caches=self._caches,
            batching=batching,
            prefill_chunk=prefill_chunk,
            kv_budget=kv_budget,
        )
        self._models: dict[str, LoadedModel] = {}
        self._loading: dict[str, asyncio.Future[Any]] = {}
        # (target, draft) pairs already checked compatible; dropped on unload.
        self._draft_ok: set[tuple[str, str]] = set()
        self._closing = False

    # ---------- models ----------

    def claims(self, model_id: str) -> bool:
        return model_id in self._models

    def model_dirs(self) -> tuple[Path, ...]:
        return ()  # MLX models are found in the models dir and the HF cache

    def available(self) -> dict[str, ModelInfo]:
        return {}  # everything it serves unloaded is in the catalog

    def loaded(self) -> dict[str, ModelInfo]:
        return {mid: m.info() for mid, m in self._models.items()}

    async def load(self, model_id: str) -> tuple[ModelInfo, float]:
        """Load a model once; concurrent callers share the same load."""
        if self._closing:
            raise Unavailable("the node is shutting down")
        if model_id in self._models:
            return self._models[model_id].info(), 0.0
        entry = self.catalog.get(model_id)  # the published snapshot: no I/O, no await
        if entry.backend != "mlx":
            raise ModelLoadError(f"model {model_id!r} is not an MLX model ({entry.backend})")
        fut = self._loading.get(model_id)
        t0 = time.perf_counter()
        if fut is None:
            log.info("loading %s from %s", model_id, entry.path)
            fut = self._engine.call(lambda: _load_on_engine(entry))
            self._loading[model_id] = fut
            try:
                lm: LoadedModel = await asyncio.shield(fut)
            finally:
                self._loading.pop(model_id, None)
            self._models[model_id] = lm
            log.info(
                "loaded %s in %.2fs: weights %.1f MiB, %+.1f%% against the estimate",
                model_id,
                time.perf_counter() - t0,
                lm.memory_bytes / (1 << 20),
                estimate_error(lm.memory_bytes, entry.size_bytes) * 100,
            )
        else:
            lm = await asyncio.shield(fut)
        return lm.info(), time.perf_counter() - t0

    async def unload(self, model_id: str) -> bool:
        lm = self._models.pop(model_id, None)
        if lm is None:
            return False
        self._draft_ok = {pair for pair in self._draft_ok if model_id not in pair}
        del lm

        def unload() -> None:
            self._engine.drop_model(model_id)  # its batch goes once its requests end
            self._caches.drop_model(model_id)  # its KV arrays, before the memory is freed
            _unload_on_engine()

        await self._engine.call(unload)
        return True

    async def _model(self, model_id: str) -> LoadedModel:
        lm = self._models.get(model_id)
        if lm is None:
            await self.load(model_id)
            lm = self._models.get(model_id)
            if lm is None:  # unloaded in between
                raise ModelNotFound(model_id, self.catalog.entries())
        return lm

    async def _draft(self, lm: LoadedModel, draft_id: str) -> LoadedModel:
        """The draft model for target `lm`, loaded and checked compatible.

        Loaded like any model (it stays loaded and is listed); an unknown id is
        ModelNotFound, a non-MLX or incompatible one InvalidRequest.
        """
        if draft_id not in self._models:
            entry = self.catalog.get(draft_id)
            if entry.backend != "mlx":
                raise InvalidRequest(
                    f"draft model {draft_id!r} is a {entry.backend} model; "
                    f"the MLX model {lm.entry.id!r} needs an MLX draft",
                    field="draft_model",
                )
        draft = await self._model(draft_id)
        pair = (lm.entry.id, draft.entry.id)
        if pair not in self._draft_ok:

            def check() -> None:
                check_speculative_cache(lm.entry.id, lm.model, "target")
                if draft is not lm:
                    check_speculative_cache(draft.entry.id, draft.model, "draft")
                check_draft_tokenizer(lm.entry.id, lm.tokenizer, draft.entry.id, draft.tokenizer)

            await self._engine.call(check)
            self._draft_ok.add(pair)
        return draft

    # ---------- prompts ----------

    def _render_sync(self, lm: LoadedModel, chat: ChatPrompt) -> list[int]:
        return render_chat(lm.tokenizer, lm.entry.id, lm.native_tools, chat)

    async def render(
        self, model_id: str, chat: ChatPrompt, include_text: bool = False
    ) -> RenderedPrompt:
        lm = await self._model(model_id)
        ids = await asyncio.to_thread(self._render_sync, lm, chat)
        text = lm.tokenizer.decode(ids) if include_text else ""
        return RenderedPrompt(token_ids=tuple(ids), context_length=lm.context_length, text=text)

    async def tokenize(self, model_id: str, text: str, add_special_tokens: bool) -> list[int]:
        lm = await self._model(model_id)
        return list(lm.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    def _parser_config(
        self, lm: LoadedModel, prompt_ids: list[int], tools: tuple[Tool, ...], stop: tuple[str, ...]
    ) -> ParserConfig:
        return parser_config(lm.tokenizer, lm.native_tools, prompt_ids, tools, stop)

    # ---------- prompt cache ----------

    @property
    def caches(self) -> PromptCaches:
        """The prompt caches (engine-thread state; `state()` is safe anywhere)."""
        return self._caches

    def cache_state(self) -> list[CachedPrefix]:
        """Per loaded model, the block hashes its prompt cache holds (cheap: precomputed)."""
        held = self._caches.state()
        size = self._caches.config.block_size
        return [CachedPrefix(mid, size, held.get(mid, ())) for mid in self._models]

    def _cache_changed(self) -> None:
        """Engine thread: the cache's hashes changed; tell the event loop's listener."""
        loop, notify = self._loop, self._on_change
        if loop is None or notify is None:
            return
        with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening
            loop.call_soon_threadsafe(notify)

    # ---------- generation ----------

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        """Validate, render, queue, then stream events until Finish."""
        if self._closing:
            raise Unavailable("the node is shutting down")
        sampling = resolve_sampling(request.sampling, self.defaults)
        lm = await self._model(request.model)
        draft = await self._draft(lm, request.draft_model) if request.draft_model else None
        ids = await prompt_ids(lm.tokenizer, lm.entry.id, lm.native_tools, request.prompt)
        check_prompt(ids, lm.context_length)
        sampling = replace(sampling, max_tokens=room(sampling.max_tokens, ids, lm.context_length))
        rid = request_id(request)
        self._loop = asyncio.get_running_loop()
        hashes: list[int] | None = None
        predicted = 0
        if draft is None and self._caches.config.enabled:
            # Hashed once here; the engine's cache lookup reuses them.
            hashes = self._caches.hashes(lm.entry.id, ids)
            predicted = self._caches.predict(lm.entry.id, ids, hashes)
        job = GenJob(
            request_id=rid,
            model_id=lm.entry.id,
            model=lm.model,
            tokenizer=lm.tokenizer,
            prompt_ids=ids,
            sampling=sampling,
            parser_config=self._parser_config(lm, ids, request.all_tools, sampling.stop),
            stats=lm.stats,
            loop=asyncio.get_running_loop(),
            draft_model=draft.model if draft is not None else None,
            draft_model_id=draft.entry.id if draft is not None else "",
            num_draft_tokens=self.num_draft_tokens if draft is not None else 0,
            prompt_hashes=hashes,
            predicted_cached=predicted,
        )
        position = self._engine.submit(job)
        try:
            yield Started(
                request_id=rid,
                model=lm.entry.id,
                prompt_tokens=len(ids),
                queue_position=position,
            )
            while True:
                event = await job.events.get()
                yield event
                if isinstance(event, Finish):
                    return
        finally:
            # Consumer gone (cancelled, disconnected, or done): stop the engine work.
            if not job.finished:
                job.cancelled = True

    def load_stats(self) -> list[ModelLoad]:
        return [lm.stats.to_load(mid) for mid, lm in self._models.items()]

    @property
    def running(self) -> int:
        return self._engine.running

    @property
    def tokens_generated(self) -> int:
        """Tokens decoded since start, over all requests."""
        return self._engine.tokens_generated

    @property
    def waiting(self) -> int:
        return self._engine.waiting

    def batch_sizes(self) -> dict[str, tuple[int, int]]:
        """Per model batched so far: (requests in its batch now, the most it has held)."""
        return self._engine.batch_sizes()

    async def close(self, grace: float) -> None:
        """Refuse new work, let in-flight streams finish for `grace` s, then cancel."""
        self._closing = True
        await drain(lambda: self._engine.running + self._engine.waiting, grace)
        await asyncio.to_thread(self._engine.stop)
        self._models.clear()


def create(ctx: BackendContext) -> MLXBackend:
    """The node's MLX backend (every node has one; it loads models on demand)."""
    c = ctx.config
    return MLXBackend(
        ctx.catalog,
        defaults=c.sampling,
        max_running=c.max_running,
        max_waiting=c.max_waiting,
        batching=c.batching,
        prefill_chunk=c.prefill_chunk,
        kv_budget=c.kv_budget,
        num_draft_tokens=c.num_draft_tokens,
        cache_config=c.cache,
        on_change=ctx.on_change,
    )
