"""Validate a request's sampling settings and fill in the node's defaults."""

from __future__ import annotations

import math
from dataclasses import dataclass

from mesh.errors import InvalidRequest
from mesh.types import SamplingParams
from node.config import SamplingDefaults

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


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


def _finite(value: float, name: str) -> float:
    if not math.isfinite(value):
        raise InvalidRequest(f"must be a finite number, got {value}", field=f"sampling.{name}")
    return value


def resolve_sampling(params: SamplingParams, defaults: SamplingDefaults) -> ResolvedSampling:
    """Apply defaults; raise InvalidRequest naming the first bad field."""
    temperature = _finite(
        params.temperature if params.temperature is not None else defaults.temperature,
        "temperature",
    )
    if not 0.0 <= temperature <= 100.0:
        raise InvalidRequest(
            f"must be between 0 and 100, got {temperature}", field="sampling.temperature"
        )
    top_p = _finite(params.top_p if params.top_p is not None else defaults.top_p, "top_p")
    if not 0.0 < top_p <= 1.0:
        raise InvalidRequest(f"must be in (0, 1], got {top_p}", field="sampling.top_p")
    top_k = params.top_k if params.top_k is not None else defaults.top_k
    if top_k < 0:
        raise InvalidRequest(f"must be >= 0 (0 = off), got {top_k}", field="sampling.top_k")
    min_p = _finite(params.min_p if params.min_p is not None else defaults.min_p, "min_p")
    if not 0.0 <= min_p < 1.0:
        raise InvalidRequest(f"must be in [0, 1), got {min_p}", field="sampling.min_p")
    max_tokens = params.max_tokens if params.max_tokens is not None else defaults.max_tokens
    if max_tokens <= 0:
        raise InvalidRequest(f"must be > 0, got {max_tokens}", field="sampling.max_tokens")
    rep = _finite(
        params.repetition_penalty
        if params.repetition_penalty is not None
        else defaults.repetition_penalty,
        "repetition_penalty",
    )
    if not 0.0 < rep <= 10.0:
        raise InvalidRequest(f"must be in (0, 10], got {rep}", field="sampling.repetition_penalty")
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(params.stop)}",
            field="sampling.stop",
        )
    for s in params.stop:
        if not s:
            raise InvalidRequest("stop sequences must not be empty", field="sampling.stop")
        if len(s) > MAX_STOP_LENGTH:
            raise InvalidRequest(
                f"a stop sequence is longer than {MAX_STOP_LENGTH} characters",
                field="sampling.stop",
            )
    return ResolvedSampling(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        min_p=min_p,
        max_tokens=max_tokens,
        stop=tuple(dict.fromkeys(params.stop)),
        seed=params.seed,
        repetition_penalty=rep,
    )
