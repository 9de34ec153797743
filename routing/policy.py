"""Which node serves a request: `choose(candidates, prompt_tokens, policy) -> Decision`.

Policies (`POLICY_NAMES`, for `--routing-policy`):

* `cache-aware` (default): the lowest estimated time to first token plus
  decode time of the expected answer (see `CostModel`), where prompt tokens
  already in a node's prefix cache cost nothing and a node's batch slows
  every stream in it, with a balance guard so one hot prefix cannot pile
  every request onto one node;
* `least-loaded`: fewest running + waiting requests, then least queued
  prefill;
* `round-robin`: the next node in node-id order (a `RoundRobin` counter the
  caller keeps).

Every policy first narrows the candidates to those with the model loaded (a
cold load costs seconds); only when none has it loaded do all compete. Ties go
to the lowest node id, so a decision is a pure function of its inputs.

Pure: no I/O, no clocks, no globals.
"""

from __future__ import annotations

import enum
import hashlib
from collections.abc import Sequence
from dataclasses import dataclass


class Policy(enum.StrEnum):
    """A routing policy; the value is its CLI / config name."""

    CACHE_AWARE = "cache-aware"
    LEAST_LOADED = "least-loaded"
    ROUND_ROBIN = "round-robin"


POLICY_NAMES: tuple[str, ...] = tuple(p.value for p in Policy)
DEFAULT_POLICY = Policy.CACHE_AWARE


class Reason(enum.StrEnum):
    """Why a node was chosen: a bounded set, fit for a metric label and a response header."""

    CACHE_HIT = "cache-hit"  # cache-aware: the winner holds part of the prompt
    COLD = "cold"  # cache-aware: no candidate holds any of the prompt
    LEAST_LOADED = "least-loaded"  # least-loaded policy, or a less busy node beat the cache
    ROUND_ROBIN = "round-robin"
    BALANCE_GUARD = "balance-guard"  # the cache-aware winner was too busy; next best taken
    ONLY_NODE = "only-node"  # a single candidate
    ONLY_LOADED = "only-loaded"  # a single candidate with the model loaded
    NOT_LOADED = "not-loaded"  # no candidate has the model loaded: it loads there first


REASONS: tuple[str, ...] = tuple(r.value for r in Reason)


@dataclass(frozen=True, slots=True)
class Candidate:
    """One node that can serve the model, as the coordinator sees it now.

    Rates are that node's measured moving averages for this model; 0 means
    not measured yet. `decode_tps` is one stream's rate; `aggregate_decode_tps`
    what all its running streams decode together now (a short window; 0 when
    nothing decodes). `cached_tokens` is the leading prompt tokens its prefix
    cache holds (`PrefixIndex.cached_blocks` x block size).
    """

    node_id: str
    loaded: bool = True
    prefill_tps: float = 0.0
    decode_tps: float = 0.0
    queued_prefill_tokens: int = 0
    running: int = 0
    waiting: int = 0
    cached_tokens: int = 0
    # Blocks its prompt caches hold in all (how full they are): a prefix nobody
    # holds goes where it evicts the least.
    cache_blocks: int = 0
    aggregate_decode_tps: float = 0.0

    @property
    def load(self) -> int:
        """Requests on the node for this model: running + waiting."""
        return self.running + self.waiting


