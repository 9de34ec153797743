"""A SIMULATED engine: deterministic text at configured prefill/decode rates.

For benchmarks and routing tests only (the node labels these models with
backend "sim"). It implements the same Backend protocol as MLX: it tokenizes
(one token per UTF-8 byte), renders a ChatML-like template, and "generates" by
sleeping `uncached prompt tokens / prefill_tps` then emitting one word (one
token) per decode step. Sleeping, not computing, means many simulated nodes
fit on one small machine, and timing noise stays around a millisecond: it
isolates what macmesh itself adds.

Like a real engine, prefills of one model run one at a time (FIFO: a node's
compute is busy), and its decoding streams share the node as a batch: with b
streams decoding, each runs at `aggregate(b) / b` tokens/s, where

    aggregate(b) = decode_tps * b / (1 + (b - 1) * alpha)

(`batch_aggregate_tps`). alpha = 1 is no batching gain (a compute-bound CPU:
b streams share one stream's rate); alpha = 0 is perfect batching (every
stream at full speed); about 0.15 fits an Apple GPU (mlx-lm's
Llama-3.2-3B-4bit: 61 / 122 / 349 tok/s at batch 1 / 2 / 32) and about 0.7
mlx[cpu] on the 2-core Linux box (4.6 / 5.9 / 6.3 tok/s at 1 / 4 / 8). Each
step's sleep uses the batch size at that step, so rates follow streams as they
join and leave. The node state reports the measured aggregate
(`ModelStats.count_decoded`, one count per word), as a real node does.

The MLX backend's own prompt cache (node.cache.PromptCaches, over one-number
"layers" that only know their length; the node's `CacheConfig`) skips the
prefill of a cached prefix and is reported in the node state, so routing
studied on simulated nodes follows the real cache's matching and eviction
rules.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncGenerator, Callable
from pathlib import Path

from mesh.errors import ModelNotFound, Unavailable
from mesh.types import (
    CachedPrefix,
    ChatPrompt,
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    ModelInfo,
    ModelLoad,
    RenderedPrompt,
    Started,
    TextPrompt,
    Usage,
)
from node.backends.base import BackendContext
from node.backends.chat_template import validate_chat
from node.backends.common import CountsRunning, check_prompt, request_id, room
from node.backends.outparse import OutputParser, ParserConfig
from node.backends.stats import ModelStats
from node.cache import Lease, PromptCaches
from node.config import CacheConfig, SamplingDefaults, SimModelSpec
from node.sampling import resolve_sampling

SIM_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a",
    "lighthouse", "keeper", "watches", "the", "sea", "and", "counts", "the", "waves", "under",
    "a", "pale", "moon",
)  # fmt: skip


# Batching of the simulated decode (see the module docstring) for models whose spec
# names none: mlx[cpu] on the 2-core Linux dev box, about 0.7.
DEFAULT_BATCH_ALPHA = 0.7


def batch_aggregate_tps(decode_tps: float, streams: int, alpha: float) -> float:
    """Tokens/s `streams` streams decode together at one-stream rate `decode_tps`."""
    if streams <= 0:
        return 0.0
    return decode_tps * streams / (1 + (streams - 1) * alpha)


def batch_alpha(spec: SimModelSpec) -> float:
    """The spec's batching alpha (`NAME:PREFILL:DECODE:CONTEXT:ALPHA`), else the default."""
    return DEFAULT_BATCH_ALPHA if spec.batch_alpha is None else spec.batch_alpha


class _SimLayer:
    """A simulated KV-cache layer: only how many tokens it holds (node.cache duck-types it)."""

    nbytes = 0

    def __init__(self) -> None:
        self.offset = 0

    def is_trimmable(self) -> bool:
        return True

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n


def sim_tokenize(text: str) -> list[int]:
    return list(text.encode())


def sim_render(chat: ChatPrompt) -> str:
    validate_chat(chat)
    parts = []
    if chat.tools:
        parts.append("<|tools|>\n" + "\n".join(t.name for t in chat.tools) + "\n")
    for m in chat.messages:
        parts.append(f"<|{m.role}|>\n{m.content}\n")
    if chat.add_generation_prompt:
        parts.append("<|assistant|>\n")
    return "".join(parts)


