"""The web UI's Models page in a real browser (Playwright + Debian's Chromium): pull from a
local stand-in for the Hugging Face Hub (tests/hub_server.py, never the network), copy
between real nodes, delete with the page's confirm step, search, and the API's errors.

The mesh: node-a (a GGUF in its models dir, a built-in simulated model, its own HF
cache), node-b (empty), node-c (keeps more disk free than any disk has: every copy to it
is refused), one coordinator in front of them.
"""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest

from coordinator.config import CoordinatorConfig
from node.config import NodeConfig, SimModelSpec
from tests.browser import console_errors, needs_browser, stop_coordinator
from tests.conftest import RunningNode, start_coordinator, start_node
from tests.gguf_fixtures import make_tiny, write_tiny_gguf
from tests.hub_server import FakeHub, FakeRepo

pytestmark = needs_browser

MB = 1 << 20
# huggingface_hub writes a download in 10 MiB chunks: a body held at 11 MiB leaves one
# chunk on disk, so the transfer shows part of its bytes done.
STALL_AT = 11 * MB
HOSTILE_REPO = "evil/tiny<img src=x onerror=window.__xss=3>"
LOCAL = "local-Q4_0.gguf"
WAIT = 20_000  # ms


def _node(root: Path, node_id: str, **config: Any) -> RunningNode:
    home = root / node_id
    home.mkdir(parents=True, exist_ok=True)
    (home / "node_id").write_text(node_id + "\n")
    return start_node(
        NodeConfig(
            grpc_port=0,
            home=home,
            models_dir=home / "models",
            scan_hf_cache=True,
            hf_cache_dir=root / f"hf-{node_id}",
            **{"min_free_disk_bytes": 0, **config},
        )
    )


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("web-models")
    src = root / "src"
    src.mkdir()
    tiny = write_tiny_gguf(src / "tiny-Q4_0.gguf", make_tiny())
    # A GGUF big enough to be seen mid-download: the tiny model, then padding.
    big = src / "big-Q4_0.gguf"
    shutil.copyfile(tiny, big)
    with big.open("ab") as f:
        f.write(b"\0" * (12 * MB))
    hub = FakeHub().start()
    hub.add(FakeRepo("org/tiny-GGUF", {"tiny-Q4_0.gguf": tiny}, tags=["gguf"], downloads=50))
    hub.add(FakeRepo("org/big-GGUF", {"big-Q4_0.gguf": big}, tags=["gguf"], downloads=5))
    two = {"two-Q4_0.gguf": tiny, "two-Q8_0.gguf": tiny}
    hub.add(FakeRepo("org/two-GGUF", two, tags=["gguf"], downloads=1))
    hub.add(FakeRepo(HOSTILE_REPO, {"x-Q4_0.gguf": tiny}, tags=["gguf"], downloads=7, likes=3))
    with pytest.MonkeyPatch.context() as mp:
        # conftest keeps the session offline; the nodes and the coordinator read these
        # when they pull and search (huggingface_hub's constant was read at import).
        mp.setenv("HF_ENDPOINT", hub.url)
        mp.setenv("HF_HUB_OFFLINE", "0")
        mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        mp.setenv("HF_HOME", str(root / "hf-home"))
        (root / "node-a" / "models").mkdir(parents=True)
        shutil.copyfile(tiny, root / "node-a" / "models" / LOCAL)
        a = _node(root, "node-a", sim_models=(SimModelSpec("sim-1"),))
        b = _node(root, "node-b")
        c = _node(root, "node-c", min_free_disk_bytes=1 << 60)
        coord = start_coordinator(
            CoordinatorConfig(home=root / "coord", peers=(a.target, b.target, c.target)),
            wait_nodes=3,
        )
        mesh_state = {"coord": coord, "hub": hub, "root": root, "base": coord.base_url}
        mesh_state["big_bytes"] = big.stat().st_size
        yield mesh_state
        stop_coordinator(coord)
        for node in (a, b, c):
            node.stop(0)
        hub.stop()


def _row(page: Any, model: str, node: str) -> Any:
    return page.locator(f'#models tr[data-model="{model}"][data-node="{node}"]')


def _open(page: Any, mesh: dict[str, Any]) -> None:
    page.goto(mesh["base"] + "/ui/models")
    _row(page, LOCAL, "node-a").wait_for(timeout=WAIT)
    page.wait_for_function("document.querySelectorAll('#pull-node option').length === 3")


def test_pull_shows_progress_then_the_model_is_served(mesh: dict[str, Any], page: Any) -> None:
    errors = console_errors(page)
    where: list[str] = []  # which URL each console error came from, for the message
    page.on(
        "console", lambda m: where.append(m.location.get("url", "?")) if m.type == "error" else None
    )
    _open(page, mesh)
    hub: FakeHub = mesh["hub"]
    hub.stall(STALL_AT)
    try:
        page.fill("#pull-repo", "org/big-GGUF")
        page.select_option("#pull-node", "node-a")
        page.click("#pull-start")
        running = page.locator('.transfer[data-state="running"]', has_text="org/big-GGUF")
        running.wait_for(timeout=WAIT)
        # Part of it done: the bar and the byte counts say how much.
        page.wait_for_function(
            "Number(document.querySelector('.transfer[data-state=running] [role=progressbar]')"
            "?.getAttribute('aria-valuenow')) > 0",
            timeout=WAIT,
        )
        text = running.inner_text()
        amount = f"{10 * MB / 1e6:.1f} MB / {mesh['big_bytes'] / 1e6:.1f} MB ("
        assert amount in text and "node-a" in text and "%)" in text, text
        assert "node-a" in page.inner_text("#pull-status")
    finally:
        hub.release()
    page.locator('.transfer[data-state="done"]', has_text="big-Q4_0.gguf").wait_for(timeout=WAIT)
    row = _row(page, "big-Q4_0.gguf", "node-a")
    row.wait_for(timeout=WAIT)
    assert row.locator(".state").inner_text() == "on disk"
    assert page.inner_text("#pull-status") == "pulled big-Q4_0.gguf onto node-a"
    assert page.inner_text("#pull-error") == ""
    assert errors == [], where