@dataclass(frozen=True, slots=True)
class CostModel:
    """The time-to-first-token and decode estimates and the balance guard's thresholds.

    TTFT on node n, in seconds:

        (queued_prefill_tokens + prompt_tokens - cached_tokens) / prefill_rate
        + running / aggregate_decode_rate      (running / decode_rate if unknown)

    The first term is the prompt work ahead of the request (nodes prefill
    queued requests first; `queued_prefill_tokens` counts them in full) plus
    its own uncached part. The second is decode interference: the request's
    prefill waits about one decode step of the running streams, and a step
    of `running` streams takes running / (their aggregate rate). A node that
    has not measured its aggregate (nothing decoding in the last seconds, or
    an older node) falls back to one stream's rate, a step per stream, as
    engines that step streams round-robin do. An unknown rate (0) takes the
    mean of the candidates' known rates for this model, else the default
    below; with no rate known anywhere the estimate still ranks nodes by
    tokens of work and running streams. Model load time is not included.

    Decode time of the answer on node n, in seconds:

        completion_tokens / stream_rate
        stream_rate = aggregate_decode_rate / (running + 1)   (running > 0, aggregate known)
                    = decode_rate                             (otherwise)

    `completion_tokens` is `expected_completion_tokens`, capped by the
    request's max_tokens when `choose` is given it. A batching engine decodes
    its streams together: each gets a share of the aggregate, which rises
    with the batch less than the batch does, so a stream on a busy node runs
    slower than alone; joining makes the batch one larger (assuming its
    aggregate stays as measured, a slight overestimate of the slowdown on a
    batching engine). `Decision.decode_s` reports it.

    Cache-aware ranks by TTFT + decode time (beyond the quickest candidate's,
    so equal rates everywhere leave the ranking and its ties as without it),
    plus the work a miss redoes:
    `waste_weight` x (prompt tokens the best-placed candidate holds that this
    one lacks) / its prefill rate. A miss pays for those tokens once in its
    own TTFT (above) and once more in what it does to the mesh: the prefill
    delays the requests that follow on that node, and the copy evicts some
    other prefix there, whose next request then misses too. Without this term
    an idle cold node beats a briefly busy warm one, prefixes get copied
    around and caches thrash: on three llama-server nodes (shuffled shared
    prefixes, docs/benchmarks.md) two runs each gave 70.7% / 84.3% token hit
    rate and TTFT p90 6.8 / 2.2 s without it, 88.1% / 89.6% and 1.1 / 1.0 s
    with it.

    So a warm node whose batch slows every stream keeps a request while the
    prefix copy (counted twice, above) costs more than the slowdown, and
    loses it to an idle node once it does not.

    Balance guard: the winner is "hot" when its load (running + waiting)
    exceeds the least loaded candidate's by more than `balance_abs` AND is
    more than `balance_rel` times it; then the best node that is not hot wins
    instead (reason `balance-guard`). The estimate above cannot see how long
    a waiting request sits until a running stream ends (or how its decode
    slows on a node that has not measured an aggregate); the guard caps that
    error.
    """

    default_prefill_tps: float = 1000.0
    default_decode_tps: float = 25.0
    balance_abs: int = 4
    balance_rel: float = 2.0
    # Estimates this close to the best are a tie (see _cache_aware).
    tie_rel: float = 0.15
    tie_abs: float = 0.02
    waste_weight: float = 1.0
    # Answer length the decode term assumes (capped by the request's max_tokens);
    # 0 leaves decode time out of cache-aware's score.
    expected_completion_tokens: int = 128

    def ttft_s(
        self, c: Candidate, prompt_tokens: int, prefill_tps: float, decode_tps: float
    ) -> float:
        """Estimated TTFT on `c` with the given (already defaulted) rates."""
        uncached = max(prompt_tokens - c.cached_tokens, 0)
        step = c.running / (c.aggregate_decode_tps if c.aggregate_decode_tps > 0 else decode_tps)
        return (c.queued_prefill_tokens + uncached) / prefill_tps + step

    @staticmethod
    def stream_tps(c: Candidate, decode_tps: float) -> float:
        """The decode rate a new stream would get on `c` (one-stream rate already
        defaulted): its share of the batch it joins, else one stream's rate."""
        if c.running > 0 and c.aggregate_decode_tps > 0:
            return c.aggregate_decode_tps / (c.running + 1)
        return decode_tps

    def completion_tokens(self, max_tokens: int | None = None) -> int:
        """The answer length to expect: the default, capped by a request's max_tokens."""
        if max_tokens is not None and max_tokens > 0:
            return min(self.expected_completion_tokens, max_tokens)
        return self.expected_completion_tokens

    def decode_s(self, c: Candidate, completion_tokens: int, decode_tps: float) -> float:
        """Estimated time to decode `completion_tokens` on `c`."""
        return completion_tokens / self.stream_tps(c, decode_tps) if completion_tokens else 0.0

    def is_hot(self, load: int, min_load: int) -> bool:
        """Whether `load` is too far above `min_load` (the guard's test)."""
        return load - min_load > self.balance_abs and load > self.balance_rel * min_load


DEFAULT_COST = CostModel()


class RoundRobin:
    """The round-robin policy's counter; the caller keeps one (per model, if it likes)."""

    __slots__ = ("_next",)

    def __init__(self) -> None:
        self._next = 0

    def pick(self, n: int) -> int:
        """An index in range(n), one further each call."""
        i = self._next % n
        self._next = (i + 1) % n
        return i


@dataclass(frozen=True, slots=True)
class Decision:
    """Where a request goes and why, with the estimate that chose it."""

    node_id: str
    reason: str  # a Reason value
    policy: str  # a Policy value
    ttft_s: float  # estimated time to first token there (no model load time)
    cached_tokens: int  # leading prompt tokens cached there
    # Estimated time to decode the expected answer there (CostModel.decode_s).
    decode_s: float = 0.0


def _mean_known(values: Sequence[float], default: float) -> float:
    known = [v for v in values if v > 0]
    return sum(known) / len(known) if known else default


