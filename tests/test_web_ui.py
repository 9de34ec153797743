"""The web UI in a real browser (Playwright + Debian's Chromium) against a live simulated mesh,
plus the HTTP rules around it (what `/` answers whom, the loopback guard, the event stream)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from node.config import SimModelSpec
from tests.browser import console_errors, needs_browser, stop_coordinator
from tests.conftest import (
    RunningNode,
    start_coordinator,
    start_sim_node,
)

# Names a careless page would turn into markup that runs script.
HOSTILE_NODE = "n<img src=x onerror=window.__xss=1>"
HOSTILE_MODEL = "m<img src=x onerror=window.__xss=2>"
LAZY = "lazy-sim:5000:50,mem=1,load=0.2"  # starts unloaded; loads in 0.2 s
SLOW = "slow-sim:5000:20"  # 20 tok/s: long enough to stop mid-answer
KEY = "sk-ui-test"


def _node(home: Path, spec: str | SimModelSpec, node_id: str | None = None) -> RunningNode:
    return start_sim_node(home, spec, node_id=node_id)


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("web-mesh")
    hostile = start_sim_node(
        root / "a", SimModelSpec(HOSTILE_MODEL, 5000, 50), SLOW, node_id=HOSTILE_NODE
    )
    lazy = _node(root / "b", LAZY, "node-b")
    peers = (hostile.target, lazy.target)
    open_coord = start_coordinator(CoordinatorConfig(home=root / "c1", peers=peers), wait_nodes=2)
    keyed = start_coordinator(
        CoordinatorConfig(home=root / "c2", peers=peers, api_keys=frozenset({KEY})), wait_nodes=0
    )
    mesh_state: dict[str, Any] = {"hostile": hostile, "lazy": lazy, "open": open_coord}
    mesh_state.update(keyed=keyed, root=root)
    yield mesh_state
    stop_coordinator(open_coord)
    stop_coordinator(keyed)
    if not mesh_state.get("lazy_stopped"):
        lazy.stop(0)
    hostile.stop(0)


def test_root_answers_json_to_clients_and_html_to_browsers(mesh: dict[str, Any]) -> None:
    base = mesh["open"].base_url
    assert httpx.get(base + "/").json()["name"] == "macmesh"  # httpx sends */*
    r = httpx.get(base + "/", headers={"accept": "text/html,application/xhtml+xml,*/*;q=0.8"})
    assert r.headers["content-type"].startswith("text/html") and "app.js" in r.text
    assert "script-src 'self'" in r.headers["content-security-policy"]
    assert httpx.get(base + "/ui/models").headers["content-type"].startswith("text/html")
    js = httpx.get(base + "/ui/static/app.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    for bad in ("/ui/static/../pyproject.toml", "/ui/static/%2e%2e/pyproject.toml", "/ui/static/x"):
        r = httpx.get(base + bad)
        assert "[project]" not in r.text and r.status_code in (200, 404), bad
    # With keys the files stay open (they hold no data), the API does not.
    keyed = mesh["keyed"].base_url
    assert httpx.get(keyed + "/ui/static/app.js").status_code == 200
    assert httpx.get(keyed + "/api/events").status_code == 401


def test_event_stream_sends_the_nodes_view(mesh: dict[str, Any]) -> None:
    with httpx.stream("GET", mesh["open"].base_url + "/api/events", timeout=10) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        for line in r.iter_lines():
            if line.startswith("data:"):
                body = json.loads(line.removeprefix("data:"))
                break
    assert {n["id"] for n in body["nodes"]} == {HOSTILE_NODE, "node-b"}


async def test_loopback_guard_without_keys(tmp_path: Path) -> None:
    from coordinator.app import create_app

    def client(app: Any, host: str) -> httpx.AsyncClient:
        transport = httpx.ASGITransport(app=app, client=(host, 1234))
        return httpx.AsyncClient(transport=transport, base_url="http://c")

    closed = create_app(CoordinatorConfig(home=tmp_path / "a"))
    async with client(closed, "192.168.1.20") as http:
        r = await http.get("/api/nodes")
        assert r.status_code == 403 and "--ui-open" in r.json()["error"]["message"]
        assert (await http.get("/ui/mesh")).status_code == 403
        assert (await http.get("/", headers={"accept": "text/html"})).status_code == 403
        assert (await http.get("/")).status_code == 200, "JSON clients and health stay open"
        assert (await http.get("/health")).status_code == 200
    async with client(closed, "127.0.0.1") as http:
        assert (await http.get("/ui/mesh")).status_code == 200
    opened = create_app(CoordinatorConfig(home=tmp_path / "b", ui_open=True))
    async with client(opened, "192.168.1.20") as http:
        assert (await http.get("/ui/mesh")).status_code == 200


@needs_browser
def test_mesh_page_is_live_and_escapes_names(mesh: dict[str, Any], page: Any) -> None:
    page.goto(mesh["open"].base_url + "/")
    cards = page.locator("article.card")
    cards.first.wait_for(timeout=10_000)
    page.wait_for_function("document.querySelectorAll('article.card').length === 2")
    hostile = page.locator("article.card", has_text=HOSTILE_NODE)
    assert hostile.locator("h3").inner_text().startswith(HOSTILE_NODE)
    assert HOSTILE_MODEL in hostile.locator(".models-loaded").inner_text()
    assert page.evaluate("document.querySelectorAll('main img').length") == 0
    assert page.evaluate("window.__xss") is None
    assert "online" in hostile.locator(".badge").inner_text()


@needs_browser
def test_models_page_loads_a_model(mesh: dict[str, Any], page: Any) -> None:
    page.goto(mesh["open"].base_url + "/ui/models")
    row = page.locator('tr[data-node="node-b"]')
    row.wait_for(timeout=10_000)
    assert row.locator(".state").inner_text() == "on disk"
    # The estimate shows while it is only on disk (the sim model declares 1 GiB).
    assert row.locator("td").nth(5).inner_text() == "1.0 GiB"
    assert page.locator("#models").inner_text().count(HOSTILE_MODEL) == 1
    row.locator("button[data-action=load]").click()
    page.wait_for_function(
        "document.querySelector('tr[data-node=\"node-b\"] .state').textContent === 'loaded'",
        timeout=10_000,
    )
    assert page.locator("#model-error").inner_text() == ""
    assert page.evaluate("window.__xss") is None


@needs_browser
def test_api_key_prompt(mesh: dict[str, Any], page: Any) -> None:
    page.goto(mesh["keyed"].base_url + "/ui/mesh")
    page.locator("#key-input").wait_for(state="visible", timeout=10_000)
    assert page.locator("article.card").count() == 0
    page.fill("#key-input", KEY)
    page.click("#key-form button")
    page.wait_for_function("document.querySelectorAll('article.card').length === 2")
    assert page.locator("#key-form").is_hidden()


def _chat(page: Any, model: str, text: str, max_tokens: int) -> Any:
    """Send one turn from the Chat page; the new assistant answer's locator."""
    page.select_option("#chat-model", value=model)
    page.fill("#chat-max-tokens", str(max_tokens))
    page.fill("#chat-input", text)
    before = page.locator(".msg.assistant").count()
    page.click("#chat-send")
    answer = page.locator(".msg.assistant").nth(before)
    answer.wait_for(timeout=5_000)
    return answer


