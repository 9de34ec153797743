"""Memory-aware placement, eviction, idle TTLs and pins (issue 17), with real processes:
two simulated nodes with small memory budgets and models of declared sizes behind a real
coordinator; plus the pure rules of routing.placement, table-driven."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from mesh.errors import InvalidRequest
from node.backends.sim import SimBackend
from routing.aliases import lifetime_entries, parse_aliases, parse_claude_routing
from routing.placement import (
    Lifetime,
    NodeRoom,
    NoRoom,
    Placement,
    Resident,
    lifetime,
    parse_model_settings,
    place,
)
from tests.conftest import RunningCoordinator, RunningNode, start_coordinator, start_sim_node

GB = 2**30

# ---------- pure rules ----------


def room(node: str, budget: float, *loaded: Resident) -> NodeRoom:
    return NodeRoom(node, int(budget * GB), 100 * GB, 128 * GB, loaded)


def res(
    model: str, gb: float, idle: float = 10.0, busy: bool = False, pinned: bool = False
) -> Resident:
    return Resident(model, int(gb * GB), idle, busy, pinned)


@pytest.mark.parametrize(
    ("nodes", "need", "expect"),
    [
        # Fits on both: the one left with the most free memory.
        ([room("a", 8, res("x", 6)), room("b", 8)], 2, ("b", ())),
        # Ties go to the lowest node id.
        ([room("b", 8), room("a", 8)], 2, ("a", ())),
        # No room without eviction: least recently used goes first, only as much as needed.
        ([room("a", 8, res("old", 3, idle=100), res("new", 3, idle=5))], 4, ("a", ("old",))),
        # Fewest evictions wins across nodes.
        (
            [
                room("a", 8, res("p", 3, idle=50), res("q", 3, idle=40)),
                room("b", 8, res("r", 6, idle=1)),
            ],
            6,
            ("b", ("r",)),
        ),
        # Pinned and busy models are never evicted.
        (
            [room("a", 8, res("pin", 5, pinned=True)), room("b", 8, res("run", 5, busy=True))],
            4,
            None,
        ),
        # Unknown size: the node with the most free memory.
        ([room("a", 4), room("b", 6)], 0, ("b", ())),
    ],
)
def test_place_rules(
    nodes: list[NodeRoom], need: float, expect: tuple[str, tuple[str, ...]] | None
) -> None:
    out = place("m", int(need * GB), nodes)
    if expect is None:
        assert isinstance(out, NoRoom)
    else:
        assert isinstance(out, Placement), out
        assert (out.node_id, out.evict) == expect


def test_no_room_names_sizes() -> None:
    out = place("big", 9 * GB, [room("a", 8, res("idle", 2)), room("b", 4)])
    assert isinstance(out, NoRoom)
    assert "9.00 GiB" in out.message and "6.00 GiB on a" in out.message
    assert "8.00 GiB on a if every idle, unpinned model there were unloaded" in out.message
    assert out.largest_free_bytes == 6 * GB


def test_free_memory_is_capped_by_the_machine() -> None:
    # A budget larger than what the machine has available: available (less a margin) wins.
    n = NodeRoom("a", 64 * GB, 10 * GB, 20 * GB)
    assert n.free_bytes == 9 * GB
    assert NodeRoom("a", 0, 10 * GB, 20 * GB).free_bytes == 9 * GB


def test_lifetimes() -> None:
    settings = parse_model_settings(
        {"default_ttl": 600, "models": {"a": {"ttl": 30}, "b": {"pin": True}, "q*": {"ttl": 5}}}
    )
    aliases = parse_aliases(
        {"fast": {"model": "c", "ttl": 60}, "keep": {"model": "d", "pin": True}}
    )
    routing = parse_claude_routing(
        {"tiers": {"haiku": {"model": "e", "ttl": 90, "backend": "gguf"}}}
    )
    from routing.aliases import RoutingConfig

    entries = lifetime_entries(RoutingConfig(aliases=aliases, claude=routing))
    assert lifetime("a", settings, entries) == Lifetime(30.0)
    assert lifetime("b", settings, entries) == Lifetime(None, pin=True)
    assert lifetime("qwen", settings, entries) == Lifetime(5.0)
    assert lifetime("c", settings, entries) == Lifetime(60.0)
    assert lifetime("d", settings, entries) == Lifetime(None, pin=True)
    assert lifetime("e.gguf", settings, entries) == Lifetime(90.0)
    assert lifetime("zzz", settings, entries) == Lifetime(600.0)
    assert lifetime("zzz", parse_model_settings({}), ()) == Lifetime(None)  # off by default


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"default_ttl": "1h"}, "default_ttl"),
        ({"models": {"a": {"ttl": -1}}}, "models[a].ttl"),
        ({"models": {"a": {"pin": "yes"}}}, "models[a].pin"),
        ({"models": {"a": {"ttl": 5, "keep": 1}}}, "models[a]"),
        ({"modles": {}}, "modles"),
    ],
)
def test_model_settings_errors_name_the_field(data: object, field: str) -> None:
    with pytest.raises(InvalidRequest) as err:
        parse_model_settings(data)
    assert err.value.field == field


# ---------- real processes ----------


def sim_node(home: Path, node_id: str, budget_gb: float, *specs: str) -> RunningNode:
    return start_sim_node(home, *specs, node_id=node_id, memory_budget=int(budget_gb * GB))


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[RunningNode, RunningNode, RunningCoordinator]]:
    """node-a (4 GB budget): m1 3 GB, m2 2 GB, xl 5 GB; node-b (4 GB): m1 3 GB, m3 2 GB.
    Every model loads in 0.3 s; decode 50 tok/s so a stream can be held open."""
    a_models = (
        "m1:5000:50,mem=3,load=0.3",
        "m2:5000:50,mem=2,load=0.3",
        "xl:5000:50,mem=5,load=0.3",
    )
    a = sim_node(tmp_path / "a", "node-a", 4, *a_models)
    b = sim_node(
        tmp_path / "b", "node-b", 4, "m1:5000:50,mem=3,load=0.3", "m3:5000:50,mem=2,load=0.3"
    )
    coord = start_coordinator(
        CoordinatorConfig(home=tmp_path / "c", peers=(a.target, b.target)), wait_nodes=2
    )
    try:
        yield a, b, coord
    finally:
        coord.stop()
        a.stop()
        b.stop()


def chat(coord: RunningCoordinator, model: str, max_tokens: int = 2) -> httpx.Response:
    body = {
        "model": model,
        "max_tokens": max_tokens,
        "messages": [{"role": "user", "content": "hi"}],
    }
    return httpx.post(coord.base_url + "/v1/chat/completions", json=body, timeout=60)


def loaded(coord: RunningCoordinator) -> dict[str, set[str]]:
    """Node id -> models loaded there, as the coordinator sees it now."""
    nodes = httpx.get(coord.base_url + "/api/nodes", timeout=10).json()["nodes"]
    return {n["id"]: {m["id"] for m in n.get("models", []) if m["loaded"]} for n in nodes}


def wait_loaded(coord: RunningCoordinator, want: dict[str, set[str]], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while (now := loaded(coord)) != want:
        assert time.monotonic() < deadline, f"loaded {now}, wanted {want}"
        time.sleep(0.05)


def settle(coord: RunningCoordinator, timeout: float = 5) -> None:
    """Until the coordinator sees every loaded model idle (nodes report it as requests end)."""
    deadline = time.monotonic() + timeout
    while True:
        nodes = httpx.get(coord.base_url + "/api/nodes", timeout=10).json()["nodes"]
        if all(m["idle_seconds"] for n in nodes for m in n.get("models", []) if m["loaded"]):
            return
        assert time.monotonic() < deadline, nodes
        time.sleep(0.05)


def sim(node: RunningNode) -> SimBackend:
    assert node.server.core is not None
    return node.server.core.backend(SimBackend)


def test_places_where_it_fits_evicts_lru_refuses_what_fits_nowhere(
    mesh: tuple[RunningNode, RunningNode, RunningCoordinator],
) -> None:
    _, _, coord = mesh
    wait_loaded(coord, {"node-a": set(), "node-b": set()})
    # Both have m1's files and 4 GB free: the lowest id.
    r = chat(coord, "m1")
    assert r.status_code == 200, r.text
    assert r.headers["x-macmesh-node"] == "node-a"
    assert r.headers["x-macmesh-route-reason"] == "not-loaded"
    assert "node-a has room: needs 3.00 GiB" in r.headers["x-macmesh-placement"]
    # m2 is only on node-a, which has 1 GB left: m1 (idle) is unloaded to make room.
    settle(coord)
    r = chat(coord, "m2")
    assert r.status_code == 200, r.text
    assert r.headers["x-macmesh-node"] == "node-a"
    assert "after unloading m1" in r.headers["x-macmesh-placement"]
    wait_loaded(coord, {"node-a": {"m2"}, "node-b": set()})
    # m1 again: node-b is empty now, so it goes there without evicting anything.
    r = chat(coord, "m1")
    assert r.headers["x-macmesh-node"] == "node-b", r.headers
    wait_loaded(coord, {"node-a": {"m2"}, "node-b": {"m1"}})
    # xl is bigger than any budget: refused at once, in the API's envelope, with the sizes.
    settle(coord)
    t0 = time.monotonic()
    r = chat(coord, "xl")
    assert r.status_code == 503
    message = r.json()["error"]["message"]
    assert "'xl' needs about 5.00 GiB" in message and "fits on no node" in message
    assert "4.00 GiB on node-a if every idle, unpinned model there were unloaded" in message
    assert time.monotonic() - t0 < 2
    # The Anthropic surface words it in its own envelope.
    r = httpx.post(
        coord.base_url + "/v1/messages",
        json={"model": "xl", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]},
        timeout=30,
    )
    assert r.status_code == 503 and r.json()["type"] == "error"
    assert "5.00 GiB" in r.json()["error"]["message"]
    # Nothing was evicted for the refusal.
    assert loaded(coord) == {"node-a": {"m2"}, "node-b": {"m1"}}


def test_never_evicts_a_pinned_model_or_one_in_flight(
    mesh: tuple[RunningNode, RunningNode, RunningCoordinator], tmp_path: Path
) -> None:
    _, _, coord = mesh
    assert chat(coord, "m2").status_code == 200  # node-a: m2 (2 GB of 4)
    wait_loaded(coord, {"node-a": {"m2"}, "node-b": set()})
    assert chat(coord, "m3").status_code == 200  # node-b: m3 (2 GB of 4)
    wait_loaded(coord, {"node-a": {"m2"}, "node-b": {"m3"}})
    # m1 (3 GB) fits only by evicting m2 (a stream runs on it below) or m3 (pinned): refused.
    put = httpx.put(
        coord.base_url + "/api/model-settings", json={"models": {"m3": {"pin": True}}}, timeout=10
    )
    assert put.status_code == 200, put.text
    done = threading.Event()
    holder: list[httpx.Response] = []

    def hold() -> None:
        holder.append(chat(coord, "m2", max_tokens=150))  # 3 s at 50 tok/s
        done.set()

    t = threading.Thread(target=hold)
    t.start()
    deadline = time.monotonic() + 5
    while not sim(mesh[0])._running["m2"]:
        assert time.monotonic() < deadline
        time.sleep(0.02)
    time.sleep(1.2)  # the node's state shows it running
    r = chat(coord, "m1")
    assert r.status_code == 503, r.text
    assert "fits on no node" in r.json()["error"]["message"]
    t.join(30)
    assert holder and holder[0].status_code == 200
    assert loaded(coord) == {"node-a": {"m2"}, "node-b": {"m3"}}
    # Once m2 is idle it may go: m1 lands on node-a in its place.
    settle(coord)
    r = chat(coord, "m1")
    assert r.status_code == 200, r.text
    assert r.headers["x-macmesh-node"] == "node-a"
    wait_loaded(coord, {"node-a": {"m1"}, "node-b": {"m3"}})
    # The preview endpoint and the table say the same.
    table = httpx.get(coord.base_url + "/api/models", timeout=10).json()["models"]
    m3 = next(m for m in table if m["id"] == "m3")
    assert m3["pin"] is True and m3["estimated_bytes"] == 2 * GB
    assert [n["id"] for n in m3["nodes"] if n["loaded"]] == ["node-b"]


def test_idle_ttl_unloads(mesh: tuple[RunningNode, RunningNode, RunningCoordinator]) -> None:
    _, _, coord = mesh
    home = Path(coord.app.state.settings.home)
    home.mkdir(exist_ok=True)
    # A TTL from model_settings.json and one from an alias entry.
    (home / "model_settings.json").write_text(json.dumps({"models": {"m3": {"ttl": 1}}}))
    (home / "model_aliases.json").write_text(json.dumps({"short": {"model": "m2", "ttl": 1.5}}))
    time.sleep(1.1)  # the settings store re-reads files at most once a second
    assert chat(coord, "m3").status_code == 200
    assert chat(coord, "short").status_code == 200
    t0 = time.monotonic()
    assert loaded(coord) == {"node-a": {"m2"}, "node-b": {"m3"}}
    wait_loaded(coord, {"node-a": {"m2"}, "node-b": set()}, timeout=10)
    assert time.monotonic() - t0 > 0.5  # idle time, not at once
    wait_loaded(coord, {"node-a": set(), "node-b": set()}, timeout=10)
    assert coord.app.state.service.placer.ttl_unloads == 2


def test_a_burst_of_first_requests_loads_once(
    mesh: tuple[RunningNode, RunningNode, RunningCoordinator],
) -> None:
    _, _, coord = mesh
    results: list[httpx.Response] = []
    lock = threading.Lock()

    def one() -> None:
        r = chat(coord, "m2")
        with lock:
            results.append(r)

    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert [r.status_code for r in results] == [200] * 6
    assert sim(mesh[0]).loads == 1
    assert coord.app.state.service.placer.loads_started == 1


def test_admin_load_unload_and_cli_table(
    mesh: tuple[RunningNode, RunningNode, RunningCoordinator],
) -> None:
    import subprocess
    import sys

    _, _, coord = mesh
    url = coord.base_url
    r = httpx.post(url + "/api/models/load", json={"model": "m1", "node": "node-b"}, timeout=30)
    assert r.status_code == 200, r.text
    assert r.json()["node"] == "node-b"
    wait_loaded(coord, {"node-a": set(), "node-b": {"m1"}})
    r = httpx.get(url + "/api/models/placement/m3", timeout=10).json()
    assert r["fits"] and r["node"] == "node-b" and r["evict"] == ["m1"]
    out = subprocess.run(
        [sys.executable, "-m", "macmesh", "models", "--coordinator", url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    line = next(ln for ln in out.splitlines() if ln.startswith("m1"))
    assert "node-a" in line and "on disk" in line and "3,221 MB" in line
    assert any("node-b" in ln and "loaded" in ln for ln in out.splitlines())
    out = subprocess.run(
        [sys.executable, "-m", "macmesh", "models", "unload", "m1", "--coordinator", url],
        capture_output=True, text=True, timeout=60, check=True,
    ).stdout  # fmt: skip
    assert "unloaded m1 on node-b" in out
    wait_loaded(coord, {"node-a": set(), "node-b": set()})
    bad = httpx.post(url + "/api/models/load", json={"model": "m3", "node": "node-a"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "node"
    bad = httpx.put(url + "/api/model-settings", json={"default_ttl": "soon"}, timeout=10)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "default_ttl"


def test_node_refuses_a_load_past_its_budget(tmp_path: Path) -> None:
    """Without a coordinator's placement (a direct gRPC call), the node's own budget holds."""
    import asyncio

    from mesh.client import NodeClient
    from mesh.errors import Overloaded

    node = sim_node(tmp_path / "n", "solo", 4, "p:5000:50,mem=3,load=0", "q:5000:50,mem=2,load=0")
    try:

        async def go() -> str:
            async with NodeClient(node.target, timeout=30) as c:
                await c.load_model("p")
                with pytest.raises(Overloaded) as err:
                    await c.load_model("q")
                return err.value.message

        message = asyncio.run(go())
        assert "'q' needs about 2.00 GiB" in message and "budget is 4.00 GiB" in message
        assert "p 3.00 GiB" in message
    finally:
        node.stop()


def test_docs_examples_parse() -> None:
    """docs/models.md's model_settings.json and tier examples are valid as written."""
    import re

    doc = (Path(__file__).resolve().parent.parent / "docs" / "models.md").read_text()
    blocks = [json.loads(b) for b in re.findall(r"```json\n(.*?)```", doc, re.S)]
    settings = parse_model_settings(next(b for b in blocks if "default_ttl" in b))
    assert lifetime("qwen3-4b", settings) == Lifetime(600.0)
    assert lifetime("x.gguf", settings) == Lifetime(300.0)
    assert lifetime("other", settings) == Lifetime(1800.0)
    tiers = parse_claude_routing({"tiers": next(b for b in blocks if "haiku" in b)})
    from routing.aliases import RoutingConfig

    entries = lifetime_entries(RoutingConfig(claude=tiers))
    assert lifetime("qwen3-coder-30b", settings, entries).pin


