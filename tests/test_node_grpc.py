"""The node over real gRPC with the real SmolLM2 model (MLX CPU: keep prompts short)."""

from __future__ import annotations

import asyncio
import time

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from mesh.client import NodeClient
from mesh.errors import InvalidRequest, ModelNotFound
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    FinishReason,
    GenerateRequest,
    Message,
    SamplingParams,
    Started,
    TextDelta,
    TextPrompt,
    TokenPrompt,
    Tool,
)
from node.backends.mlx import MLXBackend
from proto import node_pb2 as pb
from proto import node_pb2_grpc as pb_grpc
from tests.conftest import RunningNode
from tests.node_calls import chat, collect, finish_of, text_of

pytestmark = pytest.mark.model

PARIS = "What is the capital of France?"


async def test_greedy_paris_streams(client: NodeClient) -> None:
    events = await collect(client, chat(PARIS, temperature=0.0, max_tokens=12))
    assert isinstance(events[0], Started)
    deltas = [e for e in events if isinstance(e, TextDelta)]
    assert len(deltas) >= 3, "the answer must arrive as a stream of deltas"
    assert text_of(events).startswith("The capital of France is Paris")
    fin = finish_of(events)
    assert fin.reason in (FinishReason.STOP, FinishReason.LENGTH)
    assert fin.usage.prompt_tokens == events[0].prompt_tokens > 10
    assert 0 < fin.usage.completion_tokens <= 12
    assert fin.usage.cached_prompt_tokens == 0


async def test_max_tokens_ends_with_length(client: NodeClient) -> None:
    events = await collect(client, chat(PARIS, temperature=0.0, max_tokens=3))
    fin = finish_of(events)
    assert fin.reason is FinishReason.LENGTH
    assert fin.usage.completion_tokens == 3
    assert text_of(events) == "The capital of"


async def test_stop_sequence_cuts_the_text(client: NodeClient) -> None:
    events = await collect(
        client, chat(PARIS, temperature=0.0, max_tokens=12, stop=[" of France", "zzz"])
    )
    fin = finish_of(events)
    assert fin.reason is FinishReason.STOP_SEQUENCE
    assert fin.stop_sequence == " of France"
    assert text_of(events) == "The capital"


async def test_seed_reproduces_sampling(client: NodeClient) -> None:
    req = chat("Name a color.", temperature=1.0, top_p=0.95, max_tokens=6, seed=1234)
    a = text_of(await collect(client, req))
    b = text_of(await collect(client, req))
    assert a == b and a


async def test_two_concurrent_streams_do_not_mix(client: NodeClient) -> None:
    ra = chat(PARIS, temperature=0.0, max_tokens=8)
    rb = chat("What is 2+2?", temperature=0.0, max_tokens=8)
    solo_a = text_of(await collect(client, ra))
    solo_b = text_of(await collect(client, rb))
    both = await asyncio.gather(collect(client, ra), collect(client, rb))
    assert text_of(both[0]) == solo_a
    assert text_of(both[1]) == solo_b
    assert solo_a != solo_b


async def test_cancel_stops_generation_within_two_tokens(
    client: NodeClient, node: RunningNode
) -> None:
    assert node.server.core is not None
    mlx = node.server.core.backend(MLXBackend)
    stream = client.generate(chat("Write a long story about a dragon.", max_tokens=400))
    async for ev in stream:
        if isinstance(ev, TextDelta):
            break  # first token is out: stop listening mid-stream
    await stream.aclose()
    cancelled_at = mlx.tokens_generated
    deadline = time.monotonic() + 10
    while mlx.running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert mlx.running == 0, "the cancelled generation is still running"
    assert mlx.tokens_generated - cancelled_at <= 2
    # The node is fine afterwards.
    assert text_of(await collect(client, chat(PARIS, temperature=0.0, max_tokens=7))).startswith(
        "The capital of France is"
    )


async def test_raw_text_and_token_prompts(client: NodeClient) -> None:
    rendered = await client.render("smollm2", ChatPrompt((Message("user", PARIS),)))
    by_tokens = await collect(
        client,
        GenerateRequest(
            model="smollm2",
            prompt=TokenPrompt(rendered.token_ids),
            sampling=SamplingParams(temperature=0.0, max_tokens=7),
        ),
    )
    assert text_of(by_tokens).startswith("The capital of France is")
    assert by_tokens[0].prompt_tokens == rendered.token_count  # type: ignore[union-attr]
    by_text = await collect(
        client,
        GenerateRequest(
            model="smollm2",
            prompt=TextPrompt("The capital of France is"),
            sampling=SamplingParams(temperature=0.0, max_tokens=3),
        ),
    )
    assert text_of(by_text).strip().startswith("Paris")


async def test_render_and_tokenize_match_generation(client: NodeClient) -> None:
    prompt = ChatPrompt((Message("system", "Be brief."), Message("user", PARIS)))
    rendered = await client.render("smollm2", prompt, include_text=True)
    assert rendered.context_length == 8192
    assert "<|im_start|>system\nBe brief.<|im_end|>" in rendered.text
    assert rendered.text.endswith("<|im_start|>assistant\n")
    ids = await client.tokenize("smollm2", rendered.text)
    assert tuple(ids) == rendered.token_ids
    events = await collect(
        client,
        GenerateRequest(model="smollm2", prompt=prompt, sampling=SamplingParams(max_tokens=1)),
    )
    assert events[0].prompt_tokens == rendered.token_count  # type: ignore[union-attr]


