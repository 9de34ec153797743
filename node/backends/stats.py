"""Per-model load and measured speed, as reported to coordinators (ModelLoad)."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.errors import Overloaded
from mesh.types import ModelLoad, Usage

# Smoothing of the measured prefill/decode rates.
EMA = 0.3


@dataclass
class ModelStats:
    """Queue depth, moving-average speeds and speculative counters of one model."""

    running: int = 0
    waiting: int = 0
    queued_prefill_tokens: int = 0
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    # Speculative decoding since load: proposed by the draft / accepted.
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0

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

    def __init__(self, stats: ModelStats, max_waiting: int) -> None:
        if stats.waiting >= max_waiting:
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
        else:
            self.stats.waiting -= 1

    def __enter__(self) -> Admission:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
