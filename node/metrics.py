"""A node's Prometheus metrics and its `/metrics` HTTP endpoint.

Per-request metrics (latency histograms, token counters) are recorded by
`NodeCore.generate` through a `RequestMetrics` whose label children are bound
once, when the backend accepts the request (so only real model ids become
labels). State that other code owns (queues, memory, loaded models) is read at
scrape time by `StateCollector`, never copied. The HTTP server runs on the
node's event loop, so collectors read that state on the thread that owns it.

The node's identity is not a label here: Prometheus adds `node` (and `role`)
from the coordinator's service discovery (`/api/prometheus/targets`).
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import logging
import time
from collections.abc import Iterable, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.exposition import choose_encoder
from prometheus_client.metrics_core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from mesh.metrics import E2E_BUCKETS, ITL_BUCKETS, PREFIX, QUEUE_BUCKETS, TTFT_BUCKETS
from mesh.types import Finish, FinishReason, Memory, ModelInfo, ModelLoad, Usage
from mesh.version import __version__

log = logging.getLogger(__name__)

# `finish_reason` values; "cancelled" also counts a stream its caller closed.
FINISH_REASONS = tuple(r.value for r in FinishReason)


class StateSource(Protocol):
    """What the scrape-time collector reads (NodeCore provides it)."""

    @property
    def node_id(self) -> str: ...

    @property
    def draining(self) -> bool: ...

    @property
    def load_seconds(self) -> Mapping[str, float]:
        """Seconds the latest load of each model took (those loaded now are reported)."""
        ...

    def load_stats(self) -> list[ModelLoad]: ...

    def memory(self) -> Memory: ...

    def loaded_models(self) -> list[ModelInfo]: ...


class NodeMetrics:
    """The node's metric families, registered on `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self._models: set[str] = set()
        m = ["model"]
        p = PREFIX
        self.ttft = Histogram(
            f"{p}time_to_first_token_seconds",
            "Seconds from the request's arrival at the node to its first output token.",
            m,
            buckets=TTFT_BUCKETS,
            registry=registry,
        )
        self.itl = Histogram(
            f"{p}inter_token_latency_seconds",
            "Seconds between consecutive streamed outputs (tokens) of a generation.",
            m,
            buckets=ITL_BUCKETS,
            registry=registry,
        )
        self.e2e = Histogram(
            f"{p}e2e_request_latency_seconds",
            "Seconds from the request's arrival at the node to its last event.",
            m,
            buckets=E2E_BUCKETS,
            registry=registry,
        )
        self.queue = Histogram(
            f"{p}request_queue_time_seconds",
            "Seconds a request waited for the engine before its prefill began.",
            m,
            buckets=QUEUE_BUCKETS,
            registry=registry,
        )
        self.prompt_tokens = Counter(
            f"{p}prompt_tokens", "Prompt tokens of finished generations.", m, registry=registry
        )
        self.generation_tokens = Counter(
            f"{p}generation_tokens", "Tokens generated.", m, registry=registry
        )
        self.cache_queries = Counter(
            f"{p}prefix_cache_queries",
            "Prompt tokens looked up in the prompt cache (every prompt token).",
            m,
            registry=registry,
        )
        self.cache_hits = Counter(
            f"{p}prefix_cache_hits",
            "Prompt tokens served from the prompt cache instead of being prefilled.",
            m,
            registry=registry,
        )
        self.draft_tokens = Counter(
            f"{p}draft_tokens",
            "Speculative decoding: tokens the draft model proposed.",
            m,
            registry=registry,
        )
        self.accepted_tokens = Counter(
            f"{p}accepted_tokens",
            "Speculative decoding: proposed tokens the output took.",
            m,
            registry=registry,
        )
        self.requests = Counter(
            f"{p}node_requests",
            "Generations the node accepted, by how they ended.",
            ["model", "finish_reason"],
            registry=registry,
        )

    def request(self, model: str, arrived: float) -> RequestMetrics:
        """Metrics of one accepted generation of `model` that arrived at `arrived`."""
        if model not in self._models:
            # Every outcome's series from the model's first request on, at 0: a series
            # born at 1 would hide its first event from rate().
            self._models.add(model)
            for reason in FINISH_REASONS:
                self.requests.labels(model, reason)
        return RequestMetrics(self, model, arrived)

    def watch(self, source: StateSource) -> None:
        """Report `source`'s state at every scrape."""
        self.registry.register(StateCollector(source))


