"""A node that hangs with its connection open (SIGSTOP) does not stall the mesh.

The scene of issue 19, as a lab runs it: two plain `macmesh node` processes serving the
same GGUF through real llama-servers, a separate `macmesh coordinator`. One node is
frozen with SIGSTOP (its TCP connections stay open, it answers nothing) and four requests
go out at once through the official SDK. Each must complete on the healthy node, some
after being moved off the frozen one mid-call, none waiting past the watchdog's bound;
the frozen node leaves rotation within 2 s of its first missed state push and comes
back when thawed.
"""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from coordinator.nodes import FLAP_OUTAGES, SETTLE_SECONDS, STALE_AFTER, NodeView
from mesh.types import NodeState
from tests.gguf_fixtures import make_tiny, write_tiny_gguf
from tests.procs import start_lab, wait_until

FILE = "hung-tiny"
MODEL = f"{FILE}.gguf"  # the id a GGUF file in the models dir gets
# What a request may take here: the node leaves rotation (STALE_AFTER), the watchdog
# notices (0.2 s), the request is re-rendered and served elsewhere; generous for CI.
BOUND = 15.0


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, llama_server_binary: Path) -> Iterator[Any]:
    lab = start_lab(
        tmp_path_factory.mktemp("hung"),
        2,
        lambda _, home: write_tiny_gguf(home / "models" / MODEL, make_tiny()),
    )
    try:
        for node in ("node-0", "node-1"):  # loaded on both, so either may serve
            r = httpx.post(
                f"{lab.base}/api/models/load", json={"model": MODEL, "node": node}, timeout=120
            )
            assert r.status_code == 200, r.text
        yield {"base": lab.base, "nodes": lab.nodes, "all": lab.everyone}
    finally:
        for proc in lab.nodes:  # a frozen process ignores SIGTERM until thawed
            if proc.alive() and proc.process.proc is not None:
                os.kill(proc.process.proc.pid, signal.SIGCONT)
        lab.procs.stop_all()


def _status(base: str, node: str) -> str:
    nodes = httpx.get(f"{base}/api/nodes").json()["nodes"]
    return str(next(n["status"] for n in nodes if n["id"] == node))


def _ask(base: str, i: int) -> tuple[str, float]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=60)
    t0 = time.monotonic()
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": f"question {i}"}], max_tokens=4
    )
    raw.parse()
    return raw.headers["x-macmesh-node"], time.monotonic() - t0


@pytest.mark.timeout(300)
def test_a_frozen_node_is_routed_around(lab: Any) -> None:
    base, frozen = lab["base"], lab["nodes"][0]
    assert frozen.process.proc is not None
    pid = frozen.process.proc.pid
    # Spread the first requests: the coordinator sends some to each node.
    served = {_ask(base, i)[0] for i in range(6)}
    assert served == {"node-0", "node-1"}, served

    os.kill(pid, signal.SIGSTOP)
    stopped = time.monotonic()
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: _ask(base, i), range(4)))
        assert [node for node, _ in results] == ["node-1"] * 4
        assert max(took for _, took in results) < BOUND, results
        # Out of rotation: within 2 s of the first missed push (pushes come every 1 s).
        wait_until(lambda: _status(base, "node-0") == "offline", 10, "node-0 offline")
        assert time.monotonic() - stopped < 1.0 + STALE_AFTER + 1.0
        # New requests go straight to the healthy node.
        node, took = _ask(base, 99)
        assert node == "node-1" and took < BOUND
    finally:
        os.kill(pid, signal.SIGCONT)
    wait_until(lambda: _status(base, "node-0") == "online", 30, "node-0 back", lab["all"])
    # Back in rotation (which node serves next is the routing policy's call: node-0's
    # measured speeds now include the frozen seconds).
    nodes = httpx.get(f"{base}/api/routing/resolve/{MODEL}").json()["nodes"]
    assert sorted(nodes) == ["node-0", "node-1"]
    assert _ask(base, 100)[0] in ("node-0", "node-1")
    # Nothing left in flight on the coordinator's books.
    nodes = httpx.get(f"{base}/api/nodes").json()["nodes"]
    assert all(n["inflight"] == 0 for n in nodes)


