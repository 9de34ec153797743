"""Prompt (KV) caches of the MLX backend: a warm prefix is not prefilled again.

Clients like Claude Code resend the whole conversation every turn, so most of
a prompt is usually a prefix some earlier request already ran through the
model. Each loaded model keeps a few *slots*; a slot is the model's KV cache
(mlx-lm's per-layer cache objects) together with the token ids it holds.

Matching. Prompts are cut into blocks of `block_size` tokens and hashed with
`routing.prefix.block_hashes` (the hashes coordinators route on). A request
takes the slot sharing the most leading blocks with its prompt, capped so that
at least one prompt token is left to prefill (its logits give the first
token). Only whole blocks count, so the reused length is block-aligned and
predictable from the hashes a node reports; a match shorter than `min_reuse`
tokens is not worth the bookkeeping and the request starts from an empty
cache. The slot's cache is trimmed back to the match
(`trim_prompt_cache`), and only the rest of the prompt is prefilled.

Take or copy. A slot is never shared by two running generations: the engine
mutates it in place. A matching idle slot is normally *taken*: it stays listed
but is marked in use, and its cache goes to the request. It is *copied*
instead (the matched prefix only, the original kept) when it is in use by a
running generation, or when it holds at least `min_reuse` tokens beyond the
match (another conversation sharing, say, a system prompt: taking and trimming
would throw its history away).

After the generation the slot holds the prompt *and* the generated tokens:
a chat's next turn contains the previous answer, so keeping it lets the next
turn start prefilling at its new user message. (Where the client re-renders
the answer differently, matching stops at the first differing block; nothing
is lost compared to keeping the prompt only.) A slot the new one makes
redundant (its tokens are a prefix of the new slot's) is dropped.

Limits, enforced whenever a slot comes back: per model at most `max_slots`
idle slots holding at most `max_tokens` tokens in all, and over all models at
most `max_bytes` of KV arrays (their `nbytes`); least recently used idle slots
go first. A slot longer than `max_tokens` on its own is trimmed to it. Slots in
use are not counted: they cannot be evicted, and are checked when they return.

Caches that cannot be trimmed (sliding-window caches past their window,
recurrent state) get exact-prefix reuse only: an idle slot whose tokens are
all a prefix of the prompt is taken whole; the reused length is then the
slot's length, not block-aligned. Such slots are never copied.

Threads: everything but `hashes`, `state` and `predict` runs on the MLX
engine thread (the caches are MLX arrays). The block hashes of each model's slots are
published under a lock for the event loop, computed once when a slot's tokens
change; `on_change` is called (on the engine thread) when they change.
"""

from __future__ import annotations

import copy
import logging
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from node.config import (  # re-exported: the cache's settings live with the node's config
    DEFAULT_BLOCK_SIZE,
    DEFAULT_MAX_SLOTS,
    DEFAULT_MAX_TOKENS,
    DEFAULT_MIN_REUSE,
    CacheConfig,
    default_max_bytes,
)
from routing.prefix import block_hashes, common_prefix

__all__ = [
    "DEFAULT_BLOCK_SIZE",
    "DEFAULT_MAX_SLOTS",
    "DEFAULT_MAX_TOKENS",
    "DEFAULT_MIN_REUSE",
    "CacheConfig",
    "Lease",
    "PromptCaches",
    "default_max_bytes",
]

log = logging.getLogger(__name__)

# ---------- operations on an mlx-lm prompt cache (a list of per-layer caches) ----------
# Duck-typed on the layer caches' interface (`is_trimmable`, `trim`, `offset`,
# `nbytes`), so tests can use tiny fakes instead of a model.


def can_trim(cache: Sequence[Any]) -> bool:
    """Whether every layer can drop its last tokens (mlx-lm's `can_trim_prompt_cache`)."""
    return bool(cache) and all(c.is_trimmable() for c in cache)


def trim(cache: Sequence[Any], n: int) -> None:
    """Drop the last `n` tokens of every layer (mlx-lm's `trim_prompt_cache`)."""
    if n > 0:
        for c in cache:
            c.trim(n)


def cache_offset(cache: Sequence[Any]) -> int | None:
    """Tokens the cache has seen, where a layer says (KV caches do; recurrent state does not)."""
    for c in cache:
        off = getattr(c, "offset", None)
        if isinstance(off, int):
            return off
    return None


