"""Sampling validation and defaults (table-driven)."""

from __future__ import annotations

import math

import pytest

from mesh.errors import InvalidRequest
from mesh.types import SamplingParams
from node.config import SamplingDefaults
from node.sampling import MAX_STOP_SEQUENCES, resolve_sampling

DEFAULTS = SamplingDefaults(temperature=0.7, top_p=0.9, top_k=40, min_p=0.05, max_tokens=100)


def test_unset_fields_take_defaults() -> None:
    r = resolve_sampling(SamplingParams(), DEFAULTS)
    assert (r.temperature, r.top_p, r.top_k, r.min_p, r.max_tokens) == (0.7, 0.9, 40, 0.05, 100)
    assert r.seed is None and r.stop == () and not r.greedy


def test_request_overrides_defaults() -> None:
    r = resolve_sampling(
        SamplingParams(temperature=0.0, top_k=0, max_tokens=5, seed=3, stop=("a", "b", "a")),
        DEFAULTS,
    )
    assert r.greedy and r.top_k == 0 and r.max_tokens == 5 and r.seed == 3
    assert r.stop == ("a", "b"), "duplicate stop sequences are folded"


@pytest.mark.parametrize(
    ("params", "field"),
    [
        (SamplingParams(temperature=-0.1), "temperature"),
        (SamplingParams(temperature=math.nan), "temperature"),
        (SamplingParams(temperature=math.inf), "temperature"),
        (SamplingParams(top_p=0.0), "top_p"),
        (SamplingParams(top_p=1.01), "top_p"),
        (SamplingParams(top_k=-1), "top_k"),
        (SamplingParams(min_p=-0.1), "min_p"),
        (SamplingParams(min_p=1.0), "min_p"),
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(max_tokens=-1), "max_tokens"),
        (SamplingParams(repetition_penalty=0.0), "repetition_penalty"),
        (SamplingParams(stop=("",)), "stop"),
        (SamplingParams(stop=("x" * 257,)), "stop"),
        (SamplingParams(stop=tuple(str(i) for i in range(MAX_STOP_SEQUENCES + 1))), "stop"),
    ],
)
def test_bad_values_name_the_field(params: SamplingParams, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        resolve_sampling(params, DEFAULTS)
    assert info.value.field == f"sampling.{field}"
    assert info.value.message.startswith(f"sampling.{field}: ")
