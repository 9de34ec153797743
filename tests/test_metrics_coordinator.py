"""Coordinator metrics and Prometheus discovery, through a real coordinator and simulated nodes.

Each coordinator app gets a registry of its own (`app.state.metrics_registry`).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from prometheus_client import CollectorRegistry

from coordinator.api.prometheus import node_host, node_targets
from coordinator.config import CoordinatorConfig
from coordinator.metrics import alias_label, event_status, status_of, tier_label
from mesh import errors
from node.config import NodeConfig, SimModelSpec
from routing.aliases import Resolution
from routing.policy import REASONS
from tests.conftest import RunningCoordinator, RunningNode, start_coordinator, start_node

MODEL = "sim-a"


def sim_node(home: Path, *, metrics: bool = True, decode_tps: float = 1000) -> RunningNode:
    return start_node(
        NodeConfig(
            grpc_port=0,
            metrics_port=0 if metrics else None,
            home=home,
            models_dir=home / "models",
            scan_hf_cache=False,
            sim_models=(SimModelSpec(MODEL, 50_000, decode_tps, 8192),),
        )
    )


def write_config(home: Path) -> None:
    home.mkdir(parents=True, exist_ok=True)
    (home / "model_aliases.json").write_text(json.dumps({"fast": MODEL, "gpt-*": MODEL}))
    routing = {"tiers": {"haiku": {"model": MODEL}, "sonnet": {"model": MODEL}}}
    (home / "claude_routing.json").write_text(json.dumps(routing))


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[RunningNode, RunningCoordinator]]:
    node = sim_node(tmp_path / "n1", decode_tps=200)
    write_config(tmp_path / "c")
    coord = start_coordinator(CoordinatorConfig(home=tmp_path / "c", peers=(node.target,)))
    try:
        yield node, coord
    finally:
        coord.stop()
        if node.thread.is_alive():
            node.stop()


def registry(coord: RunningCoordinator) -> CollectorRegistry:
    reg: CollectorRegistry = coord.app.state.metrics_registry
    return reg


def requests_total(coord: RunningCoordinator, **labels: str) -> float | None:
    return registry(coord).get_sample_value("macmesh_requests_total", labels)


def wait_for(check: Callable[[], bool], timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def chat(url: str, model: str, **extra: object) -> httpx.Response:
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(url + "/v1/chat/completions", json={**body, **extra}, timeout=30)


def message(url: str, model: str) -> httpx.Response:
    body = {"model": model, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}
    return httpx.post(url + "/v1/messages", json=body, timeout=30)


def test_requests_are_counted_by_api_model_alias_tier_and_status(
    mesh: tuple[RunningNode, RunningCoordinator],
) -> None:
    node, coord = mesh
    url = coord.base_url
    assert chat(url, MODEL).status_code == 200
    assert chat(url, "fast").status_code == 200
    assert chat(url, "gpt-4o").status_code == 200
    assert message(url, "claude-3-5-haiku-20241022").status_code == 200
    r = httpx.post(url + "/v1/completions", json={"model": "fast", "prompt": "x", "max_tokens": 2})
    assert r.status_code == 200
    assert chat(url, "no-such-model").status_code == 404
    assert httpx.post(url + "/v1/chat/completions", json={"model": MODEL}).status_code == 400
    assert message(url, "claude-3-5-haiku-20241022").status_code == 200
    assert chat(url, MODEL, temperature=-1).status_code == 400

    def count(api: str, model: str, alias: str, tier: str, status: str) -> float | None:
        return requests_total(coord, api=api, model=model, alias=alias, tier=tier, status=status)

    assert count("openai", MODEL, MODEL, "none", "200") == 1
    assert count("openai", MODEL, "fast", "none", "200") == 2  # chat + completions
    assert count("openai", MODEL, "gpt-*", "none", "200") == 1
    assert count("anthropic", MODEL, "other", "haiku", "200") == 2
    # Unknown names and invalid bodies stay bounded: "other".
    assert count("openai", "other", "other", "none", "404") == 1
    assert count("openai", "other", "other", "none", "400") == 2

    reg = registry(coord)
    routed = 6  # every request that reached a node
    assert reg.get_sample_value("macmesh_route_decisions_total", {"reason": "only-node"}) == routed
    for reason in REASONS:
        assert reg.get_sample_value("macmesh_route_decisions_total", {"reason": reason}) is not None
    assert node.server.core is not None
    where = {"node": node.server.core.node_id, "model": MODEL}
    assert reg.get_sample_value("macmesh_time_to_first_token_seconds_count", where) == 6
    assert reg.get_sample_value("macmesh_e2e_request_latency_seconds_count", where) == 6
    ttft = reg.get_sample_value("macmesh_time_to_first_token_seconds_sum", where)
    e2e = reg.get_sample_value("macmesh_e2e_request_latency_seconds_sum", where)
    assert ttft is not None and e2e is not None and 0 < ttft < e2e


def test_count_tokens_is_not_a_request(mesh: tuple[RunningNode, RunningCoordinator]) -> None:
    _, coord = mesh
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    r = httpx.post(coord.base_url + "/v1/messages/count_tokens", json=body)
    assert r.status_code == 200
    reg = registry(coord)
    assert reg.get_sample_value("macmesh_route_decisions_total", {"reason": "only-node"}) == 0
    assert not [s for m in reg.collect() if m.name == "macmesh_requests" for s in m.samples]


def test_a_client_that_goes_away_counts_as_499(
    mesh: tuple[RunningNode, RunningCoordinator],
) -> None:
    node, coord = mesh
    body = {
        "model": MODEL,
        "max_tokens": 400,  # two seconds at 200 tok/s
        "stream": True,
        "messages": [{"role": "user", "content": "hi"}],
    }
    with httpx.stream("POST", coord.base_url + "/v1/chat/completions", json=body) as r:
        for line in r.iter_lines():
            if '"content":"' in line and '"content":""' not in line:
                break
    labels = {"api": "openai", "model": MODEL, "alias": MODEL, "tier": "none"}
    wait_for(lambda: requests_total(coord, **labels, status="499") == 1)
    assert requests_total(coord, **labels, status="200") in (None, 0)
    # The node heard about it too.
    node_reg = node.server.metrics_registry
    cancelled = {"model": MODEL, "finish_reason": "cancelled"}
    wait_for(lambda: node_reg.get_sample_value("macmesh_node_requests_total", cancelled) == 1)


def test_node_up_follows_the_mesh_view(tmp_path: Path) -> None:
    node = sim_node(tmp_path / "n1")
    coord = start_coordinator(CoordinatorConfig(home=tmp_path / "c", peers=(node.target,)))
    try:
        assert node.server.core is not None
        up = {"node": node.server.core.node_id}
        reg = registry(coord)
        assert reg.get_sample_value("macmesh_node_up", up) == 1
        node.stop()
        wait_for(lambda: reg.get_sample_value("macmesh_node_up", up) == 0)
    finally:
        coord.stop()


def test_discovery_lists_every_node_and_the_coordinator(tmp_path: Path) -> None:
    with_metrics = sim_node(tmp_path / "n1")
    without = sim_node(tmp_path / "n2", metrics=False)
    config = CoordinatorConfig(
        home=tmp_path / "c", peers=(with_metrics.target, without.target), mesh="lab"
    )
    coord = start_coordinator(config, wait_nodes=2)
    try:
        assert with_metrics.server.core is not None
        r = httpx.get(coord.base_url + "/api/prometheus/targets")
        assert r.status_code == 200
        assert r.json() == [
            {
                "targets": [f"127.0.0.1:{with_metrics.server.metrics_port}"],
                "labels": {"node": with_metrics.server.core.node_id, "role": "node", "mesh": "lab"},
            },
            {
                "targets": [f"127.0.0.1:{coord.port}"],
                "labels": {"role": "coordinator", "mesh": "lab"},
            },
        ]
        # Every target answers at /metrics: the node's and the coordinator's own.
        for group in r.json():
            text = httpx.get(f"http://{group['targets'][0]}/metrics").text
            name = "macmesh_node_info" if group["labels"]["role"] == "node" else "macmesh_node_up"
            assert name in text
        # Whatever address Prometheus used, it is the one listed; nodes the coordinator
        # reaches over loopback run on its machine, so they are listed there too.
        other = httpx.get(coord.base_url + "/api/prometheus/targets", headers={"host": "mac1:1234"})
        assert other.json()[-1]["targets"] == ["mac1:1234"]
        port = with_metrics.server.metrics_port
        assert other.json()[0]["targets"] == [f"mac1:{port}"]
        # A node the coordinator lost stays listed (Prometheus then reports it down).
        with_metrics.stop()
        wait_for(lambda: httpx.get(coord.base_url + "/health").json()["nodes_online"] == 1)
        listed = httpx.get(coord.base_url + "/api/prometheus/targets").json()
        assert listed[0]["labels"]["node"] == with_metrics.server.core.node_id
    finally:
        coord.stop()
        without.stop()


def test_node_host_and_ipv6_targets() -> None:
    assert node_host("10.0.0.7:50151") == "10.0.0.7"
    assert node_host("[fe80::1]:50151") == "fe80::1"
    assert node_host("[fe80::1]") == "fe80::1"
    assert node_host("mac-mini.local:6000") == "mac-mini.local"
    assert node_host("mac-mini.local") == "mac-mini.local"
    assert node_targets([], "default") == []


def test_metrics_and_discovery_need_no_api_key(tmp_path: Path) -> None:
    node = sim_node(tmp_path / "n1")
    config = CoordinatorConfig(
        home=tmp_path / "c", peers=(node.target,), api_keys=frozenset({"sekrit"})
    )
    coord = start_coordinator(config)
    try:
        url = coord.base_url
        assert httpx.get(url + "/metrics").status_code == 200
        assert httpx.get(url + "/api/prometheus/targets").status_code == 200
        assert httpx.get(url + "/api/nodes").status_code == 401
        assert chat(url, MODEL).status_code == 401
    finally:
        coord.stop()
        node.stop()


def test_a_scrape_preinitialises_aliases_tiers_and_loaded_models(
    mesh: tuple[RunningNode, RunningCoordinator],
) -> None:
    _, coord = mesh
    text = httpx.get(coord.base_url + "/metrics").text
    for api in ("anthropic", "openai"):
        for alias, tier in (("fast", "none"), ("gpt-*", "none"), (MODEL, "none"),
                            ("other", "haiku"), ("other", "sonnet")):  # fmt: skip
            series = (
                f'macmesh_requests_total{{alias="{alias}",api="{api}",model="{MODEL}",'
                f'status="200",tier="{tier}"}} 0.0'
            )
            assert series in text


def test_labels_stay_bounded() -> None:
    def res(rule: str, tier: str | None = None) -> Resolution:
        return Resolution("asked", MODEL, "mlx", None, rule, tier)

    assert alias_label(res("alias")) == "asked"
    assert alias_label(res("exact")) == "asked"
    assert alias_label(res("wildcard:gpt-*")) == "gpt-*"
    assert alias_label(res("tier:opus", "opus")) == "other"
    assert alias_label(res("default")) == "other"
    assert alias_label(None) == "other"
    assert tier_label(res("tier:opus", "opus")) == "opus"
    assert tier_label(res("claude-default", "haiku")) == "haiku"
    assert tier_label(res("exact")) == "none"
    assert status_of(errors.ModelNotFound("x")) == "404"
    assert status_of(errors.PromptTooLong(10, 5)) == "400"
    assert status_of(errors.Overloaded("full")) == "503"
    assert event_status("INTERNAL") == "500"
    assert event_status("CANCELLED") == "500"  # the node shut down: a server failure
    assert event_status("INVALID_ARGUMENT") == "400"


def test_node_and_coordinator_in_one_process_keep_their_metrics_apart(tmp_path: Path) -> None:
    """`macmesh node --coordinator` (as `up`): node metrics on their port, the coordinator's
    on its HTTP port, found through its discovery."""
    env = {**os.environ, "MACMESH_HOME": str(tmp_path), "PYTHONUNBUFFERED": "1"}
    env.pop("MACMESH_SECRET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "macmesh", "node", "--coordinator", "--grpc-port", "0",
         "--http-port", "0", "--sim-model", f"{MODEL}:50000:1000", "--no-bonjour",
         "--no-hf-cache", "--no-default-model", "--shutdown-grace", "0"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        match = re.search(r"coordinator listening on (\S+)", proc.stdout.readline())
        assert match
        url = match.group(1)
        wait_for(lambda: httpx.get(url + "/health").json()["nodes_online"] == 1, 30)
        assert chat(url, MODEL).status_code == 200
        groups = httpx.get(url + "/api/prometheus/targets").json()
        assert [g["labels"]["role"] for g in groups] == ["node", "coordinator"]
        node_metrics = httpx.get(f"http://{groups[0]['targets'][0]}/metrics").text
        coord_metrics = httpx.get(url + "/metrics").text
        assert f'macmesh_generation_tokens_total{{model="{MODEL}"}} 4.0' in node_metrics
        assert "macmesh_requests_total" not in node_metrics
        assert "macmesh_requests_total" in coord_metrics
        assert "macmesh_generation_tokens_total" not in coord_metrics
        # Both report the process; neither lists `_created` twins.
        assert "process_" in node_metrics or sys.platform == "darwin"
        assert "_created" not in node_metrics + coord_metrics
    finally:
        proc.terminate()
        proc.wait(20)