def _speak_and_hear(base: str, i: int) -> tuple[str, float]:
    """Speech through the mesh, then its transcription: (the text heard, seconds)."""
    t0 = time.monotonic()
    speech = httpx.post(
        f"{base}/v1/audio/speech",
        json={"model": "espeak-ng", "input": f"number {i}", "response_format": "wav"},
        timeout=60,
    )
    assert speech.status_code == 200, speech.text
    # The frozen node-0 never answers: the headers name the node that did, and any it left.
    assert speech.headers["x-macmesh-node"] == "node-1", speech.headers
    assert speech.headers.get("x-macmesh-retried-from", "node-0") == "node-0"
    heard = httpx.post(
        f"{base}/v1/audio/transcriptions",
        files={"file": ("a.wav", speech.content, "audio/wav")},
        data={"model": "pocketsphinx-en", "response_format": "text"},
        timeout=60,
    )
    assert heard.status_code == 200, heard.text
    assert heard.headers["x-macmesh-node"] == "node-1", heard.headers
    assert heard.headers.get("x-macmesh-retried-from", "node-0") == "node-0"
    return heard.text, time.monotonic() - t0


@pytest.mark.timeout(300)
def test_voice_requests_are_routed_around_a_frozen_node(lab: Any) -> None:
    """Speech and transcription calls are watched like chat: none waits on a frozen node."""
    base, frozen = lab["base"], lab["nodes"][0]
    served = httpx.get(f"{base}/api/routing/resolve/espeak-ng").json().get("nodes", [])
    if sorted(served) != ["node-0", "node-1"]:
        pytest.skip(f"the nodes serve no espeak-ng / pocketsphinx ({served}): make espeak-ng")
    assert frozen.process.proc is not None
    pid = frozen.process.proc.pid
    wait_until(lambda: _status(base, "node-0") == "online", 30, "node-0 online", lab["all"])
    seq = httpx.get(f"{base}/api/requests", params={"limit": 1}).json()["last_seq"]
    os.kill(pid, signal.SIGSTOP)
    try:
        with ThreadPoolExecutor(4) as pool:
            results = list(pool.map(lambda i: _speak_and_hear(base, i), range(4)))
        assert max(took for _, took in results) < 2 * BOUND, results
    finally:
        os.kill(pid, signal.SIGCONT)
    records = httpx.get(f"{base}/api/requests", params={"after": seq, "limit": 100}).json()
    voice = [r for r in records["requests"] if r["model"] in ("espeak-ng", "pocketsphinx-en")]
    assert len(voice) == 8 and all(r["ok"] and r["node"] == "node-1" for r in voice), voice


def _state() -> NodeState:
    return NodeState(node_id="n", version="0", sequence=1, timestamp=0.0)


def test_a_flapping_node_settles_before_it_is_routed_to(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr("coordinator.nodes.time.monotonic", lambda: clock[0])
    view = NodeView(target="t", client=None)  # type: ignore[arg-type]

    def push() -> None:
        view.reported(clock[0], STALE_AFTER)
        view.state, view.last_seen = _state(), clock[0]

    push()
    assert view.online(STALE_AFTER)
    for outage in range(1, FLAP_OUTAGES + 1):
        clock[0] += STALE_AFTER + 1  # missed pushes: out of rotation
        assert not view.online(STALE_AFTER) and view.status(STALE_AFTER) == "offline"
        push()  # back
        if outage < FLAP_OUTAGES:  # one outage: a restart, routed to at once
            assert view.online(STALE_AFTER)
    assert not view.online(STALE_AFTER) and view.status(STALE_AFTER) == "settling"
    clock[0] += SETTLE_SECONDS / 2
    push()
    assert not view.online(STALE_AFTER)
    clock[0] += SETTLE_SECONDS / 2 + 0.01
    push()
    assert view.online(STALE_AFTER)
