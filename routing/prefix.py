"""Prefix-cache block hashes: one function, used by nodes and coordinators alike.

A prompt is cut into fixed-size token blocks; only full blocks count. Block i's
hash chains the previous one with block i's tokens, `h_i = H(h_{i-1}, block_i)`,
and the model id is mixed into `h_0`, so equal hashes mean the same model and
the same tokens from the very start up to the end of that block. A node
reports the hashes its prompt caches hold; a coordinator hashes a request the
same way and counts how many leading blocks each node already has.

Pure: no I/O.
"""

from __future__ import annotations

import hashlib
import sys
from array import array
from collections.abc import Sequence

DEFAULT_BLOCK_SIZE = 256


def _seed(model: str) -> bytes:
    return hashlib.blake2b(model.encode(), digest_size=8, person=b"macmesh-pfx").digest()


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