def test_copy_to_another_node_then_delete_it_with_confirm(mesh: dict[str, Any], page: Any) -> None:
    errors = console_errors(page)
    _open(page, mesh)
    src = _row(page, LOCAL, "node-a")
    src.locator("button[data-action=copy]").click()
    src.locator("select[data-role=copy-target]").select_option("node-b")
    src.locator("button[data-action=copy-confirm]").click()
    page.locator('.transfer[data-state="done"]', has_text=LOCAL).wait_for(timeout=WAIT)
    copied = _row(page, LOCAL, "node-b")
    copied.wait_for(timeout=WAIT)
    path = mesh["root"] / "node-b" / "models" / LOCAL
    assert path.is_file()
    assert "from node-a" in page.locator(".transfer", has_text=LOCAL).inner_text()

    # Delete asks in the page first; Cancel keeps it.
    copied.locator("button[data-action=delete]").click()
    assert f"Delete {LOCAL} from node-b?" in copied.inner_text()
    copied.locator("button[data-action=cancel]").click()
    assert copied.locator("button[data-action=delete-confirm]").count() == 0
    assert path.is_file()
    copied.locator("button[data-action=delete]").click()
    copied.locator("button[data-action=delete-confirm]").click()
    copied.wait_for(state="detached", timeout=WAIT)
    assert not path.exists()
    assert _row(page, LOCAL, "node-a").count() == 1
    assert errors == []


def test_api_errors_show_next_to_the_action(mesh: dict[str, Any], page: Any) -> None:
    _open(page, mesh)
    # Copy to a node with no room: the API's 507 message, in the row.
    src = _row(page, LOCAL, "node-a")
    src.locator("button[data-action=copy]").click()
    src.locator("select[data-role=copy-target]").select_option("node-c")
    src.locator("button[data-action=copy-confirm]").click()
    src.locator(".row-error").wait_for(timeout=WAIT)
    assert "not enough disk space" in src.locator(".row-error").inner_text()
    # Delete of a model built into the node: refused, said in its row.
    sim = _row(page, "sim-1", "node-a")
    sim.locator("button[data-action=delete]").click()
    sim.locator("button[data-action=delete-confirm]").click()
    sim.locator(".row-error").wait_for(timeout=WAIT)
    assert "built into this node" in sim.locator(".row-error").inner_text()
    # A malformed repo id: refused at once, under the pull form.
    page.fill("#pull-repo", "not a repo id!")
    page.click("#pull-start")
    page.wait_for_function("document.querySelector('#pull-error').textContent !== ''")
    assert "repo" in page.inner_text("#pull-error")
    # A repo the Hub does not have: the pull starts, then fails saying why.
    page.fill("#pull-repo", "org/missing")
    page.click("#pull-start")
    failed = page.locator('.transfer[data-state="failed"]', has_text="org/missing")
    failed.wait_for(timeout=WAIT)
    assert "not found" in failed.locator(".transfer-error").inner_text()
    page.wait_for_function("document.querySelector('#pull-status').className === 'error'")
    assert "pull failed" in page.inner_text("#pull-status")


def test_search_lists_results_as_text_and_pulls_one(mesh: dict[str, Any], page: Any) -> None:
    _open(page, mesh)
    page.fill("#search-q", "tiny")
    page.select_option("#pull-node", "node-b")
    page.click("#search-go")
    page.locator("#search-results tr[data-repo]").first.wait_for(timeout=WAIT)
    repos = page.locator("#search-results td.repo").all_inner_texts()
    assert repos == ["org/tiny-GGUF", HOSTILE_REPO]
    hostile = page.locator("#search-results tr", has_text=HOSTILE_REPO)
    assert "7" in hostile.inner_text() and "Q4_0" in hostile.inner_text()
    assert page.evaluate("document.querySelectorAll('main img').length") == 0
    assert page.evaluate("window.__xss") is None
    # Pull from a result: one GGUF file, so it starts at once.
    page.locator("#search-results tr", has_text="org/tiny-GGUF").locator("button").click()
    _row(page, "tiny-Q4_0.gguf", "node-b").wait_for(timeout=WAIT)
    assert page.input_value("#pull-repo") == "org/tiny-GGUF"
    assert page.input_value("#pull-file") == "tiny-Q4_0.gguf"
    assert page.evaluate("window.__xss") is None
    # A repo typed in: its GGUF files are offered for the file field.
    page.fill("#pull-repo", "org/two-GGUF")
    page.press("#pull-repo", "Tab")
    page.wait_for_function("document.querySelector('#pull-files').textContent !== ''")
    assert page.inner_text("#pull-files").startswith("2 GGUF files: two-Q4_0.gguf (")
    options = "[...document.querySelectorAll('#pull-file-list option')].map((o) => o.value)"
    assert page.evaluate(options) == ["two-Q4_0.gguf", "two-Q8_0.gguf"]
