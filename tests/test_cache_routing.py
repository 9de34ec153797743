"""Prefix-cache-aware routing across real nodes (simulated engines) and a real coordinator."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from mesh.client import NodeClient
from mesh.types import ChatPrompt, GenerateRequest, Message, SamplingParams, TokenPrompt
from node.backends.sim import DEFAULT_BATCH_ALPHA, SimBackend
from node.config import CacheConfig, SimModelSpec
from routing.prefix import block_hashes
from tests.conftest import RunningCoordinator, RunningNode, start_coordinator, start_sim_node

MODEL = "sim-cache"
# One token per byte in the simulated tokenizer: a ~1200-token shared system prompt.
SYSTEM = "You are a careful assistant for the lighthouse keepers' guild. " * 20


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[list[RunningNode], RunningCoordinator]]:
    # One slot: a second prefix evicts the first.
    cache = CacheConfig(block_size=64, min_reuse=128, max_slots=1)
    nodes = [
        start_sim_node(tmp_path / f"n{i}", SimModelSpec(MODEL, 20_000, 2000, 32768), cache=cache)
        for i in range(3)
    ]
    coord = start_coordinator(
        CoordinatorConfig(home=tmp_path / "c", peers=tuple(n.target for n in nodes)),
        wait_nodes=3,
    )
    yield nodes, coord
    coord.stop()
    for n in nodes:
        n.stop()


def ask(url: str, question: str, system: str = SYSTEM, max_tokens: int = 2) -> httpx.Response:
    body = {
        "model": MODEL,
        "max_tokens": max_tokens,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
    }
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=30)
    assert r.status_code == 200, r.text
    return r


def _wait(cond: object, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.005)


def test_a_shared_prefix_follows_its_cache(
    mesh: tuple[list[RunningNode], RunningCoordinator],
) -> None:
    _, coord = mesh
    first = ask(coord.base_url, "How often is the lamp cleaned?")
    assert first.headers["x-macmesh-route-reason"] == "cold"
    home = first.headers["x-macmesh-node"]
    for i in range(4):
        r = ask(coord.base_url, f"Question {i}: what about the fog horn?")
        assert r.headers["x-macmesh-node"] == home
        assert r.headers["x-macmesh-route-reason"] == "cache-hit"
        usage = r.json()["usage"]
        assert usage["prompt_tokens_details"]["cached_tokens"] >= 1024
    # Another prefix goes elsewhere: the warm node is no better for it, and it is busier in
    # the index's eyes only through its cache, which does not hold this prompt.
    other = ask(coord.base_url, "Hello", system="A different assistant entirely. " * 40)
    assert other.headers["x-macmesh-route-reason"] in ("cold", "least-loaded")


async def _ask_async(http: httpx.AsyncClient, system: str) -> httpx.Response:
    body = {
        "model": MODEL,
        "max_tokens": 2,
        "messages": [{"role": "system", "content": system}, {"role": "user", "content": "Hi"}],
    }
    r = await http.post("/v1/chat/completions", json=body)
    assert r.status_code == 200, r.text
    return r


async def test_a_burst_of_new_prefixes_spreads_before_any_node_reports(
    mesh: tuple[list[RunningNode], RunningCoordinator],
) -> None:
    """Placed within milliseconds, three cold prefixes still land on three nodes: the
    coordinator counts its own requests' prefill and provisional entries as load."""
    _, coord = mesh
    async with httpx.AsyncClient(base_url=coord.base_url, timeout=30) as http:
        got = await asyncio.gather(
            *(_ask_async(http, f"Assistant number {i} of the guild. " * 40) for i in range(3))
        )
    assert [r.headers["x-macmesh-route-reason"] for r in got] == ["cold"] * 3
    assert len({r.headers["x-macmesh-node"] for r in got}) == 3


def test_round_robin_and_least_loaded_ignore_the_cache(tmp_path: Path) -> None:
    cache = CacheConfig(block_size=64, min_reuse=64)
    nodes = [
        start_sim_node(tmp_path / f"n{i}", SimModelSpec(MODEL, 20_000, 2000, 32768), cache=cache)
        for i in range(2)
    ]
    coord = start_coordinator(
        CoordinatorConfig(
            home=tmp_path / "c",
            peers=tuple(n.target for n in nodes),
            routing_policy="round-robin",
        ),
        wait_nodes=2,
    )
    try:
        seen = [ask(coord.base_url, f"q{i}").headers for i in range(4)]
        assert {h["x-macmesh-route-reason"] for h in seen} == {"round-robin"}
        assert len({h["x-macmesh-node"] for h in seen}) == 2  # alternates
    finally:
        coord.stop()
        for n in nodes:
            n.stop()


