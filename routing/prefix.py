"""Prefix-cache block hashes: one function, used by nodes and coordinators alike.

A prompt is cut into fixed-size token blocks; only full blocks count. Block i's
hash chains the previous one with block i's tokens, `h_i = H(h_{i-1}, block_i)`,
and the model id is mixed into `h_0`, so equal hashes mean the same model and
the same tokens from the very start up to the end of that block. A node
reports the hashes its prompt caches hold; a coordinator hashes a request the
same way and counts how many leading blocks each node already has.

`PrefixIndex` is the coordinator's side: block hash -> the nodes holding it,
from what nodes report plus short-lived provisional entries for requests just
routed. Pure: no I/O, no clocks (callers pass `now`).
"""

from __future__ import annotations

import hashlib
import heapq
import sys
from array import array
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from mesh.types import CachedPrefix

DEFAULT_BLOCK_SIZE = 256


def _seed(model: str) -> bytes:
    return hashlib.blake2b(model.encode(), digest_size=8, person=b"macmesh-pfx").digest()


def common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences.

    Compares 256-token slices first (C speed), then the last slice one by one:
    a 32k-token prompt against a cached one costs well under a millisecond.
    """
    n = min(len(a), len(b))
    i = 0
    while i + 256 <= n and a[i : i + 256] == b[i : i + 256]:
        i += 256
    while i < n and a[i] == b[i]:
        i += 1
    return i


def block_hashes(
    model: str, tokens: Sequence[int], block_size: int = DEFAULT_BLOCK_SIZE
) -> list[int]:
    """Chained 64-bit hashes of the full `block_size`-token blocks of `tokens`."""
    if block_size < 1:
        raise ValueError("block_size must be >= 1")
    full = len(tokens) - len(tokens) % block_size
    if not full:
        return []
    # Token ids as 4-byte little-endian words: the same bytes on every platform.
    data = array("I", tokens[:full])
    if sys.byteorder != "little":  # pragma: no cover - no big-endian Macs
        data.byteswap()
    raw = data.tobytes()
    step = block_size * 4
    out: list[int] = []
    prev = _seed(model)
    for start in range(0, len(raw), step):
        prev = hashlib.blake2b(prev + raw[start : start + step], digest_size=8).digest()
        out.append(int.from_bytes(prev, "little"))
    return out


# ---------- the coordinator's index ----------


@dataclass(frozen=True, slots=True)
class IndexStats:
    """Size of a `PrefixIndex`: distinct reported hashes, provisional entries, per-node counts."""

    hashes: int
    provisional: int
    nodes: dict[str, int]
    block_sizes: tuple[int, ...]


def _bits(mask: int) -> Iterable[int]:
    """Slot numbers of the set bits of `mask`, lowest first."""
    while mask:
        low = mask & -mask
        yield low.bit_length() - 1
        mask ^= low


class PrefixIndex:
    """Block hash -> nodes holding it, per block size.

    Each node gets a small slot number; a hash maps to an int bitmask of the
    slots holding it, so a lookup is one dict probe per block and a few int
    operations, whatever the number of nodes or indexed hashes. Hashes are
    kept per block size: a lookup for hashes cut at one size only sees nodes
    that reported that size (nodes may run with different
    MLX_CACHE_BLOCK_SIZE); `block_sizes()` tells the caller which sizes to cut
    a prompt at. Each node's reported set is kept too, so a new report is
    applied as a diff.

    Provisional entries (`add_provisional`) are held apart with an expiry and
    count as held until then, whatever the node reports meanwhile: the request
    they stand for may still be queued when the next report is sent.
    """

    def __init__(self) -> None:
        self._slot: dict[str, int] = {}
        self._names: list[str | None] = []  # slot -> node id
        self._free: list[int] = []  # released slots (a heap: lowest reused first)
        self._all = 0  # mask of every slot in use
        # block_size -> hash -> mask of slots, reported / provisional.
        self._reported: dict[int, dict[int, int]] = {}
        self._prov: dict[int, dict[int, int]] = {}
        # slot -> block_size -> hashes the node reported (for diffs).
        self._held: dict[int, dict[int, set[int]]] = {}
        self._last: dict[int, tuple[CachedPrefix, ...]] = {}  # the last report, for a fast path
        # slot -> (block_size, hash) -> latest expiry of its provisional entry.
        self._prov_until: dict[int, dict[tuple[int, int], float]] = {}
        # (expires_at, seq, slot, block_size, hashes): what to look at when.
        self._expiry: list[tuple[float, int, int, int, tuple[int, ...]]] = []
        self._seq = 0

    # ----- nodes -----

    def _slot_for(self, node_id: str) -> int:
        slot = self._slot.get(node_id)
        if slot is None:
            if self._free:
                slot = heapq.heappop(self._free)
                self._names[slot] = node_id
            else:
                slot = len(self._names)
                self._names.append(node_id)
            self._slot[node_id] = slot
            self._all |= 1 << slot
        return slot

    def set_node(self, node_id: str, cached: Iterable[CachedPrefix]) -> int:
        """Replace everything `node_id` holds with `cached` (its full report).

        Returns how many (block size, hash) entries changed, added plus
        removed. The work is the size of the node's report plus the change;
        other nodes' entries are never visited.
        """
        report = tuple(cached)
        slot = self._slot_for(node_id)
        if self._last.get(slot) == report:  # the usual case: nothing moved
            return 0
        new: dict[int, set[int]] = {}
        for c in report:
            if c.block_size >= 1:
                new.setdefault(c.block_size, set()).update(c.block_hashes)
        old = self._held.get(slot, {})
        bit = 1 << slot
        changed = 0
        for size in old.keys() | new.keys():
            before, after = old.get(size, set()), new.get(size, set())
            index = self._reported.setdefault(size, {})
            gone, came = before - after, after - before
            changed += len(gone) + len(came)
            for h in gone:
                m = index[h] & ~bit
                if m:
                    index[h] = m
                else:
                    del index[h]
            for h in came:
                index[h] = index.get(h, 0) | bit
            if not index:
                del self._reported[size]
        self._held[slot] = {size: hs for size, hs in new.items() if hs}
        self._last[slot] = report
        return changed

    def drop_node(self, node_id: str) -> None:
        """Forget `node_id`: its reported and provisional entries, and its slot."""
        slot = self._slot.get(node_id)
        if slot is None:
            return
        self.set_node(node_id, ())  # clears its reported entries
        del self._slot[node_id]
        self._held.pop(slot, None)
        self._last.pop(slot, None)
        bit = 1 << slot
        for size, h in self._prov_until.pop(slot, {}):
            self._clear_prov(size, h, bit)
        self._names[slot] = None
        self._all &= ~bit
        heapq.heappush(self._free, slot)

    def nodes(self) -> list[str]:
        """Node ids known to the index, sorted."""
        return sorted(self._slot)

    def block_sizes(self) -> tuple[int, ...]:
        """Block sizes some node reported or holds provisionally, ascending."""
        return tuple(sorted(self._reported.keys() | self._prov.keys()))

    # ----- provisional entries -----

    def add_provisional(
        self,
        node_id: str,
        hashes: Sequence[int],
        expires_at: float,
        block_size: int = DEFAULT_BLOCK_SIZE,
    ) -> None:
        """Count `node_id` as holding `hashes` until `expires_at`.

        Recorded right after routing a request there, so the next requests
        with the same prefix follow it before the node reports its cache. A
        later entry for the same hash extends the expiry; an earlier one never
        shortens it.
        """
        if not hashes:
            return
        slot = self._slot_for(node_id)
        until = self._prov_until.setdefault(slot, {})
        index = self._prov.setdefault(block_size, {})
        bit = 1 << slot
        for h in hashes:
            key = (block_size, h)
            if until.get(key, float("-inf")) < expires_at:
                until[key] = expires_at
            index[h] = index.get(h, 0) | bit
        self._seq += 1
        entry = (expires_at, self._seq, slot, block_size, tuple(hashes))
        heapq.heappush(self._expiry, entry)

    def expire(self, now: float) -> int:
        """Drop provisional entries whose expiry is <= `now`; returns how many."""
        dropped = 0
        heap = self._expiry
        while heap and heap[0][0] <= now:
            _, _, slot, size, hashes = heapq.heappop(heap)
            until = self._prov_until.get(slot)
            if until is None:  # the node was dropped
                continue
            bit = 1 << slot
            for h in hashes:
                key = (size, h)
                t = until.get(key)
                if t is not None and t <= now:  # not extended by a later entry
                    del until[key]
                    self._clear_prov(size, h, bit)
                    dropped += 1
            if not until:
                del self._prov_until[slot]
        return dropped

    def _clear_prov(self, size: int, h: int, bit: int) -> None:
        index = self._prov[size]
        m = index.get(h, 0) & ~bit
        if m:
            index[h] = m
        else:
            index.pop(h, None)
            if not index:
                del self._prov[size]

    # ----- lookups -----

    def cached_blocks(
        self, hashes: Sequence[int], now: float, block_size: int = DEFAULT_BLOCK_SIZE
    ) -> dict[str, int]:
        """Per node, how many LEADING blocks of `hashes` it holds (reported or provisional).

        `hashes` is a request's `block_hashes(model, tokens, block_size)`. The
        walk stops for each node at its first missing block (a node holding
        blocks 0, 1 and 3 has 2), and for all of them once none is left.
        Nodes with 0 are left out. Expires provisional entries first.
        """
        if self._expiry and self._expiry[0][0] <= now:
            self.expire(now)
        reported = self._reported.get(block_size, {})
        prov = self._prov.get(block_size)
        out: dict[str, int] = {}
        names = self._names
        alive = self._all
        n = 0
        for h in hashes:
            m = reported.get(h, 0)
            if prov:
                m |= prov.get(h, 0)
            dead = alive & ~m
            if dead:
                if n:
                    for slot in _bits(dead):
                        out[names[slot] or ""] = n
                alive &= m
                if not alive:
                    return out
            n += 1
        if n:
            for slot in _bits(alive):
                out[names[slot] or ""] = n
        return out

    def stats(self) -> IndexStats:
        """Distinct reported hashes (all block sizes), provisional entries, per-node counts."""
        nodes = {
            name: sum(len(hs) for hs in self._held.get(slot, {}).values())
            for name, slot in sorted(self._slot.items())
        }
        return IndexStats(
            hashes=sum(len(d) for d in self._reported.values()),
            provisional=sum(len(u) for u in self._prov_until.values()),
            nodes=nodes,
            block_sizes=self.block_sizes(),
        )

    def occupancy(self, now: float) -> dict[str, int]:
        """Per node, blocks it holds: reported plus provisional (not yet reported).

        How full its caches look to placement: a new prefix goes where it
        displaces the least, and a prefix placed a moment ago counts there
        before the node says so. Expires provisional entries first.
        """
        if self._expiry and self._expiry[0][0] <= now:
            self.expire(now)
        out: dict[str, int] = {}
        for name, slot in sorted(self._slot.items()):
            held = self._held.get(slot, {})
            prov = self._prov_until.get(slot, {})
            # A provisional entry the node has since reported is counted once.
            extra = sum(1 for (size, h) in prov if h not in held.get(size, ()))
            out[name] = sum(len(hs) for hs in held.values()) + extra
        return out

    def __len__(self) -> int:
        """Distinct reported hashes, all block sizes together."""
        return sum(len(d) for d in self._reported.values())