class RequestMetrics:
    """One generation's measurements; label children bound once, here.

    `output()` is the only per-token call: one clock read and a list append.
    Everything else happens in `close()`, after the stream's last event went out.
    """

    __slots__ = (
        "_accepted",
        "_cache_hits",
        "_cache_queries",
        "_draft",
        "_e2e",
        "_gen",
        "_itl",
        "_metrics",
        "_model",
        "_prompt",
        "_queue",
        "_ttft",
        "arrived",
        "finish",
        "outputs",
        "prompt_tokens",
    )

    def __init__(self, metrics: NodeMetrics, model: str, arrived: float) -> None:
        self._metrics = metrics
        self._model = model
        self.arrived = arrived
        self.prompt_tokens = 0
        self.outputs: list[float] = []
        self.finish: Finish | None = None
        # Bound now, so every per-model series exists from the model's first request.
        self._ttft = metrics.ttft.labels(model)
        self._itl = metrics.itl.labels(model)
        self._e2e = metrics.e2e.labels(model)
        self._queue = metrics.queue.labels(model)
        self._prompt = metrics.prompt_tokens.labels(model)
        self._gen = metrics.generation_tokens.labels(model)
        self._cache_queries = metrics.cache_queries.labels(model)
        self._cache_hits = metrics.cache_hits.labels(model)
        self._draft = metrics.draft_tokens.labels(model)
        self._accepted = metrics.accepted_tokens.labels(model)

    def output(self) -> None:
        """A text / reasoning / tool-call event went out now."""
        self.outputs.append(time.perf_counter())

    def close(self) -> None:
        """Record everything: after `Finish`, or when the caller closed the stream."""
        end = time.perf_counter()
        outputs = self.outputs
        if outputs:
            self._ttft.observe(outputs[0] - self.arrived)
            observe = self._itl.observe
            for prev, cur in itertools.pairwise(outputs):
                observe(cur - prev)
        self._e2e.observe(end - self.arrived)
        finish = self.finish
        if finish is None:
            # The caller went away: what it was sent is what was generated.
            usage = Usage(prompt_tokens=self.prompt_tokens, completion_tokens=len(outputs))
            reason = "cancelled"
        else:
            usage, reason = finish.usage, finish.reason.value
            self._queue.observe(usage.queue_seconds)
        self._prompt.inc(usage.prompt_tokens)
        self._gen.inc(usage.completion_tokens)
        self._cache_queries.inc(usage.prompt_tokens)
        self._cache_hits.inc(usage.cached_prompt_tokens)
        self._draft.inc(usage.draft_tokens)
        self._accepted.inc(usage.accepted_draft_tokens)
        self._metrics.requests.labels(self._model, reason).inc()


