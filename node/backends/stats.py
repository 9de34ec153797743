"""Per-model load and measured speed, as reported to coordinators (ModelLoad)."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.types import ModelLoad

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
