"""Node metrics move as they should: a fresh CollectorRegistry per test, a simulated backend.

Coordinator metrics: tests/test_metrics_coordinator.py. The whole mesh scraped by a real
Prometheus: tests/test_prometheus.py.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from macmesh.cli import _metrics_port
from mesh import wire
from mesh.client import NodeClient
from mesh.errors import ModelNotFound
from mesh.types import (
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    ReasoningDelta,
    SamplingParams,
    Started,
    TextDelta,
    TextPrompt,
    ToolCallEvent,
    Usage,
)
from node.app import NodeServer
from node.config import NodeConfig, SimModelSpec
from node.metrics import FINISH_REASONS, NodeMetrics
from node.service import NodeCore
from tests.conftest import RunningNode

MODEL = "sim-a"


def sample(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


def config(tmp_path: Path, decode_tps: float = 2000.0, **extra: object) -> NodeConfig:
    return NodeConfig(
        grpc_port=0,
        home=tmp_path / "home",
        models_dir=tmp_path / "models",
        scan_hf_cache=False,
        sim_models=(SimModelSpec(MODEL, 200_000, decode_tps, 8192),),
        **extra,  # type: ignore[arg-type]
    )


@pytest.fixture
async def core(tmp_path: Path) -> AsyncIterator[tuple[NodeCore, CollectorRegistry]]:
    """A NodeCore recording into a fresh registry, its state collector registered."""
    registry = CollectorRegistry()
    metrics = NodeMetrics(registry)
    node = NodeCore(config(tmp_path), metrics=metrics)
    metrics.watch(node)
    try:
        yield node, registry
    finally:
        await node.close(0)


def request(text: str, max_tokens: int = 5) -> GenerateRequest:
    return GenerateRequest(MODEL, TextPrompt(text), SamplingParams(max_tokens=max_tokens))


async def run(node: NodeCore, req: GenerateRequest) -> list[GenerateEvent]:
    return [event async for event in node.generate(req)]


OUTPUTS = TextDelta | ReasoningDelta | ToolCallEvent


async def test_generation_moves_latency_and_token_metrics(
    core: tuple[NodeCore, CollectorRegistry],
) -> None:
    node, reg = core
    m = {"model": MODEL}
    # Before any request nothing is labelled with the model.
    assert sample(reg, "macmesh_prompt_tokens_total", **m) is None
    prompt = "The same long shared prefix. " * 40  # 1160 tokens: past the sim cache's 512
    events = await run(node, request(prompt))
    finish = events[-1]
    assert isinstance(finish, Finish) and finish.reason is FinishReason.LENGTH
    outputs = sum(isinstance(e, OUTPUTS) for e in events)
    assert outputs >= 2
    usage = finish.usage
    assert usage.prompt_tokens == len(prompt) and usage.completion_tokens == 5

    assert sample(reg, "macmesh_time_to_first_token_seconds_count", **m) == 1
    assert sample(reg, "macmesh_inter_token_latency_seconds_count", **m) == outputs - 1
    assert sample(reg, "macmesh_e2e_request_latency_seconds_count", **m) == 1
    assert sample(reg, "macmesh_request_queue_time_seconds_count", **m) == 1
    ttft = sample(reg, "macmesh_time_to_first_token_seconds_sum", **m)
    e2e = sample(reg, "macmesh_e2e_request_latency_seconds_sum", **m)
    assert ttft is not None and e2e is not None and 0 < ttft <= e2e < 5
    assert sample(reg, "macmesh_prompt_tokens_total", **m) == len(prompt)
    assert sample(reg, "macmesh_generation_tokens_total", **m) == 5
    assert sample(reg, "macmesh_prefix_cache_queries_total", **m) == len(prompt)
    assert sample(reg, "macmesh_prefix_cache_hits_total", **m) == 0
    # No draft model here: the series exist, at zero.
    assert sample(reg, "macmesh_draft_tokens_total", **m) == 0
    assert sample(reg, "macmesh_accepted_tokens_total", **m) == 0
    assert sample(reg, "macmesh_node_requests_total", model=MODEL, finish_reason="length") == 1
    # Every other outcome is pre-initialised at 0 from the model's first request.
    for reason in FINISH_REASONS:
        if reason != "length":
            assert (
                sample(reg, "macmesh_node_requests_total", model=MODEL, finish_reason=reason) == 0
            )

    # The same prompt again: the prompt cache serves its block-aligned prefix.
    finish2 = (await run(node, request(prompt + " and more")))[-1]
    assert isinstance(finish2, Finish)
    cached = finish2.usage.cached_prompt_tokens
    assert cached >= 512
    assert sample(reg, "macmesh_prefix_cache_hits_total", **m) == cached
    total = len(prompt) * 2 + len(" and more")
    assert sample(reg, "macmesh_prefix_cache_queries_total", **m) == total
    assert sample(reg, "macmesh_prompt_tokens_total", **m) == total
    assert sample(reg, "macmesh_generation_tokens_total", **m) == 10
    assert sample(reg, "macmesh_time_to_first_token_seconds_count", **m) == 2
    assert sample(reg, "macmesh_node_requests_total", model=MODEL, finish_reason="length") == 2


async def test_a_stream_closed_early_counts_as_cancelled(
    core: tuple[NodeCore, CollectorRegistry],
) -> None:
    node, reg = core
    stream = node.generate(request("hello there", max_tokens=50))
    seen = 0
    async for event in stream:
        if isinstance(event, TextDelta):
            seen += 1
            break
    await stream.aclose()
    assert sample(reg, "macmesh_node_requests_total", model=MODEL, finish_reason="cancelled") == 1
    assert sample(reg, "macmesh_node_requests_total", model=MODEL, finish_reason="length") == 0
    # What the caller got is what counts; the prompt was accepted (and prefilled).
    assert sample(reg, "macmesh_generation_tokens_total", model=MODEL) == seen
    assert sample(reg, "macmesh_prompt_tokens_total", model=MODEL) == len("hello there")
    assert sample(reg, "macmesh_time_to_first_token_seconds_count", model=MODEL) == 1
    # No finish, no queue time reported.
    assert sample(reg, "macmesh_request_queue_time_seconds_count", model=MODEL) == 0


async def test_a_rejected_request_adds_no_label(core: tuple[NodeCore, CollectorRegistry]) -> None:
    node, reg = core
    with pytest.raises(ModelNotFound):
        await run(node, GenerateRequest("no-such-model", TextPrompt("hi")))
    labelled = {
        s.labels.get("model") for metric in reg.collect() for s in metric.samples if s.labels
    }
    assert "no-such-model" not in labelled


def test_speculative_counters_take_the_usage() -> None:
    reg = CollectorRegistry()
    metrics = NodeMetrics(reg)
    rec = metrics.request("target", 0.0)
    rec.output()
    rec.finish = Finish(
        FinishReason.STOP,
        Usage(prompt_tokens=10, completion_tokens=8, draft_tokens=12, accepted_draft_tokens=7),
    )
    rec.close()
    assert sample(reg, "macmesh_draft_tokens_total", model="target") == 12
    assert sample(reg, "macmesh_accepted_tokens_total", model="target") == 7
    assert sample(reg, "macmesh_generation_tokens_total", model="target") == 8
    assert sample(reg, "macmesh_node_requests_total", model="target", finish_reason="stop") == 1


async def test_state_gauges_are_read_at_scrape_time(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    metrics = NodeMetrics(reg)
    node = NodeCore(config(tmp_path, decode_tps=50), metrics=metrics)
    metrics.watch(node)
    try:
        assert sample(reg, "macmesh_num_requests_running", model=MODEL) == 0
        stream = node.generate(request("hi", max_tokens=100))
        first = await anext(stream)
        assert isinstance(first, Started)
        await anext(stream)
        assert sample(reg, "macmesh_num_requests_running", model=MODEL) == 1
        assert sample(reg, "macmesh_num_requests_waiting", model=MODEL) == 0
        for _ in range(16):  # 0.3 s of words at 50 tok/s: the aggregate of one stream
            await anext(stream)
        aggregate = sample(reg, "macmesh_aggregate_decode_tokens_per_second", model=MODEL)
        assert aggregate == pytest.approx(50, rel=0.25)
        await stream.aclose()
        assert sample(reg, "macmesh_num_requests_running", model=MODEL) == 0

        total = sample(reg, "macmesh_memory_total_bytes")
        used = sample(reg, "macmesh_memory_used_bytes")
        available = sample(reg, "macmesh_memory_available_bytes")
        assert total and used and available and abs(used + available - total) < total * 0.05
        assert sample(reg, "macmesh_memory_framework_bytes") is not None
        info = {"model": MODEL, "backend": "sim", "quantization": "simulated 200000/50 tok/s"}
        assert sample(reg, "macmesh_loaded_model_info", **info) == 1
        assert sample(reg, "macmesh_model_memory_bytes", model=MODEL) == 0
        assert sample(reg, "macmesh_model_load_seconds", model=MODEL) == 0
        assert sample(reg, "macmesh_node_info", node_id=node.node_id, version="0.1.0") == 1
        assert sample(reg, "macmesh_node_draining") == 0
    finally:
        await node.close(0)
    assert sample(reg, "macmesh_node_draining") == 1


@pytest.mark.model
async def test_model_load_seconds_follow_loads(models_dir: Path, tmp_path: Path) -> None:
    reg = CollectorRegistry()
    metrics = NodeMetrics(reg)
    node = NodeCore(
        NodeConfig(grpc_port=0, home=tmp_path, models_dir=models_dir, scan_hf_cache=False),
        metrics=metrics,
    )
    metrics.watch(node)
    try:
        assert sample(reg, "macmesh_model_load_seconds", model="smollm2") is None
        _, seconds = await node.load("smollm2")
        assert seconds > 0
        assert sample(reg, "macmesh_model_load_seconds", model="smollm2") == seconds
        assert (sample(reg, "macmesh_model_memory_bytes", model="smollm2") or 0) > 0
        # Loading a loaded model is no load: the gauge keeps the real one.
        await node.load("smollm2")
        assert sample(reg, "macmesh_model_load_seconds", model="smollm2") == seconds
        await node.unload("smollm2")
        assert sample(reg, "macmesh_model_load_seconds", model="smollm2") is None
        assert sample(reg, "macmesh_loaded_model_info", model="smollm2") is None
    finally:
        await node.close(0)


@pytest.mark.model
async def test_mlx_generation_moves_node_metrics(node: RunningNode, client: NodeClient) -> None:
    """The real engine (the session node, SmolLM2 on MLX), over gRPC."""
    reg = node.server.metrics_registry
    names = (
        "macmesh_prompt_tokens_total",
        "macmesh_generation_tokens_total",
        "macmesh_prefix_cache_queries_total",
        "macmesh_prefix_cache_hits_total",
        "macmesh_time_to_first_token_seconds_count",
        "macmesh_e2e_request_latency_seconds_count",
    )

    def values() -> list[float]:
        return [sample(reg, n, model="smollm2") or 0.0 for n in names]

    before = values()
    req = GenerateRequest(
        "smollm2",
        TextPrompt("The capital of France is"),
        # Greedy: sampled at the default temperature, the model may end after 1 or 2 tokens.
        SamplingParams(max_tokens=3, temperature=0),
    )
    events = [e async for e in client.generate(req)]
    usage = events[-1].usage if isinstance(events[-1], Finish) else Usage()
    assert usage.completion_tokens == 3
    expected = [usage.prompt_tokens, 3, usage.prompt_tokens, usage.cached_prompt_tokens, 1, 1]
    # Recorded once the stream's last event went out: a moment after the client has it.
    for _ in range(100):
        if [a - b for a, b in zip(values(), before, strict=True)] == expected:
            break
        await asyncio.sleep(0.02)
    assert [a - b for a, b in zip(values(), before, strict=True)] == expected
    loaded = [
        x.labels
        for m in reg.collect()
        if m.name == "macmesh_loaded_model"
        for x in m.samples
        if x.labels["model"] == "smollm2"
    ]
    assert loaded and loaded[0]["backend"] == "mlx" and loaded[0]["quantization"]
    assert (sample(reg, "macmesh_model_load_seconds", model="smollm2") or 0) > 0


async def test_node_serves_metrics_over_http(tmp_path: Path) -> None:
    reg = CollectorRegistry()
    server = NodeServer(config(tmp_path, metrics_port=0), metrics_registry=reg)
    await server.start()
    try:
        assert server.core is not None and server.metrics_port > 0
        # Coordinators learn the port from the node's state.
        state = server.core.snapshot()
        assert state.metrics_port == server.metrics_port
        assert wire.state_from_pb(wire.state_to_pb(state)).metrics_port == server.metrics_port
        await run(server.core, request("hi"))
        url = f"http://127.0.0.1:{server.metrics_port}"
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.get("/metrics", headers={"accept-encoding": "identity"})
            assert r.status_code == 200
            assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
            assert f'macmesh_generation_tokens_total{{model="{MODEL}"}} 5.0' in r.text
            assert f'macmesh_node_info{{node_id="{server.core.node_id}"' in r.text
            # Prometheus asks for OpenMetrics and gzip.
            r = await http.get(
                "/metrics",
                headers={
                    "accept": "application/openmetrics-text; version=1.0.0",
                    "accept-encoding": "gzip",
                },
            )
            assert r.headers["content-type"].startswith("application/openmetrics-text")
            assert r.headers["content-encoding"] == "gzip"
            assert "macmesh_generation_tokens_total" in r.text and r.text.endswith("# EOF\n")
            head = await http.head("/metrics")
            assert head.status_code == 200 and head.content == b""
            assert (await http.get("/")).status_code == 404
            assert (await http.post("/metrics")).status_code == 405
    finally:
        await server.stop(0)
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"http://127.0.0.1:{server.metrics_port}/metrics")


async def test_metrics_server_speaks_plain_http(tmp_path: Path) -> None:
    """A raw request (as `curl --raw` sends it) gets a whole response and a closed socket."""
    server = NodeServer(config(tmp_path, metrics_port=0), metrics_registry=CollectorRegistry())
    await server.start()
    try:
        reader, writer = await asyncio.open_connection("127.0.0.1", server.metrics_port)
        writer.write(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept-Encoding: gzip\r\n\r\n")
        raw = await asyncio.wait_for(reader.read(), 5)
        writer.close()
        head, _, body = raw.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200 OK")
        assert b"Content-Encoding: gzip" in head and b"Connection: close" in head
        assert b"macmesh_node_info" in gzip.decompress(body)
    finally:
        await server.stop(0)


def test_no_metrics_port_means_no_server(tmp_path: Path) -> None:
    assert NodeConfig().metrics_port is None
    assert NodeServer(config(tmp_path)).metrics_port == 0


@pytest.mark.parametrize(
    ("grpc_port", "flag", "expected"),
    [(50151, None, 50152), (6000, None, 6001), (0, None, 0), (50151, 9400, 9400),
     (50151, 0, 0), (50151, -1, None)],
)  # fmt: skip
def test_metrics_port_flag(grpc_port: int, flag: int | None, expected: int | None) -> None:
    args = argparse.Namespace(grpc_port=grpc_port, metrics_port=flag)
    assert _metrics_port(args) == expected


def test_a_failed_generation_counts_as_error() -> None:
    """A generation that failed before any output moves no token-latency histogram."""
    reg = CollectorRegistry()
    metrics = NodeMetrics(reg)
    rec = metrics.request(MODEL, 0.0)
    rec.finish = Finish(FinishReason.ERROR, Usage(prompt_tokens=3))
    rec.close()
    assert sample(reg, "macmesh_time_to_first_token_seconds_count", model=MODEL) == 0
    assert sample(reg, "macmesh_node_requests_total", model=MODEL, finish_reason="error") == 1
    assert sample(reg, "macmesh_e2e_request_latency_seconds_count", model=MODEL) == 1
    assert sample(reg, "macmesh_prompt_tokens_total", model=MODEL) == 3