async def test_tools_go_into_the_prompt(client: NodeClient) -> None:
    tool = Tool(
        "get_weather",
        "Current weather for a city",
        {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    )
    prompt = ChatPrompt((Message("user", "Weather in Paris?"),), tools=(tool,))
    rendered = await client.render("smollm2", prompt, include_text=True)
    # SmolLM2's template ignores `tools`, so the node describes them in the system turn.
    assert rendered.text.startswith("<|im_start|>system\n")
    assert "get_weather" in rendered.text and "<tool_call>" in rendered.text


@pytest.mark.parametrize(
    ("sampling", "field"),
    [
        ({"temperature": -1.0}, "sampling.temperature"),
        ({"top_p": 0.0}, "sampling.top_p"),
        ({"top_p": 1.5}, "sampling.top_p"),
        ({"top_k": -3}, "sampling.top_k"),
        ({"min_p": 1.0}, "sampling.min_p"),
        ({"max_tokens": 0}, "sampling.max_tokens"),
        ({"max_tokens": -5}, "sampling.max_tokens"),
        ({"stop": [""]}, "sampling.stop"),
    ],
)
async def test_invalid_sampling_is_invalid_argument(
    client: NodeClient, sampling: dict[str, object], field: str
) -> None:
    with pytest.raises(InvalidRequest) as info:
        await collect(client, chat(PARIS, **sampling))
    assert field in info.value.message


async def test_empty_messages_and_bad_roles(client: NodeClient) -> None:
    empty = GenerateRequest(model="smollm2", prompt=ChatPrompt(()))
    with pytest.raises(InvalidRequest, match="messages"):
        await collect(client, empty)
    bad_role = GenerateRequest(model="smollm2", prompt=ChatPrompt((Message("wizard", "hi"),)))
    with pytest.raises(InvalidRequest, match=r"messages\[0\]\.role"):
        await collect(client, bad_role)


async def test_unknown_model_is_not_found_and_lists_models(client: NodeClient) -> None:
    req = GenerateRequest(model="gpt-17", prompt=ChatPrompt((Message("user", "hi"),)))
    with pytest.raises(ModelNotFound) as info:
        await collect(client, req)
    assert "gpt-17" in info.value.message and "smollm2" in info.value.message


async def test_raw_status_codes(node: RunningNode) -> None:
    """What non-macmesh gRPC clients see: standard status codes with clear details."""
    async with grpc.aio.insecure_channel(node.target) as channel:
        stub = pb_grpc.NodeStub(channel)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(pb.GenerateRequest(model="nope", text="hi")):
                pass
        assert info.value.code() == grpc.StatusCode.NOT_FOUND
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in stub.Generate(pb.GenerateRequest(model="smollm2")):
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "input" in (info.value.details() or "")
        health = health_pb2_grpc.HealthStub(channel)
        resp = await health.Check(health_pb2.HealthCheckRequest(service="macmesh.v1.Node"))
        assert resp.status == health_pb2.HealthCheckResponse.SERVING


async def test_bad_requests_do_not_disturb_a_running_stream(client: NodeClient) -> None:
    good = asyncio.create_task(collect(client, chat(PARIS, temperature=0.0, max_tokens=10)))
    for _ in range(5):
        with pytest.raises((InvalidRequest, ModelNotFound)):
            await collect(client, chat(PARIS, temperature=-2.0))
        with pytest.raises(ModelNotFound):
            await collect(client, GenerateRequest(model="x", prompt=TextPrompt("hi")))
        with pytest.raises(InvalidRequest):
            await collect(client, GenerateRequest(model="smollm2", prompt=TokenPrompt((10**9,))))
    events = await good
    assert not any(isinstance(e, ErrorEvent) for e in events)
    assert text_of(events).startswith("The capital of France is Paris")


async def test_prompt_too_long(client: NodeClient) -> None:
    req = GenerateRequest(model="smollm2", prompt=TokenPrompt(tuple([100] * 8200)))
    with pytest.raises(InvalidRequest, match=r"prompt is too long: 8200 tokens > 8192 maximum"):
        await collect(client, req)


async def test_models_load_unload_and_state(client: NodeClient) -> None:
    models = {m.id: m for m in await client.list_models()}
    assert models["smollm2"].loaded and models["smollm2"].backend == "mlx"
    assert models["smollm2"].memory_bytes > 50_000_000
    states = client.watch_state(interval_ms=100)
    first = await anext(states)
    # (smollm2.gguf may be loaded too: the session node also serves the GGUF tests.)
    assert first.node_id and "smollm2" in [m.id for m in first.models if m.loaded]
    assert first.memory.total_bytes > first.memory.available_bytes > 0
    assert await client.unload_model("smollm2") is True
    assert await client.unload_model("smollm2") is False
    later = await anext(states)
    while any(m.loaded for m in later.models if m.id == "smollm2"):
        later = await anext(states)
    assert later.sequence > first.sequence
    info, seconds = await client.load_model("smollm2")
    assert info.loaded and seconds > 0
    with pytest.raises(ModelNotFound):
        await client.load_model("missing-model")
    await states.aclose()
    # A model that is not loaded loads on first use.
    await client.unload_model("smollm2")
    events = await collect(client, chat(PARIS, temperature=0.0, max_tokens=6))
    assert text_of(events).startswith("The capital of France")
