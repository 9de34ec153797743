"""Routing policies (pure: no I/O), table-driven."""

from __future__ import annotations

from typing import Any

import pytest

from routing.policy import (
    DEFAULT_COST,
    DEFAULT_POLICY,
    POLICY_NAMES,
    REASONS,
    Candidate,
    CostModel,
    Policy,
    Reason,
    RoundRobin,
    choose,
)

C = Candidate


def F(node_id: str, **fields: Any) -> Candidate:
    """A candidate with measured rates: 1000 tok/s prefill, 50 tok/s decode."""
    return Candidate(node_id, prefill_tps=1000.0, decode_tps=50.0, **fields)


# name, candidates, prompt tokens, policy, expected node, expected reason
CASES: list[tuple[str, list[Candidate], int, str, str, str]] = [
    (
        "cache winner",
        [F("a"), F("b", cached_tokens=4096), F("c")],
        8000,
        "cache-aware",
        "b",
        "cache-hit",
    ),
    (
        "longest cached prefix wins",
        [F("a", cached_tokens=1024), F("b", cached_tokens=4096)],
        8000,
        "cache-aware",
        "b",
        "cache-hit",
    ),
    (
        "queued prefill outweighs a small cache hit",
        [F("a", cached_tokens=512, queued_prefill_tokens=20000), F("b")],
        8000,
        "cache-aware",
        "b",
        "least-loaded",
    ),
    (
        "a faster node beats a slow cache holder",
        [
            C("a", prefill_tps=100.0, decode_tps=10.0, cached_tokens=1000),
            C("b", prefill_tps=5000.0, decode_tps=50.0),
        ],
        8000,
        "cache-aware",
        "b",
        "least-loaded",
    ),
    (
        "no cached prefix anywhere",
        [F("a", running=2), F("b", running=1)],
        8000,
        "cache-aware",
        "b",
        "cold",
    ),
    (
        "running streams cost decode steps",
        [F("a", running=3), F("b", running=1), F("c", running=2)],
        100,
        "cache-aware",
        "b",
        "cold",
    ),
    (
        "balance guard: the hot prefix holder is swamped",
        [
            F("a", cached_tokens=32000, running=4, waiting=3),
            F("b", running=1),
            F("c", running=2),
        ],
        32768,
        "cache-aware",
        "b",
        "balance-guard",
    ),
    (
        "balance guard takes the best non-hot node, not simply the least loaded",
        [
            F("a", cached_tokens=32000, running=4, waiting=4),
            F("b", running=0),
            F("c", running=2, cached_tokens=16000),
        ],
        32768,
        "cache-aware",
        "c",
        "balance-guard",
    ),
    (
        "balance guard: within the absolute margin, the cache wins",
        [F("a", cached_tokens=32000, running=4), F("b")],
        32768,
        "cache-aware",
        "a",
        "cache-hit",
    ),
    (
        "balance guard: everyone busy, within the relative margin",
        [F("a", cached_tokens=32000, running=4, waiting=12), F("b", waiting=10)],
        32768,
        "cache-aware",
        "a",
        "cache-hit",
    ),
    (
        "loaded first: a cache on an unloaded node does not count",
        [
            F("a", loaded=False, cached_tokens=8000),
            F("b", running=3),
            F("c", running=5),
        ],
        8000,
        "cache-aware",
        "b",
        "cold",
    ),
    (
        "loaded first: one loaded node among several",
        [F("a", loaded=False), F("b", running=9), F("c", loaded=False)],
        100,
        "cache-aware",
        "b",
        "only-loaded",
    ),
    (
        "nothing loaded: least queued work",
        [F("a", loaded=False, running=1), F("b", loaded=False)],
        100,
        "cache-aware",
        "b",
        "not-loaded",
    ),
    ("only node", [F("a", running=50)], 100, "cache-aware", "a", "only-node"),
    ("only node, least-loaded", [C("a")], 100, "least-loaded", "a", "only-node"),
    (
        "least-loaded",
        [C("a", running=2), C("b", running=1, waiting=2), C("c", running=1)],
        100,
        "least-loaded",
        "c",
        "least-loaded",
    ),
    (
        "least-loaded ignores the cache",
        [C("a", cached_tokens=8000, running=1), C("b")],
        8000,
        "least-loaded",
        "b",
        "least-loaded",
    ),
    (
        "least-loaded tie: less queued prefill",
        [
            C("a", running=1, queued_prefill_tokens=500),
            C("b", running=1, queued_prefill_tokens=100),
        ],
        100,
        "least-loaded",
        "b",
        "least-loaded",
    ),
    (
        "least-loaded tie: lowest node id",
        [C("c", running=1), C("a", running=1), C("b", running=1)],
        100,
        "least-loaded",
        "a",
        "least-loaded",
    ),
    (
        "cache-aware tie: lowest node id",
        [F("z"), F("m"), F("q")],
        100,
        "cache-aware",
        "m",
        "cold",
    ),
    (
        "least-loaded: loaded first",
        [C("a", loaded=False), C("b", running=7), C("c", running=3)],
        100,
        "least-loaded",
        "c",
        "least-loaded",
    ),
]


