"""`macmesh models pull` / `search`: real nodes (a thread, or a process to kill), a real
coordinator and the CLI, against a local stand-in for the Hub (tests/hub_server.py)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import huggingface_hub.constants
import pytest

from mesh.client import NodeClient
from mesh.errors import InvalidRequest, Unavailable
from mesh.types import Transfer
from node.config import NodeConfig
from tests.conftest import RunningNode, start_coordinator, start_node
from tests.gguf_fixtures import make_tiny, write_tiny_gguf
from tests.hub_server import FakeHub, FakeRepo
from tests.node_calls import chat, collect, finish_of
from tests.procs import free_port

MACMESH = str(Path(sys.executable).parent / "macmesh")
MB = 1 << 20
# huggingface_hub's http_get writes in chunks of this size (constants.DOWNLOAD_CHUNK_SIZE):
# the first chunk on disk is what a killed download leaves to resume from.
CHUNK = huggingface_hub.constants.DOWNLOAD_CHUNK_SIZE


@pytest.fixture
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Iterator[FakeHub]:
    """The fake Hub, with this process's huggingface_hub pointed at it and online.

    conftest keeps the session offline (HF_HUB_OFFLINE=1), and huggingface_hub
    reads that once at import: its constant is patched back for this test.
    """
    server = FakeHub().start()
    monkeypatch.setenv("HF_ENDPOINT", server.url)
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    # The catalog also scans $HF_HOME/gguf: never the user's.
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    yield server
    server.stop()


def pull_node(tmp_path: Path, name: str = "node") -> RunningNode:
    """An in-process node whose HF cache is `tmp_path/hf`."""
    return start_node(
        NodeConfig(
            grpc_port=0,
            home=tmp_path / name,
            models_dir=tmp_path / name / "models",
            scan_hf_cache=True,
            hf_cache_dir=tmp_path / "hf",
        )
    )


async def finished(
    client: NodeClient, transfer_id: str, timeout: float = 60
) -> tuple[Transfer, list[Transfer]]:
    """Follow the node's state until the transfer ends; (its last record, every one seen)."""
    seen: list[Transfer] = []
    deadline = time.monotonic() + timeout
    async for state in client.watch_state(interval_ms=100):
        for t in state.transfers:
            if t.id == transfer_id:
                seen.append(t)
                if t.state != "running":
                    return t, seen
        assert time.monotonic() < deadline, f"transfer {transfer_id} still running: {seen[-1:]}"
    raise AssertionError("the state stream ended")


def smollm2_repo(models_dir: Path, tmp: Path, repo_id: str = "org/SmolLM2-mlx") -> FakeRepo:
    """The real SmolLM2 MLX dir as a Hub repo (plus a README a pull must skip)."""
    src = models_dir / "smollm2"
    files = {p.name: p for p in src.iterdir() if p.is_file() and p.name != "macmesh_import.json"}
    readme = tmp / "README.md"
    readme.write_text("# SmolLM2\n")
    files["README.md"] = readme
    return FakeRepo(repo_id, files, tags=["mlx", "safetensors"], library_name="mlx")


# ---------------------------------------------------------------- an MLX repo