def test_unload_waits_for_requests_in_flight_and_refuses_new_ones(tmp_path: Path) -> None:
    """An unload (not if_idle) lets the running stream finish; meanwhile new requests for the
    model get UNAVAILABLE (a coordinator retries them elsewhere); `if_idle` refuses outright."""
    import asyncio
    from dataclasses import replace

    from mesh.client import NodeClient
    from mesh.errors import ModelLoadError, Unavailable
    from tests.node_calls import chat as chat_request
    from tests.node_calls import collect, finish_of

    node = sim_node(tmp_path / "n", "solo", 4, "p:5000:40,mem=1,load=0")
    req = replace(chat_request("hi", max_tokens=40), model="p")  # 1 s at 40 tok/s

    async def go() -> None:
        async with NodeClient(node.target, timeout=30) as c:
            stream = asyncio.create_task(collect(c, req))
            while not sim(node)._running["p"]:
                await asyncio.sleep(0.01)
            with pytest.raises(ModelLoadError, match="in flight"):
                await c.unload_model("p", if_idle=True)
            unload = asyncio.create_task(c.unload_model("p"))
            await asyncio.sleep(0.2)
            with pytest.raises(Unavailable, match="being unloaded"):
                await collect(c, req)
            assert not unload.done()
            events = await stream
            assert finish_of(events).usage.completion_tokens == 40  # not cut
            assert await unload is True
            assert "p" not in sim(node).loaded()
            # Afterwards a request loads it again on demand.
            again = await collect(c, replace(req, sampling=replace(req.sampling, max_tokens=2)))
            assert finish_of(again).usage.completion_tokens == 2

    try:
        asyncio.run(go())
    finally:
        node.stop()
