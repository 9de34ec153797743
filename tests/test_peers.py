"""Static peers: remotes.json (seed format) and --peer, applied while running."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.peers import parse_remotes, parse_target
from mesh.errors import InvalidRequest
from tests.conftest import start_coordinator
from tests.test_coordinator_sim import sim_node


@pytest.mark.parametrize(
    ("text", "target"),
    [
        ("10.0.0.5:6000", "10.0.0.5:6000"),
        ("studio.local", "studio.local:50151"),
        ("grpc://mini:7000", "mini:7000"),
        ("http://studio.local:1234", "studio.local:50151"),
        ("[fe80::1]:7000", "[fe80::1]:7000"),
    ],
)
def test_parse_target(text: str, target: str) -> None:
    assert parse_target(text) == target


def test_parse_remotes_seed_format() -> None:
    data = [
        {"name": "studio", "url": "http://studio.local:1234", "enabled": True},
        {"name": "off", "url": "http://off:1234", "enabled": False},
        {"name": "mini", "address": "mini", "grpc_port": 6001},
        "10.0.0.9:50151",
    ]
    assert parse_remotes(data) == ["studio.local:50151", "mini:6001", "10.0.0.9:50151"]


@pytest.mark.parametrize(
    ("data", "field"),
    [({"a": 1}, ""), ([5], "remotes[0]"), ([{"name": "x"}], "remotes[0]"),
     ([{"url": "h", "grpc_port": 0}], "remotes[0].grpc_port")],
)  # fmt: skip
def test_bad_remotes(data: Any, field: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        parse_remotes(data)
    assert info.value.field == field


def wait_for(url: str, n: int) -> None:
    deadline = time.monotonic() + 15
    while httpx.get(url + "/health").json()["nodes_online"] != n:
        assert time.monotonic() < deadline, f"never saw {n} nodes"
        time.sleep(0.05)


def test_remotes_file_applies_while_running(tmp_path: Path) -> None:
    a, b = sim_node(tmp_path / "a", "m-a"), sim_node(tmp_path / "b", "m-b")
    home = tmp_path / "c"
    home.mkdir()
    (home / "remotes.json").write_text(json.dumps([{"name": "a", "url": f"grpc://{a.target}"}]))
    coord = start_coordinator(CoordinatorConfig(home=home, peers=()), wait_nodes=1)
    try:
        (home / "remotes.json").write_text(json.dumps([f"grpc://{a.target}", b.target]))
        wait_for(coord.base_url, 2)
        (home / "remotes.json").write_text(json.dumps([b.target]))
        wait_for(coord.base_url, 1)
        nodes = httpx.get(coord.base_url + "/api/nodes").json()["nodes"]
        assert [n["address"] for n in nodes] == [b.target]
    finally:
        coord.stop()
        a.stop()
        b.stop()
