"""The coordinator's request log: the bounded ring, its HTTP API and event stream, the CLI,
and what real requests (official SDKs, simulated and real SmolLM2 nodes) leave in it."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Iterator
from typing import Any

import anthropic
import httpx
import openai
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.request_log import RequestFilter, RequestLog, RequestRecord
from macmesh.cli import main
from tests.browser import stop_coordinator
from tests.conftest import RunningCoordinator, start_coordinator, start_sim_node

SIZE = 6


def _rec(i: int, **kw: Any) -> RequestRecord:
    base: dict[str, Any] = dict(id=f"r{i}", time=1000.0 + i, api="openai", requested="m")
    base.update(kw)
    return RequestRecord(**base)


def test_ring_is_bounded_numbered_and_filtered() -> None:
    log = RequestLog(3)
    for i in range(5):
        log.add(_rec(i, node="a" if i % 2 else "b", status=200 if i != 3 else 503))
    got = log.query()
    assert [r.id for r in got] == ["r2", "r3", "r4"] and [r.seq for r in got] == [3, 4, 5]
    assert log.total == 5 and log.last_seq == 5
    assert [r.id for r in log.query(RequestFilter(node="a"))] == ["r3"]
    assert [r.id for r in log.query(RequestFilter(ok=False))] == ["r3"]
    assert [r.id for r in log.query(after=4)] == ["r4"]  # seq 5
    assert [r.id for r in log.query(limit=1)] == ["r4"]  # the newest
    assert [r.id for r in log.query(RequestFilter(text="R2"))] == ["r2"]
    with pytest.raises(ValueError):
        RequestLog(0)


async def test_wait_wakes_on_a_new_record() -> None:
    log = RequestLog(4)
    assert not await log.wait(0, 0.05)
    waiter = asyncio.create_task(log.wait(0, 5))
    await asyncio.sleep(0.05)
    log.add(_rec(1))
    assert await asyncio.wait_for(waiter, 1)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("reqlog")
    a = start_sim_node(root / "a", "sim-a:5000:200", node_id="node-a")
    b = start_sim_node(root / "b", "sim-b:5000:200", node_id="node-b")
    home = root / "c"
    home.mkdir()
    (home / "model_aliases.json").write_text(json.dumps({"fast": "sim-b"}))
    coord = start_coordinator(
        CoordinatorConfig(home=home, peers=(a.target, b.target), request_log_size=SIZE),
        wait_nodes=2,
    )
    yield {"coord": coord, "a": a, "b": b}
    stop_coordinator(coord)
    a.stop(0)
    b.stop(0)


def _records(coord: RunningCoordinator, **params: Any) -> dict[str, Any]:
    r = httpx.get(coord.base_url + "/api/requests", params=params)
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def test_sdk_requests_are_logged_with_route_and_timings(mesh: dict[str, Any]) -> None:
    coord = mesh["coord"]
    oa = openai.OpenAI(base_url=coord.base_url + "/v1", api_key="x", max_retries=0)
    an = anthropic.Anthropic(base_url=coord.base_url, api_key="x", max_retries=0)
    before = _records(coord)["last_seq"]
    oa.chat.completions.create(
        model="sim-a", messages=[{"role": "user", "content": "hi"}], max_tokens=8
    )
    an.messages.create(model="fast", max_tokens=5, messages=[{"role": "user", "content": "yo"}])
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "x"}]
        )
    got = _records(coord, after=before)["requests"]
    assert [r["api"] for r in got] == ["openai", "anthropic", "openai"]
    first, second, refused = got
    assert first["requested"] == first["model"] == "sim-a" and first["node"] == "node-a"
    assert first["completion_tokens"] == 8 and first["outcome"] == "length" and first["ok"]
    assert first["prompt_tokens"] > 0 and first["ttft_seconds"] > 0
    assert first["tokens_per_second"] > 0 and first["route_reason"]
    assert abs(first["time"] - time.time()) < 30
    assert second["requested"] == "fast" and second["model"] == "sim-b"
    assert second["rule"] == "alias" and second["node"] == "node-b"
    assert refused["status"] == 404 and not refused["ok"]
    assert refused["outcome"].startswith("refused:") and "no-such-model" in refused["outcome"]
    # Filters: by node, by model (requested or resolved), failures only, text.
    assert [r["id"] for r in _records(coord, after=before, node="node-b")["requests"]] == [
        second["id"]
    ]
    assert len(_records(coord, after=before, model="sim-b")["requests"]) == 1
    assert [r["id"] for r in _records(coord, after=before, ok="false")["requests"]] == [
        refused["id"]
    ]
    assert len(_records(coord, after=before, q="NO-SUCH")["requests"]) == 1


def test_the_log_keeps_only_its_size(mesh: dict[str, Any]) -> None:
    coord = mesh["coord"]
    oa = openai.OpenAI(base_url=coord.base_url + "/v1", api_key="x", max_retries=0)
    for _ in range(SIZE + 2):
        oa.completions.create(model="sim-a", prompt="x", max_tokens=1)
    body = _records(coord, limit=1000)
    assert len(body["requests"]) == SIZE and body["size"] == SIZE
    assert body["total"] >= SIZE + 2
    seqs = [r["seq"] for r in body["requests"]]
    assert seqs == sorted(seqs) and seqs[-1] == body["last_seq"]


@pytest.mark.parametrize(
    ("params", "field"),
    [({"limit": "0"}, "limit"), ({"limit": "many"}, "limit"), ({"ok": "maybe"}, "ok")],
)
def test_bad_queries_name_the_parameter(
    mesh: dict[str, Any], params: dict[str, str], field: str
) -> None:
    for path in ("/api/requests", "/api/requests/events"):
        r = httpx.get(mesh["coord"].base_url + path, params=params)
        assert r.status_code == 400
        assert r.json()["error"]["param"] == field


def test_event_stream_sends_new_requests_live(mesh: dict[str, Any]) -> None:
    coord = mesh["coord"]
    seen: list[dict[str, Any]] = []
    ready = threading.Event()

    def read() -> None:
        with httpx.stream(
            "GET", coord.base_url + "/api/requests/events", params={"node": "node-b"}, timeout=20
        ) as resp:
            for line in resp.iter_lines():
                if line.startswith("data:"):
                    body = json.loads(line[5:])
                    if not ready.is_set():
                        ready.set()  # the backlog
                        continue
                    seen.extend(body["requests"])
                    return

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    assert ready.wait(10)
    oa = openai.OpenAI(base_url=coord.base_url + "/v1", api_key="x", max_retries=0)
    oa.chat.completions.create(
        model="sim-a", messages=[{"role": "user", "content": "a"}], max_tokens=2
    )  # filtered out: node-a
    oa.chat.completions.create(
        model="sim-b", messages=[{"role": "user", "content": "b"}], max_tokens=2
    )
    reader.join(10)
    assert [r["node"] for r in seen] == ["node-b"] and seen[0]["model"] == "sim-b"


def test_cli_prints_the_log(mesh: dict[str, Any], capsys: pytest.CaptureFixture[str]) -> None:
    coord = mesh["coord"]
    oa = openai.OpenAI(base_url=coord.base_url + "/v1", api_key="x", max_retries=0)
    oa.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "c"}], max_tokens=3
    )
    assert main(["requests", "--coordinator", coord.base_url, "-n", "1", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    assert line["requested"] == "fast" and line["model"] == "sim-b"
    assert main(["requests", "--coordinator", coord.base_url, "--model", "fast"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split()[:3] == ["time", "api", "model"]
    assert "fast -> sim-b" in out[-1] and "node-b" in out[-1]
    assert main(["requests", "--coordinator", coord.base_url, "-n", "0"]) == 1
    assert "limit" in capsys.readouterr().err


def test_cached_tokens_come_from_the_node(mesh: dict[str, Any]) -> None:
    coord = mesh["coord"]
    oa = openai.OpenAI(base_url=coord.base_url + "/v1", api_key="x", max_retries=0)
    long = " ".join(f"word{i}" for i in range(1500))  # past the node's 512-token reuse floor
    for _ in range(2):  # the second one finds the prompt cached
        oa.completions.create(model="sim-b", prompt=long, max_tokens=1)
    last = _records(coord, model="sim-b", limit=1)["requests"][-1]
    assert last["cached_tokens"] >= 512 and last["prompt_tokens"] > last["cached_tokens"]


def test_real_model_request_is_logged(coordinator: RunningCoordinator) -> None:
    """SmolLM2 on a real node through the official SDK, streamed."""
    oa = openai.OpenAI(base_url=coordinator.base_url + "/v1", api_key="x", max_retries=0)
    stream = oa.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "Name a colour."}],
        max_tokens=3,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
    last = _records(coordinator, model="smollm2", limit=1)["requests"][-1]
    assert last["prompt_tokens"] > 5 and last["node"] and last["route_reason"]
    assert last["completion_tokens"] == 3 and last["ttft_seconds"] > 0 and last["ok"]
    assert last["tokens_per_second"] > 0 and last["outcome"] == "length"


HOSTILE = "m<img src=x onerror=window.__xss=3>"


def test_requests_page_is_live_filterable_and_escapes(mesh: dict[str, Any], page: Any) -> None:
    from tests.browser import console_errors

    coord = mesh["coord"]
    errors = console_errors(page)
    oa = openai.OpenAI(base_url=coord.base_url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.NotFoundError):
        oa.chat.completions.create(model=HOSTILE, messages=[{"role": "user", "content": "x"}])
    page.goto(coord.base_url + "/ui/requests")
    rows = page.locator("#requests tbody tr[data-seq]")
    rows.first.wait_for()
    assert page.locator("#requests .req-model", has_text=HOSTILE).count() == 1  # as text
    assert page.evaluate("window.__xss") is None
    # Live: a new request shows up without a reload (newest first).
    oa.chat.completions.create(
        model="fast", messages=[{"role": "user", "content": "live"}], max_tokens=2
    )
    page.wait_for_function(
        "document.querySelector('#requests tbody tr .req-model').textContent"
        ".includes('fast → sim-b')",
        timeout=5000,
    )
    first = rows.first
    assert first.locator(".req-node").text_content() == "node-b"
    # Filters narrow the table in the page.
    page.fill("#req-f-node", "node-b")
    assert all(t == "node-b" for t in page.locator("#requests .req-node").all_text_contents())
    page.fill("#req-f-node", "")
    page.select_option("#req-f-outcome", "failed")
    outcomes = page.locator("#requests tbody tr[data-seq]")
    assert outcomes.count() >= 1
    assert all(
        "failed" in (c or "") for c in outcomes.evaluate_all("rs => rs.map(r => r.className)")
    )
    assert errors == []
