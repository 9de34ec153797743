"""The web UI's Routing page in a real browser (Playwright + Debian's Chromium) against a live
simulated mesh: edits are reviewed as a diff (validated by the admin API's dry run), saved,
and take effect on the next request through the official openai SDK; invalid values show
at their field and leave the files on disk as they were; names are shown as text."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from coordinator.config import CoordinatorConfig
from tests.browser import console_errors, needs_browser, stop_coordinator
from tests.conftest import RunningCoordinator, start_coordinator, start_sim_node

pytestmark = needs_browser

HOSTILE = "a<img src=x onerror=window.__xss=1>"
NODE_ID = "routing-node"


@pytest.fixture(scope="module")
def mesh(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    root = tmp_path_factory.mktemp("web-routing")
    node = start_sim_node(root / "n", "alpha-sim:5000:500", "beta-sim:5000:500", node_id=NODE_ID)
    coord = start_coordinator(CoordinatorConfig(home=root / "c", peers=(node.target,)))
    yield coord
    stop_coordinator(coord)
    node.stop(0)


@pytest.fixture
def coord(mesh: RunningCoordinator) -> RunningCoordinator:
    """The coordinator with empty config files."""
    for path in ("/api/aliases", "/api/routing/config", "/api/inference-settings"):
        assert httpx.put(mesh.base_url + path, json={}).is_success
    return mesh


def _home(coord: RunningCoordinator) -> Path:
    home: Path = coord.app.state.config.home
    return home


def _file(coord: RunningCoordinator, name: str) -> Any:
    return json.loads((_home(coord) / name).read_text())


def _served_by(coord: RunningCoordinator, model: str) -> tuple[str | None, int]:
    """Which model answered a chat request for `model` (the openai SDK), and its output tokens."""
    client = openai.OpenAI(base_url=coord.base_url + "/v1", api_key="any", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=40
    )
    usage = raw.parse().usage
    assert usage is not None
    return raw.headers.get("x-macmesh-model"), usage.completion_tokens


def _open(page: Any, coord: RunningCoordinator) -> list[str]:
    errors = console_errors(page)
    page.goto(coord.base_url + "/ui/routing")
    page.locator("#alias-table").wait_for(timeout=10_000)
    page.locator("#tier-table").wait_for()
    page.locator("#inf-temperature").wait_for()
    return errors


def _review_and_save(page: Any, section: str) -> Any:
    sec = page.locator(f"#{section}")
    sec.locator("[data-action=review]").click()
    diff = sec.locator("pre.diff")
    diff.wait_for(timeout=5_000)
    sec.locator("[data-action=save]").click()
    page.wait_for_function(
        f"document.querySelector('#{section} [role=status]').textContent === 'Saved.'"
    )
    return diff


def test_page_loads_without_console_errors(coord: RunningCoordinator, page: Any) -> None:
    httpx.put(coord.base_url + "/api/aliases", json={"fast": {"model": "beta-sim", "ttl": 60}})
    errors = _open(page, coord)
    row = page.locator("#alias-table tbody tr")
    assert row.count() == 1
    assert row.locator("[data-col=alias]").input_value() == "fast"
    assert row.locator("[data-col=model]").input_value() == "beta-sim"
    assert page.locator("nav a.active").inner_text() == "Routing"
    page.wait_for_timeout(300)
    assert errors == []


def test_alias_edit_round_trips_and_takes_effect(coord: RunningCoordinator, page: Any) -> None:
    # Before: the name resolves nowhere.
    with pytest.raises(openai.NotFoundError):
        _served_by(coord, "fast")
    errors = _open(page, coord)
    page.locator("[data-action=add-alias]").click()
    row = page.locator("#alias-table tbody tr").last
    row.locator("[data-col=alias]").fill("fast")
    row.locator("[data-col=model]").fill("beta-sim")
    sec = page.locator("#aliases")
    sec.locator("[data-action=review]").click()
    sec.locator("pre.diff").wait_for(timeout=5_000)
    assert sec.locator("pre.diff .add").all_inner_texts() == ['+   "fast": "beta-sim"\n']
    assert _file(coord, "model_aliases.json") == {}, "reviewing wrote the file"
    sec.locator("[data-action=save]").click()
    page.wait_for_function(
        "document.querySelector('#aliases [role=status]').textContent === 'Saved.'"
    )
    assert _file(coord, "model_aliases.json") == {"fast": "beta-sim"}
    assert _served_by(coord, "fast")[0] == "beta-sim"
    # Edit it again (to alpha-sim, backend mlx): the next request follows.
    row = page.locator("#alias-table tbody tr").first
    row.locator("[data-col=model]").fill("alpha-sim")
    row.locator("[data-col=backend]").select_option("mlx")
    diff = _review_and_save(page, "aliases")
    assert _file(coord, "model_aliases.json") == {"fast": {"model": "alpha-sim", "backend": "mlx"}}
    assert _served_by(coord, "fast")[0] == "alpha-sim"
    assert diff.count() == 0, "the review closes once saved"
    # Removing the row removes the alias.
    page.locator("#alias-table tbody tr [data-action=remove]").first.click()
    _review_and_save(page, "aliases")
    assert _file(coord, "model_aliases.json") == {}
    assert errors == []


def test_tier_edit_round_trips_and_takes_effect(coord: RunningCoordinator, page: Any) -> None:
    body = {"tiers": {"sonnet": {"model": "alpha-sim", "ttl": 300}}, "patterns": {"^x-": "haiku"}}
    assert httpx.put(coord.base_url + "/api/routing/config", json=body).is_success
    assert _served_by(coord, "claude-sonnet-4-5")[0] == "alpha-sim"
    errors = _open(page, coord)
    tier = page.locator("#tier-table tr[data-tier=sonnet]")
    assert tier.locator("[data-col=model]").input_value() == "alpha-sim"
    assert tier.locator("[data-col=ttl]").input_value() == "300"
    tier.locator("[data-col=model]").fill("beta-sim")
    tier.locator("[data-col=max_tokens]").fill("7")
    tier.locator("[data-col=pin]").check()
    diff = _review_and_save(page, "tiers")
    assert diff.count() == 0
    saved = _file(coord, "claude_routing.json")
    assert saved == {
        "tiers": {"sonnet": {"model": "beta-sim", "ttl": 300, "max_tokens": 7, "pin": True}},
        "patterns": {"^x-": "haiku"},
    }, "unedited keys (ttl, patterns) are kept"
    model, tokens = _served_by(coord, "claude-sonnet-4-5")
    assert model == "beta-sim" and tokens <= 7, "the tier's max_tokens caps the next request"
    # The page shows what was saved (re-read, not what was typed).
    page.reload()
    page.locator("#tier-table").wait_for()
    assert tier.locator("[data-col=max_tokens]").input_value() == "7"
    assert tier.locator("[data-col=pin]").is_checked()
    assert errors == []


def _is_only_the_expected_400(errors: list[str]) -> bool:
    return all("status of 400" in e for e in errors)


def test_invalid_values_show_at_the_field_and_save_nothing(
    coord: RunningCoordinator, page: Any
) -> None:
    body = {"tiers": {"sonnet": {"model": "alpha-sim"}}}
    assert httpx.put(coord.base_url + "/api/routing/config", json=body).is_success
    before = (_home(coord) / "claude_routing.json").read_bytes()
    inference_before = (_home(coord) / "inference_settings.json").read_bytes()
    errors = _open(page, coord)

    max_tokens = page.locator("#tier-table tr[data-tier=sonnet] [data-col=max_tokens]")
    max_tokens.fill("-5")
    page.locator("#tiers [data-action=review]").click()
    page.locator("#tiers .field-error").wait_for(timeout=5_000)
    assert max_tokens.get_attribute("aria-invalid") == "true"
    msg = page.locator("#" + str(max_tokens.get_attribute("aria-describedby")))
    assert "tiers.sonnet.max_tokens" in msg.inner_text()
    assert page.locator("#tiers pre.diff").count() == 0, "no review, no save button"
    assert (_home(coord) / "claude_routing.json").read_bytes() == before

    temperature = page.locator("#inf-temperature")
    temperature.fill("hot")
    page.locator("#inference [data-action=review]").click()
    page.locator("#inference .field-error").wait_for(timeout=5_000)
    assert temperature.get_attribute("aria-invalid") == "true"
    assert "temperature" in page.locator("#inference .field-error").inner_text()
    assert (_home(coord) / "inference_settings.json").read_bytes() == inference_before

    # Fixing the value clears the error on the next review.
    temperature.fill("0.4")
    _review_and_save(page, "inference")
    assert temperature.get_attribute("aria-invalid") is None
    assert page.locator("#inference .field-error").count() == 0
    assert _file(coord, "inference_settings.json") == {"temperature": 0.4}
    assert (_home(coord) / "claude_routing.json").read_bytes() == before
    assert _is_only_the_expected_400(errors), errors


def test_resolve_box_shows_where_a_name_goes(coord: RunningCoordinator, page: Any) -> None:
    httpx.put(coord.base_url + "/api/aliases", json={"gpt-*": "beta-sim"})
    errors = _open(page, coord)
    page.locator("#resolve-name").fill("gpt-4o")
    page.locator("#resolve button[type=submit]").click()
    result = page.locator("#resolve-result")
    result.locator("dd[data-key=placement]").wait_for(timeout=5_000)

    def field(key: str) -> str:
        return str(result.locator(f"dd[data-key={key}]").inner_text())

    assert field("model") == "beta-sim" and field("rule") == "wildcard:gpt-*"
    assert field("backend") == "mlx" and field("nodes") == NODE_ID
    assert "loaded on " + NODE_ID in field("placement")
    page.locator("#resolve-name").fill("nothing-here")
    page.locator("#resolve button[type=submit]").click()
    result.locator(".error").wait_for(timeout=5_000)
    assert "nothing-here" in result.inner_text()
    assert all("status of 404" in e for e in errors), errors


def test_hostile_alias_name_is_shown_as_text(coord: RunningCoordinator, page: Any) -> None:
    errors = _open(page, coord)
    page.locator("[data-action=add-alias]").click()
    row = page.locator("#alias-table tbody tr").last
    row.locator("[data-col=alias]").fill(HOSTILE)
    row.locator("[data-col=model]").fill("alpha-sim")
    diff = _review_and_save(page, "aliases")
    assert diff.count() == 0
    assert _file(coord, "model_aliases.json") == {HOSTILE: "alpha-sim"}
    assert _served_by(coord, HOSTILE)[0] == "alpha-sim"
    page.reload()
    page.locator("#alias-table tbody tr").first.wait_for()
    assert page.locator("#alias-table [data-col=alias]").input_value() == HOSTILE
    # The diff of removing it shows the name literally.
    page.locator("#alias-table [data-action=remove]").click()
    page.locator("#aliases [data-action=review]").click()
    assert page.locator("#aliases pre.diff .del").all_inner_texts() == [
        f'-   "{HOSTILE}": "alpha-sim"\n'
    ]
    page.locator("#resolve-name").fill(HOSTILE)
    page.locator("#resolve button[type=submit]").click()
    page.locator("#resolve-result dd[data-key=name]").wait_for(timeout=5_000)
    assert page.locator("#resolve-result dd[data-key=name]").inner_text() == HOSTILE
    assert page.evaluate("document.querySelectorAll('main img').length") == 0
    assert page.evaluate("window.__xss") is None
    assert errors == []