@pytest.mark.parametrize(
    ("name", "candidates", "prompt", "policy", "node", "reason"), CASES, ids=[c[0] for c in CASES]
)
def test_choose(
    name: str, candidates: list[Candidate], prompt: int, policy: str, node: str, reason: str
) -> None:
    d = choose(candidates, prompt, policy, round_robin=RoundRobin())
    assert (d.node_id, d.reason) == (node, reason)
    assert d.policy == policy
    assert d.reason in REASONS
    chosen = next(c for c in candidates if c.node_id == node)
    assert d.cached_tokens == min(chosen.cached_tokens, prompt)
    assert d.ttft_s >= 0
    # The order candidates come in never matters.
    assert choose(candidates[::-1], prompt, policy, round_robin=RoundRobin()) == d


def test_the_estimate() -> None:
    c = C("a", prefill_tps=2000.0, decode_tps=40.0, queued_prefill_tokens=1000, running=2)
    d = choose([C("b", prefill_tps=1.0), c, C("x", loaded=False)], 5000, round_robin=None)
    assert d.node_id == "a"
    # (1000 queued + 5000 uncached) / 2000 + 2 running / 40
    assert d.ttft_s == pytest.approx(3.0 + 0.05)
    hit = choose([C("a", prefill_tps=2000.0, decode_tps=40.0, cached_tokens=4000)], 5000)
    assert hit.ttft_s == pytest.approx(1000 / 2000)
    over = choose([C("a", prefill_tps=2000.0, decode_tps=40.0, cached_tokens=6000)], 5000)
    assert over.ttft_s == 0.0 and over.cached_tokens == 5000


def test_unknown_rates_default_to_the_mean_of_known_ones() -> None:
    known = [C("a", prefill_tps=1000.0, decode_tps=20.0), C("b", prefill_tps=3000.0)]
    d = choose([*known, C("c", queued_prefill_tokens=2000)], 2000)
    # a: 2000/1000 = 2 s; b: 2000/3000; c: (2000 + 2000)/2000 (mean prefill) = 2 s.
    assert d.node_id == "b"
    assert d.ttft_s == pytest.approx(2000 / 3000)
    unknown = choose([C("c", queued_prefill_tokens=2000)], 2000)
    assert unknown.ttft_s == pytest.approx(4000 / DEFAULT_COST.default_prefill_tps)
    # Decode defaults too: 2 running streams at the constant's rate.
    busy = choose([C("c", running=2)], 0)
    assert busy.ttft_s == pytest.approx(2 / DEFAULT_COST.default_decode_tps)


def test_with_no_rates_nodes_rank_by_work() -> None:
    cands = [C("a", queued_prefill_tokens=4000), C("b", cached_tokens=2048), C("c")]
    assert choose(cands, 4096).node_id == "b"


