"""Schemathesis fuzzing of the coordinator's OpenAPI document (docs/reliability.md#fuzzing).

Every operation in /openapi.json (Anthropic, OpenAI and admin routes, request bodies
included) gets generated requests, valid and not. Checked for each answer: no 5xx, and
every error in its API's envelope (Anthropic's on /v1/messages* and /anthropic/*,
OpenAI's elsewhere). Afterwards the coordinator (its own process, a `macmesh
coordinator` in front of a simulated node) must still answer and its RSS stay flat.

FUZZ_EXAMPLES sets the examples per operation (default 8; `make fuzz` runs 200).
A shorter run fuzzes the inference routes against the real SmolLM2 node.
"""

from __future__ import annotations

import os
import tempfile
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, settings
from schemathesis.core.failures import Failure

from coordinator.api.openapi import build_openapi
from coordinator.app import create_app
from coordinator.config import CoordinatorConfig
from tests.conftest import RunningCoordinator, RunningNode, start_sim_node
from tests.procs import MACMESH, Procs, free_port, wait_until

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "8"))
MODEL_EXAMPLES = int(os.environ.get("FUZZ_MODEL_EXAMPLES", "6"))
SIM_MODEL = "fuzz-sim"
# Growth of the coordinator's RSS over the whole run that still counts as flat.
RSS_SLACK = 48 * 2**20
# Endless event streams: nothing to fuzz, and a call would never return.
ENDLESS = ["/api/requests/events"]
OPENAI_KEYS = {"message", "type", "param", "code"}
# Requests sent by status, reported at the end of the run.
SENT: Counter[int] = Counter()
# Hugging Face look-ups: 503 is the documented answer while the hub is out of reach
# (tests run with HF_HUB_OFFLINE=1).
HUB_ROUTES = {"/api/models/search", "/api/hub/repos/{repo}", "/api/models/pull"}


class Target:
    def __init__(self, base: str, pid: int) -> None:
        self.base = base
        self.process = psutil.Process(pid)
        self.rss_before = 0


@pytest.fixture(scope="module")
def fuzz_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    # A 2048-token context bounds every generation the fuzzer asks for.
    node = start_sim_node(
        tmp_path_factory.mktemp("fuzz-node"), f"{SIM_MODEL}:100000:20000:2048", node_id="fuzz-1"
    )
    yield node
    node.stop()