@pytest.mark.model
async def test_pull_mlx_repo_progress_never_half_served_then_served(
    hub: FakeHub, models_dir: Path, tmp_path: Path
) -> None:
    repo = hub.add(smollm2_repo(models_dir, tmp_path))
    weights = repo.files["model.safetensors"].stat().st_size
    node = pull_node(tmp_path)
    try:
        async with NodeClient(node.target, timeout=60) as client:
            # The weights stop 12 MB in: one 10 MB chunk is on disk, the rest waits.
            hub.stall(12 * MB)
            started = await client.pull_model(repo.repo_id)
            assert (started.kind, started.state, started.model) == ("pull", "running", repo.repo_id)
            assert started.source == f"hf:{repo.repo_id}@main"
            storage = tmp_path / "hf" / "models--org--SmolLM2-mlx"
            partial = storage / "blobs" / f"{hub.hashes(repo.files['model.safetensors'])[0]}"
            partial = partial.with_name(partial.name + ".incomplete")
            progress: list[Transfer] = []
            deadline = time.monotonic() + 30
            async for state in client.watch_state(interval_ms=100):
                (t,) = [t for t in state.transfers if t.id == started.id]
                progress.append(t)
                if t.bytes_done >= CHUNK:
                    break
                assert time.monotonic() < deadline, progress[-1]
            total = sum(p.stat().st_size for n, p in repo.files.items() if n != "README.md")
            assert progress[-1].bytes_total == total
            assert partial.stat().st_size == CHUNK

            # A second pull of the same thing joins the running one.
            again = await client.pull_model(repo.repo_id, revision="main")
            assert again.id == started.id

            # Half-written: some files are in the snapshot, but never config.json, and the
            # catalog (rescanned now) does not list the repo.
            core = node.server.core
            assert core is not None
            (snapshot,) = (storage / "snapshots").iterdir()
            assert (snapshot / "generation_config.json").exists()
            assert not (snapshot / "config.json").exists()
            assert repo.repo_id not in await asyncio.to_thread(core.catalog.scan)
            assert repo.repo_id not in [m.id for m in await client.list_models()]

            hub.release()
            done, seen = await finished(client, started.id)
            assert done.state == "done", done.error
            assert done.bytes_done == done.bytes_total == total
            assert Path(done.path) == snapshot
            dones = [t.bytes_done for t in progress + seen]
            assert dones == sorted(dones), "progress went backwards"

            # Linked last; mlx-lm's patterns only (no README); refs/main written at the end.
            resolved = [r.path for r in hub.requests if "/resolve/" in r.path]
            assert resolved[-1].endswith("/config.json")
            assert not any(r.endswith("README.md") for r in resolved)
            assert (storage / "refs" / "main").read_text() == repo.sha
            assert not list((storage / "blobs").glob("*.incomplete"))
            assert (snapshot / "model.safetensors").stat().st_size == weights

            # Listed by repo id, and it answers (greedy, 2 tokens).
            models = {m.id: m for m in await client.list_models()}
            assert models[repo.repo_id].backend == "mlx"
            req = replace(chat("Say hi", temperature=0.0, max_tokens=2), model=repo.repo_id)
            assert finish_of(await collect(client, req)).usage.completion_tokens == 2
    finally:
        node.stop()


# ---------------------------------------------------------------- GGUF, bad input


