"""The coordinator's log of recent requests: a bounded ring in memory, filterable, followable.

Every request the APIs answer (generated or refused) leaves one `RequestRecord`. The ring
keeps the newest `size` of them, so its memory is bounded however busy the mesh is; older
ones are in the coordinator's log file (the same facts, one line each). Readers page with
`after` (the sequence number of the last record they have) and wait for new ones with
`wait`, which is what the /api/requests event stream and `macmesh requests --follow` do.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import deque
from dataclasses import asdict, dataclass, replace
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from coordinator.nodes import NodeView
    from coordinator.prepared import Prepared
    from mesh.types import Finish

# Records kept when the coordinator is not told otherwise (`--request-log-size`).
DEFAULT_SIZE = 1000
# Most records one query answers.
MAX_LIMIT = 1000


@dataclass(frozen=True, slots=True, kw_only=True)
class RequestRecord:
    """One request as the coordinator saw it (times in seconds)."""

    seq: int = 0  # set by the log: 1, 2, ... in arrival order
    id: str
    time: float  # wall clock (Unix) when it was received
    api: str  # "openai", "anthropic"
    key: str | None = None  # the API key's name (coordinator.keys); None without keys
    requested: str | None  # the model name as the client sent it
    model: str | None = None  # what it resolved to
    rule: str | None = None  # which rule resolved it (alias, tier:opus, wildcard:x, ...)
    node: str | None = None  # the node that served it (the last one tried)
    route_reason: str | None = None
    placement: str | None = None  # a cold model: where it was loaded and why
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    ttft_seconds: float | None = None
    # The node's own account (its usage): waiting in its queue, and prefilling. What the
    # client's time to first token has beyond these is the mesh's overhead.
    queue_seconds: float | None = None
    prefill_seconds: float | None = None
    tokens_per_second: float | None = None  # decode speed the client saw
    duration_seconds: float = 0.0
    status: int = 200  # as the API's metrics count it (499: the client went away)
    outcome: str = ""  # "stop", "length", "tool_calls", or what went wrong
    stream: bool | None = None

    @property
    def ok(self) -> bool:
        return self.status < 400

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["ok"] = self.ok
        return out


@dataclass(frozen=True, slots=True)
class RequestFilter:
    """Which records a reader wants; every field set must match (text is a substring)."""

    model: str | None = None  # requested or resolved name, exact
    node: str | None = None
    api: str | None = None
    key: str | None = None  # the API key's name
    ok: bool | None = None
    text: str | None = None  # anywhere in id, names, rule, reason, outcome (case-insensitive)

    def matches(self, r: RequestRecord) -> bool:
        if self.model is not None and self.model not in (r.requested, r.model):
            return False
        if self.node is not None and r.node != self.node:
            return False
        if self.api is not None and r.api != self.api:
            return False
        if self.key is not None and r.key != self.key:
            return False
        if self.ok is not None and r.ok != self.ok:
            return False
        if self.text:
            hay = " ".join(
                str(x)
                for x in (
                    r.id,
                    r.key,
                    r.requested,
                    r.model,
                    r.rule,
                    r.node,
                    r.route_reason,
                    r.outcome,
                )
                if x
            )
            if self.text.lower() not in hay.lower():
                return False
        return True


class RequestLog:
    """The ring of recent requests (one per coordinator; used from its event loop)."""

    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        if size < 1:
            raise ValueError("the request log keeps at least 1 record")
        self.size = size
        self._records: deque[RequestRecord] = deque(maxlen=size)
        self._seq = itertools.count(1)
        self._changed = asyncio.Event()
        self.total = 0  # records ever added (the ring holds the newest `size`)

    @property
    def last_seq(self) -> int:
        return self._records[-1].seq if self._records else 0

    def add(self, record: RequestRecord) -> RequestRecord:
        """Keep `record` (numbered) and wake whoever waits for new ones."""
        kept = replace(record, seq=next(self._seq))
        self._records.append(kept)
        self.total += 1
        self._changed.set()
        return kept

    def query(
        self, flt: RequestFilter | None = None, *, after: int = 0, limit: int = 100
    ) -> list[RequestRecord]:
        """The newest `limit` matching records with seq > `after`, oldest first."""
        limit = max(1, min(limit, MAX_LIMIT))
        out: list[RequestRecord] = []
        for r in reversed(self._records):
            if r.seq <= after:
                break
            if flt is None or flt.matches(r):
                out.append(r)
                if len(out) >= limit:
                    break
        out.reverse()
        return out

    async def wait(self, after: int, timeout: float) -> bool:
        """Wait until a record newer than `after` exists (True) or `timeout` passes."""
        while self.last_seq <= after:
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except TimeoutError:
                return self.last_seq > after
        return True


def finished(
    prepared: Prepared,
    api: str,
    request_id: str,
    node: NodeView,
    status: int,
    outcome: str,
    finish: Finish | None,
    first_at: float | None,
    t0: float,
    key: str | None = None,
) -> RequestRecord:
    """The record of a request that reached a node (`first_at`, `t0`: perf_counter times
    of its first token and of the generation's start)."""
    now = time.perf_counter()
    received = prepared.received or t0
    res = prepared.resolution
    usage = finish.usage if finish is not None else None
    tps = None
    if usage is not None and usage.generation_seconds > 0 and usage.completion_tokens:
        tps = usage.completion_tokens / usage.generation_seconds
    return RequestRecord(
        id=request_id,
        time=time.time() - (now - received),
        api=api,
        key=key,
        requested=res.requested,
        model=res.model,
        rule=res.rule,
        node=node.node_id,
        route_reason=prepared.route_reason,
        placement=prepared.placement or None,
        prompt_tokens=prepared.prompt_tokens,
        cached_tokens=usage.cached_prompt_tokens if usage else 0,
        completion_tokens=usage.completion_tokens if usage else 0,
        ttft_seconds=first_at - received if first_at is not None else None,
        queue_seconds=usage.queue_seconds if usage else None,
        prefill_seconds=usage.prompt_seconds if usage else None,
        tokens_per_second=tps,
        duration_seconds=now - received,
        status=status,
        outcome=outcome,
    )
