"""Summary statistics for benchmark figures (one definition for every benchmark)."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Sequence


def percentile(values: Sequence[float], q: float, *, empty: float = math.nan) -> float:
    """Linear-interpolated percentile (q in 0..100), numpy's default method.

    `empty` is the answer for no values (NaN unless the caller's output needs a
    number, as JSON does).
    """
    if not values:
        return empty
    xs = sorted(values)
    pos = (len(xs) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def median(values: Iterable[float], *, empty: float = math.nan) -> float:
    """The median, or `empty` for no values."""
    xs = list(values)
    return statistics.median(xs) if xs else empty
