"""Block hashing and the prefix index (pure: no I/O), table-driven."""

from __future__ import annotations

import random

import pytest

from mesh.types import CachedPrefix
from routing.prefix import DEFAULT_BLOCK_SIZE, PrefixIndex, block_hashes, common_prefix

BS = 4  # small blocks keep the tables readable
TOKENS = list(range(100, 132))  # 8 blocks of 4
CHAIN = block_hashes("m", TOKENS, BS)


def held(*blocks: int, model: str = "m", size: int = BS) -> CachedPrefix:
    """A report holding these blocks of CHAIN (any subset: eviction leaves holes)."""
    return CachedPrefix(model, size, tuple(CHAIN[b] for b in blocks))


# ---------- hashing ----------


def test_full_blocks_only() -> None:
    assert block_hashes("m", TOKENS[:3], BS) == []
    assert len(block_hashes("m", TOKENS[:7], BS)) == 1
    assert len(CHAIN) == 8
    assert block_hashes("m", [], BS) == []
    assert len(block_hashes("m", list(range(1000)))) == 1000 // DEFAULT_BLOCK_SIZE


def test_prefix_stable_and_chained() -> None:
    for n in range(0, len(TOKENS) + 1):
        assert block_hashes("m", TOKENS[:n], BS) == CHAIN[: n // BS]
    # A different token in block 2 changes block 2 and every later hash, nothing before.
    other = block_hashes("m", [*TOKENS[:9], 7, *TOKENS[10:]], BS)
    assert other[:2] == CHAIN[:2]
    assert all(a != b for a, b in zip(other[2:], CHAIN[2:], strict=True))


def test_separated_by_model_and_block_size() -> None:
    assert not set(block_hashes("other", TOKENS, BS)) & set(CHAIN)
    assert not set(block_hashes("m", TOKENS, 2 * BS)) & set(CHAIN)


def test_hashes_are_64_bit_and_deterministic() -> None:
    assert all(0 <= h < 2**64 for h in CHAIN)
    assert block_hashes("m", TOKENS, BS) == CHAIN
    assert len(set(CHAIN)) == len(CHAIN)
    with pytest.raises(ValueError):
        block_hashes("m", TOKENS, 0)


# ---------- leading runs ----------

LEADING: list[tuple[str, tuple[int, ...], int]] = [
    # name, blocks of CHAIN the node holds, leading blocks it matches
    ("everything", tuple(range(8)), 8),
    ("first three", (0, 1, 2), 3),
    ("a hole stops the run", (0, 1, 3), 2),
    ("no first block", (1, 2, 3, 4, 5, 6, 7), 0),
    ("nothing", (), 0),
    ("only the first", (0,), 1),
    ("all but the last", tuple(range(7)), 7),
]


@pytest.mark.parametrize(("name", "blocks", "expected"), LEADING, ids=[c[0] for c in LEADING])
def test_leading_blocks(name: str, blocks: tuple[int, ...], expected: int) -> None:
    idx = PrefixIndex()
    idx.set_node("a", [held(*blocks)])
    idx.set_node("full", [held(*range(8))])  # another node does not change a's count
    got = idx.cached_blocks(CHAIN, now=0.0, block_size=BS)
    assert got.get("a", 0) == expected
    assert ("a" in got) == (expected > 0)  # zeros are left out
    assert got["full"] == 8


def test_all_nodes_in_one_lookup() -> None:
    idx = PrefixIndex()
    for i, blocks in enumerate(c[1] for c in LEADING):
        idx.set_node(f"n{i}", [held(*blocks)])
    got = idx.cached_blocks(CHAIN, now=0.0, block_size=BS)
    assert got == {f"n{i}": c[2] for i, c in enumerate(LEADING) if c[2]}
    assert idx.cached_blocks(CHAIN[:3], 0.0, BS) == {
        f"n{i}": min(c[2], 3) for i, c in enumerate(LEADING) if c[2]
    }
    assert idx.cached_blocks([], 0.0, BS) == {}
    assert idx.cached_blocks(block_hashes("other", TOKENS, BS), 0.0, BS) == {}


# ---------- reports, diffs, drops ----------


def test_set_node_diffs_against_the_previous_report() -> None:
    idx = PrefixIndex()
    assert idx.set_node("a", [held(0, 1, 2)]) == 3
    assert idx.set_node("a", [held(0, 1, 2)]) == 0  # same report: nothing to do
    assert idx.set_node("a", [held(0, 1, 2, 3)]) == 1
    assert idx.set_node("a", [held(0, 1)]) == 2  # 2 and 3 evicted
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"a": 2}
    assert len(idx) == 2
    assert idx.set_node("a", []) == 2
    assert len(idx) == 0 and idx.cached_blocks(CHAIN, 0.0, BS) == {}
    assert idx.nodes() == ["a"]  # an empty report keeps the node


