"""The node picks each request's llama-server slot, so it knows what every slot holds.

llama-server keeps each slot's last prompt in its KV cache and reuses the
longest common prefix (`cache_prompt`). Left to itself it gives a request the
idle slot most similar to it, else the least recently used idle one: when the
slot holding a request's prefix is busy (a second question on the same long
system prompt), the request lands on another slot, evicts that slot's prefix,
prefills its own in full, and afterwards both slots hold the same prefix.
And the node cannot tell which slot served a chat.

So the node assigns slots itself (`id_slot` on every request; llama-server
queues a request for a busy slot until it frees) with this rule:

* the slot sharing the longest prefix with the prompt, if it is idle;
* if that slot is busy, wait for it while the prefill it saves is worth more
  than the expected wait (the holder's remaining decode and anyone queued
  ahead); past that, or when nothing matches, the idle slot sharing the most,
  then an empty one, then the least recently used;
* no idle slot: queue (first come, first served) for whichever frees first,
  unless the matching slot is worth waiting for.

Because the node chose every slot, its record of their prompts is exact, and
their block hashes (routing.prefix) go to coordinators in the node state.
llama-server's own answer (`cache_n`, the tokens it reused) is compared with
the match the record promised; a shortfall is counted (`mismatches`) and
logged, and the record follows the new prompt either way.

Before a chat has been counted (the count runs while the request is queued),
its prompt is matched by message: chained digests of the request body's
messages, weighted by their length, stand in for token ids.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from routing.prefix import DEFAULT_BLOCK_SIZE, block_hashes, common_prefix

log = logging.getLogger(__name__)

# Characters per token when only message digests are known (English-ish text).
CHARS_PER_TOKEN = 4.0
# Rates assumed before the model has been measured (tok/s).
DEFAULT_PREFILL_TPS = 500.0
DEFAULT_DECODE_TPS = 30.0
# Expected output when nothing has finished yet and the request sets no lower cap.
DEFAULT_COMPLETION_TOKENS = 256
_EMA = 0.2


@dataclass(frozen=True, slots=True)
class PromptKey:
    """What a request's prompt is known to be: token ids once counted, and message digests.

    `parts[i]` is a digest chained over everything up to message i (parts[0]
    covers what precedes the messages: tools, template options); `chars[i]` is
    the length of what part i adds.
    """

    ids: tuple[int, ...] | None = None
    parts: tuple[int, ...] = ()
    chars: tuple[int, ...] = ()

    @staticmethod
    def of_chat_body(body: dict[str, Any], ids: Sequence[int] | None = None) -> PromptKey:
        """The key of a `/v1/chat/completions` body (before sampling fields are added)."""
        head = {k: v for k, v in body.items() if k != "messages"}
        pieces = [json.dumps(head, sort_keys=True)]
        pieces += [json.dumps(m, sort_keys=True) for m in body.get("messages", ())]
        parts: list[int] = []
        h = hashlib.blake2b(digest_size=8)
        for piece in pieces:
            h.update(piece.encode())
            parts.append(int.from_bytes(h.copy().digest(), "little"))
        return PromptKey(
            tuple(ids) if ids is not None else None, tuple(parts), tuple(len(p) for p in pieces)
        )

    def with_ids(self, ids: Sequence[int]) -> PromptKey:
        """The same prompt, now counted."""
        return PromptKey(tuple(ids), self.parts, self.chars)


@dataclass(eq=False)
class Slot:
    """One llama-server slot as the node assigned it."""

    id: int
    ids: tuple[int, ...] = ()  # the prompt it last prefilled (its KV holds at least this)
    parts: tuple[int, ...] = ()
    chars: tuple[int, ...] = ()
    hashes: tuple[int, ...] = ()
    last_used: int = 0
    holder: Ticket | None = None

    @property
    def busy(self) -> bool:
        return self.holder is not None

    def useful(self, key: PromptKey, block_size: int) -> int:
        """`match`, or 0 when reusing it would throw away most of what the slot holds
        for less than a block (a shared chat-template header, say)."""
        m = self.match(key)
        return m if m >= block_size or 2 * m >= len(self.ids) else 0

    def match(self, key: PromptKey) -> int:
        """Tokens of `key`'s prompt this slot holds (estimated from messages until counted)."""
        if key.ids is not None and self.ids:
            return common_prefix(self.ids, key.ids)
        n = common_prefix(self.parts, key.parts)
        if n == 0:
            return 0
        matched_chars = sum(key.chars[:n])
        total_chars = sum(self.chars)
        per_token = total_chars / len(self.ids) if self.ids and total_chars else CHARS_PER_TOKEN
        return int(matched_chars / per_token)


