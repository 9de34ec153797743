"""Validate a request's sampling settings and fill in the node's defaults."""

from __future__ import annotations

from dataclasses import dataclass

from mesh.sampling import MAX_STOP_SEQUENCES, check_sampling, merge_sampling
from mesh.types import SamplingParams
from node.config import SamplingDefaults

__all__ = ["MAX_STOP_SEQUENCES", "ResolvedSampling", "resolve_sampling"]


@dataclass(frozen=True, slots=True)
class ResolvedSampling:
    """Sampling settings with every field decided."""

    temperature: float
    top_p: float
    top_k: int
    min_p: float
    max_tokens: int
    stop: tuple[str, ...]
    seed: int | None
    repetition_penalty: float

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


def resolve_sampling(params: SamplingParams, defaults: SamplingDefaults) -> ResolvedSampling:
    """Apply defaults; raise InvalidRequest naming the first bad field."""
    d = SamplingParams(
        temperature=defaults.temperature,
        top_p=defaults.top_p,
        top_k=defaults.top_k,
        min_p=defaults.min_p,
        max_tokens=defaults.max_tokens,
        repetition_penalty=defaults.repetition_penalty,
    )
    merged = merge_sampling(params, d)
    check_sampling(merged)
    assert merged.temperature is not None and merged.top_p is not None
    assert merged.top_k is not None and merged.min_p is not None
    assert merged.max_tokens is not None and merged.repetition_penalty is not None
    return ResolvedSampling(
        temperature=merged.temperature,
        top_p=merged.top_p,
        top_k=merged.top_k,
        min_p=merged.min_p,
        max_tokens=merged.max_tokens,
        stop=tuple(dict.fromkeys(merged.stop)),
        seed=merged.seed,
        repetition_penalty=merged.repetition_penalty,
    )