def _indexed(url: str, target: str) -> int:
    nodes = httpx.get(url + "/api/nodes", timeout=5).json()["nodes"]
    return int(next(n["indexed_blocks"] for n in nodes if n["address"] == target))


def test_an_eviction_reaches_the_index_within_100_ms(
    mesh: tuple[list[RunningNode], RunningCoordinator],
) -> None:
    nodes, coord = mesh
    first = ask(coord.base_url, "How often is the lamp cleaned?")
    target = next(
        n
        for n in nodes
        if n.server.core and n.server.core.node_id == first.headers["x-macmesh-node"]
    )
    assert target.server.core is not None
    caches = target.server.core.backend(SimBackend).caches
    [(old_tokens, _)] = caches.slot_tokens(MODEL)
    old = caches.state()[MODEL]
    assert len(old) > 10
    _wait(lambda: _indexed(coord.base_url, target.target) == len(old))

    async def other_prompt() -> None:
        # Straight to that node: its only slot now holds another prompt.
        async with NodeClient(target.target) as c:
            prompt = ChatPrompt((Message("system", "Other. " * 100), Message("user", "x")))
            req = GenerateRequest(MODEL, prompt, SamplingParams(max_tokens=1))
            async for _ in c.generate(req):
                pass

    runner = threading.Thread(target=lambda: asyncio.run(other_prompt()))
    runner.start()

    def evicted() -> bool:
        slots = caches.slot_tokens(MODEL)
        return len(slots) == 1 and slots[0][0] != old_tokens and not slots[0][1]

    _wait(evicted)
    evicted_at = time.monotonic()
    held = set(block_hashes(MODEL, caches.slot_tokens(MODEL)[0][0], 64))
    _wait(lambda: _indexed(coord.base_url, target.target) == len(held), 2.0)
    lag = time.monotonic() - evicted_at
    runner.join(10)
    assert lag < 0.1, f"the eviction reached the coordinator after {lag * 1000:.0f} ms"


def _load(url: str, target: str) -> dict[str, float]:
    """The coordinator's view (GET /api/nodes) of `target`'s load for MODEL."""
    nodes = httpx.get(url + "/api/nodes", timeout=5).json()["nodes"]
    node = next(n for n in nodes if n["address"] == target)
    return next((x for x in node.get("load", ()) if x["model"] == MODEL), {})


def test_a_long_answer_leaves_a_busy_batch_when_the_prefix_is_cheap(tmp_path: Path) -> None:
    """The warm node decodes 3 streams as a batch (reported aggregate ~125 tok/s, so ~31
    each for a 4th, against 100 alone): a 2-token answer still takes the cache there,
    a 128-token one copies the cheap prefix (~60 ms of prefill) to the idle node."""
    cache = CacheConfig(block_size=64, min_reuse=128)
    nodes = [
        start_sim_node(tmp_path / f"n{i}", SimModelSpec(MODEL, 20_000, 100, 32768), cache=cache)
        for i in range(2)
    ]
    coord = start_coordinator(
        CoordinatorConfig(home=tmp_path / "c", peers=tuple(n.target for n in nodes)),
        wait_nodes=2,
    )
    stop = threading.Event()
    runner: threading.Thread | None = None
    try:
        first = ask(coord.base_url, "How often is the lamp cleaned?")
        home = first.headers["x-macmesh-node"]
        warm = next(n for n in nodes if n.server.core and n.server.core.node_id == home)

        async def batch() -> None:  # 3 long streams straight to the warm node
            async def one(i: int) -> None:
                req = GenerateRequest(
                    MODEL, TokenPrompt((i, 1, 2)), SamplingParams(max_tokens=5000)
                )
                async for _ in c.generate(req):
                    if stop.is_set():
                        break

            async with NodeClient(warm.target) as c:
                await asyncio.gather(*(one(i) for i in range(3)))

        runner = threading.Thread(target=lambda: asyncio.run(batch()))
        runner.start()
        _wait(
            lambda: (
                _load(coord.base_url, warm.target).get("running") == 3
                and _load(coord.base_url, warm.target)["aggregate_decode_tokens_per_second"] > 0
            )
        )
        aggregate = _load(coord.base_url, warm.target)["aggregate_decode_tokens_per_second"]
        assert aggregate == pytest.approx(300 / (1 + 2 * DEFAULT_BATCH_ALPHA), rel=0.2)
        short = ask(coord.base_url, "And the fog horn?")
        assert short.headers["x-macmesh-node"] == home
        assert short.headers["x-macmesh-route-reason"] == "cache-hit"
        long = ask(coord.base_url, "Tell me everything about it.", max_tokens=128)
        assert long.headers["x-macmesh-node"] != home
        assert long.headers["x-macmesh-route-reason"] == "least-loaded"
    finally:
        stop.set()
        if runner is not None:
            runner.join(10)
        coord.stop()
        for n in nodes:
            n.stop()
