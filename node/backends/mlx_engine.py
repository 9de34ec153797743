"""The one thread that owns every MLX model on this node.

MLX (and Metal) must not be driven from several threads, so all model work
(load, unload, prefill, decode) runs here. Generations are stepped round-robin,
one token each per turn, so concurrent streams all make progress; each request
brings its own asyncio queue, and events travel back through
`loop.call_soon_threadsafe`. Cancellation is a flag checked before every step
and between prefill chunks, so a cancelled call stops within a token or two.

Speculative decoding (a job with a `draft_model`) goes through mlx-lm's own
`speculative_generate_step` via `stream_generate(draft_model=...)`; see
`_speculative_stream` for what the engine adds around it (an abortable prefill,
the prompt as repetition-penalty context) and `_count_draft` for how the
draft counters are kept.

The prompt cache (`node.cache`) lives on this thread too: a plain job leases
a KV cache already holding as much of its prompt as possible when it starts,
prefills only the rest, and hands the cache back (prompt plus generated
tokens) when it ends, whatever the outcome. Speculative jobs do not use it:
their two caches (target and draft) must be filled in step, which the
target-only slots cannot give; they prefill from scratch as before.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mesh.types import ErrorEvent, Finish, FinishReason, GenerateEvent, Usage
from node.backends.outparse import OutputParser, ParserConfig
from node.backends.stats import ModelStats
from node.cache import Lease, PromptCaches
from node.sampling import ResolvedSampling

log = logging.getLogger(__name__)

# Tokens the repetition penalty looks back on (mlx-lm's default, made explicit
# because the speculative path has to hand the same window over itself).
_REPETITION_CONTEXT = 20
# Prompt chunk size of the speculative prefill (mlx-lm's own default for it:
# two models' activations are live at once).
_SPECULATIVE_PREFILL_STEP = 512


class _Aborted(Exception):
    """Raised inside prefill (progress callback, speculative prefill) to abandon a request."""


@dataclass
class GenJob:
    """One generation, shared between the event loop and the engine thread."""

    request_id: str
    model_id: str
    model: Any
    tokenizer: Any
    prompt_ids: list[int]
    sampling: ResolvedSampling
    parser_config: ParserConfig
    stats: ModelStats
    loop: asyncio.AbstractEventLoop
    # Speculative decoding: the draft model (shares the tokenizer) and how many
    # tokens it proposes per round; None = plain decoding.
    draft_model: Any = None
    draft_model_id: str = ""
    num_draft_tokens: int = 0
    # Block hashes of `prompt_ids` (node.cache), when the submitter has them,
    # and the prompt tokens it expects the cache to serve (queue accounting).
    prompt_hashes: list[int] | None = None
    predicted_cached: int = 0
    events: asyncio.Queue[GenerateEvent] = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.perf_counter)
    # Set from the event loop; read by the engine thread (a plain bool is
    # enough under the GIL: the thread only ever polls it).
    cancelled: bool = False
    finished: bool = False
    # Engine-thread state.
    _gen: Iterator[Any] | None = None
    _parser: OutputParser | None = None
    _tokens: int = 0
    _started_at: float = 0.0
    _first_at: float = 0.0
    # Prompt cache: the lease, prompt tokens it served, tokens generated (fed
    # to the model, so the cache holds them too), and this job's share of
    # `stats.queued_prefill_tokens`.
    _lease: Lease | None = None
    _cached: int = 0
    _out_tokens: list[int] = field(default_factory=list)
    _queued_prefill: int = 0
    # Speculative bookkeeping (see `_count_draft`).
    _draft_tokens: int = 0
    _accepted_draft_tokens: int = 0
    _spec_seen: int = 0  # tokens the speculative generator has produced
    _round_open: bool = False


def _make_sampler(s: ResolvedSampling) -> Callable[[Any], Any]:
    """A sampler with its own PRNG key, so a seed reproduces however streams interleave."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if s.greedy:
        return lambda logprobs: mx.argmax(logprobs, axis=-1)
    seed = s.seed if s.seed is not None else secrets.randbits(63)
    key = [mx.random.key(seed % (1 << 63))]
    inv_temp = 1.0 / s.temperature

    def sample(logprobs: Any) -> Any:
        if 0.0 < s.top_p < 1.0:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p > 0.0:
            logprobs = apply_min_p(logprobs, s.min_p)
        if s.top_k > 0:
            logprobs = apply_top_k(logprobs, s.top_k)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def _with_prompt_context(
    processors: list[Callable[[Any, Any], Any]], context_ids: list[int]
) -> list[Callable[[Any, Any], Any]]:
    """The processors, each seeing `context_ids`' tail before the tokens it is given.

    mlx-lm only tracks the tokens it feeds the model itself: the speculative
    step from the last prompt token on (the engine prefilled the rest), and
    `generate_step` from the first token not served by the prompt cache.
    Prepending the tail of the prompt tokens it did not see makes the
    repetition penalty see the same window on every path, so greedy output
    matches.
    """
    import mlx.core as mx

    head = mx.array(context_ids[-_REPETITION_CONTEXT:], dtype=mx.uint32)

    def wrap(proc: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        return lambda tokens, logits: proc(mx.concatenate([head, tokens]), logits)

    return [wrap(p) for p in processors]


def _speculative_stream(
    job: GenJob, sampler: Callable[[Any], Any], processors: list[Callable[[Any, Any], Any]] | None
) -> Iterator[Any]:
    """`stream_generate` with the draft, after a prefill that can be abandoned.

    mlx-lm's speculative path drops `prompt_progress_callback`, so a cancelled
    request could not stop during a long prefill. Instead the engine prefills
    both models' caches itself (all but the last prompt token, in chunks,
    checking the cancel flag between them) and hands mlx-lm the last token
    plus the filled caches, exactly as mlx-lm's own prefill would leave them
    (its server passes the two caches concatenated the same way).
    """
    import mlx.core as mx
    from mlx_lm.generate import generation_stream, stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    model_cache = make_prompt_cache(job.model)
    draft_cache = make_prompt_cache(job.draft_model)
    prompt = mx.array(job.prompt_ids, dtype=mx.uint32)
    head = len(job.prompt_ids) - 1
    with mx.stream(generation_stream):
        for start in range(0, head, _SPECULATIVE_PREFILL_STEP):
            if job.cancelled:
                raise _Aborted
            chunk = prompt[start : min(start + _SPECULATIVE_PREFILL_STEP, head)][None]
            job.model(chunk, cache=model_cache)
            job.draft_model(chunk, cache=draft_cache)
            mx.eval([c.state for c in model_cache] + [c.state for c in draft_cache])
            mx.clear_cache()
    if job.cancelled:
        raise _Aborted
    if processors:
        processors = _with_prompt_context(processors, job.prompt_ids[:-1])
    yield from stream_generate(
        job.model,
        job.tokenizer,
        prompt[head:],
        max_tokens=job.sampling.max_tokens,
        draft_model=job.draft_model,
        num_draft_tokens=job.num_draft_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=model_cache + draft_cache,
    )


def _count_draft(job: GenJob, resp: Any, completion: bool) -> None:
    """Update the job's draft counters for one response of the speculative stream.

    mlx-lm's `speculative_generate_step` works in rounds: the draft proposes
    `min(num_draft_tokens, max_tokens - tokens so far)` tokens, the target
    checks them in one pass, then the step yields the accepted prefix
    (`from_draft=True`) and one token of the target's own (`from_draft=False`),
    unless `max_tokens` ends the round first. `stream_generate` turns every
    token into exactly one response (an EOS into the final one). So a round
    starts at the first response and after each `from_draft=False` one, and
    what it proposed is known there: `draft_tokens` counts every proposal made,
    also those of a round cut short by a stop sequence or a cancel.
    `accepted_draft_tokens` counts the draft's tokens among the completion
    tokens (an EOS is not one), so it never exceeds `completion_tokens`.
    """
    if not job._round_open:
        left = job.sampling.max_tokens - job._spec_seen
        job._draft_tokens += max(0, min(job.num_draft_tokens, left))
        job._round_open = True
    job._spec_seen += 1
    if not resp.from_draft:
        job._round_open = False
    elif completion:
        job._accepted_draft_tokens += 1


class Engine:
    """Runs model work on one thread; see the module docstring."""

    def __init__(
        self, *, max_running: int, max_waiting: int, caches: PromptCaches | None = None
    ) -> None:
        self.max_running = max_running
        self.max_waiting = max_waiting
        # Prompt caches of all models (None: no caching); engine-thread state.
        self.caches = caches
        self._inbox: queue.Queue[GenJob | Callable[[], None] | None] = queue.Queue()
        self._waiting: deque[GenJob] = deque()
        self._active: list[GenJob] = []
        self._lock = threading.Lock()
        self._queued = 0  # submitted, not yet running (for queue positions)
        self._running = 0
        # Tokens decoded since start, all requests (metrics; cancel latency in tests).
        self.tokens_generated = 0
        self._thread = threading.Thread(target=self._run, name="mlx-engine", daemon=True)
        self._thread.start()

    # ---------- called from the event loop ----------

    @property
    def running(self) -> int:
        return self._running

    @property
    def waiting(self) -> int:
        return self._queued

    def call(self, fn: Callable[[], Any]) -> asyncio.Future[Any]:
        """Run `fn` on the engine thread; the future gets its result or exception."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()

        def job() -> None:
            try:
                result = fn()
            except BaseException as exc:  # noqa: BLE001 - handed to the caller as is
                loop.call_soon_threadsafe(_set_exception, fut, exc)
            else:
                loop.call_soon_threadsafe(_set_result, fut, result)

        self._inbox.put(job)
        return fut

    def submit(self, job: GenJob) -> int:
        """Queue a generation; returns how many requests wait ahead of it."""
        with self._lock:
            # 1-based place among waiting requests; 0 = runs at once.
            ahead = max(0, self._running + self._queued - self.max_running + 1)
            self._queued += 1
            job.stats.waiting += 1
            # What the cache will serve is only known when the job starts (on
            # the engine thread); until then count the submitter's estimate.
            job._queued_prefill = len(job.prompt_ids) - job.predicted_cached
            job.stats.queued_prefill_tokens += job._queued_prefill
        self._inbox.put(job)
        return ahead

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after it cancels what is still queued or running."""
        self._inbox.put(None)
        self._thread.join(timeout)

    # ---------- engine thread ----------

    def _next_item(self, block: bool) -> GenJob | Callable[[], None] | bool | None:
        """The next inbox item; False when the inbox is empty."""
        try:
            return self._inbox.get(block=block)
        except queue.Empty:
            return False

    def _run(self) -> None:
        while True:
            # Sleep only when there is nothing to step.
            item = self._next_item(block=not self._active and not self._waiting)
            while item is not False:
                if item is None:
                    self._shutdown()
                    return
                if isinstance(item, GenJob):
                    self._waiting.append(item)
                elif callable(item):
                    item()
                item = self._next_item(block=False)
            while self._waiting and len(self._active) < self.max_running:
                job = self._waiting.popleft()
                with self._lock:
                    self._queued -= 1
                    self._running += 1
                    job.stats.waiting -= 1
                    job.stats.running += 1
                self._active.append(job)
            for job in list(self._active):
                self._step(job)

    def _shutdown(self) -> None:
        for job in [*self._active, *self._waiting]:
            if not job.finished:
                self._emit(job, ErrorEvent("UNAVAILABLE", "the node is shutting down"))
                self._end(job, FinishReason.CANCELLED)

    def _emit(self, job: GenJob, event: GenerateEvent) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            job.cancelled = True

    def _start(self, job: GenJob) -> None:
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_logits_processors

        def progress(_done: int, _total: int) -> None:
            if job.cancelled:
                raise _Aborted

        processors = None
        if job.sampling.repetition_penalty != 1.0:
            processors = make_logits_processors(
                repetition_penalty=job.sampling.repetition_penalty,
                repetition_context_size=_REPETITION_CONTEXT,
            )
        job._parser = OutputParser(job.parser_config)
        # Before the cache lookup: a copy of a long prefix is part of the prefill.
        job._started_at = time.perf_counter()
        if job.draft_model is not None:
            log.debug(
                "%s: %s drafted by %s, %d tokens a round",
                job.request_id,
                job.model_id,
                job.draft_model_id,
                job.num_draft_tokens,
            )
            job._gen = _speculative_stream(job, _make_sampler(job.sampling), processors)
            return
        cache = None
        if self.caches is not None:
            from mlx_lm.models.cache import make_prompt_cache

            job._lease = self.caches.acquire(
                job.model_id,
                job.prompt_ids,
                lambda: make_prompt_cache(job.model),
                job.prompt_hashes,
            )
            cache, job._cached = job._lease.cache, job._lease.cached
            with self._lock:  # now the real prefill is known
                left = len(job.prompt_ids) - job._cached
                job.stats.queued_prefill_tokens += left - job._queued_prefill
                job._queued_prefill = left
            if processors and job._cached:
                processors = _with_prompt_context(processors, job.prompt_ids[: job._cached])
        job._gen = stream_generate(
            job.model,
            job.tokenizer,
            job.prompt_ids[job._cached :],
            max_tokens=job.sampling.max_tokens,
            sampler=_make_sampler(job.sampling),
            logits_processors=processors,
            prompt_progress_callback=progress,
            prompt_cache=cache,
        )

    def _step(self, job: GenJob) -> None:
        if job.cancelled:
            self._end(job, FinishReason.CANCELLED)
            return
        try:
            if job._gen is None:
                self._start(job)
            assert job._gen is not None and job._parser is not None
            resp = next(job._gen, None)
        except _Aborted:
            self._end(job, FinishReason.CANCELLED)
            return
        except Exception as exc:
            log.exception("generation %s failed", job.request_id)
            self._emit(job, ErrorEvent("INTERNAL", f"generation failed: {exc}"))
            self._end(job, FinishReason.ERROR)
            return
        parser = job._parser
        if resp is None:  # generator exhausted without a final response
            self._flush(job, parser.finish())
            self._end(job, FinishReason.TOOL_CALLS if parser.tool_calls else FinishReason.STOP)
            return
        if not job._first_at:
            job._first_at = time.perf_counter()
            with self._lock:
                job.stats.queued_prefill_tokens -= job._queued_prefill
                job._queued_prefill = 0
        job._out_tokens.append(int(resp.token))
        reason = resp.finish_reason
        completion = reason is None or reason == "length"
        if completion:
            job._tokens += 1
            self.tokens_generated += 1
        if job.draft_model is not None:
            _count_draft(job, resp, completion)
        self._flush(job, parser.feed(resp.text))
        if parser.stopped:
            self._end(job, FinishReason.STOP_SEQUENCE, parser.stop_sequence)
        elif reason is not None:
            self._flush(job, parser.finish())
            if reason == "length":
                self._end(job, FinishReason.LENGTH)
            else:
                self._end(job, FinishReason.TOOL_CALLS if parser.tool_calls else FinishReason.STOP)

    def _release_cache(self, job: GenJob, reason: FinishReason) -> None:
        """Give the job's KV cache back to the prompt cache (before Finish goes out).

        It holds the prompt and every token generated (each was fed to the
        model); after a failure its state is unknown and it is dropped; after
        a cancel during prefill it holds some prefix of the prompt, which the
        cache reads from the layers' offset.
        """
        lease, job._lease = job._lease, None
        if lease is None or self.caches is None:
            return
        tokens = None if reason is FinishReason.ERROR else job.prompt_ids + job._out_tokens
        try:
            self.caches.release(lease, tokens, exact=bool(job._first_at))
        except Exception:
            log.exception("%s: returning the prompt cache failed", job.request_id)

    def _flush(self, job: GenJob, events: list[Any]) -> None:
        for ev in events:
            self._emit(job, ev)

    def _end(self, job: GenJob, reason: FinishReason, stop_sequence: str = "") -> None:
        if job._gen is not None and hasattr(job._gen, "close"):
            job._gen.close()
        job._gen = None
        now = time.perf_counter()
        started = job._started_at or now
        first = job._first_at or now
        prompt_s = first - started if job._started_at else 0.0
        gen_s = now - first if job._first_at else 0.0
        usage = Usage(
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=job._tokens,
            cached_prompt_tokens=job._cached,
            prompt_seconds=prompt_s,
            generation_seconds=gen_s,
            queue_seconds=started - job.enqueued_at,
            draft_tokens=job._draft_tokens,
            accepted_draft_tokens=job._accepted_draft_tokens,
        )
        # Draft work counts whatever the outcome: it was done.
        job.stats.draft_tokens += job._draft_tokens
        job.stats.accepted_draft_tokens += job._accepted_draft_tokens
        with self._lock:
            if job in self._active:
                self._active.remove(job)
                self._running -= 1
                job.stats.running -= 1
            elif job in self._waiting:
                self._waiting.remove(job)
                self._queued -= 1
                job.stats.waiting -= 1
            job.stats.queued_prefill_tokens -= job._queued_prefill
            job._queued_prefill = 0
        if reason in (FinishReason.STOP, FinishReason.LENGTH, FinishReason.STOP_SEQUENCE) or (
            reason is FinishReason.TOOL_CALLS
        ):
            # The prefill rate is over the tokens really prefilled.
            prefilled = len(job.prompt_ids) - job._cached
            job.stats.observe(prefilled, prompt_s, job._tokens, gen_s)
        # Before Finish: a state snapshot taken on Finish shows the new slot.
        self._release_cache(job, reason)
        job.finished = True
        self._emit(job, Finish(reason=reason, usage=usage, stop_sequence=stop_sequence))


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