class SimBackend(CountsRunning):
    """Backend protocol over simulated models (always "loaded")."""

    name = "sim"

    def __init__(
        self,
        specs: tuple[SimModelSpec, ...],
        *,
        defaults: SamplingDefaults,
        cache_config: CacheConfig | None = None,
        on_change: Callable[[], None] = lambda: None,
    ) -> None:
        self.specs = {s.name: s for s in specs}
        self.alpha = {s.name: batch_alpha(s) for s in specs}
        if any(a < 0 for a in self.alpha.values()):
            raise ValueError(f"simulated batching alpha must be >= 0: {self.alpha}")
        self._on_change = on_change
        self.defaults = defaults
        self._running: dict[str, int] = dict.fromkeys(self.specs, 0)
        self._prefill: dict[str, int] = dict.fromkeys(self.specs, 0)
        # Streams past their prefill, decoding together (the batch size).
        self._decoding: dict[str, int] = dict.fromkeys(self.specs, 0)
        # Only the aggregate decode meter is used: the other rates are the spec's.
        self._stats = {name: ModelStats() for name in self.specs}
        self.tokens_generated = 0
        # Loads of sized models so far (tests check that a burst loads once).
        self.loads = 0
        self._closing = False
        self._prefill_lock = {name: asyncio.Lock() for name in self.specs}
        # Models with a declared size load and unload; the others are always loaded.
        self._loaded = {s.name for s in specs if s.memory_bytes is None}
        self._load_lock = {name: asyncio.Lock() for name in self.specs}
        # Runs on the event loop here (the MLX backend drives it from its engine thread).
        self.caches = PromptCaches(cache_config or CacheConfig(), on_change=on_change)

    def _spec(self, model_id: str) -> SimModelSpec:
        spec = self.specs.get(model_id)
        if spec is None:
            raise ModelNotFound(model_id, self.specs)
        return spec

    def info(self, spec: SimModelSpec) -> ModelInfo:
        size = spec.memory_bytes or 0
        loaded = spec.name in self._loaded
        return ModelInfo(
            id=spec.name,
            backend="sim",
            source="simulated",
            path="",
            loaded=loaded,
            context_length=spec.context_length,
            quantization=f"simulated {spec.prefill_tps:g}/{spec.decode_tps:g} tok/s",
            size_bytes=size,
            estimated_bytes=size,
            memory_bytes=size if loaded else 0,
        )

    def claims(self, model_id: str) -> bool:
        return model_id in self.specs

    def model_dirs(self) -> tuple[Path, ...]:
        return ()

    def loaded(self) -> dict[str, ModelInfo]:
        return {n: self.info(s) for n, s in self.specs.items() if n in self._loaded}

    def available(self) -> dict[str, ModelInfo]:
        return {n: self.info(s) for n, s in self.specs.items() if n not in self._loaded}

    async def load(self, model_id: str) -> tuple[ModelInfo, float]:
        spec = self._spec(model_id)
        async with self._load_lock[model_id]:  # single-flight: a burst loads once
            if model_id in self._loaded:
                return self.info(spec), 0.0
            t0 = time.perf_counter()
            await asyncio.sleep(spec.load_seconds)
            self.loads += 1
            self._loaded.add(model_id)
        self._on_change()
        return self.info(spec), time.perf_counter() - t0

    async def unload(self, model_id: str) -> bool:
        spec = self._spec(model_id)
        if spec.memory_bytes is None or model_id not in self._loaded:
            return False  # built-in simulated models stay loaded
        self._loaded.discard(model_id)
        self._on_change()
        return True

    async def render(
        self, model_id: str, chat: ChatPrompt, include_text: bool = False
    ) -> RenderedPrompt:
        spec = self._spec(model_id)
        await self.load(model_id)  # like MLX: rendering needs the (loaded) tokenizer
        text = sim_render(chat)
        return RenderedPrompt(
            tuple(sim_tokenize(text)), spec.context_length, text if include_text else ""
        )

    async def tokenize(self, model_id: str, text: str, add_special_tokens: bool) -> list[int]:
        self._spec(model_id)
        return sim_tokenize(text)

    def step_seconds(self, model_id: str) -> float:
        """One decode step of one stream of `model_id` at its batch size now."""
        spec = self._spec(model_id)
        b = max(self._decoding[model_id], 1)
        return b / batch_aggregate_tps(spec.decode_tps, b, self.alpha[model_id])

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        if self._closing:
            raise Unavailable("the node is shutting down")
        spec = self._spec(request.model)
        await self.load(spec.name)  # on first use, like a real engine
        sampling = resolve_sampling(request.sampling, self.defaults)
        prompt = request.prompt
        if isinstance(prompt, ChatPrompt):
            ids = sim_tokenize(sim_render(prompt))
        elif isinstance(prompt, TextPrompt):
            ids = sim_tokenize(prompt.text)
        else:
            ids = list(prompt.ids)
        check_prompt(ids, spec.context_length)
        max_tokens = room(sampling.max_tokens, ids, spec.context_length)
        parser = OutputParser(ParserConfig(stop=sampling.stop))
        rid = request_id(request, "sim")
        self._running[spec.name] += 1
        hashes = self.caches.hashes(spec.name, ids)
        # Work queued counts what will likely be prefilled (the cache as it is now).
        queued = len(ids) - self.caches.predict(spec.name, ids, hashes)
        self._prefill[spec.name] += queued
        t0 = time.perf_counter()
        prefilled = decoding = False
        stats = self._stats[spec.name]
        n = 0
        cached = 0
        lease: Lease | None = None
        reason = FinishReason.LENGTH
        try:
            yield Started(rid, spec.name, len(ids))
            async with self._prefill_lock[spec.name]:  # one prefill at a time, FIFO
                started = time.perf_counter()
                lease = self.caches.acquire(spec.name, ids, lambda: [_SimLayer()], hashes)
                cached = lease.cached
                await asyncio.sleep((len(ids) - cached) / spec.prefill_tps)
                lease.cache[0].offset = len(ids)  # the layer now holds the whole prompt
                # Released at once: the prompt is reusable from the end of its prefill.
                self.caches.release(lease, ids)
                lease = None
            self._prefill[spec.name] -= queued
            prefilled = True
            t1 = time.perf_counter()
            self._decoding[spec.name] += 1
            decoding = True
            # Decode on a schedule (each step as long as the batch size then makes it) so
            # per-token costs don't accumulate drift.
            due = time.perf_counter()
            while n < max_tokens:
                word = SIM_WORDS[(len(ids) + n) % len(SIM_WORDS)]
                n += 1
                self.tokens_generated += 1
                stats.count_decoded(1)
                for ev in parser.feed(word if n == 1 else " " + word):
                    yield ev
                if parser.stopped:
                    reason = FinishReason.STOP_SEQUENCE
                    break
                if n < max_tokens:
                    due += self.step_seconds(spec.name)
                    delay = due - time.perf_counter()
                    if delay > 0:
                        await asyncio.sleep(delay)
            for ev in parser.finish():
                yield ev
            usage = Usage(
                prompt_tokens=len(ids),
                completion_tokens=n,
                cached_prompt_tokens=cached,
                prompt_seconds=t1 - started,
                generation_seconds=time.perf_counter() - t1,
                queue_seconds=started - t0,
            )
            yield Finish(reason, usage, parser.stop_sequence)
        finally:
            self._running[spec.name] -= 1
            if decoding:
                self._decoding[spec.name] -= 1
                if not self._decoding[spec.name]:
                    stats.decode_idle()
            if lease is not None:  # cancelled during the prefill: its state is unknown
                self.caches.release(lease, None)
            if not prefilled:
                self._prefill[spec.name] -= queued

    def cache_state(self) -> list[CachedPrefix]:
        """The simulated prompt caches' block hashes, like a real node reports them."""
        size = self.caches.config.block_size
        return [CachedPrefix(m, size, h) for m, h in self.caches.state().items()]

    def load_stats(self) -> list[ModelLoad]:
        return [
            ModelLoad(
                model=name,
                running=self._running[name],
                queued_prefill_tokens=max(0, self._prefill[name]),
                prefill_tokens_per_second=s.prefill_tps,
                decode_tokens_per_second=s.decode_tps,
                aggregate_decode_tokens_per_second=self._stats[name].aggregate_decode_tps,
            )
            for name, s in self.specs.items()
            if name in self._loaded
        ]


def create(ctx: BackendContext) -> SimBackend | None:
    """Simulated models, when the node was given some (`--sim-model`)."""
    c = ctx.config
    if not c.sim_models:
        return None
    return SimBackend(
        c.sim_models, defaults=c.sampling, cache_config=c.cache, on_change=ctx.on_change
    )
