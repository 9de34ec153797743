"""Continuous batching on the real SmolLM2 model, over real gRPC.

Concurrent requests share one mlx-lm `BatchGenerator`; each must still get
exactly what it would get alone (greedy text, seeded samples, stop sequences,
max_tokens), a cancel must leave the others intact, long prompts must not
freeze running streams, and the KV memory limit must hold the batch back
rather than crash.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mesh.client import NodeClient
from mesh.types import (
    ErrorEvent,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    SamplingParams,
    TextDelta,
    TokenPrompt,
)
from node.backends.mlx import MLXBackend
from node.config import CacheConfig
from tests.conftest import RunningNode, start_smollm2_node
from tests.node_calls import chat, collect, finish_of, text_of

pytestmark = pytest.mark.model

PROMPTS = (
    "What is the capital of France?",
    "Name three colours of the rainbow.",
    "Write one sentence about the sea.",
    "What is two plus two?",
    "Say hello in Spanish.",
    "What do bees make?",
    "Name a large planet.",
    "What is ice made of?",
)


def mlx_of(node: RunningNode) -> MLXBackend:
    assert node.server.core is not None
    return node.server.core.backend(MLXBackend)


async def alone_then_together(
    client: NodeClient, reqs: list[GenerateRequest]
) -> tuple[list[list[GenerateEvent]], list[list[GenerateEvent]]]:
    alone = [await collect(client, r) for r in reqs]
    together = list(await asyncio.gather(*(collect(client, r) for r in reqs)))
    return alone, together


async def test_concurrent_greedy_streams_match_each_alone(
    client: NodeClient, node: RunningNode
) -> None:
    reqs = [chat(p, temperature=0.0, max_tokens=12) for p in PROMPTS[:4]]
    alone, together = await alone_then_together(client, reqs)
    for a, t in zip(alone, together, strict=True):
        assert text_of(t) == text_of(a)
        assert finish_of(t).reason == finish_of(a).reason
        assert finish_of(t).usage.completion_tokens == finish_of(a).usage.completion_tokens
    # They really ran as one batch.
    _, most = mlx_of(node).batch_sizes()["smollm2"]
    assert most >= 4


async def test_seed_reproduces_inside_a_batch(client: NodeClient) -> None:
    seeded = chat(PROMPTS[2], temperature=0.9, top_p=0.95, seed=1234, max_tokens=12)
    alone = text_of(await collect(client, seeded))
    others = [
        chat(PROMPTS[0], temperature=1.0, max_tokens=12),  # unseeded
        chat(PROMPTS[1], temperature=0.7, seed=7, max_tokens=12),
        chat(PROMPTS[3], temperature=0.0, max_tokens=12),
    ]
    results = await asyncio.gather(collect(client, seeded), *(collect(client, r) for r in others))
    assert text_of(results[0]) == alone
    assert len(alone) > 8


async def test_a_top_k_past_the_vocabulary_fails_nothing(client: NodeClient) -> None:
    """Found by fuzzing: top_k beyond the vocabulary made mlx-lm raise inside the batch
    step, which ended every request in the batch. It now means "keep every token"."""
    greedy = chat(PROMPTS[3], temperature=0.0, max_tokens=8)
    expected = text_of(await collect(client, greedy))
    huge = chat(PROMPTS[0], temperature=0.8, top_k=17_393_665, max_tokens=8)
    a, b = await asyncio.gather(collect(client, huge), collect(client, greedy))
    assert finish_of(a).usage.completion_tokens == 8
    assert text_of(b) == expected and finish_of(b).reason is FinishReason.LENGTH


async def test_stop_sequences_and_max_tokens_hold_per_request(client: NodeClient) -> None:
    stop = chat(PROMPTS[0], temperature=0.0, max_tokens=16, stop=["Paris"])
    short = chat(PROMPTS[0], temperature=0.0, max_tokens=4)
    long = chat(PROMPTS[2], temperature=0.0, max_tokens=12)
    a, b, c = await asyncio.gather(
        collect(client, stop), collect(client, short), collect(client, long)
    )
    assert finish_of(a).reason is FinishReason.STOP_SEQUENCE
    assert finish_of(a).stop_sequence == "Paris"
    assert "Paris" not in text_of(a) and text_of(a).startswith("The capital of France is")
    assert finish_of(b).reason is FinishReason.LENGTH
    assert finish_of(b).usage.completion_tokens == 4
    assert finish_of(c).usage.completion_tokens > 4
    assert text_of(c) == text_of(await collect(client, long))


async def test_cancel_mid_batch_leaves_the_others_intact(
    client: NodeClient, node: RunningNode
) -> None:
    keep = [chat(p, temperature=0.0, max_tokens=12) for p in PROMPTS[4:6]]
    expected = [text_of(await collect(client, r)) for r in keep]
    mlx = mlx_of(node)

    async def cancel_after_first_token() -> int:
        stream = client.generate(chat("Write a long story about a dragon.", max_tokens=400))
        async for ev in stream:
            if isinstance(ev, TextDelta):
                break
        await stream.aclose()
        return 1

    results = await asyncio.gather(cancel_after_first_token(), *(collect(client, r) for r in keep))
    assert [text_of(r) for r in results[1:]] == expected  # type: ignore[arg-type]
    deadline = time.monotonic() + 10
    while (mlx.running or mlx.batch_sizes()["smollm2"][0]) and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert mlx.running == 0 and mlx.batch_sizes()["smollm2"][0] == 0


async def test_eight_mixed_requests_do_not_mix(client: NodeClient, node: RunningNode) -> None:
    """More requests than `max_running` (4): later ones join the batch as others end."""
    reqs = [
        chat(PROMPTS[0], temperature=0.0, max_tokens=10),
        chat(PROMPTS[1], temperature=0.8, seed=11, max_tokens=8),
        chat(PROMPTS[2], temperature=0.0, max_tokens=4),
        chat(PROMPTS[3], temperature=0.0, max_tokens=10, stop=["4"]),
        chat(PROMPTS[4], temperature=0.5, seed=3, top_k=20, max_tokens=6),
        chat(PROMPTS[5], temperature=0.0, max_tokens=10, repetition_penalty=1.3),
        chat(PROMPTS[6], temperature=0.0, max_tokens=6),
        GenerateRequest(
            model="smollm2",
            prompt=TokenPrompt((1, 9690, 198, 2683, 314, 253)),
            sampling=SamplingParams(temperature=0.0, max_tokens=6),
        ),
    ]
    alone, together = await alone_then_together(client, reqs)
    for i, (a, t) in enumerate(zip(alone, together, strict=True)):
        assert text_of(t) == text_of(a), f"request {i}"
        assert finish_of(t).reason == finish_of(a).reason, f"request {i}"
    assert mlx_of(node).batch_sizes()["smollm2"][1] <= 4  # --max-running


@pytest.fixture(scope="module")
def chunked_node(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningNode]:
    """A node prefilling 16 tokens per step, with no prompt cache (every prefill is real)."""
    running = start_smollm2_node(
        tmp_path_factory.mktemp("chunked"),
        models_dir,
        prefill_chunk=16,
        cache=CacheConfig(max_slots=0),
    )
    yield running
    running.stop()


@pytest.fixture
async def chunked(chunked_node: RunningNode) -> AsyncIterator[NodeClient]:
    async with NodeClient(chunked_node.target, timeout=300) as c:
        yield c


async def test_a_long_prefill_does_not_freeze_a_running_stream(chunked: NodeClient) -> None:
    # mlx[cpu] prefills ~11 tokens/s here: ~150 tokens, 10 chunks, over 10 s.
    long_prompt = " ".join(f"Line {i}: a fox." for i in range(24))
    long_req = chat(long_prompt + " Summarise.", temperature=0.0, max_tokens=1)
    # The long prompt's prefill alone, timed from the client.
    t0 = time.perf_counter()
    alone = await collect(chunked, long_req)
    prefill_alone = time.perf_counter() - t0
    assert finish_of(alone).usage.prompt_tokens > 140

    arrivals: list[float] = []

    async def running_stream() -> None:
        story = chat("Write a long story about a dragon.", temperature=0.0, max_tokens=80)
        async for ev in chunked.generate(story):
            if isinstance(ev, TextDelta):
                arrivals.append(time.perf_counter())

    stream = asyncio.ensure_future(running_stream())
    while len(arrivals) < 3:
        await asyncio.sleep(0.01)
    t_long = time.perf_counter()
    await collect(chunked, long_req)
    t_done = time.perf_counter()
    await stream
    during = [b - a for a, b in itertools.pairwise(arrivals) if t_long <= b <= t_done]
    assert during, "the running stream made no progress while the long prompt prefilled"
    # 10 chunks of 16 tokens: the stream waits one chunk per token, not the whole prefill.
    assert max(during) < 0.4 * prefill_alone, (max(during), prefill_alone)


@pytest.fixture(scope="module")
def tight_node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """A node whose running requests' KV caches may take 3 MiB."""
    running = start_smollm2_node(
        tmp_path_factory.mktemp("tight"),
        models_dir,
        max_running=8,
        kv_budget=3 << 20,
    )
    yield running
    running.stop()


async def test_kv_budget_holds_the_batch_back_and_refuses_what_never_fits(
    tight_node: RunningNode,
) -> None:
    async with NodeClient(tight_node.target, timeout=300) as c:
        # Never fits: refused with a message naming the limit; the node carries on.
        huge = await collect(c, chat(PROMPTS[0], temperature=0.0, max_tokens=1000))
        err = next(e for e in huge if isinstance(e, ErrorEvent))
        assert err.code == "RESOURCE_EXHAUSTED"
        assert "max_tokens" in err.message and "KV cache" in err.message
        assert finish_of(huge).reason is FinishReason.ERROR
        # One fits (~60 tokens of KV), four together do not: all finish, and the batch
        # never outgrows the budget.
        reqs = [chat(p, temperature=0.0, max_tokens=16) for p in PROMPTS[:4]]
        results = await asyncio.gather(*(collect(c, r) for r in reqs))
    for r in results:
        assert finish_of(r).reason in (FinishReason.STOP, FinishReason.LENGTH)
    _, most = mlx_of(tight_node).batch_sizes()["smollm2"]
    assert 1 <= most < 4
