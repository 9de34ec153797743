"""The MLX prompt (KV) cache: slot choice, LRU and budgets with fakes; the real thing over gRPC.

The unit tests drive `node.cache.PromptCaches` with tiny fake layer caches
(an offset, trimmable or not, a byte size per token). The model tests start
their own node with small `MLX_CACHE_*` settings (16-token blocks) and the
real SmolLM2; a ~150-token prompt is prefilled once (MLX on CPU: ~10 s) and
then served from the cache.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.client import NodeClient
from mesh.types import (
    ChatPrompt,
    Finish,
    GenerateEvent,
    GenerateRequest,
    Message,
    SamplingParams,
    TextDelta,
    TokenPrompt,
)
from node.backends.mlx import MLXBackend
from node.cache import (
    DEFAULT_MAX_TOKENS,
    CacheConfig,
    Lease,
    PromptCaches,
    default_max_bytes,
)
from node.config import NodeConfig
from routing.prefix import block_hashes
from tests.conftest import RunningNode, start_node

# ---------- fakes ----------


class FakeLayer:
    """One layer's cache: `offset` tokens, `bytes_per_token` each, trimmable or not."""

    def __init__(self, trimmable: bool = True, bytes_per_token: int = 10) -> None:
        self.offset = 0
        self.trimmable = trimmable
        self.bytes_per_token = bytes_per_token

    def is_trimmable(self) -> bool:
        return self.trimmable

    def trim(self, n: int) -> int:
        n = min(self.offset, n)
        self.offset -= n
        return n

    @property
    def nbytes(self) -> int:
        return self.offset * self.bytes_per_token


class StateLayer:
    """Recurrent state: no offset, cannot be trimmed."""

    nbytes = 100

    def is_trimmable(self) -> bool:
        return False

    def trim(self, n: int) -> int:
        raise AssertionError("not trimmable")


def fake_cache(trimmable: bool = True, layers: int = 2) -> list[Any]:
    return [FakeLayer(trimmable) for _ in range(layers)]


def caches(**kw: int) -> PromptCaches:
    cfg = {"block_size": 4, "max_slots": 4, "min_reuse": 8, "max_tokens": 1000, "max_bytes": 10**9}
    return PromptCaches(CacheConfig(**{**cfg, **kw}))


def feed(lease: Lease, tokens: Sequence[int]) -> None:
    """What the engine's generation does to the leased cache: every token goes in."""
    for layer in lease.cache:
        if isinstance(layer, FakeLayer):
            assert layer.offset == lease.cached, "the lease holds exactly the cached prefix"
            layer.offset = len(tokens)


def run(
    pc: PromptCaches,
    prompt: Sequence[int],
    gen: Sequence[int] = (),
    model: str = "m",
    trimmable: bool = True,
) -> Lease:
    """One whole generation: acquire, feed prompt + generated tokens, release."""
    lease = pc.acquire(model, prompt, lambda: fake_cache(trimmable))
    feed(lease, [*prompt, *gen])
    pc.release(lease, [*prompt, *gen])
    return lease


def seq(start: int, n: int) -> list[int]:
    return list(range(start, start + n))


# ---------- config ----------


def test_config_from_env() -> None:
    cfg = CacheConfig.from_env({})
    assert (cfg.block_size, cfg.max_slots, cfg.min_reuse, cfg.max_tokens) == (
        256,
        4,
        512,
        DEFAULT_MAX_TOKENS,
    )
    assert cfg.max_bytes == default_max_bytes() > 0 and cfg.enabled
    cfg = CacheConfig.from_env(
        {
            "MLX_CACHE_BLOCK_SIZE": "16",
            "MLX_CACHE_MAX_SLOTS": "2",
            "MLX_CACHE_MIN_REUSE": "32",
            "MLX_CACHE_MAX_TOKENS": "4_096",
            "MLX_CACHE_MAX_BYTES": "1000000",
        }
    )
    assert cfg == CacheConfig(16, 2, 32, 4096, 1_000_000)
    assert not CacheConfig.from_env({"MLX_CACHE_MAX_SLOTS": "0"}).enabled
    with pytest.raises(ValueError, match="MLX_CACHE_BLOCK_SIZE must be >= 1"):
        CacheConfig.from_env({"MLX_CACHE_BLOCK_SIZE": "0"})
    with pytest.raises(ValueError, match="not an integer"):
        CacheConfig.from_env({"MLX_CACHE_MAX_BYTES": "lots"})