@needs_browser
def test_chat_streams_an_answer_with_its_route(mesh: dict[str, Any], page: Any) -> None:
    base = mesh["open"].base_url
    r = httpx.put(base + "/api/routing/config", json={"tiers": {"haiku": "slow-sim"}})
    assert r.status_code == 200, r.text
    page.goto(base + "/ui/chat")
    page.locator('#chat-model option[value="claude-haiku"]').wait_for(state="attached")
    assert page.locator('#chat-model option[value="claude-haiku"]').inner_text() == (
        "claude haiku → slow-sim"
    )
    page.locator(f'#chat-model option[value="{HOSTILE_MODEL}"]').wait_for(state="attached")
    answer = _chat(page, HOSTILE_MODEL, "hello", 12)
    page.wait_for_selector(".msg.assistant.done", timeout=10_000)
    words = answer.locator(".answer").inner_text().split()
    assert len(words) >= 3, words
    meta = answer.locator(".meta").inner_text()
    assert f"node {HOSTILE_NODE}" in meta and "route " in meta
    assert "prompt " in meta and "cached)" in meta and "completion 12 tokens" in meta
    assert "TTFT" in meta and "tok/s" in meta
    assert page.locator("#chat-resolve").inner_text().startswith("on ")
    # A second turn carries the first (the prompt grows).
    answer2 = _chat(page, HOSTILE_MODEL, "again", 4)
    page.wait_for_function("document.querySelectorAll('.msg.assistant.done').length === 2")
    assert "completion 4 tokens" in answer2.locator(".meta").inner_text()
    assert page.evaluate("document.querySelectorAll('main img').length") == 0
    assert page.evaluate("window.__xss") is None