class StateCollector(Collector):
    """Scrape-time gauges from the node's live state (owned by NodeCore and its backends)."""

    def __init__(self, source: StateSource) -> None:
        self.source = source

    def describe(self) -> Iterable[Metric]:
        # Nothing up front: collecting at registration would read half-built state.
        return []

    def collect(self) -> Iterable[Metric]:
        p, src = PREFIX, self.source
        running = GaugeMetricFamily(
            f"{p}num_requests_running", "Generations running now.", labels=["model"]
        )
        waiting = GaugeMetricFamily(
            f"{p}num_requests_waiting", "Generations queued for the engine.", labels=["model"]
        )
        queued = GaugeMetricFamily(
            f"{p}queued_prefill_tokens", "Prompt tokens waiting to be prefilled.", labels=["model"]
        )
        aggregate = GaugeMetricFamily(
            f"{p}aggregate_decode_tokens_per_second",
            "Tokens/s all running generations decode together, over the last seconds "
            "(0 = nothing decoding).",
            labels=["model"],
        )
        for x in src.load_stats():
            running.add_metric([x.model], x.running)
            waiting.add_metric([x.model], x.waiting)
            queued.add_metric([x.model], x.queued_prefill_tokens)
            aggregate.add_metric([x.model], x.aggregate_decode_tokens_per_second)
        yield from (running, waiting, queued, aggregate)

        mem = src.memory()
        for name, value, text in (
            ("total", mem.total_bytes, "Physical memory of the machine."),
            ("used", mem.used_bytes, "Memory in use on the machine (total - available)."),
            ("available", mem.available_bytes, "Memory available to new allocations."),
            ("framework", mem.framework_bytes, "Memory MLX holds (Metal / CPU arrays)."),
        ):
            yield GaugeMetricFamily(f"{p}memory_{name}_bytes", text, value=value)

        info = InfoMetricFamily(
            f"{p}loaded_model",
            "Models loaded now (value 1), with backend and quantization.",
            labels=["model"],
        )
        memory = GaugeMetricFamily(
            f"{p}model_memory_bytes", "Memory a loaded model holds.", labels=["model"]
        )
        load = GaugeMetricFamily(
            f"{p}model_load_seconds",
            "Seconds the latest load of a loaded model took.",
            labels=["model"],
        )
        for m in src.loaded_models():
            info.add_metric([m.id], {"backend": m.backend, "quantization": m.quantization})
            memory.add_metric([m.id], m.memory_bytes)
            seconds = src.load_seconds.get(m.id)
            if seconds is not None:
                load.add_metric([m.id], seconds)
        yield from (info, memory, load)

        node = InfoMetricFamily(f"{p}node", "This node: id and version.")
        node.add_metric([], {"node_id": src.node_id, "version": __version__})
        yield node
        yield GaugeMetricFamily(
            f"{p}node_draining", "1 while the node shuts down.", value=int(src.draining)
        )


class MetricsServer:
    """`GET /metrics` (Prometheus text or OpenMetrics, gzip when asked) on the event loop.

    A few lines of asyncio rather than prometheus_client's threaded server:
    collectors then read node state on the loop that owns it, and the server's
    lifetime is the node's.
    """

    def __init__(self, registry: CollectorRegistry, host: str, port: int) -> None:
        self.registry = registry
        self.host = host
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        """Listen; returns the bound port (port 0 picks a free one)."""
        try:
            self._server = await asyncio.start_server(self._handle, self.host, self.port)
        except OSError as exc:
            raise OSError(
                f"cannot serve metrics on {self.host}:{self.port}: {exc.strerror} (port in use?)"
            ) from None
        self.port = int(self._server.sockets[0].getsockname()[1])
        return self.port

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
                return
            writer.write(self.respond(head))
            await writer.drain()
        except ConnectionError:
            pass
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()

    def respond(self, head: bytes) -> bytes:
        """The whole HTTP response to a request head."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if len(parts) != 3 or parts[0] not in ("GET", "HEAD"):
            return _response(405, "text/plain", b"only GET /metrics\n")
        if parts[1].split("?")[0] != "/metrics":
            return _response(404, "text/plain", b"not found: try /metrics\n")
        encoder, content_type = choose_encoder(headers.get("accept", ""))
        body = encoder(self.registry)
        extra = {}
        if "gzip" in headers.get("accept-encoding", ""):
            body, extra = gzip.compress(body, 1), {"Content-Encoding": "gzip"}
        return _response(200, content_type, b"" if parts[0] == "HEAD" else body, extra, len(body))


_REASONS = {200: "OK", 404: "Not Found", 405: "Method Not Allowed"}


def _response(
    status: int,
    content_type: str,
    body: bytes,
    extra: dict[str, str] | None = None,
    length: int | None = None,
) -> bytes:
    headers = {
        "Content-Type": content_type,
        "Content-Length": str(len(body) if length is None else length),
        "Connection": "close",
        **(extra or {}),
    }
    head = f"HTTP/1.1 {status} {_REASONS[status]}\r\n"
    head += "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    return (head + "\r\n").encode("latin-1") + body
