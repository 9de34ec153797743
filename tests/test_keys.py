"""Named API keys (coordinator.keys): roles, per-key concurrency caps, allowed models, the
key's name in the request log and metrics. Official SDKs against a real uvicorn coordinator
in front of a simulated node."""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.keys import KeyFileError, KeyStore, parse_keys
from tests.conftest import RunningCoordinator, start_sim_node

MODEL = "sim"
ALICE = "sk-alice-0123456789abcdef"
BOB = "sk-bob-0123456789abcdef00"
OPS = "sk-ops-0123456789abcdef00"
CAROL = "sk-carol-0123456789abcdef"
LEGACY = "legacy-plain-key"


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def key_file(path: Path) -> Path:
    path.write_text(
        json.dumps(
            {
                "keys": [
                    {"name": "alice", "key": ALICE, "role": "user", "max_concurrent": 2},
                    {"name": "bob", "key": BOB, "models": ["fast", "other-*"]},
                    {"name": "carol", "key": "sha256:" + sha256(CAROL)},
                    {"name": "ops", "key": OPS, "role": "admin"},
                ]
            }
        )
    )
    return path


@pytest.fixture(scope="module")
def coord(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningCoordinator]:
    from tests.conftest import start_coordinator

    root = tmp_path_factory.mktemp("keys")
    # A slow decoder: streams last long enough to hold a slot.
    node = start_sim_node(root / "n1", "sim:5000:40", node_id="n1")
    home = root / "c"
    home.mkdir()
    (home / "model_aliases.json").write_text(json.dumps({"fast": MODEL, "blocked": MODEL}))
    key_file(home / "api_keys.json")
    running = start_coordinator(
        CoordinatorConfig(home=home, peers=(node.target,), api_keys=frozenset({LEGACY}))
    )
    yield running
    running.stop()
    node.stop()


def oai(coord: RunningCoordinator, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=coord.base_url + "/v1", api_key=key, max_retries=0)


def ant(coord: RunningCoordinator, key: str) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=coord.base_url, api_key=key, max_retries=0)


def chat(coord: RunningCoordinator, key: str, model: str = MODEL, tokens: int = 4) -> str:
    r = oai(coord, key).chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], max_tokens=tokens
    )
    return r.choices[0].message.content or ""


def running(coord: RunningCoordinator, name: str) -> int:
    return int(coord.app.state.keys.running(name))


def wait_for(cond: object, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():  # type: ignore[operator]
        assert time.monotonic() < deadline, "condition not reached"
        time.sleep(0.02)


# ---------- authentication and roles ----------


def test_every_key_authenticates_and_wrong_ones_get_401(coord: RunningCoordinator) -> None:
    for key in (ALICE, BOB, CAROL, OPS, LEGACY):
        assert chat(coord, key, "fast")
    with pytest.raises(openai.AuthenticationError):
        chat(coord, "sk-nobody-0123456789abcdef")
    # A hashed entry is not a key itself.
    with pytest.raises(openai.AuthenticationError):
        chat(coord, "sha256:" + sha256(CAROL))
    with pytest.raises(anthropic.AuthenticationError):
        ant(coord, "wrong").messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )


def test_admin_routes_need_an_admin_key(coord: RunningCoordinator) -> None:
    url = coord.base_url
    for key in (ALICE, BOB, CAROL):
        r = httpx.get(url + "/api/nodes", headers={"x-api-key": key})
        assert r.status_code == 403
        err = r.json()["error"]
        assert err["type"] == "permission_error" and "role 'admin'" in err["message"]
        r = httpx.post(url + "/api/models/unload", headers={"x-api-key": key}, json={})
        assert r.status_code == 403
    # Admin keys: the file's, and the plain --api-key ones (as before key files).
    for key in (OPS, LEGACY):
        assert httpx.get(url + "/api/nodes", headers={"authorization": f"Bearer {key}"}).is_success
    # Open paths stay open; the inference APIs take user keys.
    assert httpx.get(url + "/health").is_success
    assert httpx.get(url + "/metrics").is_success
    assert (
        ant(coord, ALICE)
        .messages.count_tokens(model=MODEL, messages=[{"role": "user", "content": "hi"}])
        .input_tokens
    )


# ---------- allowed models ----------