@dataclass(eq=False)
class Ticket:
    """One request's claim on a slot: queued until `slot` is set, then running."""

    key: PromptKey
    max_tokens: int
    arrived: float
    slot: Slot | None = None
    matched: int = 0  # tokens the chosen slot was expected to reuse
    matched_exact: bool = False  # `matched` came from token ids, not message digests
    produced: int = 0  # output tokens so far (the caller counts them)
    prefilled: bool = False
    sent: bool = False  # the request went to llama-server (the slot's KV changed)
    _ready: asyncio.Future[Slot] | None = field(default=None, repr=False)

    @property
    def prompt_tokens(self) -> int:
        if self.key.ids is not None:
            return len(self.key.ids)
        return int(sum(self.key.chars) / CHARS_PER_TOKEN)


class SlotScheduler:
    """Assigns one llama-server's slots (see the module docstring). Single event loop."""

    def __init__(
        self,
        model: str,
        slots: int,
        *,
        block_size: int = DEFAULT_BLOCK_SIZE,
        rates: Callable[[], tuple[float, float]] | None = None,
        on_change: Callable[[], None] | None = None,
    ) -> None:
        """`rates()` gives the measured (prefill, decode) tok/s, 0 where unmeasured."""
        self.model = model
        self.block_size = block_size
        self.slots = [Slot(i) for i in range(max(1, slots))]
        self._rates = rates or (lambda: (0.0, 0.0))
        self._on_change = on_change or (lambda: None)
        self._queue: list[Ticket] = []
        self._clock = itertools.count(1)
        self._timer: asyncio.TimerHandle | None = None
        self.avg_completion = 0.0
        self.mismatches = 0  # llama-server reused fewer tokens than the record promised

    # ---------- the request side ----------

    def request(self, key: PromptKey, max_tokens: int) -> Ticket:
        """Queue a request; its `slot` is set at once when one is free for it."""
        t = Ticket(key, max_tokens, time.monotonic())
        self._queue.append(t)
        self._dispatch()
        return t

    def refine(self, ticket: Ticket, ids: Sequence[int]) -> None:
        """The prompt has been counted: match it by tokens from now on."""
        ticket.key = ticket.key.with_ids(ids)
        if ticket.slot is None:
            self._dispatch()
        elif ticket.sent:
            self._set(ticket.slot, ticket.key)
            self._on_change()

    def sent(self, ticket: Ticket) -> None:
        """The request went to llama-server: from now on its slot holds this prompt.

        Said at once (not when it finishes) so that coordinators send the
        prompt's followers here while it is still being prefilled.
        """
        assert ticket.slot is not None and ticket.slot.holder is ticket
        ticket.sent = True
        self._set(ticket.slot, ticket.key)
        self._on_change()

    async def wait(self, ticket: Ticket) -> Slot:
        """The ticket's slot, once it has one. Cancelling gives the claim up."""
        if ticket.slot is not None:
            return ticket.slot
        loop = asyncio.get_running_loop()
        ticket._ready = loop.create_future()
        try:
            return await ticket._ready
        except asyncio.CancelledError:
            self.release(ticket, failed=True)
            raise

    def release(
        self,
        ticket: Ticket,
        *,
        ids: Sequence[int] | None = None,
        cached: int | None = None,
        completion_tokens: int = 0,
        failed: bool = False,
    ) -> None:
        """The request is done (or gave up): free its slot, record what the slot holds.

        `cached` is what llama-server says it reused; `ids` the prompt it was
        sent. A request that failed after it was sent leaves the slot's record
        empty (its KV state is unknown); one never sent leaves it as it was.
        """
        if ticket in self._queue:
            self._queue.remove(ticket)
        slot = ticket.slot
        if slot is None or slot.holder is not ticket:
            self._dispatch()
            return
        slot.holder = None
        slot.last_used = next(self._clock)
        if ticket.sent and failed:
            self._set(slot, PromptKey())
        elif ticket.sent:
            key = ticket.key.with_ids(ids) if ids is not None else ticket.key
            if (
                cached is not None
                and ticket.matched_exact
                and cached + self.block_size < ticket.matched
            ):
                self.mismatches += 1
                log.info(
                    "%s slot %d: llama-server reused %d tokens, the record promised %d",
                    self.model,
                    slot.id,
                    cached,
                    ticket.matched,
                )
            self._set(slot, key)
            if completion_tokens > 0:
                self.avg_completion = (
                    completion_tokens
                    if not self.avg_completion
                    else _EMA * completion_tokens + (1 - _EMA) * self.avg_completion
                )
        self._on_change()
        self._dispatch()

    # ---------- state ----------

    @property
    def running(self) -> int:
        return sum(1 for s in self.slots if s.busy)

    @property
    def waiting(self) -> int:
        return len(self._queue)

    def hashes(self) -> tuple[int, ...]:
        """Every full block the slots hold, deduplicated, most recently used first."""
        seen: dict[int, None] = {}
        for s in sorted(self.slots, key=lambda s: -s.last_used):
            seen.update(dict.fromkeys(s.hashes))
        return tuple(seen)

    def clear(self) -> None:
        """llama-server restarted: every slot is empty."""
        for s in self.slots:
            self._set(s, PromptKey())

    def predicted(self, key: PromptKey) -> int:
        """Tokens of the prompt the best slot holds."""
        return max(s.match(key) for s in self.slots)

    # ---------- the rule ----------

    def _set(self, slot: Slot, key: PromptKey) -> None:
        ids = key.ids or ()
        if ids != slot.ids:
            slot.hashes = tuple(block_hashes(self.model, ids, self.block_size)) if ids else ()
        slot.ids, slot.parts, slot.chars = ids, key.parts, key.chars

    def _rates_now(self) -> tuple[float, float]:
        prefill, decode = self._rates()
        return prefill or DEFAULT_PREFILL_TPS, decode or DEFAULT_DECODE_TPS

    def _expected_out(self, t: Ticket) -> float:
        typical = 2 * self.avg_completion if self.avg_completion else DEFAULT_COMPLETION_TOKENS
        return max(min(float(t.max_tokens), typical), t.produced + 1.0)

    def _service_s(self, t: Ticket, prefill: float, decode: float) -> float:
        """Seconds `t` still holds its slot: the prefill left, then the expected output."""
        left = max(self._expected_out(t) - t.produced, 1.0) / decode
        if not t.prefilled:
            left += max(t.prompt_tokens - t.matched, 0) / prefill
        return left

    def _choose(self, t: Ticket, now: float, ahead: dict[int, float]) -> tuple[Slot | None, float]:
        """A slot for `t` now, or None and how long waiting for its warm slot still pays.

        `ahead[slot id]` is the service time of tickets queued before `t` that
        wait for that slot.
        """
        idle = [s for s in self.slots if not s.busy]

        def gain(s: Slot) -> int:
            return s.useful(t.key, self.block_size)

        # Longest useful match; among equals an idle one, then the most recently used.
        best = max(self.slots, key=lambda s: (gain(s), not s.busy, s.last_used))
        m_best = gain(best)
        fallback = max(idle, key=lambda s: (gain(s), not s.ids, -s.last_used)) if idle else None
        if m_best == 0 or (not best.busy and best.id not in ahead):
            return (best if m_best else fallback), 0.0
        m_fallback = gain(fallback) if fallback else 0
        if fallback is not None and m_fallback >= m_best:
            return fallback, 0.0
        prefill, decode = self._rates_now()
        saved = (m_best - m_fallback) / prefill
        wait = ahead.get(best.id, 0.0)
        if best.holder is not None:
            wait += self._service_s(best.holder, prefill, decode)
        waited = now - t.arrived
        if fallback is None or (wait < saved and waited < saved):
            ahead[best.id] = ahead.get(best.id, 0.0) + self._service_s(t, prefill, decode)
            return None, max(saved - waited, 0.0) if fallback is not None else 0.0
        return fallback, 0.0

    def _dispatch(self) -> None:
        """Give free slots to queued tickets, first come first served."""
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        now = time.monotonic()
        recheck = float("inf")
        ahead: dict[int, float] = {}
        for t in list(self._queue):
            if all(s.busy for s in self.slots):
                break
            slot, patience = self._choose(t, now, ahead)
            if slot is None:
                if patience > 0:
                    recheck = min(recheck, patience)
                continue
            self._queue.remove(t)
            t.slot, t.matched = slot, slot.match(t.key)
            t.matched_exact = t.key.ids is not None and bool(slot.ids)
            slot.holder = t
            log.debug(
                "%s: slot %d (reuses ~%d of %d tokens, waited %.3fs)",
                self.model,
                slot.id,
                t.matched,
                t.prompt_tokens,
                now - t.arrived,
            )
            if t._ready is not None and not t._ready.done():
                t._ready.set_result(slot)
        if recheck != float("inf"):
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:
                return
            self._timer = loop.call_later(recheck + 0.001, self._dispatch)