@pytest.fixture(scope="module")
def target(fuzz_node: RunningNode, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    root = tmp_path_factory.mktemp("fuzz")
    procs = Procs(root)
    (root / "home").mkdir()
    port = free_port()
    args = [MACMESH, "coordinator", "--port", str(port), "--no-bonjour"]
    args += ["--peer", fuzz_node.target, "--default-model", SIM_MODEL, "--max-body-mb", "8"]
    env = {"MACMESH_HOME": str(root / "home"), "HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    coord = procs.spawn("coordinator", args, env)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_until(
            lambda: httpx.get(base + "/health").json()["nodes_online"] == 1, 60, "node", [coord]
        )
        assert coord.process.proc is not None
        t = Target(base, coord.process.proc.pid)
        # Warm up (imports, tokenizer caches, first schema build) before measuring.
        for _ in range(20):
            httpx.post(
                base + "/v1/chat/completions",
                json={
                    "model": SIM_MODEL,
                    "max_tokens": 8,
                    "messages": [{"role": "user", "content": "hi"}],
                },
                timeout=30,
            ).raise_for_status()
        httpx.get(base + "/openapi.json").raise_for_status()
        t.rss_before = t.process.memory_info().rss
        yield t
    finally:
        procs.stop_all()


def _anthropic(path: str) -> bool:
    return path.startswith(("/anthropic/", "/v1/messages"))


@schemathesis.check
def no_server_error(ctx: Any, response: Any, case: schemathesis.Case[Any]) -> bool | None:
    """No 5xx, but for the hub's documented 503 while it is out of reach."""
    status = response.status_code
    if status == 503 and case.operation.path in HUB_ROUTES:
        return True
    if status >= 500:
        raise Failure(
            operation=case.operation.label,
            title="Server error",
            message=f"{status} {response.text[:300]}",
        )
    return True


@schemathesis.check
def error_envelope(ctx: Any, response: Any, case: schemathesis.Case[Any]) -> bool | None:
    """An error's body is its API's envelope: Anthropic's or OpenAI's."""
    if response.status_code < 400:
        return None
    try:
        body = response.json()
    except ValueError:
        raise Failure(
            operation=case.operation.label,
            title="Error outside the envelope",
            message=f"{response.status_code} with a body that is not JSON: {response.text[:200]!r}",
        ) from None
    path = case.operation.path
    if _anthropic(path):
        err = body.get("error") if isinstance(body, dict) else None
        ok = (
            body.get("type") == "error"
            and isinstance(err, dict)
            and isinstance(err.get("type"), str)
            and isinstance(err.get("message"), str)
        )
    else:
        err = body.get("error") if isinstance(body, dict) else None
        ok = isinstance(err, dict) and set(err) == OPENAI_KEYS and isinstance(err["message"], str)
    if not ok:
        raise Failure(
            operation=case.operation.label,
            title="Error outside the envelope",
            message=f"{response.status_code} {response.text[:300]}",
        )
    return True


# The document the coordinator serves, built here so that pytest can collect one test
# per operation before any server runs (`test_served_document` compares the two).
DOCUMENT = build_openapi(create_app(CoordinatorConfig(home=Path(tempfile.mkdtemp()))))
schema = schemathesis.openapi.from_dict(DOCUMENT).exclude(path=ENDLESS)


def test_served_document(target: Target) -> None:
    served = httpx.get(target.base + "/openapi.json").json()
    assert served["paths"].keys() == DOCUMENT["paths"].keys()
    bodies = [
        f"{m.upper()} {p}"
        for p, ops in served["paths"].items()
        for m, op in ops.items()
        if m in ("post", "put") and "requestBody" not in op
    ]
    assert not bodies, f"operations without a request body schema: {bodies}"


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    # The default run is reproducible (a CI failure reruns the same way); `make fuzz`
    # (FUZZ_EXAMPLES set) explores new examples each time.
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_api(case: schemathesis.Case[Any], target: Target) -> None:
    response = case.call(base_url=target.base, timeout=60)
    SENT[response.status_code] += 1
    case.validate_response(response, checks=[no_server_error, error_envelope])


def test_server_stays_up_with_flat_rss(target: Target) -> None:
    """After the run: still serving, and its memory did not grow with the requests."""
    r = httpx.post(
        target.base + "/v1/messages",
        json={"model": SIM_MODEL, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]},
        headers={"anthropic-version": "2023-06-01"},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    after = target.process.memory_info().rss
    grew = after - target.rss_before
    print(
        f"\nfuzzing: {SENT.total()} requests, by status {dict(sorted(SENT.items()))}; "
        f"coordinator RSS {target.rss_before / 2**20:.0f} -> {after / 2**20:.0f} MiB"
    )
    assert grew < RSS_SLACK, f"RSS grew {grew / 2**20:.0f} MiB over the run"


# ---------- the real model ----------


model_fuzz = schemathesis.openapi.from_dict(DOCUMENT).include(
    method="POST", path=["/v1/messages", "/v1/chat/completions"]
)


@pytest.mark.model
@model_fuzz.parametrize()
@settings(
    max_examples=MODEL_EXAMPLES,
    # Generated cases only: the coverage phase's many explicit ones would take minutes.
    phases=[Phase.generate],
    derandomize="FUZZ_EXAMPLES" not in os.environ,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    database=None,
)
def test_model_routes(case: schemathesis.Case[Any], coordinator: RunningCoordinator) -> None:
    # SmolLM2 on CPU decodes ~6 tok/s: keep each answer to two tokens.
    if isinstance(case.body, dict):
        case.body["model"] = "smollm2"
        case.body["max_tokens"] = 2
        case.body.pop("max_completion_tokens", None)
    response = case.call(base_url=coordinator.base_url, timeout=120)
    case.validate_response(response, checks=[no_server_error, error_envelope])


def test_docs_name_the_run() -> None:
    """docs/reliability.md records a longer run's figures."""
    text = (Path(__file__).parent.parent / "docs" / "reliability.md").read_text()
    assert "## Fuzzing" in text and "## Limits" in text


# ---------- what the fuzzer found (regressions) ----------


def test_framework_errors_use_the_envelope(target: Target) -> None:
    """405, 404 and a query parameter of the wrong type were FastAPI's {"detail": ...}."""
    r = httpx.request("TRACE", target.base + "/api/requests")
    assert r.status_code == 405 and set(r.json()["error"]) == OPENAI_KEYS
    assert "allow" in r.headers
    r = httpx.request("TRACE", target.base + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = httpx.get(target.base + "/v1/nothing-here")
    assert r.status_code == 404 and r.json()["error"]["type"] == "invalid_request_error"
    r = httpx.delete(target.base + "/api/models/x", params={"force": "null"})
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "force"


def test_a_block_type_that_is_not_a_string_is_a_400(target: Target) -> None:
    """`{"type": {}}` in a content block was a 500 (an unhashable tag)."""
    body = {
        "model": SIM_MODEL,
        "max_tokens": 4,
        "messages": [{"role": "user", "content": [{"type": {}, "thinking": ""}]}],
    }
    for path in ("/v1/messages", "/v1/messages/count_tokens"):
        r = httpx.post(target.base + path, json=body)
        assert r.status_code == 400, r.text
        err = r.json()["error"]
        assert err["type"] == "invalid_request_error"
        assert err["message"].startswith("messages[0].content[0].type"), err