# ---------- matching ----------


def test_reuse_is_block_aligned_and_leaves_one_token_to_prefill() -> None:
    pc = caches()
    prompt = seq(0, 21)
    first = run(pc, prompt, gen=[900, 901])
    assert (first.how, first.cached) == ("fresh", 0)
    again = pc.acquire("m", prompt, fake_cache)
    # 21 tokens: 5 whole blocks, but the 21st must be fed (its logits): 20 cached.
    assert (again.how, again.cached) == ("take", 20)
    assert all(layer.offset == 20 for layer in again.cache), "trimmed back to the match"
    pc.release(again, prompt)
    exact = pc.acquire("m", seq(0, 20), fake_cache)
    assert exact.cached == 16  # 20 tokens: at most 19 reusable, 4 whole blocks


def test_partial_blocks_and_short_matches_do_not_count() -> None:
    pc = caches()
    run(pc, seq(0, 40))
    # 10 shared tokens = 2 whole blocks (8 tokens): the partial third does not count.
    lease = pc.acquire("m", [*seq(0, 10), *seq(500, 20)], fake_cache)
    assert lease.cached == 8
    pc.release(lease, None)
    # 7 shared tokens: 1 block, under min_reuse=8.
    lease = pc.acquire("m", [*seq(0, 7), *seq(500, 20)], fake_cache)
    assert (lease.how, lease.cached) == ("fresh", 0)


def test_longest_match_wins() -> None:
    pc = caches()
    run(pc, [*seq(0, 12), *seq(100, 20)])  # shares 12 with the prompt below
    run(pc, [*seq(0, 24), *seq(200, 4)])  # shares 24
    lease = pc.acquire("m", [*seq(0, 24), *seq(300, 8)], fake_cache)
    assert lease.cached == 24


def test_slot_in_use_is_copied_not_shared() -> None:
    pc = caches()
    prompt = seq(0, 33)
    run(pc, prompt)
    a = pc.acquire("m", prompt, fake_cache)
    assert (a.how, a.cached) == ("take", 32)
    feed(a, [*prompt, 7, 8, 9])  # A is generating: its cache keeps growing
    b = pc.acquire("m", prompt, fake_cache)
    assert (b.how, b.cached) == ("copy", 32)
    assert b.cache is not a.cache and all(x is not y for x, y in zip(b.cache, a.cache, strict=True))
    assert [layer.offset for layer in b.cache] == [32, 32]
    assert [layer.offset for layer in a.cache] == [36, 36], "A's cache is untouched"
    pc.release(b, prompt)
    pc.release(a, [*prompt, 7, 8, 9])
    # A's slot holds B's tokens and more: B's slot was redundant and is gone.
    assert [len(t) for t, _ in pc.slot_tokens("m")] == [36]


def test_idle_slot_holding_another_conversation_is_copied() -> None:
    pc = caches()
    system = seq(0, 16)
    history = [*system, *seq(1000, 40)]
    run(pc, history)
    # Shares only the "system prompt", and the slot holds 40 more tokens: copy.
    other = pc.acquire("m", [*system, *seq(2000, 10)], fake_cache)
    assert (other.how, other.cached) == ("copy", 16)
    pc.release(other, [*system, *seq(2000, 10)])
    # The original history is still there for its next turn, which takes it.
    nxt = pc.acquire("m", [*history, *seq(3000, 5)], fake_cache)
    assert (nxt.how, nxt.cached) == ("take", 56)


def test_next_turn_takes_the_slot_with_the_answer() -> None:
    pc = caches()
    turn1 = seq(0, 30)
    answer = seq(500, 10)
    run(pc, turn1, gen=answer)
    turn2 = [*turn1, *answer, *seq(700, 9)]
    lease = pc.acquire("m", turn2, fake_cache)
    assert (lease.how, lease.cached) == ("take", 40)


