"""What a llama-server's prompt cache holds, as far as the node can tell.

llama-server keeps each slot's last prompt in its KV cache and reuses the
longest common prefix for the next request (`cache_prompt`), but it does not
say which slot served a chat. The node models the slots as an LRU of the last
prompts it sent: a finished request's prompt takes the entry it extended (the
one sharing the longest prefix) or the least recently used one. llama-server's
own answer reconciles the model: `cache_n` (tokens it reused) lower than what
an entry promised means that entry was gone, so it is dropped.

The block hashes (routing.prefix) of every entry go to coordinators in the
node state, for prefix-aware routing.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from routing.prefix import DEFAULT_BLOCK_SIZE, block_hashes


def _common_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class _Entry:
    tokens: tuple[int, ...]
    hashes: list[int]


@dataclass
class SlotTracker:
    """The modelled contents of one llama-server's slots (see the module docstring)."""

    model: str
    slots: int
    block_size: int = DEFAULT_BLOCK_SIZE
    # Most recently used last.
    _entries: list[_Entry] = field(default_factory=list)

    def predicted(self, tokens: Sequence[int]) -> int:
        """Tokens of `tokens` the model says are cached (the longest common prefix)."""
        return max((_common_prefix(e.tokens, tokens) for e in self._entries), default=0)

    def record(self, tokens: Sequence[int], cached: int) -> bool:
        """A request with prompt `tokens` finished, llama-server reused `cached` of them.

        Returns True when the reported hashes changed.
        """
        changed = False
        # Reconcile: entries that promised more than llama-server found are not there.
        for e in list(self._entries):
            if _common_prefix(e.tokens, tokens) > cached + self.block_size:
                self._entries.remove(e)
                changed = True
        best = max(self._entries, key=lambda e: _common_prefix(e.tokens, tokens), default=None)
        if best is not None and _common_prefix(best.tokens, tokens) >= len(best.tokens):
            self._entries.remove(best)  # extended: the slot now holds the longer prompt
        elif len(self._entries) >= self.slots:
            self._entries.pop(0)
        new = tuple(tokens)
        self._entries.append(_Entry(new, block_hashes(self.model, new, self.block_size)))
        return changed or bool(self._entries[-1].hashes)

    def hashes(self) -> tuple[int, ...]:
        """Every full block held, deduplicated, in entry order."""
        seen: dict[int, None] = {}
        for e in self._entries:
            seen.update(dict.fromkeys(e.hashes))
        return tuple(seen)

    def clear(self) -> None:
        self._entries.clear()