async def test_pull_gguf_file_and_clear_errors(hub: FakeHub, tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    q4 = write_tiny_gguf(src / "tiny-Q4_0.gguf", make_tiny())
    q8 = src / "tiny-Q8_0.gguf"
    shutil.copyfile(q4, q8)
    repo = hub.add(FakeRepo("org/tiny-GGUF", {"tiny-Q4_0.gguf": q4, "tiny-Q8_0.gguf": q8}))
    node = pull_node(tmp_path)
    try:
        async with NodeClient(node.target, timeout=30) as client:
            # Two GGUF files and no --file: which one is the question.
            t, _ = await finished(client, (await client.pull_model(repo.repo_id)).id)
            assert t.state == "failed"
            assert "choose one with --file: tiny-Q4_0.gguf, tiny-Q8_0.gguf" in t.error

            t, _ = await finished(
                client, (await client.pull_model(repo.repo_id, "tiny-Q8_0.gguf")).id
            )
            assert t.state == "done", t.error
            assert (t.model, t.bytes_done, t.bytes_total) == (
                "tiny-Q8_0.gguf",
                q8.stat().st_size,
                q8.stat().st_size,
            )
            assert Path(t.path).read_bytes() == q8.read_bytes()
            models = {m.id: m for m in await client.list_models()}
            assert models["tiny-Q8_0.gguf"].backend == "gguf"
            assert "tiny-Q4_0.gguf" not in models

            # 404s: repo, file, revision; each a failed transfer saying which.
            t, _ = await finished(client, (await client.pull_model("org/missing")).id)
            assert t.state == "failed" and "repository 'org/missing' not found" in t.error
            t, _ = await finished(client, (await client.pull_model(repo.repo_id, "nope.gguf")).id)
            assert t.state == "failed"
            assert "has no file 'nope.gguf'; its GGUF files: tiny-Q4_0.gguf" in t.error
            t, _ = await finished(
                client, (await client.pull_model(repo.repo_id, "tiny-Q4_0.gguf", "v9")).id
            )
            assert t.state == "failed" and "has no revision 'v9'" in t.error
            # No Hub there: the node says so (it does not retry a refused connection).
            with pytest.MonkeyPatch.context() as mp:
                mp.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
                t, _ = await finished(client, (await client.pull_model(repo.repo_id)).id)
            assert t.state == "failed" and "cannot reach the Hub at http://127.0.0.1:" in t.error
            # A node that may not go online refuses at once.
            with pytest.MonkeyPatch.context() as mp:
                mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
                with pytest.raises(Unavailable, match="HF_HUB_OFFLINE"):
                    await client.pull_model(repo.repo_id)
            # Malformed: refused at once, naming the field.
            with pytest.raises(InvalidRequest, match="repo"):
                await client.pull_model("not a repo id!")
            with pytest.raises(InvalidRequest, match="file"):
                await client.pull_model(repo.repo_id, "../../etc/passwd")
    finally:
        node.stop()


async def test_split_gguf_lands_first_part_last(hub: FakeHub, tmp_path: Path) -> None:
    (tmp_path / "src").mkdir()
    parts = {}
    for i in (1, 2):
        parts[f"m-0000{i}-of-00002.gguf"] = tmp_path / "src" / f"p{i}"
        parts[f"m-0000{i}-of-00002.gguf"].write_bytes(os.urandom(1000 * i))
    repo = hub.add(FakeRepo("org/split-GGUF", parts))
    node = pull_node(tmp_path)
    try:
        async with NodeClient(node.target, timeout=30) as client:
            started = await client.pull_model(repo.repo_id, "m-00002-of-00002.gguf")
            t, _ = await finished(client, started.id)
    finally:
        node.stop()
    assert t.state == "done", t.error
    assert t.model == "m-00001-of-00002.gguf" and t.bytes_total == 3000
    heads = [r.path for r in hub.requests if r.method == "HEAD"]
    assert heads[0].endswith("m-00002-of-00002.gguf") and heads[-1].endswith(
        "m-00001-of-00002.gguf"
    )


async def test_a_bad_partial_is_discarded_never_served(hub: FakeHub, tmp_path: Path) -> None:
    data = os.urandom(3 * MB)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "w.bin").write_bytes(data)
    repo = hub.add(FakeRepo("org/w", {"w.bin": tmp_path / "src" / "w.bin"}))
    sha256 = hub.cdn_path(repo.repo_id, "w.bin").rsplit("/", 1)[1]
    blobs = tmp_path / "hf" / "models--org--w" / "blobs"
    blobs.mkdir(parents=True)
    partial = blobs / f"{sha256}.incomplete"
    partial.write_bytes(b"\0" * MB)  # not the file's first megabyte
    node = pull_node(tmp_path)
    try:
        async with NodeClient(node.target, timeout=30) as client:
            t, _ = await finished(client, (await client.pull_model(repo.repo_id, "w.bin")).id)
            assert t.state == "failed" and "does not match its sha256" in t.error
            assert not partial.exists() and not (blobs / sha256).exists()
            assert not list(blobs.parent.glob("snapshots/*/w.bin"))
            partial.write_bytes(os.urandom(4 * MB))  # longer than the file: dropped at once
            t, _ = await finished(client, (await client.pull_model(repo.repo_id, "w.bin")).id)
    finally:
        node.stop()
    assert t.state == "done", t.error
    assert Path(t.path).read_bytes() == data


# ---------------------------------------------------------------- resume after a kill