@needs_browser
def test_chat_stop_aborts_and_the_next_turn_works(mesh: dict[str, Any], page: Any) -> None:
    page.goto(mesh["open"].base_url + "/ui/chat")
    page.locator('#chat-model option[value="slow-sim"]').wait_for(state="attached")
    answer = _chat(page, "slow-sim", "tell me a long story", 4000)
    page.wait_for_function(
        "document.querySelector('.msg.assistant .answer').textContent.split(' ').length > 3",
        timeout=10_000,
    )
    t0 = time.monotonic()
    page.click("#chat-stop")
    page.wait_for_selector(".msg.assistant.stopped", timeout=5_000)
    assert time.monotonic() - t0 < 3
    assert "stopped" in answer.locator(".meta").inner_text()
    assert page.locator("#chat-stop").is_disabled()
    answer2 = _chat(page, HOSTILE_MODEL, "short one", 5)
    page.wait_for_selector(".msg.assistant.done", timeout=10_000)
    assert "completion 5 tokens" in answer2.locator(".meta").inner_text()


@needs_browser
def test_chat_markdown_renderer_cannot_inject_html(mesh: dict[str, Any], page: Any) -> None:
    page.goto(mesh["open"].base_url + "/ui/chat")
    hostile = (
        "<img src=x onerror=window.__xss=1> **bold** and `x<b>y</b>`\n\n"
        "- one\n- <script>window.__xss=3</script>\n\n"
        "```html\n<script>window.__xss=2</script>\n```\n<think>not thinking</think>"
    )
    tags = page.evaluate(
        """async (text) => {
            const { renderMarkdown } = await import('/ui/static/app.js');
            const box = document.createElement('div');
            box.id = 'md';
            box.append(renderMarkdown(text));
            document.body.append(box);
            await new Promise((r) => setTimeout(r, 200));
            return [...box.querySelectorAll('*')].map((e) => e.tagName.toLowerCase());
        }""",
        hostile,
    )
    assert "img" not in tags and "script" not in tags and "b" not in tags and "think" not in tags
    assert {"p", "strong", "code", "pre", "ul", "li"} <= set(tags)
    md = page.locator("#md")
    assert md.locator("strong").inner_text() == "bold"
    assert md.locator("pre code").inner_text() == "<script>window.__xss=2</script>"
    assert "<img src=x onerror=window.__xss=1>" in md.locator("p").first.inner_text()
    assert page.evaluate("window.__xss") is None