def test_shared_hashes_survive_one_holder_leaving() -> None:
    idx = PrefixIndex()
    idx.set_node("a", [held(0, 1, 2)])
    idx.set_node("b", [held(0, 1)])
    assert len(idx) == 3
    assert idx.stats().nodes == {"a": 3, "b": 2}
    idx.set_node("a", [])
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"b": 2}
    assert len(idx) == 2


def test_several_models_in_one_report() -> None:
    other = block_hashes("other", TOKENS, BS)
    idx = PrefixIndex()
    idx.set_node("a", [held(0, 1), CachedPrefix("other", BS, tuple(other[:5]))])
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"a": 2}
    assert idx.cached_blocks(other, 0.0, BS) == {"a": 5}
    assert idx.stats().nodes == {"a": 7}


def test_drop_node_and_slot_reuse() -> None:
    idx = PrefixIndex()
    idx.set_node("a", [held(0, 1, 2)])
    idx.set_node("b", [held(0)])
    idx.add_provisional("a", CHAIN, expires_at=10.0, block_size=BS)
    idx.drop_node("a")
    idx.drop_node("nobody")  # unknown: no-op
    assert idx.nodes() == ["b"]
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"b": 1}
    # "c" takes a's old slot: none of a's entries, reported or provisional, leak to it.
    idx.set_node("c", [])
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"b": 1}
    assert idx.stats().provisional == 0 and len(idx) == 1


def test_block_sizes_are_kept_apart() -> None:
    big = block_hashes("m", TOKENS, 2 * BS)
    idx = PrefixIndex()
    idx.set_node("small", [held(0, 1, 2, 3)])
    idx.set_node("big", [CachedPrefix("m", 2 * BS, tuple(big[:2]))])
    assert idx.block_sizes() == (BS, 2 * BS)
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"small": 4}
    assert idx.cached_blocks(big, 0.0, 2 * BS) == {"big": 2}
    # The same hashes looked up under the wrong size see nothing.
    assert idx.cached_blocks(CHAIN, 0.0, 2 * BS) == {}
    idx.set_node("bad", [CachedPrefix("m", 0, (1, 2))])  # block size 0: ignored
    assert idx.block_sizes() == (BS, 2 * BS)


# ---------- provisional entries ----------


def test_provisional_counts_until_it_expires() -> None:
    idx = PrefixIndex()
    idx.add_provisional("a", CHAIN[:5], expires_at=10.0, block_size=BS)
    assert idx.stats().provisional == 5 and len(idx) == 0
    assert idx.cached_blocks(CHAIN, now=9.99, block_size=BS) == {"a": 5}
    assert idx.cached_blocks(CHAIN, now=10.0, block_size=BS) == {}  # expiry is inclusive
    assert idx.stats().provisional == 0
    assert idx.block_sizes() == ()


def test_provisional_and_reported_combine() -> None:
    idx = PrefixIndex()
    idx.set_node("a", [held(0, 1, 5, 6)])
    idx.add_provisional("a", CHAIN[:4], expires_at=10.0, block_size=BS)
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"a": 4}
    # A report that does not yet include the provisional blocks leaves them in place.
    idx.set_node("a", [held(0)])
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"a": 4}
    assert idx.cached_blocks(CHAIN, 11.0, BS) == {"a": 1}