def test_untrimmable_caches_reuse_exact_prefixes_only() -> None:
    pc = caches()
    prompt = seq(0, 30)
    run(pc, prompt, trimmable=False)
    # A prompt extending the slot's tokens takes it whole (not block-aligned).
    longer = [*prompt, *seq(100, 5)]
    lease = pc.acquire("m", longer, lambda: fake_cache(False))
    assert (lease.how, lease.cached) == ("take", 30)
    pc.release(lease, None)  # (dropped)
    run(pc, prompt, trimmable=False)
    # Diverging inside the slot: it cannot be rewound, so nothing is reused.
    lease = pc.acquire("m", [*seq(0, 20), *seq(100, 20)], lambda: fake_cache(False))
    assert (lease.how, lease.cached) == ("fresh", 0)
    # And one in use is not copied.
    again = pc.acquire("m", longer, lambda: fake_cache(False))
    assert again.how == "take"
    busy = pc.acquire("m", longer, lambda: fake_cache(False))
    assert busy.how == "fresh"


# ---------- release ----------


def test_release_reconciles_with_the_cache() -> None:
    pc = caches()
    prompt = seq(0, 40)
    lease = pc.acquire("m", prompt, fake_cache)
    for layer in lease.cache:
        layer.offset = 24  # the prefill was cancelled after 24 tokens
    pc.release(lease, prompt, exact=False)
    assert [t for t, _ in pc.slot_tokens("m")] == [seq(0, 24)]
    # One token fed but never reported (the last prefill step): trimmed off.
    lease = pc.acquire("m", prompt, fake_cache)
    for layer in lease.cache:
        layer.offset = 41
    pc.release(lease, prompt)
    assert [t for t, _ in pc.slot_tokens("m")] == [prompt]
    assert all(layer.offset == 40 for layer in lease.cache)
    # A failed generation's cache is dropped, and so is a partial one without offsets.
    lease = pc.acquire("m", prompt, fake_cache)
    pc.release(lease, None)
    assert pc.slot_tokens("m") == []
    lease = pc.acquire("m", prompt, lambda: [StateLayer()])
    pc.release(lease, prompt, exact=False)
    assert pc.slot_tokens("m") == []


# ---------- limits ----------


def test_lru_eviction_over_max_slots() -> None:
    pc = caches(max_slots=2)
    a, b, c = seq(0, 20), seq(100, 20), seq(200, 20)
    run(pc, a)
    run(pc, b)
    run(pc, a)  # a is now more recent than b
    run(pc, c)
    assert sorted(t[0] for t, _ in pc.slot_tokens("m")) == [0, 200]


def test_lru_eviction_over_max_tokens_and_trim_of_a_long_slot() -> None:
    pc = caches(max_tokens=50)
    run(pc, seq(0, 20))
    run(pc, seq(100, 20))
    run(pc, seq(200, 20))  # 60 > 50: the oldest goes
    assert sorted(t[0] for t, _ in pc.slot_tokens("m")) == [100, 200]
    run(pc, seq(300, 70))  # alone over the budget: kept trimmed to 48 (whole blocks)
    assert [t for t, _ in pc.slot_tokens("m")] == [seq(300, 48)]


def test_memory_budget_is_shared_by_all_models() -> None:
    # 2 layers x 10 bytes a token: a 20-token slot is 400 bytes.
    pc = caches(max_bytes=1000)
    run(pc, seq(0, 20), model="x")
    run(pc, seq(100, 20), model="y")
    assert pc.nbytes == 800
    run(pc, seq(200, 20), model="y")  # 1200 > 1000: x's slot is the oldest
    assert pc.slot_tokens("x") == [] and len(pc.slot_tokens("y")) == 2
    assert set(pc.state()) == {"y"}
    run(pc, seq(300, 60), model="x")  # 1200 bytes on its own: not kept
    assert pc.slot_tokens("x") == [] and pc.nbytes == 800


def test_disabled_cache_hands_out_fresh_caches() -> None:
    pc = caches(max_slots=0)
    run(pc, seq(0, 40))
    lease = pc.acquire("m", seq(0, 40), fake_cache)
    assert (lease.how, lease.cached) == ("fresh", 0)
    assert pc.state() == {} and pc.slot_tokens("m") == []


# ---------- what coordinators see ----------