def test_round_robin_cycles_in_node_order() -> None:
    rr = RoundRobin()
    cands = [C("c"), C("a"), C("b", running=9), C("x", loaded=False)]
    picks = [choose(cands, 100, Policy.ROUND_ROBIN, round_robin=rr) for _ in range(7)]
    assert [d.node_id for d in picks] == ["a", "b", "c", "a", "b", "c", "a"]
    assert {d.reason for d in picks} == {"round-robin"}
    # Fewer candidates later: the counter stays in range.
    assert choose(cands[:1], 100, "round-robin", round_robin=rr).node_id == "c"
    assert choose(cands[:2], 100, "round-robin", round_robin=rr).node_id in {"a", "c"}


def test_round_robin_counter() -> None:
    rr = RoundRobin()
    assert [rr.pick(3) for _ in range(5)] == [0, 1, 2, 0, 1]
    assert rr.pick(1) == 0


def test_a_custom_balance_guard() -> None:
    cands = [C("a", cached_tokens=8000, running=2), C("b")]
    assert choose(cands, 8192).reason == "cache-hit"
    strict = CostModel(balance_abs=1, balance_rel=1.5)
    d = choose(cands, 8192, cost=strict)
    assert (d.node_id, d.reason) == ("b", "balance-guard")


def test_bad_inputs() -> None:
    with pytest.raises(ValueError, match="no candidate"):
        choose([], 10)
    with pytest.raises(ValueError):
        choose([C("a")], 10, "fastest")
    with pytest.raises(ValueError, match="RoundRobin"):
        choose([C("a")], 10, "round-robin")


def test_names() -> None:
    assert POLICY_NAMES == ("cache-aware", "least-loaded", "round-robin")
    assert DEFAULT_POLICY is Policy.CACHE_AWARE and DEFAULT_POLICY.value == "cache-aware"
    assert set(REASONS) == {r.value for r in Reason}
    assert all(len(r) <= 16 and r.isascii() for r in REASONS)
    assert choose([C("a")], 1).policy == "cache-aware"


def test_affinity_spreads_cold_prompts_and_keeps_alike_ones_together() -> None:
    idle = [Candidate(f"n{i}", prefill_tps=400, decode_tps=150) for i in range(4)]
    picks = {choose(idle, 2000, affinity=a).node_id for a in range(1, 200)}
    assert len(picks) == 4  # different beginnings spread over every idle node
    same = {choose(idle, 2000, affinity=12345).node_id for _ in range(5)}
    assert len(same) == 1  # the same beginning, the same node
    # Near-equal estimates: a node that holds part of the prompt wins the tie.
    warm = [*idle[:3], Candidate("n3", prefill_tps=380, decode_tps=150, cached_tokens=256)]
    assert choose(warm, 2000, affinity=7).node_id == "n3"


def test_a_new_prefix_goes_to_the_emptiest_cache() -> None:
    idle = [
        Candidate("n0", prefill_tps=400, decode_tps=150, cache_blocks=12),
        Candidate("n1", prefill_tps=400, decode_tps=150, cache_blocks=3),
        Candidate("n2", prefill_tps=400, decode_tps=150, cache_blocks=12),
    ]
    assert {choose(idle, 2000, affinity=a).node_id for a in range(1, 50)} == {"n1"}


def test_a_miss_pays_for_the_prefix_it_copies() -> None:
    """A warm node with work queued keeps its prefix's requests until the queue costs
    more than the prefill a cold node would redo (and evict something else for)."""
    cold = F("cold")
    for queued, winner, reason in (
        (1500, "warm", Reason.CACHE_HIT),  # TTFT 1.53 s vs 0.83 s, but 0.8 s of it is waste
        (3000, "cold", Reason.LEAST_LOADED),  # 3.03 s vs 0.83 + 0.8 s
    ):
        warm = F("warm", cached_tokens=800, queued_prefill_tokens=queued)
        d = choose([cold, warm], 830)
        assert (d.node_id, d.reason) == (winner, reason.value)
    # The decision still reports the plain TTFT estimate, not the score.
    d = choose([cold, F("warm", cached_tokens=800, queued_prefill_tokens=1500)], 830)
    assert d.ttft_s == pytest.approx((1500 + 30) / 1000)
    # Without the waste term the idle cold node wins.
    myopic = CostModel(waste_weight=0.0)
    warm = F("warm", cached_tokens=800, queued_prefill_tokens=1500)
    assert choose([cold, warm], 830, cost=myopic).node_id == "cold"


