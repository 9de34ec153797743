"""The one thread that owns every MLX model on this node.

MLX (and Metal) must not be driven from several threads, so all model work
(load, unload, prefill, decode) runs here. Each request brings its own asyncio
queue, and events travel back through `loop.call_soon_threadsafe`.

Requests run in one of two ways:

* batched (node.backends.mlx_batch): each model has one continuous batch on
  mlx-lm's `BatchGenerator`; requests join and leave it between steps, and
  long prompts are prefilled a chunk per step, interleaved with decoding;
* one at a time (node.backends.mlx_solo): speculative requests, models whose
  caches cannot be batched, and everything with batching off; each such
  request is stepped one token per turn.

Admission is FIFO: at most `max_running` requests run (batched and alone
together), and a batched request joins only when its model's batch, grown by
it, still fits the memory the node can give its KV caches; otherwise it waits
(a request that cannot fit even alone is refused). Cancellation is a flag
checked before every step, so a cancelled call leaves within a step or two and
its cache is handed back at once.

The prompt cache (`node.cache`) lives on this thread too: a request leases a
KV cache already holding as much of its prompt as possible when it starts,
prefills only the rest, and hands its cache back (prompt plus generated
tokens) when it ends, whatever the outcome.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import Any

from mesh.errors import Overloaded
from mesh.types import ErrorEvent, Finish, FinishReason, GenerateEvent, Usage
from node.backends import mlx_solo
from node.backends.mlx_batch import ModelBatch, Step, batchable
from node.backends.mlx_job import Aborted, GenJob
from node.backends.outparse import OutputParser
from node.backends.stats import Admission
from node.cache import Lease, PromptCaches

log = logging.getLogger(__name__)


class Engine:
    """Runs model work on one thread; see the module docstring."""

    def __init__(
        self,
        *,
        max_running: int,
        max_waiting: int,
        caches: PromptCaches | None = None,
        batching: bool = True,
        prefill_chunk: int = 512,
        kv_budget: int | None = None,
    ) -> None:
        """`kv_budget`: bytes the running requests' KV caches may take (None: what the
        machine has available, less a margin)."""
        self.max_running = max_running
        self.max_waiting = max_waiting
        # Prompt caches of all models (None: no caching); engine-thread state.
        self.caches = caches
        self.batching = batching
        self.prefill_chunk = prefill_chunk
        self.kv_budget = kv_budget
        self._inbox: queue.Queue[GenJob | Callable[[], None] | None] = queue.Queue()
        self._waiting: deque[GenJob] = deque()
        self._solo: list[GenJob] = []
        self._batches: dict[str, ModelBatch] = {}  # the live batch per model
        self._retired: list[ModelBatch] = []  # unloaded or reloaded models' batches, draining
        self._batchable: dict[int, bool] = {}  # by id(model)
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
        """Queue a generation; returns how many requests wait ahead of it.

        Raises Overloaded when `max_waiting` requests already wait."""
        with self._lock:
            if self._queued >= self.max_waiting:
                raise Overloaded(
                    f"{self._queued} requests already waiting on this node; retry later"
                )
            # 1-based place among waiting requests; 0 = runs at once.
            ahead = max(0, self._running + self._queued - self.max_running + 1)
            self._queued += 1
            # The node-wide limit above is the one that applies.
            job.admission = Admission(job.stats)
            # What the cache will serve is only known when the job starts (on
            # the engine thread); until then count the submitter's estimate.
            job.admission.queue_prefill(len(job.prompt_ids) - job.predicted_cached)
        self._inbox.put(job)
        return ahead

    def stop(self, timeout: float = 5.0) -> None:
        """Stop the thread after it cancels what is still queued or running."""
        self._inbox.put(None)
        self._thread.join(timeout)

    # ---------- engine thread ----------

    def drop_model(self, model_id: str) -> None:
        """Engine thread: the model is unloaded; its batch goes once idle."""
        batch = self._batches.get(model_id)
        if batch is not None:
            self._retire(batch)
            self._drop_idle()

    def _retire(self, batch: ModelBatch) -> None:
        """No new request joins `batch`; it is dropped once its requests have left."""
        for mid, live in list(self._batches.items()):
            if live is batch:
                del self._batches[mid]
        if batch not in self._retired:
            self._retired.append(batch)

    def _drop_idle(self) -> None:
        for batch in [b for b in self._retired if not len(b)]:
            batch.close()
            self._retired.remove(batch)

    def _all_batches(self) -> list[ModelBatch]:
        return [*self._batches.values(), *self._retired]

    def batch_sizes(self) -> dict[str, tuple[int, int]]:
        """Per model with a live batch: (requests in it now, the most it has held)."""
        return {mid: (len(b), b.max_size) for mid, b in list(self._batches.items())}

    def _next_item(self, block: bool) -> GenJob | Callable[[], None] | bool | None:
        """The next inbox item; False when the inbox is empty."""
        try:
            return self._inbox.get(block=block)
        except queue.Empty:
            return False

    def _busy(self) -> bool:
        return bool(self._solo or any(len(b) for b in self._all_batches()))

    def _run(self) -> None:
        while True:
            # Sleep only when there is nothing to step or admit.
            item = self._next_item(block=not self._busy() and not self._waiting)
            while item is not False:
                if item is None:
                    self._shutdown()
                    return
                if isinstance(item, GenJob):
                    self._waiting.append(item)
                elif callable(item):
                    item()
                item = self._next_item(block=False)
            self._admit()
            for batch in self._all_batches():
                if len(batch):
                    self._step_batch(batch)
            for job in list(self._solo):
                self._step_solo(job)
            self._drop_idle()

    def _shutdown(self) -> None:
        jobs = [*self._solo, *self._waiting]
        for batch in self._all_batches():
            jobs += [*batch.jobs.values(), *batch.pending]
        for job in jobs:
            if not job.finished:
                self._emit(job, ErrorEvent("UNAVAILABLE", "the node is shutting down"))
                self._end(job, FinishReason.CANCELLED)

    # ---------- admission ----------

    def _solo_only(self, job: GenJob) -> bool:
        if not self.batching or job.draft_model is not None:
            return True
        key = id(job.model)
        if key not in self._batchable:
            self._batchable[key] = batchable(job.model)
            if not self._batchable[key]:
                log.info(
                    "%s: its KV caches cannot be batched; requests run one at a time", job.model_id
                )
        return not self._batchable[key]

    def _batch(self, job: GenJob) -> ModelBatch:
        batch = self._batches.get(job.model_id)
        if batch is None or batch.model is not job.model:
            if batch is not None:  # reloaded: the old batch drains, then goes
                self._retire(batch)
            batch = ModelBatch(
                job.model,
                job.tokenizer,
                max_batch=self.max_running,
                prefill_chunk=self.prefill_chunk,
            )
            self._batches[job.model_id] = batch
        return batch

    def _admit(self) -> None:
        """Start waiting requests in order while there is room."""
        while self._waiting:
            job = self._waiting[0]
            if job.cancelled:
                self._waiting.popleft()
                self._end(job, FinishReason.CANCELLED)
                continue
            if self._running >= self.max_running:
                return
            if self._solo_only(job):
                self._waiting.popleft()
                self._set_running(job)
                self._solo.append(job)
                continue
            batch = self._batch(job)
            room = batch.room(self.kv_budget)
            if batch.need_bytes(job) > room:
                if len(batch) and batch.fits_alone(job, room):
                    return  # it fits once the batch shrinks: wait, in order
                self._waiting.popleft()
                self._emit(job, ErrorEvent("RESOURCE_EXHAUSTED", batch.too_big(job, room)))
                self._end(job, FinishReason.ERROR)
                continue
            self._waiting.popleft()
            self._set_running(job)
            job.parser = OutputParser(job.parser_config)
            job.started_at = time.perf_counter()
            self._lease(job)
            batch.add(job)

    def _set_running(self, job: GenJob) -> None:
        with self._lock:
            self._queued -= 1
            self._running += 1
            assert job.admission is not None
            job.admission.run()

    def _lease(self, job: GenJob) -> None:
        """Lease the job's prompt cache; the real prefill is known from here on."""
        from mlx_lm.models.cache import make_prompt_cache

        if self.caches is None:  # no prompt cache: an empty KV cache of its own
            job.lease = Lease(job.model_id, make_prompt_cache(job.model), 0, "fresh")
        else:
            job.lease = self.caches.acquire(
                job.model_id,
                job.prompt_ids,
                lambda: make_prompt_cache(job.model),
                job.prompt_hashes,
            )
        job.cached = job.lease.cached
        with self._lock:
            assert job.admission is not None
            job.admission.prefilled()
            job.admission.queue_prefill(len(job.prompt_ids) - job.cached)

    # ---------- stepping ----------

    def _step_batch(self, batch: ModelBatch) -> None:
        for job in [*batch.jobs.values(), *batch.pending]:
            if job.cancelled:
                self._end(job, FinishReason.CANCELLED)
        if not len(batch):
            return
        try:
            _, steps = batch.step()
        except Exception as exc:
            # A failed step leaves the batch's state unknown: end all its requests.
            log.exception("batch step for %s failed", batch.model)
            jobs = [*batch.jobs.values(), *batch.pending]
            batch.jobs.clear()
            batch.pending.clear()
            self._retire(batch)  # the next request starts a fresh batch
            for job in jobs:
                job.uid, job.batch = None, None
                self._emit(job, ErrorEvent("INTERNAL", f"generation failed: {exc}"))
                self._end(job, FinishReason.ERROR)
            return
        batch.max_size = max(batch.max_size, len(batch.jobs) + len(batch.pending))
        for s in steps:
            if s.job.finished or s.token is None:
                continue
            try:
                self._deliver_batched(s)
            except Exception as exc:
                # This request's own failure (its detokenizer, its parser): it alone ends.
                log.exception("generation %s failed", s.job.request_id)
                self._emit(s.job, ErrorEvent("INTERNAL", f"generation failed: {exc}"))
                self._end(s.job, FinishReason.ERROR)

    def _deliver_batched(self, s: Step) -> None:
        job, token, reason = s.job, s.token, s.finish_reason
        assert token is not None
        detok = job.detokenizer
        if reason == "stop":  # the EOS: not text, not a completion token
            detok.finalize()
        else:
            detok.add_token(token)
            if reason == "length":
                detok.finalize()
        kv = (s.cache, s.cache_tokens) if s.cache is not None and s.cache_tokens else None
        self._deliver(job, token, detok.last_segment, reason, kv)

    def _step_solo(self, job: GenJob) -> None:
        if job.cancelled:
            self._end(job, FinishReason.CANCELLED)
            return
        try:
            if job.gen is None:
                mlx_solo.start(job, self.caches, self._lease)
            assert job.gen is not None and job.parser is not None
            resp = next(job.gen, None)
        except Aborted:
            self._end(job, FinishReason.CANCELLED)
            return
        except Exception as exc:
            log.exception("generation %s failed", job.request_id)
            self._emit(job, ErrorEvent("INTERNAL", f"generation failed: {exc}"))
            self._end(job, FinishReason.ERROR)
            return
        if resp is None:  # generator exhausted without a final response
            self._finish_parser(job)
            return
        job.out_tokens.append(int(resp.token))
        reason = resp.finish_reason
        if job.draft_model is not None:
            mlx_solo.count_draft(job, resp, reason is None or reason == "length")
        self._deliver(job, int(resp.token), resp.text, reason, None)

    def _deliver(
        self,
        job: GenJob,
        token: int,
        text: str,
        reason: str | None,
        kv: tuple[list[Any], list[int]] | None,
    ) -> None:
        """One token out of either path: count it, parse its text, end the job if done."""
        if not job.first_at:
            job.first_at = time.perf_counter()
            with self._lock:
                assert job.admission is not None
                job.admission.prefilled()
        if reason is None or reason == "length":
            job.tokens += 1
            self.tokens_generated += 1
            job.stats.count_decoded(1)  # the aggregate rate routing weighs
        parser = job.parser
        assert parser is not None
        self._flush(job, parser.feed(text))
        if parser.stopped:
            self._end(job, FinishReason.STOP_SEQUENCE, parser.stop_sequence, kv)
        elif reason == "length":
            self._flush(job, parser.finish())
            self._end(job, FinishReason.LENGTH, kv=kv)
        elif reason is not None:
            self._finish_parser(job, kv)

    def _finish_parser(self, job: GenJob, kv: tuple[list[Any], list[int]] | None = None) -> None:
        assert job.parser is not None
        self._flush(job, job.parser.finish())
        reason = FinishReason.TOOL_CALLS if job.parser.tool_calls else FinishReason.STOP
        self._end(job, reason, kv=kv)

    # ---------- ending ----------

    def _release_cache(
        self, job: GenJob, reason: FinishReason, kv: tuple[list[Any], list[int]] | None
    ) -> None:
        """Give the job's KV cache back to the prompt cache (before Finish goes out).

        A batched job's cache comes out of the batch with the exact tokens it
        holds. A job run alone holds the prompt and every token generated (each
        was fed to the model); after a cancel during its prefill it holds some
        prefix of the prompt, which the cache reads from the layers' offset.
        After a failure the state is unknown and the cache is dropped.
        """
        lease, job.lease = job.lease, None
        if lease is None or self.caches is None:
            return
        tokens: list[int] | None
        exact = bool(job.first_at)
        if job.batched:
            if kv is None:
                tokens = None
            else:
                lease.cache, tokens, exact = kv[0], kv[1], True
        else:
            tokens = job.prompt_ids + job.out_tokens
        if reason is FinishReason.ERROR:
            tokens = None
        try:
            self.caches.release(lease, tokens, exact=exact)
        except Exception:
            log.exception("%s: returning the prompt cache failed", job.request_id)

    def _emit(self, job: GenJob, event: GenerateEvent) -> None:
        try:
            job.loop.call_soon_threadsafe(job.events.put_nowait, event)
        except RuntimeError:  # the caller's loop is closed: nobody is listening
            job.cancelled = True

    def _flush(self, job: GenJob, events: list[Any]) -> None:
        for ev in events:
            self._emit(job, ev)

    def _end(
        self,
        job: GenJob,
        reason: FinishReason,
        stop_sequence: str = "",
        kv: tuple[list[Any], list[int]] | None = None,
    ) -> None:
        if job.finished:
            return
        if job.gen is not None and hasattr(job.gen, "close"):
            job.gen.close()
        job.gen = None
        batch = job.batch
        if batch is not None and kv is None and (job.batched or job in batch.pending):
            try:
                kv = batch.remove(job)
            except Exception:
                log.exception("%s: leaving the batch failed", job.request_id)
                kv = None
        now = time.perf_counter()
        started = job.started_at or now
        first = job.first_at or now
        prompt_s = first - started if job.started_at else 0.0
        gen_s = now - first if job.first_at else 0.0
        usage = Usage(
            prompt_tokens=len(job.prompt_ids),
            completion_tokens=job.tokens,
            cached_prompt_tokens=job.cached,
            prompt_seconds=prompt_s,
            generation_seconds=gen_s,
            queue_seconds=started - job.enqueued_at,
            draft_tokens=job.draft_tokens,
            accepted_draft_tokens=job.accepted_draft_tokens,
        )
        # Draft work counts whatever the outcome: it was done.
        job.stats.draft_tokens += job.draft_tokens
        job.stats.accepted_draft_tokens += job.accepted_draft_tokens
        with self._lock:
            if job in self._solo:
                self._solo.remove(job)
            elif job in self._waiting:
                self._waiting.remove(job)
            assert job.admission is not None
            if job.admission.running:
                self._running -= 1
            else:
                self._queued -= 1
            job.admission.close()
        if reason in (
            FinishReason.STOP,
            FinishReason.LENGTH,
            FinishReason.STOP_SEQUENCE,
            FinishReason.TOOL_CALLS,
        ):
            # The prefill rate is over the tokens really prefilled.
            prefilled = len(job.prompt_ids) - job.cached
            job.stats.observe(prefilled, prompt_s, job.tokens, gen_s)
        # Before Finish: a state snapshot taken on Finish shows the new slot.
        self._release_cache(job, reason, kv)
        job.finished = True
        self._emit(job, Finish(reason=reason, usage=usage, stop_sequence=stop_sequence))


def _set_result(fut: asyncio.Future[Any], result: Any) -> None:
    if not fut.done():
        fut.set_result(result)


def _set_exception(fut: asyncio.Future[Any], exc: BaseException) -> None:
    if not fut.done():
        fut.set_exception(exc)