def test_state_hashes_predict_and_notify() -> None:
    notes: list[None] = []
    pc = caches()
    pc.on_change = lambda: notes.append(None)
    p1, p2 = seq(0, 30), [*seq(0, 12), *seq(100, 10)]
    run(pc, p1, gen=[5, 6])
    run(pc, p2)
    want = list(dict.fromkeys([*block_hashes("m", p2, 4), *block_hashes("m", [*p1, 5, 6], 4)]))
    assert list(pc.state()["m"]) == want
    assert notes, "changes are notified"
    # The next request's likely reuse, from the published hashes alone.
    probe = [*p1, 5, 6, 7]
    assert pc.predict("m", probe, block_hashes("m", probe, 4)) == 32
    assert pc.predict("m", seq(500, 30), block_hashes("m", seq(500, 30), 4)) == 0
    # A request in flight is reported with its prompt.
    lease = pc.acquire("m", seq(900, 12), fake_cache)
    assert set(block_hashes("m", seq(900, 12), 4)) <= set(pc.state()["m"])
    n = len(notes)
    pc.drop_model("m")
    assert pc.state() == {} and len(notes) == n + 1
    pc.release(lease, seq(900, 12))  # the model went away meanwhile: dropped
    assert pc.state() == {}


# ---------- the real model over gRPC ----------

BLOCK = 16
MAX_SLOTS = 2
MAX_TOKENS = 600
# Long enough to make the cold prefill dominate (MLX on CPU: ~10 s).
TOPIC = "Summarize this inventory: " + ", ".join(
    f"box {i} holds {i * 7} red apples" for i in range(9)
)


