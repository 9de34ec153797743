"""A stream that sends nothing for a while (a long prefill) survives the clients'
keepalive pings: the node's gRPC server accepts them (mesh.client.SERVER_OPTIONS).

With gRPC's server defaults, pings on a quiet stream count as strikes and the
third one is answered with GOAWAY "too_many_pings", killing the stream; a
client pinging every second shows it in three seconds instead of a minute.
"""

from __future__ import annotations

from collections.abc import Iterator

import grpc
import pytest

from mesh import wire
from mesh.client import CHANNEL_OPTIONS
from mesh.types import ChatPrompt, GenerateRequest, Message, SamplingParams
from node.config import SimModelSpec
from proto import node_pb2_grpc as pb_grpc
from tests.conftest import RunningNode, start_sim_node


@pytest.fixture(scope="module")
def slow_prefill_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    # 25 prompt tokens a second: a ~100-token prompt is quiet for about 4 s.
    running = start_sim_node(tmp_path_factory.mktemp("keepalive"), SimModelSpec("slow", 25.0, 50.0))
    yield running
    running.stop()


async def test_a_quiet_stream_survives_frequent_keepalive_pings(
    slow_prefill_node: RunningNode,
) -> None:
    options = [
        *(o for o in CHANNEL_OPTIONS if o[0] != "grpc.keepalive_time_ms"),
        ("grpc.keepalive_time_ms", 1000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.http2.min_time_between_pings_ms", 100),
    ]
    request = GenerateRequest(
        model="slow",
        prompt=ChatPrompt((Message("user", "a question that takes a while to read " * 2),)),
        sampling=SamplingParams(max_tokens=3),
    )
    async with grpc.aio.insecure_channel(slow_prefill_node.target, options=options) as channel:
        stub = pb_grpc.NodeStub(channel)
        events = [
            wire.event_from_pb(m)
            async for m in stub.Generate(wire.request_to_pb(request), timeout=60)
        ]
    finish = events[-1]
    assert type(finish).__name__ == "Finish"
    assert finish.usage.prompt_seconds > 3.0  # type: ignore[union-attr]
    assert finish.usage.completion_tokens == 3  # type: ignore[union-attr]
