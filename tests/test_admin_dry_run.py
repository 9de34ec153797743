"""The admin API's validate-only mode (`?dry_run=true`) and the field paths its errors name:
a dry run answers exactly like a save would (same checks, same 400s) and writes nothing."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.config import CoordinatorConfig

# (route, file in the coordinator home, key of the answer, a valid body)
ROUTES = [
    ("/api/aliases", "model_aliases.json", "aliases", {"tiny": "smollm2", "gpt-*": "smollm2"}),
    (
        "/api/routing/config",
        "claude_routing.json",
        "routing",
        {
            "enabled": True,
            "tiers": {"sonnet": {"model": "smollm2", "max_tokens": 512, "ttl": 60, "pin": False}},
            "default_model": "smollm2",
        },
    ),
    ("/api/inference-settings", "inference_settings.json", "inference", {"temperature": 0.3}),
    ("/api/model-settings", "model_settings.json", "models", {"default_ttl": 600}),
]

# (route, bad body, the field path the 400 must name)
INVALID = [
    ("/api/aliases", {"ok": "smollm2", "bad": 5}, "aliases[bad]"),
    ("/api/aliases", {"x": {"model": "m", "backend": "onnx"}}, "aliases[x].backend"),
    ("/api/aliases", {"x": {"model": "m", "max_tokens": 0}}, "aliases[x].max_tokens"),
    ("/api/aliases", {"x": {"model": "m", "ttl": -1}}, "aliases[x].ttl"),
    (
        "/api/routing/config",
        {"tiers": {"sonnet": {"model": "m", "max_tokens": -5}}},
        "tiers.sonnet.max_tokens",
    ),
    (
        "/api/routing/config",
        {"tiers": {"opus": {"model": "m", "backend": "x"}}},
        "tiers.opus.backend",
    ),
    (
        "/api/routing/config",
        {"tiers": {"haiku": {"model": "m", "draft_model": 3}}},
        "tiers.haiku.draft_model",
    ),
    ("/api/routing/config", {"tiers": {"haiku": {"model": "m", "pin": "yes"}}}, "tiers.haiku.pin"),
    ("/api/routing/config", {"tiers": {"mega": {"model": "m"}}}, "tiers.mega"),
    ("/api/routing/config", {"default_model": 7}, "default_model"),
    ("/api/routing/config", {"enabled": "no"}, "enabled"),
    ("/api/inference-settings", {"temperature": "hot"}, "temperature"),
    ("/api/inference-settings", {"temperature": -2}, "temperature"),
    ("/api/inference-settings", {"top_p": 1.5}, "top_p"),
    ("/api/inference-settings", {"top_k": 2.5}, "top_k"),
    ("/api/inference-settings", {"max_tokens": -5}, "max_tokens"),
    ("/api/inference-settings", {"max_output_tokens": 0}, "max_output_tokens"),
    ("/api/inference-settings", {"enable_thinking": "maybe"}, "enable_thinking"),
    ("/api/inference-settings", {"prompt_hygiene": 1}, "prompt_hygiene"),
    ("/api/model-settings", {"models": {"m": {"ttl": "x"}}}, "models[m].ttl"),
    ("/api/model-settings", {"default_ttl": -3}, "default_ttl"),
]


@pytest.fixture
async def admin(tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    """The coordinator app in process (no nodes: these routes only touch config files)."""
    from coordinator.app import create_app

    app = create_app(CoordinatorConfig(home=tmp_path))
    transport = httpx.ASGITransport(app=app, client=("127.0.0.1", 1234))
    async with httpx.AsyncClient(transport=transport, base_url="http://c") as client:
        yield client


def _files(home: Path) -> dict[str, str]:
    return {p.name: p.read_text() for p in sorted(home.glob("*.json"))}


@pytest.mark.parametrize(("path", "file", "key", "body"), ROUTES)
async def test_dry_run_validates_and_writes_nothing(
    admin: httpx.AsyncClient, tmp_path: Path, path: str, file: str, key: str, body: Any
) -> None:
    before_files = _files(tmp_path)
    before = (await admin.get(path)).json()
    r = await admin.put(path, params={"dry_run": "true"}, json=body)
    assert r.status_code == 200, r.text
    assert r.json() == {"status": "valid", key: body}
    assert _files(tmp_path) == before_files, "a dry run wrote a file"
    assert not (tmp_path / file).exists()
    assert (await admin.get(path)).json() == before, "a dry run changed what is in force"
    # The same body saved for real: the answer differs only in its status.
    saved = await admin.put(path, json=body)
    assert saved.json() == {"status": "updated", key: body}
    assert json.loads((tmp_path / file).read_text()) == body


@pytest.mark.parametrize(("path", "body", "param"), INVALID)
@pytest.mark.parametrize("dry", [True, False])
async def test_invalid_values_name_the_field_and_change_nothing(
    admin: httpx.AsyncClient, tmp_path: Path, path: str, body: Any, param: str, dry: bool
) -> None:
    before_files = _files(tmp_path)
    before = (await admin.get(path)).json()
    r = await admin.put(path, params={"dry_run": "true"} if dry else None, json=body)
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
    assert err["type"] == "invalid_request_error" and err["message"].startswith(param + ": ")
    assert _files(tmp_path) == before_files
    assert (await admin.get(path)).json() == before


async def test_dry_run_of_alias_post_and_delete(admin: httpx.AsyncClient, tmp_path: Path) -> None:
    assert (await admin.put("/api/aliases", json={"a": "m1"})).is_success
    saved = (tmp_path / "model_aliases.json").read_text()
    r = await admin.post("/api/aliases?dry_run=true", json={"alias": "b", "model": "m2"})
    assert r.json() == {"status": "valid", "aliases": {"a": "m1", "b": "m2"}}
    r = await admin.delete("/api/aliases/a?dry_run=1")
    assert r.json() == {"status": "valid", "aliases": {}}
    r = await admin.post("/api/aliases?dry_run=true", json={"alias": "b", "model": ""})
    assert r.status_code == 400 and r.json()["error"]["param"] == "aliases[b]"
    assert (tmp_path / "model_aliases.json").read_text() == saved
    assert (await admin.get("/api/aliases")).json()["aliases"] == {"a": "m1"}


async def test_dry_run_flag_values(admin: httpx.AsyncClient, tmp_path: Path) -> None:
    r = await admin.put("/api/aliases?dry_run=perhaps", json={"a": "m"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "dry_run"
    assert not (tmp_path / "model_aliases.json").exists()
    r = await admin.put("/api/aliases?dry_run=false", json={"a": "m"})
    assert r.json()["status"] == "updated"
    assert (tmp_path / "model_aliases.json").exists()


async def test_what_get_adds_is_dropped_before_validating(admin: httpx.AsyncClient) -> None:
    """The UI sends back what GET gave it (with `error`); the answer shows what is written."""
    body = {"tiers": {"haiku": {"model": "m"}}, "error": None}
    r = await admin.put("/api/routing/config?dry_run=true", json=body)
    assert r.json() == {"status": "valid", "routing": {"tiers": {"haiku": {"model": "m"}}}}
    r = await admin.put("/api/aliases?dry_run=true", json={"aliases": {"x": "m"}})
    assert r.json() == {"status": "valid", "aliases": {"x": "m"}}
