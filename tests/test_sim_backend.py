"""The SIMULATED engine behind the node's real gRPC service."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from mesh.client import NodeClient
from mesh.errors import InvalidRequest
from mesh.types import (
    ChatPrompt,
    Finish,
    FinishReason,
    GenerateRequest,
    Message,
    SamplingParams,
    Started,
    TextDelta,
    TokenPrompt,
)
from node.backends.sim import DEFAULT_BATCH_ALPHA, batch_aggregate_tps
from node.config import NodeConfig, SimModelSpec
from tests.conftest import RunningNode, start_node


@pytest.fixture(scope="module")
def sim_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    home = tmp_path_factory.mktemp("sim")
    running = start_node(
        NodeConfig(
            grpc_port=0,
            home=home,
            models_dir=Path(home / "models"),
            scan_hf_cache=False,
            sim_models=(SimModelSpec("sim-fast", 10_000, 200, 4096),),
        )
    )
    yield running
    running.stop()


@pytest.fixture
async def sim(sim_node: RunningNode) -> AsyncIterator[NodeClient]:
    async with NodeClient(sim_node.target) as c:
        yield c


def req(max_tokens: int = 5, stop: tuple[str, ...] = ()) -> GenerateRequest:
    return GenerateRequest(
        model="sim-fast",
        prompt=ChatPrompt((Message("user", "hi"),)),
        sampling=SamplingParams(max_tokens=max_tokens, stop=stop),
    )


def test_spec_parsing() -> None:
    assert SimModelSpec.parse("m") == SimModelSpec("m")
    assert SimModelSpec.parse("m:100:5:2048") == SimModelSpec("m", 100.0, 5.0, 2048)
    assert SimModelSpec.parse("m:100:5:2048:0.15") == SimModelSpec("m", 100.0, 5.0, 2048, 0.15)
    assert SimModelSpec.parse("m:100:5:2048:0").batch_alpha == 0.0
    for bad in (":1", "m:x", "m:0", "m:1:1:1:-0.1", "m:1:1:1:1:1"):
        with pytest.raises(ValueError):
            SimModelSpec.parse(bad)


async def test_listed_and_deterministic(sim: NodeClient) -> None:
    models = {m.id: m for m in await sim.list_models()}
    assert models["sim-fast"].backend == "sim" and models["sim-fast"].loaded
    a = [e async for e in sim.generate(req())]
    b = [e async for e in sim.generate(req())]
    deltas_a = [e for e in a if isinstance(e, TextDelta)]
    assert deltas_a == [e for e in b if isinstance(e, TextDelta)], "deterministic text"
    assert isinstance(a[0], Started)
    text = "".join(e.text for e in deltas_a)
    assert len(text.split()) == 5
    fin = a[-1]
    assert isinstance(fin, Finish) and fin.reason is FinishReason.LENGTH
    assert fin.usage.completion_tokens == 5
    rendered = await sim.render("sim-fast", ChatPrompt((Message("user", "hi"),)))
    assert fin.usage.prompt_tokens == rendered.token_count


async def test_stop_and_context(sim: NodeClient) -> None:
    events = [e async for e in sim.generate(req(max_tokens=50, stop=(" lazy",)))]
    fin = events[-1]
    assert isinstance(fin, Finish) and fin.reason is FinishReason.STOP_SEQUENCE
    assert "lazy" not in "".join(e.text for e in events if isinstance(e, TextDelta))
    too_long = GenerateRequest(model="sim-fast", prompt=TokenPrompt(tuple([1] * 5000)))
    with pytest.raises(InvalidRequest, match="prompt is too long: 5000 tokens > 4096 maximum"):
        [e async for e in sim.generate(too_long)]


async def _token_times(sim: NodeClient, max_tokens: int) -> list[float]:
    """When each word of one generation arrived (perf_counter)."""
    request = GenerateRequest(
        model="sim-fast",
        prompt=TokenPrompt((1, 2, 3)),
        sampling=SamplingParams(max_tokens=max_tokens),
    )
    times = [time.perf_counter() async for e in sim.generate(request) if isinstance(e, TextDelta)]
    assert len(times) == max_tokens
    return times


def _step(times: list[float]) -> float:
    """Mean seconds per decode step over `times`."""
    return (times[-1] - times[0]) / (len(times) - 1)


def test_the_batching_formula() -> None:
    assert batch_aggregate_tps(100, 0, 0.5) == 0.0
    assert batch_aggregate_tps(100, 1, 0.7) == 100.0
    assert batch_aggregate_tps(100, 4, 1.0) == pytest.approx(100.0)  # no batching gain
    assert batch_aggregate_tps(100, 4, 0.0) == pytest.approx(400.0)  # perfect batching
    # mlx-lm's Llama-3.2-3B-4bit on an Apple GPU: 61 / 349 tok/s at batch 1 / 32.
    assert batch_aggregate_tps(61, 32, 0.15) == pytest.approx(349, rel=0.02)


async def test_concurrent_streams_decode_as_a_batch(sim: NodeClient) -> None:
    """b streams each decode at aggregate(b) / b, and the node reports the aggregate."""
    solo = _step(await _token_times(sim, 41))
    assert solo == pytest.approx(1 / 200, rel=0.15)
    b, alpha = 4, DEFAULT_BATCH_ALPHA
    batch = [asyncio.create_task(_token_times(sim, 161)) for _ in range(b)]
    await asyncio.sleep(2.2)  # the meter's 2 s window now holds only the batch
    async for state in sim.watch_state():
        load = next(x for x in state.load if x.model == "sim-fast")
        break
    steps = [_step(t) for t in await asyncio.gather(*batch)]
    # Each stream's step is b / aggregate(b) = (1 + (b - 1) alpha) x one stream's.
    for step in steps:
        assert step / solo == pytest.approx(1 + (b - 1) * alpha, rel=0.15)
    assert load.running == b
    assert load.decode_tokens_per_second == 200  # one stream's rate, as configured
    assert load.aggregate_decode_tokens_per_second == pytest.approx(
        batch_aggregate_tps(200, b, alpha), rel=0.1
    )


async def test_the_rate_follows_streams_as_they_leave(sim: NodeClient) -> None:
    long = asyncio.create_task(_token_times(sim, 100))
    short = await _token_times(sim, 30)
    times = await long
    together = _step([t for t in times if t <= short[-1]][2:])  # both decoding
    alone = _step([t for t in times if t > short[-1]][2:])  # the short one has left
    assert together / alone == pytest.approx(1 + DEFAULT_BATCH_ALPHA, rel=0.15)
