"""Sampling-value rules shared by nodes (requests) and coordinators (settings files)."""

from __future__ import annotations

import math

from mesh.errors import InvalidRequest
from mesh.types import SamplingParams

MAX_STOP_SEQUENCES = 16
MAX_STOP_LENGTH = 256


def _finite(value: float, name: str) -> None:
    if not math.isfinite(value):
        raise InvalidRequest(f"must be a finite number, got {value}", field=name)


def check_sampling(params: SamplingParams, prefix: str = "sampling.") -> None:
    """Raise InvalidRequest naming the first field that is set to a bad value."""
    t = params.temperature
    if t is not None:
        _finite(t, f"{prefix}temperature")
        if not 0.0 <= t <= 100.0:
            raise InvalidRequest(
                f"must be between 0 and 100, got {t}", field=f"{prefix}temperature"
            )
    p = params.top_p
    if p is not None:
        _finite(p, f"{prefix}top_p")
        if not 0.0 < p <= 1.0:
            raise InvalidRequest(f"must be in (0, 1], got {p}", field=f"{prefix}top_p")
    k = params.top_k
    if k is not None and k < 0:
        raise InvalidRequest(f"must be >= 0 (0 = off), got {k}", field=f"{prefix}top_k")
    m = params.min_p
    if m is not None:
        _finite(m, f"{prefix}min_p")
        if not 0.0 <= m < 1.0:
            raise InvalidRequest(f"must be in [0, 1), got {m}", field=f"{prefix}min_p")
    n = params.max_tokens
    if n is not None and n <= 0:
        raise InvalidRequest(f"must be > 0, got {n}", field=f"{prefix}max_tokens")
    r = params.repetition_penalty
    if r is not None:
        _finite(r, f"{prefix}repetition_penalty")
        if not 0.0 < r <= 10.0:
            raise InvalidRequest(
                f"must be in (0, 10], got {r}", field=f"{prefix}repetition_penalty"
            )
    if len(params.stop) > MAX_STOP_SEQUENCES:
        raise InvalidRequest(
            f"at most {MAX_STOP_SEQUENCES} stop sequences, got {len(params.stop)}",
            field=f"{prefix}stop",
        )
    for s in params.stop:
        if not s:
            raise InvalidRequest("stop sequences must not be empty", field=f"{prefix}stop")
        if len(s) > MAX_STOP_LENGTH:
            raise InvalidRequest(
                f"a stop sequence is longer than {MAX_STOP_LENGTH} characters",
                field=f"{prefix}stop",
            )


def merge_sampling(request: SamplingParams, defaults: SamplingParams) -> SamplingParams:
    """Fields the request leaves unset take `defaults`; stop sequences are the request's."""
    return SamplingParams(
        temperature=request.temperature
        if request.temperature is not None
        else defaults.temperature,
        top_p=request.top_p if request.top_p is not None else defaults.top_p,
        top_k=request.top_k if request.top_k is not None else defaults.top_k,
        min_p=request.min_p if request.min_p is not None else defaults.min_p,
        max_tokens=request.max_tokens if request.max_tokens is not None else defaults.max_tokens,
        stop=request.stop or defaults.stop,
        seed=request.seed if request.seed is not None else defaults.seed,
        repetition_penalty=(
            request.repetition_penalty
            if request.repetition_penalty is not None
            else defaults.repetition_penalty
        ),
    )
