"""Per-model load and measured speed, as reported to coordinators (ModelLoad)."""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from mesh.errors import Overloaded
from mesh.types import ModelLoad, Usage

# Smoothing of the measured prefill/decode rates.
EMA = 0.3
# The aggregate decode rate counts the tokens decoded in this many recent seconds,
# and reads 0 (not measured) until its counts span at least the minimum.
AGGREGATE_WINDOW_S = 2.0
AGGREGATE_MIN_SPAN_S = 0.25


class DecodeMeter:
    """Tokens decoded by all of one model's streams together, as a rate over a short
    recent window: the aggregate decode rate at the batch size the node runs now.

    `count(n)` records `n` tokens produced now (a batch step's tokens, or one
    stream's token); `rate()` is the tokens counted after the window's first
    count divided by the time from that count to the last, so a steady decode
    reads exactly between counts. Only time with something decoding counts:
    `idle()` (the batch emptied) forgets every count, and counts older than
    `window_s` drop out. Until the counts span `min_span_s` (nothing
    decoding, or only just started) the rate is 0, "not measured".
    Thread-safe: an engine thread counts while the event loop reads.
    """

    def __init__(
        self,
        window_s: float = AGGREGATE_WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
        min_span_s: float = AGGREGATE_MIN_SPAN_S,
    ) -> None:
        self._window = window_s
        self._min_span = min_span_s
        self._clock = clock
        self._lock = threading.Lock()
        self._counts: deque[tuple[float, int]] = deque()
        self._tokens = 0  # the sum of the counts in the window

    def count(self, n: int) -> None:
        """`n` tokens decoded now (any thread)."""
        if n <= 0:
            return
        now = self._clock()
        with self._lock:
            self._counts.append((now, n))
            self._tokens += n
            self._expire(now)

    def idle(self) -> None:
        """Nothing decodes any more: forget the counts (the next busy spell starts afresh)."""
        with self._lock:
            self._counts.clear()
            self._tokens = 0

    def rate(self) -> float:
        """Tokens per second over the window; 0 = not measured (any thread)."""
        now = self._clock()
        with self._lock:
            self._expire(now)
            if len(self._counts) < 2:
                return 0.0
            (first, n0), (last, _) = self._counts[0], self._counts[-1]
            span = last - first
            return (self._tokens - n0) / span if span >= self._min_span and span > 0 else 0.0

    def _expire(self, now: float) -> None:
        cutoff = now - self._window
        while self._counts and self._counts[0][0] < cutoff:
            self._tokens -= self._counts.popleft()[1]


@dataclass
class ModelStats:
    """Queue depth, moving-average speeds and speculative counters of one model.

    `decode_tps` is one stream's decode rate (a moving average over finished
    generations); `aggregate_decode_tps` is what all its streams decode together
    now (`count_decoded`, a short window: see DecodeMeter).
    """

    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    # Speculative decoding since load: proposed by the draft / accepted.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    meter: DecodeMeter = field(default_factory=DecodeMeter, repr=False, compare=False)

    def count_decoded(self, n: int) -> None:
        """`n` tokens just decoded by this model's streams, together (thread-safe: the
        MLX engine thread calls it after each batch step with the tokens that step
        produced; the GGUF backend for each token event; the simulated engine per word)."""
        self.meter.count(n)

    def decode_idle(self) -> None:
        """No stream of this model decodes any more (thread-safe): the aggregate
        forgets the spell that ended, so an idle gap never dilutes the next reading.
        `Admission.close` calls it when the last running request leaves."""
        self.meter.idle()

    @property
    def aggregate_decode_tps(self) -> float:
        """Tokens per second all streams decode together, recently; 0 = not measured."""
        return self.meter.rate()

    def observe(self, prompt_tokens: int, prompt_s: float, gen_tokens: int, gen_s: float) -> None:
        """Fold one finished generation into the moving averages."""
        if prompt_tokens > 0 and prompt_s > 0:
            rate = prompt_tokens / prompt_s
            self.prefill_tps = (
                rate if not self.prefill_tps else EMA * rate + (1 - EMA) * (self.prefill_tps)
            )
        if gen_tokens > 1 and gen_s > 0:
            rate = (gen_tokens - 1) / gen_s
            self.decode_tps = (
                rate if not self.decode_tps else EMA * rate + (1 - EMA) * (self.decode_tps)
            )

    def observe_usage(self, usage: Usage) -> None:
        """Fold one finished generation's usage in: speeds from the uncached prefill and
        the decode, plus the speculative counters."""
        self.observe(
            usage.prompt_tokens - usage.cached_prompt_tokens,
            usage.prompt_seconds,
            usage.completion_tokens,
            usage.generation_seconds,
        )
        self.draft_tokens += usage.draft_tokens
        self.accepted_draft_tokens += usage.accepted_draft_tokens

    def to_load(self, model: str) -> ModelLoad:
        """What the node state reports for `model` (queued prefill never below 0)."""
        return ModelLoad(
            model=model,
            running=self.running,
            waiting=self.waiting,
            queued_prefill_tokens=max(0, self.queued_prefill_tokens),
            prefill_tokens_per_second=self.prefill_tps,
            decode_tokens_per_second=self.decode_tps,
            aggregate_decode_tokens_per_second=self.aggregate_decode_tps,
            draft_tokens=self.draft_tokens,
            accepted_draft_tokens=self.accepted_draft_tokens,
        )


class Admission:
    """One request's share of its model's counters, balanced on every way out.

    Entering counts it waiting (or refuses it when `max_waiting` are already
    waiting); `queue_prefill` adds the prompt tokens it will prefill, `run` moves
    it from waiting to running, `prefilled` takes its prefill off the queue at its
    first token, and leaving undoes whatever is still counted.
    """

    def __init__(self, stats: ModelStats, max_waiting: int | None = None) -> None:
        """`max_waiting` None: the caller applies its own limit (the MLX engine's is
        node-wide)."""
        if max_waiting is not None and stats.waiting >= max_waiting:
            raise Overloaded(f"{stats.waiting} requests already waiting on this node; retry later")
        self.stats = stats
        self.running = False
        self._queued = 0
        self._closed = False
        stats.waiting += 1

    def queue_prefill(self, tokens: int) -> None:
        self.stats.queued_prefill_tokens += tokens
        self._queued += tokens

    def run(self) -> None:
        if not self.running:
            self.stats.waiting -= 1
            self.stats.running += 1
            self.running = True

    def prefilled(self) -> None:
        self.stats.queued_prefill_tokens -= self._queued
        self._queued = 0

    def close(self) -> None:
        """Leave the counters (idempotent)."""
        if self._closed:
            return
        self._closed = True
        self.prefilled()
        if self.running:
            self.stats.running -= 1
            if self.stats.running == 0:
                self.stats.decode_idle()
        else:
            self.stats.waiting -= 1

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