def test_a_batching_node_slows_the_stream_it_takes() -> None:
    """A warm node decoding 3 streams at 60 tok/s together would give a 4th 15 tok/s,
    against 50 alone on an idle node: the request moves when copying the prefix there
    costs less than that slowdown (128 expected tokens: 8.5 s vs 2.6 s), and stays
    when the copy is dear."""
    cold = F("cold")
    for prompt, held, winner, reason in (
        (1000, 800, "cold", Reason.LEAST_LOADED),  # copy 0.8 s (+0.8 waste) < 6 s slower
        (8200, 8000, "warm", Reason.CACHE_HIT),  # copy 8 s (+8 waste) > 6 s slower
    ):
        warm = F("warm", cached_tokens=held, running=3, aggregate_decode_tps=60.0)
        d = choose([cold, warm], prompt)
        assert (d.node_id, d.reason) == (winner, reason.value)
    d = choose([cold, F("warm", cached_tokens=800, running=3, aggregate_decode_tps=60.0)], 1000)
    assert d.ttft_s == pytest.approx(1.0)  # the plain TTFT estimate, not the score
    assert d.decode_s == pytest.approx(128 / 50)
    warm = F("warm", cached_tokens=800, running=3, aggregate_decode_tps=60.0)
    assert choose([warm], 1000).decode_s == pytest.approx(128 / 15)
    # A short answer: the slowdown (16 tokens: 1.1 s vs 0.3 s) is less than the copy.
    assert choose([cold, warm], 1000, completion_tokens=16).node_id == "warm"
    # Decode left out of the score (the estimate as it was): the warm node keeps it.
    off = CostModel(expected_completion_tokens=0)
    d = choose([cold, warm], 1000, cost=off)
    assert d.node_id == "warm" and d.decode_s == 0.0


def test_an_unknown_aggregate_falls_back_to_one_streams_rate() -> None:
    # Nothing measured: the new stream is assumed to run at one stream's rate, so the
    # running streams cost only their decode step in the TTFT, as before.
    warm = F("warm", cached_tokens=800, running=3)
    d = choose([F("cold"), warm], 1000)
    assert d.node_id == "warm"
    assert d.ttft_s == pytest.approx(200 / 1000 + 3 / 50)
    assert d.decode_s == pytest.approx(128 / 50)
    # An idle node's aggregate (a stale reading) does not change its rate.
    idle = F("idle", aggregate_decode_tps=10.0)
    assert choose([idle], 100).decode_s == pytest.approx(128 / 50)


def test_the_decode_step_is_one_batch_step() -> None:
    # 4 running streams decoding 200 tok/s together: one step of the batch is 20 ms.
    c = C("a", prefill_tps=2000.0, decode_tps=40.0, running=4, aggregate_decode_tps=200.0)
    assert choose([c], 2000).ttft_s == pytest.approx(1.0 + 4 / 200)
    # The answer's length: the default, capped by max_tokens.
    assert DEFAULT_COST.completion_tokens() == DEFAULT_COST.expected_completion_tokens
    assert DEFAULT_COST.completion_tokens(16) == 16
    assert DEFAULT_COST.completion_tokens(100_000) == DEFAULT_COST.expected_completion_tokens
    assert choose([c], 2000, completion_tokens=10).decode_s == pytest.approx(10 / (200 / 5))


def test_equal_decode_rates_leave_the_ranking_as_it_was() -> None:
    """Idle nodes (or none measured) all decode alike: the decode term shifts every
    score alike, so near-ties and the balance guard decide as before."""
    for cands, prompt in (
        ([F("a", cached_tokens=1024), F("b", cached_tokens=4096)], 8000),
        ([F("a", running=3), F("b", running=1), F("c", running=2)], 100),
        ([Candidate(f"n{i}", prefill_tps=400, decode_tps=150) for i in range(4)], 2000),
    ):
        for affinity in range(1, 20):
            new = choose(cands, prompt, affinity=affinity)
            old = choose(
                cands, prompt, affinity=affinity, cost=CostModel(expected_completion_tokens=0)
            )
            assert (new.node_id, new.reason) == (old.node_id, old.reason)
