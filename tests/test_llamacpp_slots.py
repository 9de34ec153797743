"""The node's llama-server slot assignment (no server needed: the scheduler is pure asyncio)."""

from __future__ import annotations

import asyncio

import pytest

from node.backends.llamacpp_slots import PromptKey, SlotScheduler, Ticket
from routing.prefix import block_hashes

BLOCK = 4


def sched(slots: int = 2, prefill: float = 1000.0, decode: float = 100.0) -> SlotScheduler:
    return SlotScheduler("m", slots, block_size=BLOCK, rates=lambda: (prefill, decode))


def run(s: SlotScheduler, ids: list[int], *, cached: int = 0, out: int = 8) -> Ticket:
    """One request start to finish while a slot is free for it."""
    t = s.request(PromptKey(tuple(ids)), max_tokens=out)
    assert t.slot is not None, "expected a free slot"
    s.sent(t)
    s.release(t, ids=ids, cached=cached, completion_tokens=out)
    return t


A = list(range(1000, 1400))  # 400-token prefixes
B = list(range(2000, 2400))
C = list(range(3000, 3400))


def test_a_prompt_goes_to_the_slot_holding_its_prefix() -> None:
    s = sched()
    sa, sb = run(s, [*A, 1]).slot, run(s, [*B, 1]).slot
    assert sa is not None and sb is not None and sa.id != sb.id
    for tail in (2, 3):
        assert run(s, [*B, tail], cached=400).slot is sb
        assert run(s, [*A, tail], cached=400).slot is sa
    held = set(s.hashes())
    assert set(block_hashes("m", [*A, 3], BLOCK)) <= held
    assert set(block_hashes("m", [*B, 3], BLOCK)) <= held


async def test_a_busy_warm_slot_is_waited_for_instead_of_evicting_another_prefix() -> None:
    s = sched()
    run(s, [*A, 1])
    run(s, [*B, 1])
    first = s.request(PromptKey((*A, 2)), max_tokens=8)
    assert first.slot is not None
    s.sent(first)
    # A second question on A while A's slot decodes: 8 tokens at 100 tok/s (~0.1 s)
    # beats re-prefilling 400 tokens at 1000 tok/s (0.4 s) on B's slot.
    second = s.request(PromptKey((*A, 3)), max_tokens=8)
    assert second.slot is None and s.waiting == 1
    s.release(first, ids=[*A, 2], cached=400, completion_tokens=8)
    assert second.slot is first.slot
    assert set(block_hashes("m", B, BLOCK)) <= set(s.hashes())  # B survived


async def test_a_long_wait_takes_the_idle_slot() -> None:
    s = sched(decode=10.0)
    run(s, [*A, 1], out=500)
    run(s, [*B, 1], out=500)
    first = s.request(PromptKey((*A, 2)), max_tokens=500)
    s.sent(first)
    # ~500 tokens left at 10 tok/s (50 s) against 0.4 s of prefill: not worth it.
    second = s.request(PromptKey((*A, 3)), max_tokens=500)
    assert second.slot is not None and second.slot is not first.slot


async def test_patience_runs_out() -> None:
    s = sched(prefill=4000.0)  # saving 400 tokens is worth 0.1 s
    run(s, [*A, 1])
    run(s, [*B, 1])
    first = s.request(PromptKey((*A, 2)), max_tokens=8)
    s.sent(first)
    first.produced = 7  # nearly done: the expected wait (~0.01 s) is short
    second = s.request(PromptKey((*A, 3)), max_tokens=8)
    assert second.slot is None
    slot = await asyncio.wait_for(s.wait(second), 2.0)  # the holder never finishes
    assert slot is not first.slot


def test_no_match_takes_an_empty_slot_then_the_least_recently_used() -> None:
    s = sched(slots=3)
    ta = run(s, A)
    tb = run(s, B)
    tc = run(s, C)
    assert len({ta.slot, tb.slot, tc.slot}) == 3  # empty slots first
    run(s, [*B, 1], cached=400)
    run(s, [*C, 1], cached=400)
    d = run(s, list(range(9000, 9100)))
    assert d.slot is ta.slot  # A's was used least recently
    assert not set(block_hashes("m", A, BLOCK)) & set(s.hashes())