def test_a_later_provisional_entry_extends_never_shortens() -> None:
    idx = PrefixIndex()
    idx.add_provisional("a", CHAIN[:3], expires_at=5.0, block_size=BS)
    idx.add_provisional("a", CHAIN[:2], expires_at=8.0, block_size=BS)
    idx.add_provisional("a", CHAIN[:1], expires_at=1.0, block_size=BS)  # earlier: no effect
    assert idx.cached_blocks(CHAIN, 0.5, BS) == {"a": 3}
    assert idx.cached_blocks(CHAIN, 6.0, BS) == {"a": 2}
    assert idx.expire(100.0) == 2
    assert idx.cached_blocks(CHAIN, 100.0, BS) == {}
    idx.add_provisional("a", [], expires_at=1.0)  # nothing to add
    assert idx.stats().provisional == 0


def test_provisional_for_two_nodes() -> None:
    idx = PrefixIndex()
    idx.add_provisional("a", CHAIN, expires_at=5.0, block_size=BS)
    idx.add_provisional("b", CHAIN[:2], expires_at=9.0, block_size=BS)
    assert idx.cached_blocks(CHAIN, 0.0, BS) == {"a": 8, "b": 2}
    assert idx.cached_blocks(CHAIN, 5.0, BS) == {"b": 2}


# ---------- against a brute-force model ----------


def test_matches_a_reference_under_random_updates() -> None:
    rng = random.Random(7)
    chains = [block_hashes("m", [rng.randrange(50) for _ in range(40)], BS) for _ in range(6)]
    pool = sorted({h for c in chains for h in c})
    nodes = [f"n{i}" for i in range(5)]
    idx = PrefixIndex()
    truth: dict[str, set[int]] = {}
    prov: dict[str, dict[int, float]] = {}
    for step in range(400):
        now = float(step)
        node = rng.choice(nodes)
        op = rng.random()
        if op < 0.5:
            hs = set(rng.sample(pool, rng.randrange(len(pool))))
            idx.set_node(node, [CachedPrefix("m", BS, tuple(hs))])
            truth[node] = hs
        elif op < 0.8:
            chain = rng.choice(chains)[: rng.randrange(1, 11)]
            until = now + rng.randrange(1, 20)
            idx.add_provisional(node, chain, until, BS)
            mine = prov.setdefault(node, {})
            for h in chain:
                mine[h] = max(mine.get(h, until), until)
        else:
            idx.drop_node(node)
            truth.pop(node, None)
            prov.pop(node, None)
        query = rng.choice(chains)
        expected: dict[str, int] = {}
        for n in set(truth) | set(prov):
            have = truth.get(n, set()) | {h for h, t in prov.get(n, {}).items() if t > now}
            run = 0
            while run < len(query) and query[run] in have:
                run += 1
            if run:
                expected[n] = run
        assert idx.cached_blocks(query, now, BS) == expected, step
        assert idx.stats().nodes == {n: len(truth.get(n, ())) for n in sorted(idx.nodes())}


def test_occupancy_counts_provisional_blocks_once() -> None:
    idx = PrefixIndex()
    a = block_hashes("m", list(range(1024)), 256)  # 4 blocks
    b = block_hashes("m", list(range(5000, 5512)), 256)  # 2 blocks
    idx.set_node("n1", [CachedPrefix("m", 256, tuple(a))])
    idx.add_provisional("n2", b, expires_at=10.0, block_size=256)
    assert idx.occupancy(now=0.0) == {"n1": 4, "n2": 2}
    idx.add_provisional("n1", a[:2], expires_at=10.0, block_size=256)  # already reported
    assert idx.occupancy(now=0.0)["n1"] == 4
    assert idx.occupancy(now=11.0) == {"n1": 4, "n2": 0}  # expired


@pytest.mark.parametrize("n", [0, 1, 255, 256, 257, 1000, 5000])
def test_common_prefix(n: int) -> None:
    base = list(range(6000))
    other = [*base[:n], -1, *base[n + 1 :]]
    assert common_prefix(base, other) == n
    assert common_prefix(tuple(base), other) == n  # a tuple against a list, too
    assert common_prefix(base[:n], base) == n