def spawn_node(tmp_path: Path, hub: FakeHub) -> tuple[subprocess.Popen[str], str]:
    """`macmesh node` as a process (so it can be killed), on the shared HF cache."""
    env = {
        **os.environ,
        "MACMESH_HOME": str(tmp_path / "proc-home"),
        "HF_ENDPOINT": hub.url,
        "HF_HUB_OFFLINE": "0",
        "PYTHONUNBUFFERED": "1",
    }
    log = (tmp_path / "node.log").open("w")
    proc = subprocess.Popen(
        [
            MACMESH, "node", "--grpc-port", "0", "--no-bonjour", "--no-default-model",
            "--models-dir", str(tmp_path / "proc-home" / "models"),
            "--hf-cache-dir", str(tmp_path / "hf"),
        ],
        stdout=subprocess.PIPE, stderr=log, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    line = proc.stdout.readline()
    match = re.search(r"listening on (\S+)", line)
    assert match, f"unexpected first line {line!r}: {(tmp_path / 'node.log').read_text()}"
    return proc, match.group(1)


async def test_resume_after_the_node_is_killed(hub: FakeHub, tmp_path: Path) -> None:
    data = os.urandom(24 * MB)
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "big.bin").write_bytes(data)
    repo = hub.add(FakeRepo("org/big", {"big.bin": tmp_path / "src" / "big.bin"}))
    cdn = hub.cdn_path(repo.repo_id, "big.bin")
    partial = (
        tmp_path / "hf" / "models--org--big" / "blobs" / (cdn.rsplit("/", 1)[1] + ".incomplete")
    )

    hub.stall(12 * MB)
    proc, target = spawn_node(tmp_path, hub)
    try:
        async with NodeClient(target, timeout=30) as client:
            started = await client.pull_model(repo.repo_id, "big.bin")
            deadline = time.monotonic() + 30
            async for state in client.watch_state(interval_ms=100):
                (t,) = [t for t in state.transfers if t.id == started.id]
                if t.bytes_done >= CHUNK:
                    break
                assert time.monotonic() < deadline, t
            assert t.bytes_total == len(data)
    finally:
        proc.kill()
        proc.wait(10)
    assert partial.stat().st_size == CHUNK
    assert hub.ranges(cdn)[0] is None  # the first node started at 0
    before = len(hub.ranges(cdn))
    hub.release()

    node = pull_node(tmp_path, "node2")
    try:
        async with NodeClient(node.target, timeout=30) as client:
            done, _ = await finished(client, (await client.pull_model(repo.repo_id, "big.bin")).id)
    finally:
        node.stop()
    assert done.state == "done", done.error
    # The new node asked only for the rest.
    assert hub.ranges(cdn)[before:] == [f"bytes={CHUNK}-"]
    assert Path(done.path).read_bytes() == data
    assert not partial.exists()


# ---------------------------------------------------------------- admin API and CLI


