"""Node groups as a lab runs them: three plain `macmesh node` processes and a separate
`macmesh coordinator`, a group formed with `macmesh groups create`, served over the
coordinator's APIs with the official SDKs.

SmolLM2 (9 query heads, 3 KV heads) sharded over 3 ranks with tensor parallelism on
the ring backend over loopback: its greedy answer through the group is the single
node's answer; killing a member's agent mid-stream ends the stream with an error,
the group shows down, later requests get a 503 naming why, and `macmesh groups rm`
clears it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from tests.browser import console_errors, needs_browser
from tests.group_models import make_tiny_qwen2
from tests.procs import MACMESH, start_lab, wait_until

QUESTION = "What is the capital of France?"
NODES = ("node-0", "node-1", "node-2")


@pytest.fixture(scope="module")
def lab(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    root = tmp_path_factory.mktemp("groups-lab")
    tiny = make_tiny_qwen2(root / "tinyqwen", models_dir / "smollm2")

    def prepare(_: int, home: Path) -> None:
        (home / "models" / "smollm2").symlink_to(models_dir / "smollm2")
        (home / "models" / "tinyqwen").symlink_to(tiny)

    lab = start_lab(root, 3, prepare)
    try:
        yield {"base": lab.base, "nodes": lab.nodes, "all": lab.everyone}
    finally:
        lab.procs.stop_all()


def _cli(base: str, *args: str, timeout: float = 600) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MACMESH, "groups", *args, "--coordinator", base],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _group(base: str, name: str) -> dict[str, Any]:
    r = httpx.get(f"{base}/api/groups/{name}")
    assert r.status_code == 200, r.text
    body: dict[str, Any] = r.json()
    return body


def _greedy(base: str, model: str, max_tokens: int) -> tuple[str, str, int]:
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
    raw = client.chat.completions.with_raw_response.create(
        model=model,
        messages=[{"role": "user", "content": QUESTION}],
        max_tokens=max_tokens,
        temperature=0,
    )
    out = raw.parse()
    assert out.usage is not None
    tokens = out.usage.completion_tokens
    return out.choices[0].message.content or "", raw.headers["x-macmesh-node"], tokens


def test_bad_groups_are_refused_before_anything_starts(lab: dict[str, Any]) -> None:
    base = lab["base"]
    cases: list[tuple[dict[str, Any], int, str]] = [
        # 2 members do not divide SmolLM2's 9 query heads (nor its 3 KV heads)
        ({"name": "g2", "model": "smollm2", "nodes": ["node-0", "node-1"]}, 400, "9 attention"),
        ({"name": "g", "model": "nope", "nodes": list(NODES)}, 404, "no files"),
        ({"name": "g", "model": "smollm2", "nodes": ["node-0"]}, 400, "at least 2"),
        ({"name": "g", "model": "smollm2", "nodes": ["node-0", "node-9"]}, 400, "node-9"),
        ({"name": "g", "model": "smollm2", "nodes": ["node-0", "node-0"]}, 400, "twice"),
        ({"name": "a b", "model": "smollm2", "nodes": list(NODES)}, 400, "group name"),
        ({"name": "smollm2", "model": "smollm2", "nodes": list(NODES)}, 400, "name of a model"),
        (
            {"name": "g", "model": "smollm2", "nodes": list(NODES), "strategy": "pipeline"},
            400,
            "pipeline",
        ),
        ({"name": "g", "model": "smollm2", "nodes": list(NODES), "backend": "mpi"}, 400, "ring"),
        ({"name": "g", "model": "smollm2", "nodes": "node-0"}, 400, "nodes"),
    ]
    for body, status, words in cases:
        r = httpx.post(f"{base}/api/groups", json=body, timeout=60)
        assert r.status_code == status, (body, r.text)
        assert words in r.json()["error"]["message"], (body, r.text)
    for query, status, words in [
        ("model=nope", 404, "no online node has model 'nope'"),
        ("model=smollm2&size=4", 400, "a group of 4 needs as many online nodes"),
        ("model=smollm2&size=2", 400, "do not divide"),
        ("model=smollm2&size=x", 400, "size"),
        ("model=smollm2&strategy=expert", 400, "strategy"),
        ("", 400, "model"),
    ]:
        r = httpx.get(f"{base}/api/groups/propose?{query}", timeout=60)
        assert r.status_code == status, (query, r.text)
        assert words in r.json()["error"]["message"], (query, r.text)
    assert httpx.get(f"{base}/api/groups").json() == {"groups": []}
    for proc in lab["nodes"]:
        assert proc.alive()


def test_a_group_serves_the_single_node_greedy_answer(lab: dict[str, Any]) -> None:
    base = lab["base"]
    single, _, single_tokens = _greedy(base, "smollm2", 8)
    # The coordinator proposes the members from their free memory: 2 would hold it, but
    # 2 do not divide 9 heads, so all 3.
    proposed = _cli(base, "propose", "--model", "smollm2", "--json")
    assert proposed.returncode == 0, proposed.stderr
    proposal = json.loads(proposed.stdout)
    assert sorted(proposal["nodes"]) == list(NODES), proposal
    made = _cli(base, "create", "tp3", "--model", "smollm2")  # no --nodes: the proposal
    assert made.returncode == 0, made.stderr
    assert "tp3: up" in made.stdout, made.stdout
    group = _group(base, "tp3")
    assert group["state"] == "up"
    assert sorted(r["node"] for r in group["ranks"]) == list(NODES)
    assert group["memory_bytes_per_member"] > 0
    listed = _cli(base, "list")
    assert "tp3: up" in listed.stdout, listed.stdout
    assert f"rank 2: {group['members'][2]}  up" in listed.stdout, listed.stdout
    # The group is one more model to the coordinator: listed, routed to rank 0's node.
    models = httpx.get(f"{base}/v1/models").json()["data"]
    assert "tp3" in {m["id"] for m in models}

    text, served_by, tokens = _greedy(base, "tp3", 8)
    assert served_by == group["members"][0] == group["serving_node"]
    metrics = httpx.get(f"{base}/metrics").text
    assert 'macmesh_group_up{group="tp3",model="smollm2"} 1.0' in metrics
    assert 'macmesh_group_members{group="tp3"} 3.0' in metrics
    assert (text, tokens) == (single, single_tokens)

    # The Anthropic API streams through the group too (same greedy tokens).
    client = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=300)
    with client.messages.stream(
        model="tp3",
        max_tokens=8,
        messages=[{"role": "user", "content": QUESTION}],
        extra_body={"temperature": 0},
    ) as stream:
        streamed = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert streamed == single
    assert final.usage.output_tokens == single_tokens


@needs_browser
def test_the_mesh_page_shows_the_group(lab: dict[str, Any], page: Any) -> None:
    page.goto(lab["base"] + "/ui/mesh")
    card = page.locator('[data-group="tp3"]')
    card.wait_for(timeout=15_000)
    assert card.locator(".badge").inner_text() == "up"
    ranks = card.locator(".group-rank").all_inner_texts()
    assert len(ranks) == 3 and "serves it" in ranks[0], ranks
    assert console_errors(page) == []


def test_a_pipeline_group_beside_a_tensor_group(lab: dict[str, Any]) -> None:
    """Pipeline parallelism through the mesh, on nodes that are also in another group."""
    base = lab["base"]
    single, _, single_tokens = _greedy(base, "tinyqwen", 10)
    r = httpx.post(
        f"{base}/api/groups",
        json={
            "name": "pp2",
            "model": "tinyqwen",
            "nodes": ["node-1", "node-2"],
            "strategy": "pipeline",
        },
        timeout=600,
    )
    assert r.status_code == 201, r.text
    assert r.json()["strategy"] == "pipeline" and r.json()["state"] == "up"
    text, served_by, tokens = _greedy(base, "pp2", 10)
    assert served_by == "node-1"
    assert (text, tokens) == (single, single_tokens)
    names = {g["name"] for g in httpx.get(f"{base}/api/groups").json()["groups"]}
    assert {"pp2"} <= names
    r = httpx.delete(f"{base}/api/groups/pp2", timeout=120)
    assert r.status_code == 200 and r.json()["state"] == "removed", r.text
    r = httpx.get(f"{base}/api/groups/pp2")
    assert r.status_code == 404 and "no group 'pp2'" in r.json()["error"]["message"]


def test_killing_a_member_ends_the_stream_and_downs_the_group(lab: dict[str, Any]) -> None:
    base = lab["base"]
    if httpx.get(f"{base}/api/groups").json()["groups"] == []:
        made = _cli(base, "create", "tp3", "--model", "smollm2", "--nodes", ",".join(NODES))
        assert made.returncode == 0, made.stderr
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
    last = _group(base, "tp3")["members"][-1]  # not rank 0: the serving node stays up
    member = lab["nodes"][NODES.index(last)].process.proc
    stream = client.chat.completions.create(
        model="tp3",
        messages=[{"role": "user", "content": "Tell me a long story about the sea."}],
        max_tokens=400,
        temperature=0,
        stream=True,
    )
    chunks = 0
    killed_at = 0.0
    with pytest.raises(openai.APIError) as failure:
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                chunks += 1
                if chunks == 2:
                    os.kill(member.pid, signal.SIGKILL)  # the member's agent, as a crash
                    killed_at = time.monotonic()
    ended = time.monotonic() - killed_at
    assert killed_at and ended < 30, f"the stream took {ended:.1f}s to end"
    assert "down" in str(failure.value) or "left" in str(failure.value), failure.value

    wait_until(lambda: _group(base, "tp3")["state"] == "down", 30, "group down")
    detail = _group(base, "tp3")["detail"]
    assert detail, "a down group says why"
    metrics = httpx.get(f"{base}/metrics").text
    assert 'macmesh_group_up{group="tp3",model="smollm2"} 0.0' in metrics
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "tp3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code == 503, r.text
    assert "group 'tp3' is down" in r.json()["error"]["message"]
    # The survivors' rank processes are gone, their nodes still serve.
    for i, proc in enumerate(lab["nodes"]):
        assert proc.alive() == (NODES[i] != last)
    text, _, _ = _greedy(base, "smollm2", 2)
    assert text

    removed = _cli(base, "rm", "tp3")
    assert removed.returncode == 0, removed.stderr
    wait_until(
        lambda: (
            not any(
                g["name"] == "tp3" and g["ranks"]
                for g in httpx.get(f"{base}/api/groups").json()["groups"]
            )
        ),
        30,
        "group removed",
    )
    r = httpx.post(
        f"{base}/v1/chat/completions",
        json={"model": "tp3", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2},
        timeout=60,
    )
    assert r.status_code in (404, 503), r.text
