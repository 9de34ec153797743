"""A SIMULATED engine: deterministic text at configured prefill/decode rates.

For benchmarks and routing tests only (the node labels these models with
backend "sim"). It implements the same Backend protocol as MLX: it tokenizes
(one token per UTF-8 byte), renders a ChatML-like template, and "generates" by
sleeping `uncached prompt tokens / prefill_tps` then emitting one word per
`1 / decode_tps` seconds. Sleeping, not computing, means many simulated nodes
fit on one small machine, and timing noise stays around a millisecond: it
isolates what macmesh itself adds.

Like a real engine, prefills of one model run one at a time (FIFO: a node's
compute is busy), decodes run side by side, and a prompt cache with the MLX
cache's semantics (block-granular longest prefix, minimum reuse, LRU slots,
`MLX_CACHE_*` settings) skips the prefill of a cached prefix and is reported
in the node state, so routing can be studied on many simulated nodes.
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import AsyncGenerator, Callable

from mesh.errors import InvalidRequest, ModelNotFound, PromptTooLong, Unavailable
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
from node.backends.chat_template import validate_chat
from node.backends.outparse import OutputParser, ParserConfig
from node.config import SamplingDefaults, SimModelSpec
from node.sampling import resolve_sampling
from routing.prefix import DEFAULT_BLOCK_SIZE, block_hashes

_WORDS = (
    "the", "quick", "brown", "fox", "jumps", "over", "the", "lazy", "dog", "while", "a",
    "lighthouse", "keeper", "watches", "the", "sea", "and", "counts", "the", "waves", "under",
    "a", "pale", "moon",
)  # fmt: skip


def _env_int(name: str, default: int) -> int:
    try:
        value = int(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


class SimPromptCache:
    """LRU slots of token sequences with the MLX prompt cache's matching rules."""

    def __init__(self, model: str) -> None:
        self.model = model
        self.block_size = _env_int("MLX_CACHE_BLOCK_SIZE", DEFAULT_BLOCK_SIZE)
        self.max_slots = _env_int("MLX_CACHE_MAX_SLOTS", 4)
        self.min_reuse = _env_int("MLX_CACHE_MIN_REUSE", 512)
        self.max_tokens = _env_int("MLX_CACHE_MAX_TOKENS", 65536)
        # (tokens, their block hashes); most recently used last.
        self.slots: list[tuple[list[int], list[int]]] = []

    def lookup(self, ids: list[int]) -> int:
        """Cached tokens for `ids`: the longest block-aligned common prefix, if long enough."""
        best = 0
        for tokens, _ in self.slots:
            n, limit = 0, min(len(tokens), len(ids))
            while n < limit and tokens[n] == ids[n]:
                n += 1
            best = max(best, n - n % self.block_size)
        # At least one token is always prefilled (it yields the first logits).
        best = min(best, len(ids) - 1)
        return best if best >= self.min_reuse else 0

    def store(self, ids: list[int]) -> None:
        """`ids` now fills a slot: the one it extends, else the least recently used."""
        for i, (tokens, _) in enumerate(self.slots):
            if ids[: len(tokens)] == tokens:
                del self.slots[i]
                break
        self.slots.append((list(ids), block_hashes(self.model, ids, self.block_size)))
        while len(self.slots) > self.max_slots or (
            len(self.slots) > 1 and sum(len(t) for t, _ in self.slots) > self.max_tokens
        ):
            self.slots.pop(0)

    def state(self) -> CachedPrefix:
        held: dict[int, None] = {}
        for _, hashes in self.slots:
            held.update(dict.fromkeys(hashes))
        return CachedPrefix(self.model, self.block_size, tuple(held))


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
        self.caches = {name: SimPromptCache(name) for name in self.specs}

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
        if not ids:
            raise InvalidRequest("the prompt is empty", field="input")
        if len(ids) >= spec.context_length:
            raise PromptTooLong(len(ids), spec.context_length)
        max_tokens = min(sampling.max_tokens, spec.context_length - len(ids))
        parser = OutputParser(ParserConfig(stop=sampling.stop))
        request_id = request.request_id or f"sim_{uuid.uuid4().hex[:16]}"
        self._running[spec.name] += 1
        # Work queued counts what will really be prefilled (the cache as it is now).
        queued = len(ids) - self.caches[spec.name].lookup(ids)
        self._prefill[spec.name] += queued
        t0 = time.perf_counter()
        prefilled = False
        n = 0
        cached = 0
        reason = FinishReason.LENGTH
        try:
            yield Started(request_id, spec.name, len(ids))
            async with self._prefill_lock[spec.name]:  # one prefill at a time, FIFO
                started = time.perf_counter()
                cached = self.caches[spec.name].lookup(ids)
                await asyncio.sleep((len(ids) - cached) / spec.prefill_tps)
                self.caches[spec.name].store(ids)
            self._on_change()  # coordinators learn of the new prefix (and evictions) now
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
            if not prefilled:
                self._prefill[spec.name] -= queued

    def cache_state(self) -> list[CachedPrefix]:
        """The simulated prompt caches' block hashes, like a real node reports them."""
        return [c.state() for c in self.caches.values() if c.slots]

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
        deadline = time.monotonic() + grace
        while self.running and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