def test_a_key_uses_only_its_models(coord: RunningCoordinator) -> None:
    # bob: ["fast", "other-*"]: the requested name matches, so it may use what it resolves to.
    assert chat(coord, BOB, "fast")
    for model in (MODEL, "blocked"):  # neither name nor resolved model match
        with pytest.raises(openai.PermissionDeniedError) as info:
            chat(coord, BOB, model)
        assert f"'bob' may not use model '{model}'" in info.value.message
        with pytest.raises(anthropic.PermissionDeniedError) as ainfo:
            ant(coord, BOB).messages.create(
                model=model, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
            )
        assert ainfo.value.body["error"]["type"] == "permission_error"  # type: ignore[index]
    # An unknown name it may not use: 403, and the names of other models are not revealed.
    with pytest.raises(openai.PermissionDeniedError):
        chat(coord, BOB, "secret-model")
    # An unknown name it may use: 404, listing only what the key may use.
    with pytest.raises(openai.NotFoundError) as nf:
        chat(coord, BOB, "other-x")
    assert "available: fast" in nf.value.message and "blocked" not in nf.value.message
    with pytest.raises(anthropic.PermissionDeniedError):
        ant(coord, BOB).messages.count_tokens(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    # The model lists show the key's models only.
    assert [m.id for m in oai(coord, BOB).models.list()] == ["fast"]
    assert [m.id for m in ant(coord, BOB).models.list()] == ["fast"]
    assert {m.id for m in oai(coord, ALICE).models.list()} == {"blocked", "fast", MODEL}
    # A key without `models` may use everything.
    assert chat(coord, ALICE, "blocked")


# ---------- concurrency caps ----------


def test_concurrency_cap_holds_and_every_slot_comes_back(coord: RunningCoordinator) -> None:
    client = oai(coord, ALICE)
    # Two streams hold alice's two slots until they end.
    streams = [
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=200, stream=True
        )
        for _ in range(2)
    ]
    for s in streams:
        next(iter(s))
    assert running(coord, "alice") == 2
    with pytest.raises(openai.RateLimitError) as info:
        chat(coord, ALICE)
    assert "'alice' already has 2 requests running" in info.value.message
    assert info.value.response.headers["retry-after"] == "1"
    assert info.value.body["code"] == "rate_limit_exceeded"  # type: ignore[index]
    with pytest.raises(anthropic.RateLimitError) as ainfo:
        ant(coord, ALICE).messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "hi"}]
        )
    assert ainfo.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    # Other keys are not affected; alice's non-generating calls are not capped.
    assert chat(coord, BOB, "fast")
    assert oai(coord, ALICE).models.list()
    # Closing the streams early (client gone) frees the slots.
    for s in streams:
        s.close()
    wait_for(lambda: running(coord, "alice") == 0)
    assert chat(coord, ALICE)

    # Many cancelled streams, from both SDKs and raw disconnects: the count returns to 0.
    def cancel_one(i: int) -> None:
        if i % 3 == 0:
            with ant(coord, ALICE).messages.stream(
                model=MODEL, max_tokens=200, messages=[{"role": "user", "content": "hi"}]
            ) as st:
                next(iter(st))
        elif i % 3 == 1:
            s = client.chat.completions.create(
                model=MODEL,
                messages=[{"role": "user", "content": "x"}],
                max_tokens=200,
                stream=True,
            )
            next(iter(s))
            s.close()
        else:  # a non-streaming request whose client gives up
            with pytest.raises(httpx.ReadTimeout):
                httpx.post(
                    coord.base_url + "/v1/chat/completions",
                    headers={"x-api-key": ALICE},
                    json={
                        "model": MODEL,
                        "messages": [{"role": "user", "content": "x"}],
                        "max_tokens": 200,
                    },
                    timeout=0.3,
                )

    refused = 0
    for i in range(12):
        try:
            cancel_one(i)
        except (openai.RateLimitError, anthropic.RateLimitError):
            refused += 1  # a slot freed a moment later than the client left
            time.sleep(0.2)
    wait_for(lambda: running(coord, "alice") == 0)
    assert refused < 6

    # The cap holds under concurrent load: never more than 2 running, the rest 429.
    peak = 0
    stop = threading.Event()

    def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, running(coord, "alice"))
            time.sleep(0.005)

    results: list[str] = []

    def one() -> None:
        try:
            chat(coord, ALICE, tokens=20)
            results.append("ok")
        except openai.RateLimitError:
            results.append("429")

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=one) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert peak <= 2 and results.count("ok") >= 2 and "429" in results
    assert running(coord, "alice") == 0


# ---------- the key's name in the log and the metrics ----------


