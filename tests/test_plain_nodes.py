"""The lab as launchd runs it: plain `macmesh node` processes on two homes, one coordinator.

No `--preload`, no model flags: each node must advertise its whole catalog
from the start, load a model on its first request, pick up a GGUF copied into
its models dir within seconds, and serve GGUF files that the coordinator's
seed-style config names by path. Real processes, the real SmolLM2 (MLX and
GGUF), a real llama-server, the official openai and anthropic SDKs.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

from tests.gguf_fixtures import make_tiny, write_tiny_gguf
from tests.procs import MACMESH, Procs, free_port, wait_until

pytestmark = pytest.mark.model

SEED_ROUTING = {
    "enabled": True,
    # The seed's own shape: a GGUF tier named without its suffix, and an MLX tier.
    "tiers": {
        "haiku": {"model": "smollm2", "backend": "gguf"},
        "sonnet": {"model": "smollm2", "backend": "mlx"},
        "opus": {"model": None},
    },
    "default_model": None,
}


@pytest.fixture(scope="module")
def lab(
    tmp_path_factory: pytest.TempPathFactory, llama_server_binary: Path
) -> Iterator[dict[str, object]]:
    root = tmp_path_factory.mktemp("lab")
    procs = Procs(root)
    # A GGUF that no models dir holds: only the coordinator's config names it, by path.
    (root / "elsewhere").mkdir()
    named = write_tiny_gguf(root / "elsewhere" / "Named-Q8.gguf", make_tiny())
    env_common = {"HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    ports = [free_port() for _ in range(3)]
    nodes = []
    try:
        for i, port in enumerate(ports[:2]):
            home = root / f"home{i}"
            home.mkdir()
            # Plain `macmesh node`; the port as launchd's job passes it (two on one host).
            nodes.append(
                procs.spawn(
                    f"node{i}",
                    [MACMESH, "node", "--grpc-port", str(port), "--metrics-port", "-1"],
                    {**env_common, "MACMESH_HOME": str(home)},
                )
            )
        coord_home = root / "coord"
        coord_home.mkdir()
        (coord_home / "claude_routing.json").write_text(json.dumps(SEED_ROUTING))
        (coord_home / "model_aliases.json").write_text(json.dumps({"named": str(named)}))
        http = ports[2]
        peers = [a for p in ports[:2] for a in ("--peer", f"127.0.0.1:{p}")]
        coord = procs.spawn(
            "coordinator",
            [MACMESH, "coordinator", "--port", str(http), "--no-bonjour", *peers],
            {**env_common, "MACMESH_HOME": str(coord_home)},
        )
        base = f"http://127.0.0.1:{http}"
        everyone = [*nodes, coord]

        def nodes_up() -> bool:
            return bool(httpx.get(f"{base}/health").json()["nodes_online"] == 2)

        wait_until(nodes_up, 240, "two nodes online", everyone)
        yield {"base": base, "root": root, "procs": procs, "all": everyone}
    finally:
        procs.stop_all()


def model_nodes(base: str) -> dict[str, list[str]]:
    models = httpx.get(f"{base}/api/models").json()["models"]
    return {m["id"]: [n["id"] for n in m["nodes"]] for m in models}


def test_plain_nodes_advertise_their_catalog_from_the_start(lab: dict[str, object]) -> None:
    base = str(lab["base"])
    served = model_nodes(base)
    assert len(served["smollm2"]) == 2 and len(served["smollm2.gguf"]) == 2, served
    # Named by path in the coordinator's model_aliases.json: served where the file exists.
    assert len(served["Named-Q8.gguf"]) == 2, served


def test_first_requests_load_on_demand(lab: dict[str, object]) -> None:
    base = str(lab["base"])
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
    for model in ("smollm2", "smollm2.gguf"):
        raw = client.chat.completions.with_raw_response.create(
            model=model,
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=8,
            temperature=0,
        )
        assert raw.headers["x-macmesh-route-reason"] == "not-loaded"
        assert raw.parse().choices[0].message.content, model
    # The seed's tier {"model": "smollm2", "backend": "gguf"} runs the GGUF, not the MLX model.
    ac = anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=300)
    raw_msg = ac.messages.with_raw_response.create(
        model="claude-haiku-4-5",
        max_tokens=4,
        messages=[{"role": "user", "content": "Hi"}],
    )
    assert raw_msg.headers["x-macmesh-model"] == "smollm2.gguf"
    resolved = httpx.get(f"{base}/api/routing/resolve/claude-sonnet-4-6").json()
    assert (resolved["resolved"], resolved["backend"]) == ("smollm2", "mlx")
    named = client.chat.completions.with_raw_response.create(
        model="named", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert named.headers["x-macmesh-model"] == "Named-Q8.gguf"
    assert named.parse().choices[0].finish_reason in ("stop", "length")


def test_a_gguf_copied_in_is_served_within_seconds(lab: dict[str, object]) -> None:
    base, root = str(lab["base"]), Path(str(lab["root"]))
    src = root / "home0" / "models" / "smollm2.gguf"
    tmp = root / "home0" / "models" / ".copying"
    shutil.copyfile(src.resolve(), tmp)  # copy, then rename into place, as `cp` + `mv` do
    t0 = time.monotonic()
    tmp.rename(root / "home0" / "models" / "copied.gguf")
    took = wait_until(lambda: "copied.gguf" in model_nodes(base), 10, "copied.gguf advertised", [])
    assert took < 10
    client = openai.OpenAI(base_url=f"{base}/v1", api_key="x", max_retries=0, timeout=300)
    out = client.chat.completions.create(
        model="copied.gguf", messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    assert out.choices[0].message is not None
    print(f"copied GGUF served {time.monotonic() - t0:.1f}s after it appeared")


def test_bad_config_keeps_the_previous_one(lab: dict[str, object]) -> None:
    base, root = str(lab["base"]), Path(str(lab["root"]))
    routing = root / "coord" / "claude_routing.json"
    good = routing.read_text()
    routing.write_text(json.dumps({"tiers": {"haiku": {"model": "x", "backend": "onnx"}}}))
    try:

        def reported() -> bool:
            error = httpx.get(f"{base}/api/routing/config").json()["error"]
            return bool(error and "claude_routing.json" in error and "tiers.haiku.backend" in error)

        wait_until(reported, 10, "the bad file reported", [])
        resolved = httpx.get(f"{base}/api/routing/resolve/claude-haiku-4-5").json()
        assert resolved["resolved"] == "smollm2.gguf"  # the previous config is in force
    finally:
        routing.write_text(good)
    # A path that exists on no node: the error names the file, the key and the path.
    aliases = root / "coord" / "model_aliases.json"
    named = str(root / "elsewhere" / "Named-Q8.gguf")
    aliases.write_text(json.dumps({"named": named, "gone": "/nowhere/Gone-Q4.gguf"}))

    def gone() -> httpx.Response:
        return httpx.post(
            f"{base}/v1/chat/completions",
            json={"model": "gone", "messages": [{"role": "user", "content": "hi"}]},
        )

    wait_until(lambda: "Gone-Q4" in gone().text, 10, "the new alias in force", [])
    r = gone()
    assert r.status_code == 404
    message = r.json()["error"]["message"]
    assert "model_aliases.json key 'gone'" in message and "/nowhere/Gone-Q4.gguf" in message


def test_config_path_changes_reach_every_node(lab: dict[str, object]) -> None:
    """A path added to the coordinator's config is served within seconds; a removed one is no
    longer offered, except where it is loaded (a running llama-server keeps serving it)."""
    base, root = str(lab["base"]), Path(str(lab["root"]))
    aliases = root / "coord" / "model_aliases.json"
    before = aliases.read_text()
    later = write_tiny_gguf(root / "elsewhere" / "Later-Q8.gguf", make_tiny(seed=1))
    aliases.write_text(json.dumps({"later": str(later)}))
    try:

        def switched() -> bool:
            models = {m["id"]: m["nodes"] for m in httpx.get(f"{base}/api/models").json()["models"]}
            old_offered = [n for n in models.get("Named-Q8.gguf", []) if not n["loaded"]]
            return len(models.get("Later-Q8.gguf", [])) == 2 and not old_offered

        took = wait_until(switched, 15, "the new path served, the old one withdrawn", [])
        print(f"config path change reached both nodes in {took:.1f}s")
    finally:
        aliases.write_text(before)