def macmesh(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MACMESH, *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_cli_and_admin_api(hub: FakeHub, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from coordinator.config import CoordinatorConfig

    src = tmp_path / "src"
    src.mkdir()
    gguf = write_tiny_gguf(src / "tiny-Q4_0.gguf", make_tiny())
    hub.add(
        FakeRepo(
            "org/tiny-GGUF",
            {"tiny-Q4_0.gguf": gguf},
            tags=["gguf"],
            downloads=50,
            parameters=12345,
        )
    )
    (src / "config.json").write_text('{"model_type": "llama"}')
    (src / "model.safetensors").write_bytes(b"\0" * 100)
    hub.add(
        FakeRepo(
            "mlx-community/tiny-4bit",
            {"config.json": src / "config.json", "model.safetensors": src / "model.safetensors"},
            tags=["mlx", "safetensors"],
            library_name="mlx",
            downloads=900,
        )
    )
    node = pull_node(tmp_path)
    coordinator = start_coordinator(
        CoordinatorConfig(home=tmp_path / "coord", peers=(node.target,))
    )
    base = coordinator.base_url
    try:
        out = macmesh("models", "pull", "org/tiny-GGUF", "--coordinator", base)
        assert out.returncode == 0, out.stderr
        assert "100.0%" in out.stderr and "tiny-Q4_0.gguf" in out.stderr
        assert "served as 'tiny-Q4_0.gguf'" in out.stdout

        missing = macmesh("models", "pull", "org/missing", "--coordinator", base)
        assert missing.returncode == 1
        assert "pull failed" in missing.stderr and "'org/missing' not found" in missing.stderr

        started = macmesh(
            "models", "pull", "org/tiny-GGUF", "--file", "nope.gguf", "--no-wait", "--json",
            "--coordinator", base,
        )  # fmt: skip
        assert started.returncode == 0, started.stderr
        tid = json.loads(started.stdout)["transfer"]["id"]

        with httpx.Client(base_url=base, timeout=30) as http:
            deadline = time.monotonic() + 10
            while (t := http.get(f"/api/transfers/{tid}").json()["transfer"])["state"] == "running":
                assert time.monotonic() < deadline
                time.sleep(0.1)
            assert t["state"] == "failed" and "has no file 'nope.gguf'" in t["error"]
            listed = http.get("/api/transfers", params={"node": t["node"]}).json()["transfers"]
            ok = [x for x in listed if x["state"] == "done"]
            assert ok and ok[0]["percent"] == 100.0 and ok[0]["served"] is True
            assert http.get("/api/transfers/pull-nope").status_code == 404
            assert http.get("/api/transfers", params={"node": "elsewhere"}).json() == {
                "transfers": []
            }
            # Bad requests: the admin envelope, a field named.
            bad = http.post("/api/models/pull", content=b"{")
            assert bad.status_code == 400 and "not valid JSON" in bad.json()["error"]["message"]
            bad = http.post("/api/models/pull", json={"file": "x.gguf"})
            assert bad.status_code == 400 and bad.json()["error"]["param"] == "repo"
            bad = http.post("/api/models/pull", json={"repo": "org/x", "node": "elsewhere"})
            assert bad.status_code == 400 and "no online node 'elsewhere'" in bad.text
            # One repo's files.
            files = http.get("/api/hub/repos/org/tiny-GGUF").json()
            assert files["kind"] == "gguf"
            assert files["files"][0]["quantization"] == "Q4_0"
            assert http.get("/api/hub/repos/org/missing").status_code == 404

        # Search: both kinds, most downloaded first, quantization from the name / files.
        found = macmesh("models", "search", "tiny", "--json", "--coordinator", base)
        assert found.returncode == 0, found.stderr
        results = json.loads(found.stdout)
        assert [(r["repo"], r["kind"], r["quantization"]) for r in results] == [
            ("mlx-community/tiny-4bit", "mlx", "4bit"),
            ("org/tiny-GGUF", "gguf", "Q4_0"),
        ]
        assert results[1]["gguf_files"] == ["tiny-Q4_0.gguf"]
        assert results[1]["parameters"] == 12345
        assert results[1]["size_bytes"] == gguf.stat().st_size
        table = macmesh("models", "search", "tiny", "--kind", "gguf", "--coordinator", base)
        assert table.returncode == 0, table.stderr
        assert "org/tiny-GGUF" in table.stdout and "mlx-community" not in table.stdout

        # No Hub for this coordinator: a clear 503, never a 500 (unreachable: see below).
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        down = macmesh("models", "search", "tiny", "--coordinator", base)
        assert down.returncode == 1 and "HTTP 503" in down.stderr
        assert "HF_HUB_OFFLINE is set on this coordinator" in down.stderr
    finally:
        coordinator.stop()
        node.stop()


@pytest.mark.slow
def test_search_with_the_hub_unreachable(monkeypatch: pytest.MonkeyPatch) -> None:
    """huggingface_hub retries a refused connection for ~25 s, then: 503, not 500."""
    from coordinator.hub_search import search_hub
    from mesh.errors import Unavailable

    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{free_port()}")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    with pytest.raises(Unavailable, match=r"cannot reach the Hub at http://127\.0\.0\.1:"):
        search_hub("tiny")
