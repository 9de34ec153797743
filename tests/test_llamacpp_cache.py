"""The modelled llama-server slot contents (no server needed)."""

from __future__ import annotations

from node.backends.llamacpp_cache import SlotTracker
from routing.prefix import block_hashes


def test_extending_a_prompt_replaces_its_entry() -> None:
    t = SlotTracker("m", slots=2, block_size=4)
    first = list(range(10))
    assert t.record(first, cached=0)
    assert t.hashes() == tuple(block_hashes("m", first, 4))
    turn2 = [*first, 10, 11, 12, 13, 14]
    assert t.predicted(turn2) == 10
    t.record(turn2, cached=10)
    assert t.hashes() == tuple(block_hashes("m", turn2, 4))  # one entry, the longer prompt


def test_lru_keeps_as_many_prompts_as_slots() -> None:
    t = SlotTracker("m", slots=2, block_size=4)
    a, b, c = [1] * 8, [2] * 8, [3] * 8
    for p in (a, b, c):
        t.record(p, cached=0)
    held = set(t.hashes())
    assert not set(block_hashes("m", a, 4)) & held  # the oldest went
    assert set(block_hashes("m", b, 4)) | set(block_hashes("m", c, 4)) == held


def test_llama_server_reporting_less_cached_drops_the_stale_entry() -> None:
    t = SlotTracker("m", slots=4, block_size=4)
    shared = list(range(40))
    t.record([*shared, 100], cached=0)
    # llama-server reused nothing for a prompt the model thought 40 tokens warm: gone.
    t.record([*shared, 200], cached=0)
    assert t.predicted([*shared, 300]) == 40  # only the new entry explains it now
    assert len([h for h in t.hashes() if h in block_hashes("m", [*shared, 100], 4)]) == 10