def cache_nbytes(cache: Sequence[Any]) -> int:
    """Bytes of the cache's arrays (allocated capacity, not just the used part)."""
    total = 0
    for c in cache:
        try:
            total += int(c.nbytes)
        except NotImplementedError:
            from mlx.utils import tree_flatten

            leaves: list[tuple[str, Any]] = tree_flatten(c.state)  # type: ignore[assignment]
            total += sum(int(a.nbytes) for _, a in leaves if hasattr(a, "nbytes"))
    return total


def _is_plain_kv(layer: Any) -> bool:
    t = type(layer)
    return t.__name__ == "KVCache" and t.__module__ == "mlx_lm.models.cache"


def copy_prefix(cache: Sequence[Any], length: int, keep: int) -> list[Any]:
    """A new cache holding the first `keep` tokens of `cache` (trimmable).

    `length` is the tokens in `cache` where its layers do not say (`cache_offset`).

    Plain KV caches copy just the kept rows (a 60k-token conversation shared
    for its 8k-token system prompt must not be copied whole); anything else is
    deep-copied, then trimmed. The copy is evaluated at once, so the source
    may go on changing afterwards.
    """
    if cache and all(_is_plain_kv(c) for c in cache):
        import mlx.core as mx
        from mlx_lm.models.cache import KVCache

        out: list[Any] = []
        arrays: list[Any] = []
        for c in cache:
            layer = KVCache()  # type: ignore[no-untyped-call]
            if c.keys is not None and keep > 0:
                layer.keys = mx.contiguous(c.keys[..., :keep, :])
                layer.values = mx.contiguous(c.values[..., :keep, :])
                layer.offset = keep
                arrays += [layer.keys, layer.values]
            out.append(layer)
        mx.eval(arrays)
        return out
    copied = copy.deepcopy(list(cache))
    held = cache_offset(copied)
    trim(copied, (length if held is None else held) - keep)
    return copied


# ---------- slots ----------


@dataclass(eq=False)
class Slot:
    """One cached sequence of a model: its tokens, their block hashes and the KV cache."""

    tokens: list[int]
    hashes: list[int]
    cache: list[Any]
    nbytes: int
    last_used: int
    # In use by a running generation: `tokens` is then that request's prompt
    # (its cache holds at least those) and the slot can only be copied.
    in_use: bool = False


@dataclass(eq=False)
class Lease:
    """What one generation got from the cache; hand it back with `PromptCaches.release`."""

    model_id: str
    cache: list[Any]
    # Prompt tokens already in `cache`: prefill starts after them.
    cached: int
    # An empty cache, an idle slot's own cache, or a copy of a slot's prefix.
    how: Literal["fresh", "take", "copy"]
    # The in-use slot standing for this generation (None when caching is off).
    slot: Slot | None = None
    owner: ModelCache | None = None


@dataclass(eq=False)
class ModelCache:
    """The slots of one model."""

    model_id: str
    slots: list[Slot] = field(default_factory=list)
    closed: bool = False

    def idle(self) -> list[Slot]:
        return [s for s in self.slots if not s.in_use]


@dataclass(frozen=True, slots=True)
class _Match:
    slot: Slot
    tokens: int  # reusable prompt tokens
    trimmable: bool


