"""Request limits (coordinator/limits.py, docs/reliability.md): each gets a clear error in
its API's envelope, naming the limit, before anything reaches a node; a client that stops
reading a stream has its generation cancelled on the node after the send timeout.

A real coordinator in front of a simulated node; raw bodies through httpx, the rest
through the official SDKs.
"""

from __future__ import annotations

import json
import socket
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from coordinator.config import CoordinatorConfig
from coordinator.limits import MAX_JSON_DEPTH, MAX_MESSAGES, MAX_TOOLS, decode_json
from mesh import errors
from mesh.sampling import MAX_STOP_SEQUENCES
from tests.conftest import RunningCoordinator, RunningNode, start_coordinator, start_sim_node

MODEL = "sim-fast"
SEND_TIMEOUT = 1.0
OPENAI_ENVELOPE = {"message", "type", "param", "code"}


@pytest.fixture(scope="module")
def sim_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    # Fast decode and a large context: a stream that would run for minutes.
    node = start_sim_node(
        tmp_path_factory.mktemp("limits-node"), f"{MODEL}:50000:10000:10000000", node_id="lim-1"
    )
    yield node
    node.stop()


@pytest.fixture(scope="module")
def coord(
    sim_node: RunningNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningCoordinator]:
    config = CoordinatorConfig(
        home=tmp_path_factory.mktemp("limits-coord"),
        peers=(sim_node.target,),
        send_timeout=SEND_TIMEOUT,
    )
    running = start_coordinator(config)
    yield running
    running.stop()