def test_key_name_in_request_log_and_metrics(coord: RunningCoordinator) -> None:
    chat(coord, OPS, "fast")
    with pytest.raises(openai.PermissionDeniedError):
        chat(coord, BOB, MODEL)
    admin = {"x-api-key": OPS}
    r = httpx.get(coord.base_url + "/api/requests", params={"key": "ops"}, headers=admin)
    records = r.json()["requests"]
    assert records and all(rec["key"] == "ops" for rec in records)
    params = {"key": "bob", "ok": "false"}
    records = httpx.get(coord.base_url + "/api/requests", params=params, headers=admin).json()[
        "requests"
    ]
    assert any(rec["status"] == 403 for rec in records)
    text = httpx.get(coord.base_url + "/metrics").text
    assert 'macmesh_key_requests_total{api="openai",key="ops",status="200"}' in text
    assert 'macmesh_key_requests_total{api="openai",key="bob",status="403"}' in text
    # Pre-initialised for every named key; never a raw key.
    assert 'macmesh_key_requests_total{api="anthropic",key="carol",status="200"} 0.0' in text
    for secret in (ALICE, BOB, OPS, LEGACY):
        assert secret not in text


# ---------- the file ----------


def test_key_file_validation_names_the_field(tmp_path: Path) -> None:
    good = {"name": "a", "key": ALICE}
    cases = [
        ({"keys": []}, "keys: must be a non-empty list"),
        ({"keys": [good], "extra": 1}, "expected a JSON object"),
        ({"keys": [{**good, "name": "a b"}]}, "keys[0].name"),
        ({"keys": [good, {**good, "key": BOB}]}, "keys[1].name: 'a' is used twice"),
        ({"keys": [good, {"name": "b", "key": ALICE}]}, "keys[1].key: the same key"),
        ({"keys": [{**good, "key": "short"}]}, "keys[0].key: at least 16"),
        ({"keys": [{**good, "key": "sha256:abc"}]}, "keys[0].key: sha256:"),
        ({"keys": [{**good, "role": "root"}]}, "keys[0].role"),
        ({"keys": [{**good, "max_concurrent": 0}]}, "keys[0].max_concurrent"),
        ({"keys": [{**good, "max_concurent": 2}]}, "keys[0].max_concurent: unknown field"),
        ({"keys": [{**good, "models": []}]}, "keys[0].models"),
    ]
    for data, expected in cases:
        with pytest.raises(KeyFileError) as info:
            parse_keys(data)
        assert expected in str(info.value), (data, str(info.value))


def test_bad_key_file_refuses_start_and_reload_keeps_the_last_good(tmp_path: Path) -> None:
    from coordinator.app import create_app

    path = tmp_path / "api_keys.json"
    path.write_text('{"keys": [{"name": "a", "key": "short"}]}')
    with pytest.raises(KeyFileError, match=r"keys\[0\]\.key"):
        create_app(CoordinatorConfig(home=tmp_path))
    with pytest.raises(KeyFileError, match="cannot read"):
        KeyStore((), tmp_path / "missing.json", required=True)
    key_file(path)
    store = KeyStore((), path)
    assert store.enabled and store.authenticate(ALICE) is not None
    time.sleep(1.1)
    path.write_text("{not json")
    assert store.authenticate(ALICE) is not None  # invalid: the previous keys stay
    time.sleep(1.1)
    path.write_text(json.dumps({"keys": [{"name": "new", "key": BOB, "role": "admin"}]}))
    time.sleep(1.1)
    assert store.authenticate(ALICE) is None
    found = store.authenticate(BOB)
    assert found is not None and found.name == "new" and found.admin
    path.unlink()
    time.sleep(1.1)
    assert store.authenticate(BOB) is not None  # removed: fail closed, keys stay
    # No file and no keys: open, as before.
    assert not KeyStore((), tmp_path / "none.json").enabled


def test_cli_refuses_a_bad_key_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from macmesh.cli import build_parser

    bad = tmp_path / "keys.json"
    bad.write_text('{"keys": [{"name": "a", "key": "sk-0123456789abcdef", "role": "x"}]}')
    monkeypatch.setenv("MACMESH_HOME", str(tmp_path / "home"))
    args = build_parser().parse_args(
        ["coordinator", "--api-keys-file", str(bad), "--port", "0", "--no-bonjour"]
    )
    from macmesh import cli

    config = cli._coordinator_config(args)
    assert config.api_keys_file == bad
    from coordinator.app import create_app

    with pytest.raises(KeyFileError, match=r"keys\[0\]\.role: must be one of admin, user"):
        create_app(config)