async def test_waiters_are_served_first_come_first_served() -> None:
    s = sched(slots=1)
    holder = s.request(PromptKey(tuple(A)), max_tokens=8)
    s.sent(holder)
    w1 = s.request(PromptKey(tuple(B)), max_tokens=8)
    w2 = s.request(PromptKey(tuple(C)), max_tokens=8)
    assert (w1.slot, w2.slot, s.waiting) == (None, None, 2)
    got = asyncio.ensure_future(s.wait(w2))
    s.release(holder, ids=A, cached=0)
    assert w1.slot is holder.slot and w2.slot is None
    s.sent(w1)
    s.release(w1, ids=B, cached=0)
    assert (await asyncio.wait_for(got, 1.0)) is holder.slot


async def test_a_cancelled_waiter_gives_up_its_claim() -> None:
    s = sched(slots=1)
    holder = s.request(PromptKey(tuple(A)), max_tokens=8)
    s.sent(holder)
    gone = s.request(PromptKey(tuple(B)), max_tokens=8)
    nxt = s.request(PromptKey(tuple(C)), max_tokens=8)
    waiting = asyncio.ensure_future(s.wait(gone))
    await asyncio.sleep(0)
    waiting.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiting
    assert s.waiting == 1
    s.release(holder, ids=A, cached=0)
    assert nxt.slot is holder.slot


def test_records_follow_what_was_sent_and_what_failed() -> None:
    s = sched(slots=1)
    run(s, A)
    never = s.request(PromptKey(tuple(B)), max_tokens=8)
    s.release(never, failed=True)  # given a slot, never sent: the slot still holds A
    assert set(block_hashes("m", A, BLOCK)) == set(s.hashes())
    cut = s.request(PromptKey(tuple(B)), max_tokens=8)
    s.sent(cut)
    assert set(block_hashes("m", B, BLOCK)) == set(s.hashes())  # reported while it runs
    s.release(cut, failed=True)  # failed mid-prefill: the slot's KV is unknown
    assert s.hashes() == ()


def test_llama_server_reusing_less_than_promised_is_counted() -> None:
    s = sched(slots=1)
    run(s, [*A, 1])
    run(s, [*A, 2], cached=400)
    assert s.mismatches == 0
    run(s, [*A, 3], cached=0)
    assert s.mismatches == 1
    assert set(block_hashes("m", [*A, 3], BLOCK)) == set(s.hashes())


def test_chats_match_by_message_until_counted() -> None:
    s = sched()
    system = {"role": "system", "content": "x" * 1600}

    def body(q: str) -> dict[str, object]:
        return {"messages": [system, {"role": "user", "content": q}]}

    other = run(s, B)
    first = s.request(PromptKey.of_chat_body(body("one")), max_tokens=8)
    assert first.slot is not None and first.slot is not other.slot
    s.sent(first)
    s.refine(first, [*A, 1])
    s.release(first, ids=[*A, 1], cached=0)
    # Not counted yet: the shared system message finds the slot.
    key = PromptKey.of_chat_body(body("two"))
    assert first.slot.match(key) > 300
    assert other.slot is not None and other.slot.match(key) == 0
    assert s.request(key, max_tokens=8).slot is first.slot
    # Different tools (the head) share nothing.
    assert first.slot.match(PromptKey.of_chat_body({**body("one"), "tools": [1]})) == 0


def test_a_shared_template_header_is_no_reason_to_evict() -> None:
    s = sched()
    held = run(s, [1, 2, *A])
    new = run(s, [1, 2, *B])  # shares 2 tokens with A's slot: the empty slot is better
    assert new.slot is not held.slot
    assert set(block_hashes("m", [1, 2, *A], BLOCK)) <= set(s.hashes())
    # A short conversation that its slot holds most of is still matched.
    short = run(s, [7, 8, 9])
    assert run(s, [7, 8, 9, 10]).slot is short.slot