@pytest.fixture(scope="module")
def cache_node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node of its own, its prompt cache tuned small."""
    running = start_node(
        NodeConfig(
            host="127.0.0.1",
            grpc_port=0,
            home=tmp_path_factory.mktemp("cache-home"),
            models_dir=models_dir,
            scan_hf_cache=False,
            preload=("smollm2",),
            max_running=4,
            cache=CacheConfig(
                block_size=BLOCK, min_reuse=2 * BLOCK, max_slots=MAX_SLOTS, max_tokens=MAX_TOKENS
            ),
        )
    )
    yield running
    running.stop()


@pytest.fixture
async def cclient(cache_node: RunningNode) -> AsyncIterator[NodeClient]:
    async with NodeClient(cache_node.target, timeout=300) as c:
        yield c


@dataclass
class Run:
    text: str
    ttft: float
    finish: Finish


async def timed(client: NodeClient, req: GenerateRequest) -> Run:
    t0 = time.perf_counter()
    ttft = 0.0
    text = ""
    events: list[GenerateEvent] = []
    async for ev in client.generate(req):
        events.append(ev)
        if isinstance(ev, TextDelta):
            ttft = ttft or time.perf_counter() - t0
            text += ev.text
    fin = events[-1]
    assert isinstance(fin, Finish), events
    return Run(text, ttft, fin)


def greedy(prompt: Any, max_tokens: int = 8) -> GenerateRequest:
    return GenerateRequest(
        model="smollm2",
        prompt=prompt,
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )


@dataclass
class Warm:
    """The long prompt (its length - 1 a whole number of blocks) and its cold run."""

    chat: ChatPrompt
    ids: tuple[int, ...]
    cold: Run


async def _warm_up(target: str) -> Warm:
    async with NodeClient(target, timeout=300) as client:
        # Pad until all but the last token fill whole blocks: a warm rerun then
        # prefills exactly one token.
        for pad in range(BLOCK):
            chat = ChatPrompt((Message("user", TOPIC + " ok" * pad),))
            ids = (await client.render("smollm2", chat)).token_ids
            if (len(ids) - 1) % BLOCK == 0:
                break
        else:
            pytest.fail("could not align the prompt to the block size")
        cold = await timed(client, greedy(chat))
    return Warm(chat, ids, cold)


@pytest.fixture(scope="module")
def warm(cache_node: RunningNode) -> Warm:
    """The long prompt, prefilled once (cold) on the cache node."""
    return asyncio.run(_warm_up(cache_node.target))


def _mlx(node: RunningNode) -> Any:
    assert node.server.core is not None
    return node.server.core.backend(MLXBackend)


@pytest.mark.model
async def test_warm_prompt_skips_its_prefill(cclient: NodeClient, warm: Warm) -> None:
    assert warm.cold.finish.usage.cached_prompt_tokens == 0
    assert 100 < len(warm.ids) < 300
    again = await timed(cclient, greedy(warm.chat))
    usage = again.finish.usage
    assert usage.cached_prompt_tokens == len(warm.ids) - 1  # all whole blocks but the last token
    assert again.text == warm.cold.text, "greedy output is the same with the cache"
    assert again.ttft <= 0.1 * warm.cold.ttft, (again.ttft, warm.cold.ttft)
    assert usage.prompt_seconds <= 0.1 * warm.cold.finish.usage.prompt_seconds


@pytest.mark.model
async def test_concurrent_request_copies_a_slot_in_use(
    cclient: NodeClient, warm: Warm, cache_node: RunningNode
) -> None:
    long = cclient.generate(greedy(warm.chat, max_tokens=30))
    async for ev in long:
        if isinstance(ev, TextDelta):
            break  # the slot is now in use by a decoding stream
    assert _mlx(cache_node).caches.slot_tokens("smollm2")[0][1], "the slot is in use"
    second = await timed(cclient, greedy(warm.chat))
    rest = [ev async for ev in long]
    fin = rest[-1]
    assert isinstance(fin, Finish)
    assert fin.usage.cached_prompt_tokens == len(warm.ids) - 1
    assert second.finish.usage.cached_prompt_tokens == len(warm.ids) - 1
    assert second.text == warm.cold.text


@pytest.mark.model
async def test_next_turn_reuses_the_previous_turn(cclient: NodeClient, warm: Warm) -> None:
    turn2 = ChatPrompt(
        (*warm.chat.messages, Message("assistant", warm.cold.text), Message("user", "Thanks!"))
    )
    run2 = await timed(cclient, greedy(turn2, max_tokens=4))
    usage = run2.finish.usage
    assert len(warm.ids) - 1 <= usage.cached_prompt_tokens < usage.prompt_tokens
    assert usage.cached_prompt_tokens % BLOCK == 0


@pytest.mark.model
async def test_cache_state_reports_the_slot_hashes(
    cclient: NodeClient, warm: Warm, cache_node: RunningNode
) -> None:
    mlx = _mlx(cache_node)
    [prefix] = mlx.cache_state()
    assert prefix.model == "smollm2" and prefix.block_size == BLOCK
    slots = mlx.caches.slot_tokens("smollm2")
    assert slots and not any(busy for _, busy in slots)
    want: dict[int, None] = {}
    for tokens, _ in slots:
        want.update(dict.fromkeys(block_hashes("smollm2", tokens, BLOCK)))
    assert list(prefix.block_hashes) == list(want)
    assert set(block_hashes("smollm2", warm.ids, BLOCK)) <= set(prefix.block_hashes)
    assert sum(len(t) for t, _ in slots) <= MAX_TOKENS
    load = mlx.load_stats()[0]
    assert load.queued_prefill_tokens == 0


@pytest.mark.model
async def test_least_recently_used_slot_is_evicted(
    cclient: NodeClient, warm: Warm, cache_node: RunningNode
) -> None:
    mlx = _mlx(cache_node)
    mine = block_hashes("smollm2", warm.ids, BLOCK)[-1]
    assert mine in mlx.cache_state()[0].block_hashes
    rendered = await cclient.tokenize("smollm2", "The quick brown fox jumps over the lazy dog.")
    for word in ("first", "second"):  # MAX_SLOTS=2 unrelated prompts push it out
        ids = (*await cclient.tokenize("smollm2", f"A {word} story."), *rendered)
        run = await timed(cclient, greedy(TokenPrompt(tuple(ids)), max_tokens=2))
        assert run.finish.usage.cached_prompt_tokens == 0
    slots = mlx.caches.slot_tokens("smollm2")
    assert len(slots) == MAX_SLOTS
    assert mine not in mlx.cache_state()[0].block_hashes


@pytest.mark.model
async def test_repetition_penalty_sees_the_cached_prompt(cclient: NodeClient) -> None:
    # mlx-lm only shows the penalty the tokens it is fed: the engine must hand
    # it the tail of the cached prefix, or the warm output differs.
    words = "Repeat these words exactly: red green blue red green blue red green blue"
    for pad in range(BLOCK):
        chat = ChatPrompt((Message("system", "Echo."), Message("user", words + " ok" * pad)))
        ids = (await cclient.render("smollm2", chat)).token_ids
        if (len(ids) - 1) % BLOCK == 0:
            break
    req = GenerateRequest(
        model="smollm2",
        prompt=chat,
        sampling=SamplingParams(temperature=0.0, max_tokens=10, repetition_penalty=1.5),
    )
    cold = await timed(cclient, req)
    warm = await timed(cclient, req)
    assert cold.finish.usage.cached_prompt_tokens == 0
    assert warm.finish.usage.cached_prompt_tokens == len(ids) - 1
    assert warm.text == cold.text
