"""What node and coordinator metrics share: histogram buckets, registries, label bounds.

Names follow vLLM's (`..._time_to_first_token_seconds`, `..._prompt_tokens_total`)
with a `macmesh_` prefix; docs/metrics.md lists every metric. Registries are
never module globals: each server gets one passed in (or makes a fresh one),
so tests use their own and `macmesh up` keeps node and coordinator apart.
"""

from __future__ import annotations

from collections.abc import Collection

from prometheus_client import CollectorRegistry, GCCollector, PlatformCollector, ProcessCollector

PREFIX = "macmesh_"
# A label value outside the known set (an unknown model name or alias).
OTHER = "other"

# vLLM's buckets, plus finer low ends: a small model on a Mac streams a token in
# a few milliseconds, and a cached prompt's first token comes in tens of them.
TTFT_BUCKETS = (
    0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
    20.0, 40.0, 80.0, 160.0, 640.0, 2560.0,
)  # fmt: skip
ITL_BUCKETS = (
    0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15,
    0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip
E2E_BUCKETS = (
    0.1, 0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0,
    120.0, 240.0, 480.0, 960.0, 1920.0, 7680.0,
)  # fmt: skip
QUEUE_BUCKETS = (
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 40.0, 80.0,
    160.0, 320.0, 640.0,
)  # fmt: skip


def new_registry(*, process: bool = True) -> CollectorRegistry:
    """A fresh registry; `process` adds the standard process_*/python_* collectors."""
    registry = CollectorRegistry()
    if process:
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        GCCollector(registry=registry)
    return registry


def bounded(value: str, known: Collection[str]) -> str:
    """`value` if it is one of `known`, else "other": label sets stay finite."""
    return value if value in known else OTHER
