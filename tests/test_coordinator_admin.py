"""Admin API, health, API keys, and the mesh view, against a real coordinator + node."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from tests.conftest import RunningCoordinator, RunningNode, start_coordinator


def test_root_and_health(coordinator: RunningCoordinator) -> None:
    assert httpx.get(coordinator.base_url + "/").status_code == 200
    assert httpx.head(coordinator.base_url + "/").status_code == 200
    health = httpx.get(coordinator.base_url + "/health").json()
    assert health == {"status": "ok", "nodes_online": 1}


def test_nodes_and_models(coordinator: RunningCoordinator, node: RunningNode) -> None:
    nodes = httpx.get(coordinator.base_url + "/api/nodes").json()["nodes"]
    assert len(nodes) == 1
    n = nodes[0]
    assert n["online"] and n["address"] == node.target
    assert node.server.core is not None and n["id"] == node.server.core.node_id
    assert n["memory"]["total_bytes"] > 0
    assert [m["id"] for m in n["models"]] == ["smollm2", "smollm2.gguf"]
    models = httpx.get(coordinator.base_url + "/api/models").json()["models"]
    assert models[0]["id"] == "smollm2" and models[0]["context_length"] == 8192
    assert models[0]["nodes"][0]["id"] == n["id"]


@pytest.fixture
def fresh_settings(coordinator: RunningCoordinator) -> Iterator[str]:
    """Restore the session coordinator's config files after a test edits them."""
    url = coordinator.base_url
    yield url
    httpx.put(url + "/api/aliases", json={})
    httpx.put(url + "/api/routing/config", json={})
    httpx.put(url + "/api/inference-settings", json={})


def test_aliases_crud_applies_without_restart(fresh_settings: str) -> None:
    url = fresh_settings
    assert httpx.get(url + "/api/routing/resolve/tiny").status_code == 404
    r = httpx.put(url + "/api/aliases", json={"tiny": "smollm2", "gpt-*": "smollm2"})
    assert r.status_code == 200, r.text
    preview = httpx.get(url + "/api/routing/resolve/tiny").json()
    assert preview["resolved"] == "smollm2" and preview["rule"] == "alias"
    assert len(preview["nodes"]) == 1
    assert httpx.get(url + "/api/routing/resolve/gpt-4o").json()["rule"] == "wildcard:gpt-*"
    assert httpx.post(
        url + "/api/aliases", json={"alias": "t2", "model_path": "smollm2"}
    ).is_success
    assert set(httpx.get(url + "/api/aliases").json()["aliases"]) == {"tiny", "gpt-*", "t2"}
    assert httpx.delete(url + "/api/aliases/t2").is_success
    assert httpx.delete(url + "/api/aliases/t2").status_code == 404


def test_tiers_route_claude_names(fresh_settings: str) -> None:
    url = fresh_settings
    body = {"enabled": True, "tiers": {"haiku": {"model": "smollm2"}}}
    assert httpx.put(url + "/api/routing/config", json=body).is_success
    res = httpx.get(url + "/api/routing/resolve/claude-haiku-4-5-20251001").json()
    assert (res["resolved"], res["rule"], res["tier"]) == ("smollm2", "tier:haiku", "haiku")
    got = httpx.get(url + "/api/routing/config").json()
    assert got["tiers"] == {"haiku": {"model": "smollm2"}} and got["error"] is None


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/api/aliases", {"x": 5}, "aliases[x]"),
        ("/api/routing/config", {"tiers": {"mega": {"model": "m"}}}, "tiers.mega"),
        ("/api/inference-settings", {"temperature": -2}, "temperature"),
    ],
)
def test_invalid_config_is_rejected_and_nothing_changes(
    fresh_settings: str, path: str, body: dict[str, object], param: str
) -> None:
    before = httpx.get(fresh_settings + path).json()
    r = httpx.put(fresh_settings + path, json=body)
    assert r.status_code == 400
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and err["param"] == param
    assert httpx.get(fresh_settings + path).json() == before


def test_malformed_admin_json(fresh_settings: str) -> None:
    r = httpx.put(fresh_settings + "/api/aliases", content=b"{nope")
    assert r.status_code == 400 and "not valid JSON" in r.json()["error"]["message"]


def test_inference_settings_round_trip(fresh_settings: str, tmp_path: Path) -> None:
    body = {"temperature": 0.3, "max_tokens": 64, "enable_thinking": False}
    assert httpx.put(fresh_settings + "/api/inference-settings", json=body).is_success
    got = httpx.get(fresh_settings + "/api/inference-settings").json()
    assert got["temperature"] == 0.3 and got["enable_thinking"] is False


@pytest.fixture(scope="module")
def keyed(node: RunningNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    running = start_coordinator(
        CoordinatorConfig(
            home=tmp_path_factory.mktemp("keyed"),
            peers=(node.target,),
            api_keys=frozenset({"sk-lab-1", "sk-lab-2"}),
        )
    )
    yield running.base_url
    running.stop()


def test_api_keys(keyed: str) -> None:
    assert httpx.get(keyed + "/health").status_code == 200, "health stays open"
    assert httpx.get(keyed + "/").status_code == 200
    r = httpx.post(keyed + "/v1/messages", json={})
    assert r.status_code == 401
    assert r.json()["type"] == "error" and r.json()["error"]["type"] == "authentication_error"
    r = httpx.post(keyed + "/v1/chat/completions", json={}, headers={"authorization": "Bearer no"})
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = httpx.get(keyed + "/api/nodes")
    assert r.status_code == 401
    ok = httpx.get(keyed + "/api/nodes", headers={"x-api-key": "sk-lab-2"})
    assert ok.status_code == 200
    ok = httpx.get(keyed + "/v1/models", headers={"authorization": "Bearer sk-lab-1"})
    assert ok.status_code == 200