@needs_browser
def test_offline_node_and_reconnect(
    mesh: dict[str, Any], page: Any, tmp_path_factory: pytest.TempPathFactory
) -> None:
    # Last: it stops the lazy node and restarts a coordinator of its own.
    root = tmp_path_factory.mktemp("web-reconnect")
    coord = start_coordinator(
        CoordinatorConfig(home=root, peers=(mesh["lazy"].target, mesh["hostile"].target)),
        wait_nodes=2,
    )
    port = coord.port
    page.goto(coord.base_url + "/ui/mesh")
    page.wait_for_function("document.querySelectorAll('article.card.online').length === 2")
    t0 = time.monotonic()
    mesh["lazy"].stop(0)
    mesh["lazy_stopped"] = True
    page.locator('article.card.offline[data-node="node-b"]').wait_for(timeout=15_000)
    assert "offline" in page.locator('article[data-node="node-b"] .badge').inner_text()
    assert time.monotonic() - t0 < 12
    stop_coordinator(coord)
    page.wait_for_function(
        "document.getElementById('conn').textContent.includes('reconnecting')", timeout=10_000
    )
    # The same port again: the page finds the new coordinator by itself.
    import uvicorn

    from coordinator.app import create_app

    app = create_app(CoordinatorConfig(home=root, peers=(mesh["hostile"].target,)))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        page.wait_for_function(
            "document.getElementById('conn').textContent === 'live'", timeout=20_000
        )
    finally:
        server.force_exit = True
        server.should_exit = True
        thread.join(30)


@needs_browser
def test_first_load_is_small_and_the_mesh_page_is_idle(mesh: dict[str, Any], page: Any) -> None:
    """Issue 18: all of a first load under 300 KB; at rest the Mesh page only listens."""
    base = mesh["open"].base_url
    urls: list[str] = []
    page.on("request", lambda r: urls.append(r.url))
    page.goto(base + "/ui/mesh")
    page.locator("#nodes article").first.wait_for()
    page.wait_for_timeout(1000)
    streams = [u for u in urls if u.endswith("/api/events")]
    assert len(streams) == 1
    total = 0
    for url in set(urls) - set(streams):
        r = httpx.get(url, headers={"accept": "text/html"} if url.endswith("/mesh") else {})
        assert r.status_code == 200, url
        total += len(r.content)
    assert total < 300 * 1024, f"first load {total} bytes: {sorted(set(urls))}"
    # Every page module is loaded at start (one import graph), so this covers them all.
    assert any(u.endswith("/page-requests.js") for u in urls)
    seen = len(urls)
    page.wait_for_timeout(3000)
    assert urls[seen:] == []  # no polling: updates arrive on the open event stream


@needs_browser
def test_every_page_loads_without_console_errors(mesh: dict[str, Any], page: Any) -> None:
    errors = console_errors(page)
    base = mesh["open"].base_url
    for name, ready in (
        ("mesh", "#nodes article"),
        ("models", "#models tbody tr"),
        ("chat", "#chat-model option"),
        ("routing", "#resolve-name"),
        ("requests", "#requests tbody tr"),
    ):
        page.goto(f"{base}/ui/{name}")
        page.locator(ready).first.wait_for(state="attached")
        page.wait_for_timeout(300)
        assert page.locator("nav a.active").get_attribute("data-page") == name
    assert errors == []


@needs_browser
def test_chat_streams_a_real_smollm2_answer_and_stops(coordinator: Any, page: Any) -> None:
    """The real model on a real node: an answer streams in, and Stop ends a long one."""
    errors = console_errors(page)
    page.goto(coordinator.base_url + "/ui/chat")
    page.locator('#chat-model option[value="smollm2"]').wait_for(state="attached")
    answer = _chat(page, "smollm2", "Name three colours.", 6)
    page.wait_for_selector(".msg.assistant.done", timeout=120_000)
    assert answer.locator(".answer").inner_text().strip()
    meta = answer.locator(".meta").inner_text()
    assert "completion 6 tokens" in meta and "TTFT" in meta and "node " in meta
    long = _chat(page, "smollm2", "Tell me a long story about a lighthouse.", 400)
    page.wait_for_function(
        "document.querySelectorAll('.msg.assistant .answer')[1].textContent.length > 5",
        timeout=120_000,
    )
    page.click("#chat-stop")
    page.wait_for_selector(".msg.assistant.stopped", timeout=10_000)
    assert "stopped" in long.locator(".meta").inner_text()
    assert errors == []