def _requests(base: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = httpx.get(base + "/api/requests?limit=50").json()["requests"]
    return out


def _node_running(base: str) -> int:
    nodes = httpx.get(base + "/api/nodes").json()["nodes"]
    return sum(int(n.get("running") or 0) for n in nodes)


def _anthropic_error(r: httpx.Response, status: int, kind: str) -> str:
    assert r.status_code == status, r.text
    body = r.json()
    assert body["type"] == "error" and set(body["error"]) >= {"type", "message"}, body
    assert body["error"]["type"] == kind, body
    return str(body["error"]["message"])


def _openai_error(r: httpx.Response, status: int) -> dict[str, Any]:
    assert r.status_code == status, r.text
    err: dict[str, Any] = r.json()["error"]
    assert set(err) == OPENAI_ENVELOPE, err
    return err


# ---------- decode_json: pure ----------


def test_decode_json_limits() -> None:
    assert decode_json(b'{"a": [1, {"b": 2}]}') == {"a": [1, {"b": 2}]}
    ok = b"[" * MAX_JSON_DEPTH + b"]" * MAX_JSON_DEPTH
    assert decode_json(ok) is not None
    for depth in (MAX_JSON_DEPTH + 1, 10_000, 1_000_000):
        with pytest.raises(errors.InvalidRequest, match=f"deeper than {MAX_JSON_DEPTH}"):
            decode_json(b"[" * depth + b"]" * depth)
    with pytest.raises(errors.InvalidRequest, match="not valid UTF-8"):
        decode_json(b'{"a": "\xff"}')
    with pytest.raises(errors.InvalidRequest, match="not valid JSON"):
        decode_json(b'{"a": ')


# ---------- body size ----------

BIG = 200 * 2**20


def _big_body(total: int, sent: list[int]) -> Iterator[bytes]:
    """A syntactically plausible JSON body of `total` bytes, made as it is sent."""
    head = b'{"model": "sim-fast", "max_tokens": 4, "messages": [{"role": "user", "content": "'
    yield head
    sent[0] += len(head)
    chunk = b"x" * 2**20
    while sent[0] < total:
        yield chunk
        sent[0] += len(chunk)
    yield b'"}]}'


@pytest.mark.parametrize(
    ("path", "anthropic_api"),
    [("/v1/messages", True), ("/v1/chat/completions", False), ("/api/aliases", False)],
)
def test_200mb_body_is_refused_with_413(
    coord: RunningCoordinator, path: str, anthropic_api: bool
) -> None:
    before = {r["id"] for r in _requests(coord.base_url)}
    sent = [0]
    method = "PUT" if path.startswith("/api/") else "POST"
    started = time.monotonic()
    r = httpx.request(
        method,
        coord.base_url + path,
        content=_big_body(BIG, sent),
        headers={"content-type": "application/json", "anthropic-version": "2023-06-01"},
        timeout=60,
    )
    limit = "33554432 bytes (32 MB)"
    if anthropic_api:
        assert limit in _anthropic_error(r, 413, "request_too_large")
    else:
        err = _openai_error(r, 413)
        assert limit in err["message"] and err["code"] == "request_too_large"
    assert time.monotonic() - started < 30
    # Nothing reached the node: the request log has only the refusal, without a node.
    new = [x for x in _requests(coord.base_url) if x["id"] not in before]
    assert all(x["node"] is None and x["status"] == 413 for x in new), new
    if method == "POST":
        assert len(new) == 1 and "too large" in new[0]["outcome"]


def test_declared_content_length_is_refused_before_reading(coord: RunningCoordinator) -> None:
    """A Content-Length over the limit gets its 413 without a byte of the body being sent."""
    with socket.create_connection(("127.0.0.1", coord.port), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
            + f"content-length: {BIG}\r\n\r\n".encode()
        )
        data = b""
        while b"\r\n\r\n" not in data or not data.rstrip().endswith(b"}"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 413"), head
    assert json.loads(body)["error"]["code"] == "request_too_large"


def test_body_limit_is_configurable(sim_node: RunningNode, tmp_path: Path) -> None:
    from macmesh.cli import _coordinator_config, build_parser

    args = build_parser().parse_args(["coordinator", "--max-body-mb", "1", "--no-bonjour"])
    assert _coordinator_config(args).max_body_bytes == 2**20
    small = start_coordinator(
        CoordinatorConfig(home=tmp_path, peers=(sim_node.target,), max_body_bytes=2**20)
    )
    try:
        client = anthropic.Anthropic(base_url=small.base_url, api_key="x", max_retries=0)
        with pytest.raises(anthropic.APIStatusError) as caught:
            client.messages.create(
                model=MODEL,
                max_tokens=4,
                messages=[{"role": "user", "content": "x" * (2 * 2**20)}],
            )
        assert caught.value.status_code == 413
        assert "1048576 bytes (1 MB)" in caught.value.message
        ok = client.messages.create(
            model=MODEL, max_tokens=4, messages=[{"role": "user", "content": "x" * 1000}]
        )
        assert ok.stop_reason == "max_tokens"
    finally:
        small.stop()


# ---------- nesting, UTF-8, counts ----------


def test_deep_nesting_is_a_400_in_the_envelope(coord: RunningCoordinator) -> None:
    deep = b'{"model": "sim-fast", "max_tokens": 4, "metadata": ' + b"[" * 10_000
    deep += b"]" * 10_000 + b', "messages": [{"role": "user", "content": "hi"}]}'
    r = httpx.post(coord.base_url + "/v1/messages", content=deep)
    assert f"deeper than {MAX_JSON_DEPTH}" in _anthropic_error(r, 400, "invalid_request_error")
    r = httpx.post(coord.base_url + "/v1/chat/completions", content=deep)
    err = _openai_error(r, 400)
    assert f"deeper than {MAX_JSON_DEPTH}" in err["message"] and err["param"] == "body"
    r = httpx.put(coord.base_url + "/api/aliases", content=b"[" * 10_000 + b"]" * 10_000)
    assert f"deeper than {MAX_JSON_DEPTH}" in _openai_error(r, 400)["message"]


def test_invalid_utf8_is_a_400(coord: RunningCoordinator) -> None:
    bad = (
        b'{"model": "sim-fast", "max_tokens": 4, "messages": [{"role": "user", "content": "\xff"}]}'
    )
    r = httpx.post(coord.base_url + "/v1/messages", content=bad)
    assert "UTF-8" in _anthropic_error(r, 400, "invalid_request_error")
    assert (
        "UTF-8"
        in _openai_error(httpx.post(coord.base_url + "/v1/completions", content=bad), 400)[
            "message"
        ]
    )


def test_lone_surrogates_are_a_400_naming_the_field(coord: RunningCoordinator) -> None:
    """Found by fuzzing: `\\ud800` in a message was a plain-text 500 (it cannot be encoded
    for the node). A proper surrogate pair (an emoji) still goes through."""
    body = '{"model": "sim-fast", "max_tokens": 4, "messages": [{"role": "user", '
    lone = (body + '"content": [{"type": "text", "text": "a \\ud800 b"}]}]}').encode()
    r = httpx.post(coord.base_url + "/v1/messages", content=lone)
    assert "surrogate" in _anthropic_error(r, 400, "invalid_request_error")
    r = httpx.post(coord.base_url + "/v1/chat/completions", content=lone)
    err = _openai_error(r, 400)
    assert "surrogate" in err["message"] and err["param"] == "messages[0].content[0].text"
    pair = (body + '"content": "smile \\ud83d\\ude00"}]}').encode()
    r = httpx.post(coord.base_url + "/v1/messages", content=pair)
    assert r.status_code == 200, r.text


def test_counts_name_their_limit(coord: RunningCoordinator) -> None:
    oa = openai.OpenAI(base_url=coord.base_url + "/v1", api_key="x", max_retries=0)
    an = anthropic.Anthropic(base_url=coord.base_url, api_key="x", max_retries=0)
    many: Any = [{"role": "user", "content": "hi"}] * (MAX_MESSAGES * 2)
    with pytest.raises(openai.BadRequestError) as oe:
        oa.chat.completions.create(model=MODEL, messages=many, max_tokens=4)
    assert oe.value.param == "messages" and f"limit is {MAX_MESSAGES}" in oe.value.message
    with pytest.raises(anthropic.BadRequestError) as ae:
        an.messages.create(model=MODEL, messages=many, max_tokens=4)
    assert f"limit is {MAX_MESSAGES}" in ae.value.message and "messages" in ae.value.message

    one: Any = [{"role": "user", "content": "hi"}]
    tools: Any = [
        {"type": "function", "function": {"name": f"t{i}", "parameters": {"type": "object"}}}
        for i in range(MAX_TOOLS + 1)
    ]
    with pytest.raises(openai.BadRequestError) as oe:
        oa.chat.completions.create(model=MODEL, messages=one, tools=tools, max_tokens=4)
    assert oe.value.param == "tools" and f"limit is {MAX_TOOLS}" in oe.value.message
    a_tools: Any = [{"name": f"t{i}", "input_schema": {"type": "object"}} for i in range(600)]
    with pytest.raises(anthropic.BadRequestError) as ae:
        an.messages.create(model=MODEL, messages=one, tools=a_tools, max_tokens=4)
    assert "tools" in ae.value.message and f"limit is {MAX_TOOLS}" in ae.value.message

    stops = [f"s{i}" for i in range(MAX_STOP_SEQUENCES + 1)]
    with pytest.raises(openai.BadRequestError) as oe:
        oa.chat.completions.create(model=MODEL, messages=one, stop=stops, max_tokens=4)
    assert oe.value.param == "stop" and f"limit is {MAX_STOP_SEQUENCES}" in oe.value.message
    with pytest.raises(anthropic.BadRequestError) as ae:
        an.messages.create(model=MODEL, messages=one, stop_sequences=stops, max_tokens=4)
    assert "stop_sequences" in ae.value.message
    # At the limit, all is well.
    ok = oa.chat.completions.create(model=MODEL, messages=one, stop=stops[:-1], max_tokens=4)
    assert ok.choices[0].finish_reason == "length"


# ---------- a client that never reads its stream ----------


def _stalled_stream(port: int, path: str, body: dict[str, Any]) -> socket.socket:
    """Send a streaming request with a tiny receive buffer, then never read."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    raw = json.dumps(body).encode()
    sock.sendall(
        f"POST {path} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
        f"anthropic-version: 2023-06-01\r\ncontent-length: {len(raw)}\r\n\r\n".encode()
        + raw
    )
    return sock


@pytest.mark.parametrize(
    "path",
    [
        "/v1/chat/completions",
        # The same response class; Anthropic's smaller events take ~20 s to fill the buffers.
        pytest.param("/v1/messages", marks=pytest.mark.slow),
    ],
)
def test_a_client_that_stops_reading_cancels_the_generation(
    coord: RunningCoordinator, path: str
) -> None:
    base = coord.base_url
    body = {
        "model": MODEL,
        "max_tokens": 5_000_000,  # minutes at the node's 10,000 tok/s
        "stream": True,
        "messages": [{"role": "user", "content": "write forever"}],
    }
    sock = _stalled_stream(coord.port, path, body)
    try:
        deadline = time.monotonic() + 60
        while _node_running(base) == 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _node_running(base) == 1, "the stream never started"
        # The coordinator still serves others meanwhile.
        oa = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0)
        done = oa.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=4
        )
        assert done.choices[0].finish_reason == "length"
        # The socket buffers (~2 MB on loopback) fill within seconds; then the send
        # timeout (1 s) ends the stream and cancels the generation.
        while _node_running(base) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert _node_running(base) == 0, "the generation kept running for a stalled client"
        assert time.monotonic() < deadline
        stalled = next(r for r in _requests(base) if r["model"] == MODEL and r["status"] != 200)
        assert stalled["status"] == 499 and "cancelled" in stalled["outcome"], stalled
    finally:
        sock.close()