class PromptCaches:
    """Every loaded model's prompt cache, under one memory budget (module docstring)."""

    def __init__(self, config: CacheConfig, on_change: Callable[[], None] | None = None) -> None:
        self.config = config
        self.on_change = on_change
        self._models: dict[str, ModelCache] = {}
        self._tick = 0  # LRU clock
        self._lock = threading.Lock()
        # model -> (hashes in order, the same as a set); read from any thread.
        self._published: dict[str, tuple[tuple[int, ...], frozenset[int]]] = {}

    # ---------- any thread ----------

    def hashes(self, model_id: str, tokens: Sequence[int]) -> list[int]:
        """The block hashes of `tokens` under this cache's block size."""
        return block_hashes(model_id, tokens, self.config.block_size)

    def state(self) -> dict[str, tuple[int, ...]]:
        """Per model with slots: the block hashes they hold (deduplicated, most recent first)."""
        with self._lock:
            return {m: h for m, (h, _) in self._published.items()}

    def predict(self, model_id: str, tokens: Sequence[int], hashes: Sequence[int]) -> int:
        """Prompt tokens the cache would likely serve now (from the published hashes).

        An estimate for queue accounting at submit time: the engine thread's
        lookup when the request starts is what counts.
        """
        cfg = self.config
        if not cfg.enabled or not hashes:
            return 0
        with self._lock:
            known = self._published.get(model_id, ((), frozenset()))[1]
        blocks = 0
        for h in hashes[: (len(tokens) - 1) // cfg.block_size]:
            if h not in known:
                break
            blocks += 1
        reused = blocks * cfg.block_size
        return reused if reused >= max(cfg.min_reuse, 1) else 0

    def slot_tokens(self, model_id: str) -> list[tuple[list[int], bool]]:
        """(tokens, in use) of each slot of the model, most recent first (introspection)."""
        mc = self._models.get(model_id)
        slots = sorted(list(mc.slots) if mc else [], key=lambda s: -s.last_used)
        return [(list(s.tokens), s.in_use) for s in slots]

    @property
    def nbytes(self) -> int:
        """Bytes of all idle slots."""
        return sum(s.nbytes for mc in list(self._models.values()) for s in mc.idle())

    # ---------- engine thread ----------

    def acquire(
        self,
        model_id: str,
        tokens: Sequence[int],
        make_cache: Callable[[], list[Any]],
        hashes: Sequence[int] | None = None,
    ) -> Lease:
        """A cache for a generation of `tokens`, with as much of the prompt in it as possible."""
        cfg = self.config
        if not cfg.enabled:
            return Lease(model_id, make_cache(), 0, "fresh")
        mc = self._models.get(model_id)
        if mc is None:
            mc = self._models[model_id] = ModelCache(model_id)
        prompt = list(tokens)
        hashes = list(hashes) if hashes is not None else self.hashes(model_id, prompt)
        best = self._best(mc, prompt, hashes)
        self._tick += 1
        how: Literal["fresh", "take", "copy"]
        if best is None:
            cache, cached, how = make_cache(), 0, "fresh"
        else:
            slot, cached = best.slot, best.tokens
            held = len(slot.tokens)
            if best.trimmable and (slot.in_use or held - cached >= max(cfg.min_reuse, 1)):
                # Shared by a running generation, or holding more than this prompt
                # needs (another conversation's history): copy the prefix.
                cache, how = copy_prefix(slot.cache, held, cached), "copy"
            else:
                offset = cache_offset(slot.cache)
                trim(slot.cache, (held if offset is None else offset) - cached)
                cache, how = slot.cache, "take"
                mc.slots.remove(slot)
        slot = Slot(prompt, hashes, cache, 0, self._tick, in_use=True)
        mc.slots.append(slot)
        log.debug("%s: prompt cache %s, %d of %d tokens", model_id, how, cached, len(prompt))
        self._publish(mc)
        return Lease(model_id, cache, cached, how, slot, mc)

    def _best(self, mc: ModelCache, prompt: list[int], hashes: list[int]) -> _Match | None:
        cfg = self.config
        limit = len(prompt) - 1  # one prompt token at least must be fed for logits
        max_blocks = limit // cfg.block_size
        floor = max(cfg.min_reuse, 1)
        best: _Match | None = None
        best_rank: tuple[int, bool, int] | None = None
        for slot in mc.slots:
            trimmable = can_trim(slot.cache)
            if trimmable:
                reuse = min(common_prefix(slot.hashes, hashes), max_blocks) * cfg.block_size
                if reuse and slot.tokens[:reuse] != prompt[:reuse]:  # a hash collision
                    continue
            elif (
                not slot.in_use
                and len(slot.tokens) <= limit
                and slot.tokens == prompt[: len(slot.tokens)]
            ):
                reuse = len(slot.tokens)
            else:
                continue
            if reuse < floor:
                continue
            # Longest match; then an idle slot (no copy); then the least to trim.
            rank = (reuse, not slot.in_use, reuse - len(slot.tokens))
            if best_rank is None or rank > best_rank:
                best, best_rank = _Match(slot, reuse, trimmable), rank
        return best

    def release(self, lease: Lease, tokens: Sequence[int] | None, *, exact: bool = True) -> None:
        """The generation is over: its cache becomes an idle slot holding `tokens`.

        `tokens` are the prompt and the generated tokens fed to the model;
        None drops the cache (the generation failed: its state is unknown).
        `exact=False` says the cache holds only some prefix of `tokens` (the
        prefill was abandoned): the layers' offset tells how much, and a cache
        without one is dropped.
        """
        mc, slot = lease.owner, lease.slot
        if mc is None or slot is None:
            return
        if slot in mc.slots:
            mc.slots.remove(slot)
        kept = None if mc.closed or tokens is None else self._reconcile(lease.cache, tokens, exact)
        nbytes = cache_nbytes(lease.cache) if kept is not None else 0
        # A slot over the memory budget on its own is dropped, not the others.
        if kept is not None and nbytes <= self.config.max_bytes:
            self._tick += 1
            new = Slot(kept, self.hashes(mc.model_id, kept), lease.cache, nbytes, self._tick)
            if can_trim(new.cache):
                # Idle slots holding a prefix of this one are redundant now.
                mc.slots = [
                    s
                    for s in mc.slots
                    if s.in_use or len(s.tokens) > len(kept) or kept[: len(s.tokens)] != s.tokens
                ]
            mc.slots.append(new)
        self._enforce(mc)
        self._publish(mc)

    def _reconcile(self, cache: list[Any], tokens: Sequence[int], exact: bool) -> list[int] | None:
        """The tokens `cache` really holds (trimmed to `max_tokens`), or None to drop it."""
        cfg = self.config
        kept = list(tokens)
        held = cache_offset(cache)
        if held is None:
            if not exact:
                return None
        elif held < len(kept):
            kept = kept[:held]
        elif held > len(kept):
            # Fed but never seen (e.g. the token computed as the prefill ended).
            if not can_trim(cache):
                return None
            trim(cache, held - len(kept))
        if len(kept) > cfg.max_tokens:
            if not can_trim(cache):
                return None
            # Keep the head: that is what later prompts share.
            cut = cfg.max_tokens - cfg.max_tokens % cfg.block_size
            trim(cache, len(kept) - cut)
            kept = kept[:cut]
        return kept or None

    def _enforce(self, mc: ModelCache) -> None:
        """Evict least recently used idle slots until the limits hold."""
        cfg = self.config
        changed: set[str] = set()
        while True:
            idle = mc.idle()
            if not idle or (
                len(idle) <= cfg.max_slots and sum(len(s.tokens) for s in idle) <= cfg.max_tokens
            ):
                break
            self._evict(mc, min(idle, key=lambda s: s.last_used))
        while self.nbytes > cfg.max_bytes:
            victims = [(s, m) for m in self._models.values() for s in m.idle()]
            if not victims:
                break
            s, m = min(victims, key=lambda v: v[0].last_used)
            self._evict(m, s)
            changed.add(m.model_id)
        for model_id in changed - {mc.model_id}:
            self._publish(self._models[model_id])

    def _evict(self, mc: ModelCache, slot: Slot) -> None:
        log.debug(
            "%s: evicting a prompt-cache slot of %d tokens (%d bytes)",
            mc.model_id,
            len(slot.tokens),
            slot.nbytes,
        )
        mc.slots.remove(slot)

    def drop_model(self, model_id: str) -> None:
        """Forget the model's slots (it is being unloaded); running leases are dropped later."""
        mc = self._models.pop(model_id, None)
        if mc is None:
            return
        mc.closed = True
        mc.slots.clear()
        self._publish(mc)

    def _publish(self, mc: ModelCache) -> None:
        """Recompute the model's reported hashes; notify when they changed."""
        seen: dict[int, None] = {}
        if not mc.closed:
            for s in sorted(mc.slots, key=lambda s: -s.last_used):
                seen.update(dict.fromkeys(s.hashes))
        hashes = tuple(seen)
        with self._lock:
            old = self._published.get(mc.model_id, ((), frozenset()))[0]
            if mc.closed or not hashes:
                self._published.pop(mc.model_id, None)
            else:
                self._published[mc.model_id] = (hashes, frozenset(hashes))
        if old != hashes and self.on_change is not None:
            self.on_change()