def choose(
    candidates: Sequence[Candidate],
    prompt_tokens: int,
    policy: Policy | str = DEFAULT_POLICY,
    *,
    round_robin: RoundRobin | None = None,
    cost: CostModel = DEFAULT_COST,
    affinity: int = 0,
    completion_tokens: int | None = None,
) -> Decision:
    """The node for a request of `prompt_tokens` tokens among `candidates`.

    `completion_tokens`: the request's max_tokens, if known; it caps the
    answer length the decode estimate assumes (`CostModel.completion_tokens`).

    `affinity` (cache-aware only) breaks near-ties by rendezvous hashing: give
    the hash of the prompt's first block, and prompts sharing a beginning go to
    the same node even before any node reports caching it, while different
    beginnings spread over the nodes instead of piling onto the lowest id.

    Raises ValueError with no candidates, an unknown policy name, or
    `round-robin` without a `RoundRobin` counter. Node ids must be unique.
    """
    if not candidates:
        raise ValueError("no candidate node")
    policy = Policy(policy)
    if policy is Policy.ROUND_ROBIN and round_robin is None:
        raise ValueError("the round-robin policy needs a RoundRobin counter")
    # Rates default from every candidate (same model), loaded or not.
    prefill_default = _mean_known([c.prefill_tps for c in candidates], cost.default_prefill_tps)
    decode_default = _mean_known([c.decode_tps for c in candidates], cost.default_decode_tps)

    answer = cost.completion_tokens(completion_tokens)

    def prefill_rate(c: Candidate) -> float:
        return c.prefill_tps if c.prefill_tps > 0 else prefill_default

    def decode_rate(c: Candidate) -> float:
        return c.decode_tps if c.decode_tps > 0 else decode_default

    loaded = [c for c in candidates if c.loaded]
    pool = sorted(loaded or candidates, key=lambda c: c.node_id)
    est = {c.node_id: cost.ttft_s(c, prompt_tokens, prefill_rate(c), decode_rate(c)) for c in pool}
    decode = {c.node_id: cost.decode_s(c, answer, decode_rate(c)) for c in pool}

    if policy is Policy.ROUND_ROBIN:
        assert round_robin is not None
        best, reason = pool[round_robin.pick(len(pool))], Reason.ROUND_ROBIN
    elif policy is Policy.LEAST_LOADED:
        best = min(pool, key=lambda c: (c.load, c.queued_prefill_tokens, c.node_id))
        reason = Reason.LEAST_LOADED
    else:
        held = min(max(c.cached_tokens for c in pool), prompt_tokens)
        # Decode time beyond the quickest candidate's: the same shift everywhere would
        # only widen the tie window.
        quickest = min(decode.values())
        score = {
            c.node_id: est[c.node_id]
            + decode[c.node_id]
            - quickest
            + cost.waste_weight * max(held - c.cached_tokens, 0) / prefill_rate(c)
            for c in pool
        }
        best, reason = _cache_aware(pool, score, cost, affinity)

    if len(candidates) == 1:
        reason = Reason.ONLY_NODE
    elif len(pool) == 1 and loaded:
        reason = Reason.ONLY_LOADED
    elif not loaded:
        reason = Reason.NOT_LOADED
    return Decision(
        node_id=best.node_id,
        reason=reason.value,
        policy=policy.value,
        ttft_s=est[best.node_id],
        cached_tokens=min(best.cached_tokens, prompt_tokens),
        decode_s=decode[best.node_id],
    )


def _rendezvous(affinity: int, node_id: str) -> int:
    digest = hashlib.blake2b(f"{affinity}:{node_id}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little")


def _cache_aware(
    pool: Sequence[Candidate], est: dict[str, float], cost: CostModel, affinity: int = 0
) -> tuple[Candidate, Reason]:
    """Lowest score (estimated TTFT + decode + a miss's waste), then the balance guard; `pool`
    is sorted by node id.

    Scores within `cost.tie_rel` (plus `tie_abs` seconds) of the best count
    as a tie: measured rates are noisy, and among near-equal nodes the one
    holding more of the prompt, then the affinity hash, decides.
    """

    def key(c: Candidate) -> tuple[float, int, str]:
        return (est[c.node_id], c.load, c.node_id)

    def pick(cands: Sequence[Candidate]) -> Candidate:
        top = min(est[c.node_id] for c in cands)
        near = [c for c in cands if est[c.node_id] <= top * (1 + cost.tie_rel) + cost.tie_abs]
        most = max(c.cached_tokens for c in near)
        near = [c for c in near if c.cached_tokens == most]
        if most == 0 and len(near) > 1:
            # A new prefix: the emptiest cache, so it displaces no other prefix's home.
            emptiest = min(c.cache_blocks for c in near)
            near = [c for c in near if c.cache_blocks == emptiest]
        if affinity and len(near) > 1:
            return max(near, key=lambda c: (_rendezvous(affinity, c.node_id), c.node_id))
        return min(near, key=key)

    best = pick(pool)
    min_load = min(c.load for c in pool)
    if cost.is_hot(best.load, min_load):
        # The least loaded node is never hot, so this is never empty.
        best = pick([c for c in pool if not cost.is_hot(c.load, min_load)])
        return best, Reason.BALANCE_GUARD
    if best.cached_tokens > 0:
        return best, Reason.CACHE_HIT
    if any(c.cached_tokens > 0 for c in pool):
        return best, Reason.LEAST_LOADED  # a cache holder lost on queued work
    return best, Reason.COLD
