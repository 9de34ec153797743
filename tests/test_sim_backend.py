"""The SIMULATED engine behind the node's real gRPC service."""

from __future__ import annotations

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
    for bad in (":1", "m:x", "m:0"):
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
