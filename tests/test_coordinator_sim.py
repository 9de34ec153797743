"""Coordinator behaviour that needs no real model: simulated nodes, fast and deterministic."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from node.backends.sim import SimBackend
from node.config import NodeConfig, SimModelSpec
from tests.conftest import RunningCoordinator, RunningNode, start_coordinator, start_node


def sim_node(home: Path, name: str = "sim-a") -> RunningNode:
    return start_node(
        NodeConfig(
            grpc_port=0,
            home=home,
            models_dir=home / "models",
            scan_hf_cache=False,
            sim_models=(SimModelSpec(name, 50_000, 1000, 4096),),
        )
    )


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[RunningNode, RunningCoordinator]]:
    node = sim_node(tmp_path / "n1")
    coord = start_coordinator(CoordinatorConfig(home=tmp_path / "c", peers=(node.target,)))
    try:
        yield node, coord
    finally:
        coord.stop()
        if node.thread.is_alive():
            node.stop()


def chat(url: str, model: str = "sim-a", **extra: object) -> httpx.Response:
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}], **extra}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=30)


def test_routing_headers_and_usage(mesh: tuple[RunningNode, RunningCoordinator]) -> None:
    node, coord = mesh
    r = chat(coord.base_url, max_tokens=7)
    assert r.status_code == 200, r.text
    assert node.server.core is not None
    assert r.headers["x-macmesh-node"] == node.server.core.node_id
    assert r.headers["x-macmesh-model"] == "sim-a"
    assert r.headers["x-macmesh-route-reason"] == "only-node"
    assert r.json()["usage"]["completion_tokens"] == 7


def test_output_caps(mesh: tuple[RunningNode, RunningCoordinator]) -> None:
    _, coord = mesh
    url = coord.base_url
    # Room left in the context (4096) caps a huge request.
    r = chat(url, max_tokens=100_000, stream=False)
    prompt = r.json()["usage"]["prompt_tokens"]
    assert r.json()["usage"]["completion_tokens"] == 4096 - prompt
    assert r.json()["choices"][0]["finish_reason"] == "length", "the context is really full"
    # A tier's max_tokens caps requests routed through it.
    assert httpx.put(
        url + "/api/routing/config", json={"tiers": {"haiku": {"model": "sim-a", "max_tokens": 5}}}
    ).is_success
    body = {"model": "claude-haiku-4-5", "max_tokens": 32000, "messages": [{"role": "user", "content": "hi"}]}  # fmt: skip  # noqa: E501
    r = httpx.post(url + "/v1/messages", json=body, timeout=30)
    assert r.status_code == 200 and r.json()["usage"]["output_tokens"] == 5
    # A server-side cap ends the turn; "max_tokens" would tell Claude Code to continue.
    assert r.json()["stop_reason"] == "end_turn"
    r = httpx.post(url + "/v1/messages", json={**body, "max_tokens": 4}, timeout=30)
    assert r.json()["stop_reason"] == "max_tokens", "the client's own limit is reported as such"
    # The global cap applies to everything.
    assert httpx.put(url + "/api/inference-settings", json={"max_output_tokens": 3}).is_success
    capped = chat(url, max_tokens=50).json()
    assert capped["usage"]["completion_tokens"] == 3
    assert capped["choices"][0]["finish_reason"] == "stop"
    bad = httpx.put(url + "/api/inference-settings", json={"max_output_tokens": 0})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "max_output_tokens"


def test_no_node_answers_503_at_once(mesh: tuple[RunningNode, RunningCoordinator]) -> None:
    node, coord = mesh
    node.stop()
    deadline = time.monotonic() + 10
    while httpx.get(coord.base_url + "/health").json()["nodes_online"]:
        assert time.monotonic() < deadline, "the coordinator never noticed the node left"
        time.sleep(0.05)
    t0 = time.monotonic()
    r = chat(coord.base_url)
    assert r.status_code == 503 and r.headers["retry-after"]
    assert "no node" in r.json()["error"]["message"]
    a = httpx.post(
        coord.base_url + "/v1/messages",
        json={"model": "sim-a", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
    )
    assert a.status_code == 503 and a.json()["error"]["type"] == "overloaded_error"
    assert time.monotonic() - t0 < 2, "must not hang"


def test_loaded_and_least_loaded_placement(tmp_path: Path) -> None:
    a, b = sim_node(tmp_path / "a", "shared"), sim_node(tmp_path / "b", "shared")
    coord = start_coordinator(
        CoordinatorConfig(
            home=tmp_path / "c", peers=(a.target, b.target), routing_policy="least-loaded"
        ),
        wait_nodes=2,
    )
    try:
        seen = {chat(coord.base_url, "shared", max_tokens=2).headers["x-macmesh-node"]}
        assert all(
            chat(coord.base_url, "shared", max_tokens=2).headers["x-macmesh-route-reason"]
            == "least-loaded"
            for _ in range(3)
        )
        assert seen <= {a.server.core.node_id, b.server.core.node_id}  # type: ignore[union-attr]
    finally:
        coord.stop()
        a.stop()
        b.stop()


def test_retry_on_another_node_before_the_first_token(tmp_path: Path) -> None:
    """A node that dies during prefill costs the client nothing: another node answers."""
    import threading

    def slow(home: Path) -> RunningNode:
        # ~3 s of simulated prefill: time to kill the node before any token exists.
        return start_node(
            NodeConfig(
                grpc_port=0,
                home=home,
                models_dir=home / "models",
                scan_hf_cache=False,
                shutdown_grace=0.0,
                sim_models=(SimModelSpec("shared", 10, 1000, 4096),),
            )
        )

    a, b = slow(tmp_path / "a"), slow(tmp_path / "b")
    coord = start_coordinator(
        CoordinatorConfig(home=tmp_path / "c", peers=(a.target, b.target)), wait_nodes=2
    )
    try:
        result: list[httpx.Response] = []
        t = threading.Thread(
            target=lambda: result.append(chat(coord.base_url, "shared", max_tokens=3))
        )
        t.start()
        victim = None
        deadline = time.monotonic() + 10
        while victim is None:
            assert time.monotonic() < deadline, "the request never reached a node"
            for n in (a, b):
                assert n.server.core is not None
                if n.server.core.backend(SimBackend).running:  # type: ignore[union-attr]
                    victim = n
            time.sleep(0.01)
        victim.stop(grace=0.0)
        t.join(30)
        r = result[0]
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3
        survivor = b if victim is a else a
        assert survivor.server.core is not None
        assert survivor.server.core.backend(SimBackend).tokens_generated == 3  # type: ignore[union-attr]
    finally:
        coord.stop()
        for n in (a, b):
            if n.thread.is_alive():
                n.stop()


def test_status_command(mesh: tuple[RunningNode, RunningCoordinator]) -> None:
    import subprocess
    import sys

    node, coord = mesh
    macmesh = str(Path(sys.executable).parent / "macmesh")
    out = subprocess.run(
        [macmesh, "status", "--coordinator", coord.base_url],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    header, row = out.stdout.splitlines()
    assert header.split()[:3] == ["NODE", "ADDRESS", "STATUS"]
    assert node.server.core is not None
    assert row.split()[:4] == [node.server.core.node_id, node.target, "online", "sim-a*"]
    down = subprocess.run(
        [macmesh, "status", "--coordinator", "http://127.0.0.1:9"],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert down.returncode == 1 and "cannot reach the coordinator" in down.stderr


def test_a_stopped_node_shows_offline_not_draining(
    mesh: tuple[RunningNode, RunningCoordinator],
) -> None:
    """Its last state said "draining" (it was shutting down); once gone it is offline."""
    node, coord = mesh
    node.stop()
    deadline = time.monotonic() + 10
    while True:
        (view,) = httpx.get(coord.base_url + "/api/nodes", timeout=10).json()["nodes"]
        if view["status"] == "offline":
            break
        assert time.monotonic() < deadline, view
        time.sleep(0.05)
    assert view["draining"] is True  # what it last reported, kept for the record
