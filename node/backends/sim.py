"""A SIMULATED engine: deterministic text at configured prefill/decode rates.

For benchmarks and routing tests only (the node labels these models with
backend "sim"). It implements the same Backend protocol as MLX: it tokenizes
(one token per UTF-8 byte), renders a ChatML-like template, and "generates" by
sleeping `uncached prompt tokens / prefill_tps` then emitting one word per
`1 / decode_tps` seconds. Sleeping, not computing, means many simulated nodes
fit on one small machine, and timing noise stays around a millisecond: it
isolates what macmesh itself adds.

Like a real engine, prefills of one model run one at a time (FIFO: a node's
compute is busy), decodes run side by side, and the MLX backend's own prompt
cache (node.cache.PromptCaches, over one-number "layers" that only know their
length; the node's `CacheConfig`) skips the prefill of a cached prefix and is
reported in the node state, so routing studied on simulated nodes follows the
real cache's matching and eviction rules.
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
from node.backends.common import check_prompt, drain, request_id, room
from node.backends.outparse import OutputParser, ParserConfig
from node.cache import Lease, PromptCaches
from node.config import CacheConfig, SamplingDefaults, SimModelSpec
from node.sampling import resolve_sampling

_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a",
    "lighthouse", "keeper", "watches", "the", "sea", "and", "counts", "the", "waves", "under",
    "a", "pale", "moon",
)  # fmt: skip


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


class SimBackend:
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
        self._on_change = on_change
        self.defaults = defaults
        self._running: dict[str, int] = dict.fromkeys(self.specs, 0)
        self._prefill: dict[str, int] = dict.fromkeys(self.specs, 0)
        self.tokens_generated = 0
        self._closing = False
        self._prefill_lock = {name: asyncio.Lock() for name in self.specs}
        # Runs on the event loop here (the MLX backend drives it from its engine thread).
        self.caches = PromptCaches(cache_config or CacheConfig(), on_change=on_change)

    def _spec(self, model_id: str) -> SimModelSpec:
        spec = self.specs.get(model_id)
        if spec is None:
            raise ModelNotFound(model_id, self.specs)
        return spec

    def info(self, spec: SimModelSpec) -> ModelInfo:
        return ModelInfo(
            id=spec.name,
            backend="sim",
            source="simulated",
            path="",
            loaded=True,
            context_length=spec.context_length,
            quantization=f"simulated {spec.prefill_tps:g}/{spec.decode_tps:g} tok/s",
        )

    def claims(self, model_id: str) -> bool:
        return model_id in self.specs

    def model_dirs(self) -> tuple[Path, ...]:
        return ()

    def loaded(self) -> dict[str, ModelInfo]:
        return {name: self.info(s) for name, s in self.specs.items()}

    async def load(self, model_id: str) -> tuple[ModelInfo, float]:
        return self.info(self._spec(model_id)), 0.0

    async def unload(self, model_id: str) -> bool:
        self._spec(model_id)
        return False  # simulated models cannot be unloaded

    async def render(
        self, model_id: str, chat: ChatPrompt, include_text: bool = False
    ) -> RenderedPrompt:
        spec = self._spec(model_id)
        text = sim_render(chat)
        return RenderedPrompt(
            tuple(sim_tokenize(text)), spec.context_length, text if include_text else ""
        )

    async def tokenize(self, model_id: str, text: str, add_special_tokens: bool) -> list[int]:
        self._spec(model_id)
        return sim_tokenize(text)

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        if self._closing:
            raise Unavailable("the node is shutting down")
        spec = self._spec(request.model)
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
        prefilled = False
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
            # Decode on a fixed schedule so per-token costs don't accumulate drift.
            start = time.perf_counter()
            while n < max_tokens:
                word = _WORDS[(len(ids) + n) % len(_WORDS)]
                n += 1
                self.tokens_generated += 1
                for ev in parser.feed(word if n == 1 else " " + word):
                    yield ev
                if parser.stopped:
                    reason = FinishReason.STOP_SEQUENCE
                    break
                if n < max_tokens:
                    delay = start + n / spec.decode_tps - time.perf_counter()
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
            )
            for name, s in self.specs.items()
        ]

    @property
    def running(self) -> int:
        return sum(self._running.values())

    @property
    def waiting(self) -> int:
        return 0

    async def close(self, grace: float) -> None:
        self._closing = True
        await drain(lambda: self.running, grace)


def create(ctx: BackendContext) -> SimBackend | None:
    """Simulated models, when the node was given some (`--sim-model`)."""
    c = ctx.config
    if not c.sim_models:
        return None
    return SimBackend(
        c.sim_models, defaults=c.sampling, cache_config=c.cache, on_change=ctx.on_change
    )
