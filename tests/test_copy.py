"""`macmesh models copy` / `rm` between real nodes: the SmolLM2 MLX dir and GGUF, resume
after a kill, corruption caught, no room, wrong secret, and rm's refusals.

Node A is the source (the session's models dir, SmolLM2 preloaded); every test copies
into destinations of its own (temp homes and models dirs). A spy on A's `read_file`
records which (file, offset) each ReadModelFile call asked for and how many bytes
it sent, so a resume can be shown to fetch only what was missing.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import AsyncGenerator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from mesh.auth import channel_credentials
from mesh.client import NodeClient
from mesh.errors import (
    BackendError,
    InvalidRequest,
    ModelNotFound,
    Overloaded,
    Unauthenticated,
)
from mesh.types import ChatPrompt, GenerateRequest, Message, SamplingParams, Transfer
from node.config import NodeConfig, SimModelSpec
from node.models.copy import CRC_RETRIES, CopyJob
from node.models.files import PARTIAL_DIR, file_sha256, staging_dir
from node.models.staging import ManifestFile
from node.models.transfers import Transfers
from proto import node_pb2 as pb
from tests.conftest import RunningCoordinator, RunningNode, start_coordinator, start_node
from tests.node_calls import collect, text_of
from tests.procs import MACMESH, free_port
from tests.test_auth import Pki, pki  # noqa: F401 - the module's throwaway CA, as a fixture

SMOL = "smollm2"
GGUF = "smollm2.gguf"
PROMPT = "What is the capital of France?"


# ---------- helpers ----------


@dataclass
class ReadSpy:
    """What the source's ReadModelFile calls asked for and sent."""

    calls: list[tuple[str, int]] = field(default_factory=list)
    sent: int = 0

    def install(self, node: RunningNode, monkeypatch: pytest.MonkeyPatch) -> None:
        core = node.server.core
        assert core is not None
        real = core.read_file

        def spy(model: str, path: str, offset: int) -> AsyncGenerator[pb.FileChunk, None]:
            self.calls.append((path, offset))

            async def counted() -> AsyncGenerator[pb.FileChunk, None]:
                async for chunk in real(model, path, offset):
                    self.sent += len(chunk.data)
                    yield chunk

            return counted()

        monkeypatch.setattr(core, "read_file", spy)

    def reset(self) -> None:
        self.calls.clear()
        self.sent = 0


def tree_digest(path: Path) -> dict[str, str]:
    """SHA-256 of every file under `path` (or of `path` itself), by relative path."""
    if path.is_file():
        return {path.name: file_sha256(path)}
    return {
        p.relative_to(path).as_posix(): file_sha256(p)
        for p in sorted(path.rglob("*"))
        if p.is_file()
    }


async def wait_transfer(target: str, transfer_id: str, timeout: float = 120) -> Transfer:
    """The transfer once it is no longer running, as the node's state stream shows it."""
    async with NodeClient(target) as client:
        async with asyncio.timeout(timeout):
            async for state in client.watch_state(100):
                t = next((t for t in state.transfers if t.id == transfer_id), None)
                if t is not None and t.state != "running":
                    return t
    raise AssertionError("state stream ended")


async def copy_and_wait(dest: str, model: str, source: RunningNode, limit: int = 0) -> Transfer:
    async with NodeClient(dest) as client:
        started = await client.copy_model(model, source.target, "node-a", limit)
    assert started.state == "running" and started.kind == "copy", started
    return await wait_transfer(dest, started.id)


async def greedy(target: str, model: str) -> str:
    req = GenerateRequest(
        model=model,
        prompt=ChatPrompt((Message("user", PROMPT),)),
        sampling=SamplingParams(temperature=0.0, max_tokens=3),
    )
    async with NodeClient(target, timeout=300) as client:
        return text_of(await collect(client, req))


def dest_config(root: Path, name: str, **extra: object) -> NodeConfig:
    return NodeConfig(
        grpc_port=0,
        home=root / f"{name}-home",
        models_dir=root / f"{name}-models",
        **{"scan_hf_cache": False, "min_free_disk_bytes": 0, **extra},  # type: ignore[arg-type]
    )


# ---------- fixtures ----------


@pytest.fixture(scope="module")
def source(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """Node A: the session's SmolLM2 (MLX dir + GGUF link), SmolLM2 preloaded."""
    node = start_node(
        NodeConfig(
            grpc_port=0,
            home=tmp_path_factory.mktemp("copy-src-home"),
            models_dir=models_dir,
            scan_hf_cache=False,
            preload=(SMOL,),
        )
    )
    yield node
    node.stop()


@pytest.fixture(scope="module")
def dest(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    """Node B: empty, its own home and models dir."""
    node = start_node(dest_config(tmp_path_factory.mktemp("copy-dest"), "b"))
    yield node
    node.stop()


@pytest.fixture(scope="module")
def mesh(
    source: RunningNode, dest: RunningNode, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningCoordinator]:
    coord = start_coordinator(
        CoordinatorConfig(
            home=tmp_path_factory.mktemp("copy-coord"), peers=(source.target, dest.target)
        ),
        wait_nodes=2,
    )
    yield coord
    coord.stop()


@pytest.fixture
def spy(source: RunningNode, monkeypatch: pytest.MonkeyPatch) -> ReadSpy:
    s = ReadSpy()
    s.install(source, monkeypatch)
    return s


# ---------- the whole story through the admin API ----------


@pytest.mark.model
async def test_copy_mlx_dir_serves_the_same_greedy_answer_then_rm(
    source: RunningNode, dest: RunningNode, mesh: RunningCoordinator, models_dir: Path
) -> None:
    api = httpx.AsyncClient(base_url=mesh.base_url, timeout=120)
    body = {"model": SMOL, "from": source.target, "to": dest.target}
    r = await api.post("/api/models/copy", json=body)
    assert r.status_code == 202, r.text
    started = r.json()
    assert started["transfer"]["state"] == "running"
    assert started["transfer"]["source"].startswith("node:")
    done = await wait_transfer(dest.target, started["transfer"]["id"])
    assert done.state == "done", done.error
    dest_models = dest.server.config.resolved_models_dir
    assert done.path == str(dest_models / SMOL)
    assert done.bytes_done == done.bytes_total > 90_000_000
    # Byte-identical, listed under the same id, nothing left in staging.
    assert tree_digest(dest_models / SMOL) == tree_digest(models_dir / SMOL)
    assert not (dest_models / PARTIAL_DIR).exists()
    async with NodeClient(dest.target) as client:
        listed = {m.id: m for m in await client.list_models()}
    assert listed[SMOL].backend == "mlx" and listed[SMOL].source == "models-dir"
    # The copy serves the same greedy answer.
    answer = await greedy(source.target, SMOL)
    assert answer and await greedy(dest.target, SMOL) == answer

    # A second copy of a model the node has: refused, naming rm.
    r = await api.post("/api/models/copy", json=body)
    assert r.status_code == 400 and "already on node" in r.text, r.text

    # rm: refused while loaded (the greedy request loaded it), --force unloads first.
    path = f"/api/models/{SMOL}"
    r = await api.delete(path, params={"node": dest.target})
    assert r.status_code == 409, r.text
    assert "loaded; unload it first or use --force" in r.json()["error"]["message"]
    out = subprocess.run(
        [MACMESH, "models", "rm", SMOL, "--node", dest.target, "--force",
         "--coordinator", mesh.base_url, "--json"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0, out.stderr
    deleted = json.loads(out.stdout)
    assert deleted["was_loaded"] and deleted["bytes_freed"] > 90_000_000, deleted
    assert deleted["path"] == str(dest_models / SMOL)
    assert not (dest_models / SMOL).exists()
    async with NodeClient(dest.target) as client:
        assert SMOL not in {m.id for m in await client.list_models()}
    r = await api.delete(path, params={"node": dest.target})
    assert r.status_code == 404, r.text
    # The source still has its model, untouched.
    assert (models_dir / SMOL / "config.json").is_file()
    await api.aclose()


@pytest.mark.model
async def test_copy_gguf_file_then_serve_it(
    source: RunningNode,
    dest: RunningNode,
    mesh: RunningCoordinator,
    models_dir: Path,
    llama_server_binary: Path,
) -> None:
    # Through the CLI, which waits for the end (following GET /api/transfers/{id}).
    cli = await asyncio.create_subprocess_exec(
        MACMESH, "models", "copy", GGUF, "--from", source.target, "--to", dest.target,
        "--coordinator", mesh.base_url, "--json",
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(cli.communicate(), 120)
    assert cli.returncode == 0, err.decode()
    done = json.loads(out)["transfer"]
    assert done["state"] == "done" and done["kind"] == "copy", done
    copied = dest.server.config.resolved_models_dir / GGUF
    assert done["path"] == str(copied) and copied.is_file() and not copied.is_symlink()
    assert done["bytes_done"] == done["bytes_total"] == copied.stat().st_size
    assert file_sha256(copied) == file_sha256(models_dir / GGUF)
    async with NodeClient(dest.target) as client:
        listed = {m.id: m for m in await client.list_models()}
    assert listed[GGUF].backend == "gguf"
    answer = await greedy(source.target, GGUF)
    assert answer and await greedy(dest.target, GGUF) == answer


async def test_bad_requests_fail_clearly(
    source: RunningNode, dest: RunningNode, mesh: RunningCoordinator
) -> None:
    async with httpx.AsyncClient(base_url=mesh.base_url, timeout=60) as api:
        r = await api.post(
            "/api/models/copy", json={"model": "nope", "from": source.target, "to": dest.target}
        )
        assert r.status_code == 404 and "smollm2" in r.json()["error"]["message"], r.text
        r = await api.post(
            "/api/models/copy", json={"model": SMOL, "from": source.target, "to": source.target}
        )
        assert r.status_code == 400 and "both source and destination" in r.text
        r = await api.post("/api/models/copy", json={"model": SMOL, "from": "x", "to": dest.target})
        assert r.status_code == 400 and r.json()["error"]["param"] == "from"
        r = await api.post("/api/models/copy", json={"model": SMOL, "from": source.target})
        assert r.status_code == 400 and r.json()["error"]["param"] == "to"
        bad = {"model": SMOL, "from": source.target, "to": dest.target, "limit_mbps": -1}
        r = await api.post("/api/models/copy", json=bad)
        assert r.status_code == 400 and r.json()["error"]["param"] == "limit_mbps"
        r = await api.delete("/api/models/nope", params={"node": dest.target})
        assert r.status_code == 404
        r = await api.delete(f"/api/models/{SMOL}")
        assert r.status_code == 400 and r.json()["error"]["param"] == "node"


async def test_no_room_on_disk_is_refused_naming_both_numbers(
    source: RunningNode, tmp_path: Path
) -> None:
    # The node keeps more free than this disk has: every copy is refused up front.
    full = start_node(dest_config(tmp_path, "full", min_free_disk_bytes=1 << 60))
    coord = start_coordinator(
        CoordinatorConfig(home=tmp_path / "coord", peers=(source.target, full.target)),
        wait_nodes=2,
    )
    try:
        async with NodeClient(full.target) as client:
            no_room = r"not enough disk space .* MB still to copy, 0\.0 MB usable"
            with pytest.raises(Overloaded, match=no_room):
                await client.copy_model(SMOL, source.target, "node-a")
        body = {"model": SMOL, "from": source.target, "to": full.target}
        r = httpx.post(f"{coord.base_url}/api/models/copy", json=body, timeout=60)
        assert r.status_code == 507 and "not enough disk space" in r.text, r.text
        assert not (tmp_path / "full-models" / SMOL).exists()
    finally:
        coord.stop()
        full.stop()


async def test_wrong_secret_on_the_source_fails_authentication(tmp_path: Path) -> None:
    src = start_node(dest_config(tmp_path, "s", secret=b"s" * 32))
    dst = start_node(dest_config(tmp_path, "d", secret=b"d" * 32))
    try:
        async with NodeClient(dst.target, secret=b"d" * 32) as client:
            with pytest.raises(Unauthenticated, match=r"source node .*mesh secret"):
                await client.copy_model(SMOL, src.target, "s")
    finally:
        dst.stop()
        src.stop()


async def test_copy_over_mtls_with_the_mesh_secret(
    models_dir: Path,
    tmp_path: Path,
    pki: Pki,  # noqa: F811 - the fixture imported above
) -> None:
    """Node to node as coordinators dial nodes: the secret on every call, and mutual TLS
    with the destination's own certificate (`--tls-cert/--tls-key/--tls-ca`)."""
    secret = b"copy-secret-0123456789"
    tls = {"secret": secret, "tls_cert": pki.cert, "tls_key": pki.key, "tls_ca": pki.ca}
    src_config = dest_config(tmp_path, "s", **tls)
    src_config.resolved_models_dir.mkdir(parents=True)
    shutil.copyfile(models_dir / GGUF, src_config.resolved_models_dir / GGUF)
    src = start_node(src_config)
    dst = start_node(dest_config(tmp_path, "d", **tls))
    try:
        creds = channel_credentials(pki.ca, pki.cert, pki.key)
        async with NodeClient(dst.target, secret=secret, credentials=creds) as client:
            started = await client.copy_model(GGUF, src.target, "s")
            async with asyncio.timeout(60):
                async for state in client.watch_state(100):
                    done = next(t for t in state.transfers if t.id == started.id)
                    if done.state != "running":
                        break
        assert done.state == "done", done.error
        assert file_sha256(tmp_path / "d-models" / GGUF) == file_sha256(models_dir / GGUF)
    finally:
        dst.stop()
        src.stop()


# ---------- resume and corruption ----------


def _node_proc(home: Path, models: Path, port: int) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if k != "MACMESH_SECRET"}
    env["MACMESH_HOME"] = str(home)
    args = [MACMESH, "node", "--grpc-port", str(port), "--metrics-port", "-1", "--no-bonjour",
            "--no-hf-cache", "--no-default-model", "--models-dir", str(models),
            "--min-free-disk", "0"]  # fmt: skip
    home.mkdir(parents=True, exist_ok=True)
    log = (home / "node.log").open("ab")
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=log)


async def _ready(target: str) -> None:
    async with NodeClient(target) as client:
        await client.wait_ready(60)


async def _progress(target: str, transfer_id: str, at_least: int) -> Transfer:
    async with NodeClient(target) as client:
        async with asyncio.timeout(60):
            async for state in client.watch_state(50):
                t = next(t for t in state.transfers if t.id == transfer_id)
                assert t.state == "running", t
                if t.bytes_done >= at_least:
                    return t
    raise AssertionError("state stream ended")


@pytest.mark.model
async def test_copy_killed_midway_resumes_where_it_stopped(
    source: RunningNode, models_dir: Path, tmp_path: Path, spy: ReadSpy
) -> None:
    home, models, port = tmp_path / "home", tmp_path / "models", free_port()
    target = f"127.0.0.1:{port}"
    weights = "model.safetensors"
    total = (models_dir / SMOL / weights).stat().st_size
    proc = _node_proc(home, models, port)
    try:
        await _ready(target)
        async with NodeClient(target) as client:  # 25 MB/s: about 4 s for SmolLM2
            started = await client.copy_model(SMOL, source.target, "node-a", 25_000_000)
        await _progress(target, started.id, 40_000_000)
        proc.send_signal(signal.SIGKILL)  # no goodbye: a crash, a power cut
        proc.wait(10)
        part = staging_dir(models, SMOL) / "data" / weights
        kept = part.stat().st_size
        assert 0 < kept < total
        assert not (models / SMOL).exists()  # a half-written model is never served
        first_sent = spy.sent
        spy.reset()

        proc = _node_proc(home, models, port)  # restart on the same home
        await _ready(target)
        done = await copy_and_wait(target, SMOL, source)
        assert done.state == "done", done.error
        # Resumed: the weights were asked for from where the partial file ended.
        assert (weights, kept) in spy.calls and (weights, 0) not in spy.calls
        assert spy.sent <= total - kept + 8 * 1024 * 1024  # + what the link had in flight
        assert first_sent + spy.sent < total * 1.5
        assert tree_digest(models / SMOL) == tree_digest(models_dir / SMOL)
    finally:
        proc.kill()
        proc.wait(10)


@pytest.mark.model
async def test_damaged_partial_file_is_caught_and_fetched_again(
    source: RunningNode, models_dir: Path, tmp_path: Path, spy: ReadSpy
) -> None:
    """A node stopped mid-copy, its partial file damaged before the resume: the SHA-256
    check at the end catches it, and the file is fetched whole once more."""
    config = dest_config(tmp_path, "d")
    weights = "model.safetensors"
    node = start_node(config)
    try:
        async with NodeClient(node.target) as client:
            started = await client.copy_model(SMOL, source.target, "node-a", 25_000_000)
        await _progress(node.target, started.id, 30_000_000)
    finally:
        node.stop()  # graceful: the job stops at its next chunk, partial files stay
    part = staging_dir(config.resolved_models_dir, SMOL) / "data" / weights
    time.sleep(0.5)
    kept = part.stat().st_size
    with part.open("r+b") as f:  # flip bytes inside the prefix the resume will trust
        f.seek(kept // 2)
        byte = f.read(1)
        f.seek(kept // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    spy.reset()
    node = start_node(config)
    try:
        done = await copy_and_wait(node.target, SMOL, source)
        assert done.state == "done", done.error
        assert spy.calls.index((weights, kept)) < spy.calls.index((weights, 0))
        models = config.resolved_models_dir
        assert tree_digest(models / SMOL) == tree_digest(models_dir / SMOL)
    finally:
        node.stop()


@pytest.mark.model
async def test_a_node_restarted_mid_copy_resumes_it_by_itself(
    source: RunningNode, models_dir: Path, tmp_path: Path, spy: ReadSpy
) -> None:
    """No new request: the restarted node finds the unfinished copy in its staging dir
    and continues it from the partial file, at the same bandwidth cap."""
    config = dest_config(tmp_path, "r")
    weights = "model.safetensors"
    node = start_node(config)
    try:
        async with NodeClient(node.target) as client:
            started = await client.copy_model(SMOL, source.target, "node-a", 25_000_000)
        await _progress(node.target, started.id, 30_000_000)
    finally:
        node.stop()
    kept = (staging_dir(config.resolved_models_dir, SMOL) / "data" / weights).stat().st_size
    spy.reset()
    node = start_node(config)
    try:
        async with NodeClient(node.target) as client:
            async with asyncio.timeout(60):
                async for state in client.watch_state(100):
                    resumed = [t for t in state.transfers if t.model == SMOL]
                    if resumed and resumed[0].state != "running":
                        break
        assert resumed[0].state == "done", resumed[0].error
        assert resumed[0].id != started.id  # a new job, started by the node itself
        assert (weights, kept) in spy.calls and (weights, 0) not in spy.calls
        models = config.resolved_models_dir
        assert tree_digest(models / SMOL) == tree_digest(models_dir / SMOL)
    finally:
        node.stop()


async def test_source_file_changed_after_its_manifest_fails_with_checksum_mismatch(
    models_dir: Path, tmp_path: Path
) -> None:
    """Bytes flipped in the source's file while it is being copied: the fresh fetch does
    not match the manifest, the copy fails naming the file, nothing is installed."""
    src_config = dest_config(tmp_path, "s")
    src_config.resolved_models_dir.mkdir(parents=True)
    original = src_config.resolved_models_dir / GGUF
    shutil.copyfile(models_dir / GGUF, original)
    src = start_node(src_config)
    dst = start_node(dest_config(tmp_path, "d"))
    try:
        async with NodeClient(dst.target) as client:
            started = await client.copy_model(GGUF, src.target, "s", 30_000_000)
        await _progress(dst.target, started.id, 1)
        with original.open("r+b") as f:
            f.seek(-1000, os.SEEK_END)
            f.write(b"\0" * 8)
        failed = await wait_transfer(dst.target, started.id)
        assert failed.state == "failed"
        assert failed.error.startswith(f"checksum mismatch for {GGUF}"), failed.error
        dest_models = tmp_path / "d-models"
        assert not (dest_models / GGUF).exists()
        assert not (staging_dir(dest_models, GGUF) / "data" / GGUF).exists()
        async with NodeClient(dst.target) as client:
            assert GGUF not in {m.id for m in await client.list_models()}
    finally:
        dst.stop()
        src.stop()


# ---------- bad chunks (CRC-32), at the receiver's own interface ----------


class _Node:
    """The parts of a node a CopyJob touches, for a job driven by hand."""

    def __init__(self, root: Path) -> None:
        self.config = dest_config(root, "n")
        self.transfers = Transfers()
        self.draining = False


class _FlakyLink:
    """A source whose chunk at offset 3000 arrives damaged (its CRC-32 no longer fits)
    in its first `bad` streams."""

    def __init__(self, data: bytes, bad: int) -> None:
        self.data, self.bad = data, bad
        self.offsets: list[int] = []

    async def read_model_file(
        self, model: str, path: str, offset: int = 0
    ) -> AsyncGenerator[pb.FileChunk, None]:
        self.offsets.append(offset)
        damage = len(self.offsets) <= self.bad
        for pos in range(offset, len(self.data), 1000):
            data = self.data[pos : pos + 1000]
            chunk = pb.FileChunk(data=data, offset=pos, crc32=zlib.crc32(data))
            if pos == 3000 and damage:
                # Flip the first byte (a fixed b"X" left 1 random byte in 256 intact).
                chunk.data = bytes([data[0] ^ 0xFF]) + data[1:]
            yield chunk


@pytest.mark.parametrize("bad", [1, CRC_RETRIES + 1])
async def test_a_corrupted_chunk_is_fetched_again_from_its_offset(tmp_path: Path, bad: int) -> None:
    data = os.urandom(10_000)
    node = _Node(tmp_path)
    job = node.transfers.start("copy", "m", "node:x", key="k")
    copy = CopyJob(node, job, "m", "x", "addr", tmp_path, 0)  # type: ignore[arg-type]
    link = _FlakyLink(data, bad)
    part = tmp_path / "part"
    f = ManifestFile("w.bin", len(data), hashlib.sha256(data).hexdigest())
    hasher = hashlib.sha256()
    if bad > CRC_RETRIES:
        with pytest.raises(BackendError, match=r"chunk at offset 3000 of w.bin failed its CRC-32"):
            await copy._receive(link, f, part, 0, hasher)  # type: ignore[arg-type]
        return
    await copy._receive(link, f, part, 0, hasher)  # type: ignore[arg-type]
    assert link.offsets == [0, 3000] and part.read_bytes() == data
    assert hasher.hexdigest() == f.sha256


# ---------- the Hugging Face cache layout ----------


def _fake_hub(hub: Path, model_dir: Path, repo: str, rev: str) -> Path:
    """huggingface_hub's layout: blobs named by SHA-256 (hard links here), snapshot links."""
    root = hub / ("models--" + repo.replace("/", "--"))
    (root / "blobs").mkdir(parents=True)
    snap = root / "snapshots" / rev
    snap.mkdir(parents=True)
    for p in sorted(model_dir.iterdir()):
        blob = root / "blobs" / file_sha256(p)
        os.link(p, blob)
        (snap / p.name).symlink_to(Path("../../blobs") / blob.name)
    (root / "refs").mkdir()
    (root / "refs" / "main").write_text(rev)
    return snap


@pytest.mark.model
async def test_hf_cache_model_lands_in_the_hf_cache_under_the_same_id(
    models_dir: Path, tmp_path: Path
) -> None:
    repo, rev = "test-org/smol-copy", "0123abcd"
    snap = _fake_hub(tmp_path / "hub-a", models_dir / SMOL, repo, rev)
    src = start_node(
        dest_config(tmp_path, "s", scan_hf_cache=True, hf_cache_dir=tmp_path / "hub-a")
    )
    dst = start_node(
        dest_config(tmp_path, "d", scan_hf_cache=True, hf_cache_dir=tmp_path / "hub-b")
    )
    try:
        done = await copy_and_wait(dst.target, repo, src)
        assert done.state == "done", done.error
        copied = tmp_path / "hub-b" / "models--test-org--smol-copy"
        assert done.path == str(copied / "snapshots" / rev)
        assert (copied / "refs" / "main").read_text() == rev
        assert tree_digest(copied / "snapshots" / rev) == tree_digest(snap)
        async with NodeClient(dst.target) as client:
            listed = {m.id: m for m in await client.list_models()}
            assert listed[repo].source == "hf-cache"
            gone = await client.delete_model(repo)
        assert gone.path == str(copied) and gone.bytes_freed > 90_000_000
        assert not copied.exists()
        # rm of a model the node does not have: NOT_FOUND; of a config-named one: refused.
        async with NodeClient(dst.target) as client:
            with pytest.raises(ModelNotFound):
                await client.delete_model(repo)
    finally:
        dst.stop()
        src.stop()


async def test_rm_refuses_config_named_and_built_in_models(
    models_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    node = start_node(
        NodeConfig(
            grpc_port=0,
            home=home,
            models_dir=tmp_path / "models",
            scan_hf_cache=False,
            sim_models=(SimModelSpec("sim-1"),),
        )
    )
    try:
        core = node.server.core
        assert core is not None
        core.push_model_paths([str(models_dir / GGUF)])
        async with NodeClient(node.target) as client:
            deadline = time.monotonic() + 10
            while GGUF not in {m.id for m in await client.list_models()}:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.1)
            with pytest.raises(InvalidRequest, match="named by a config file"):
                await client.delete_model(GGUF)
            with pytest.raises(InvalidRequest, match="built into this node"):
                await client.delete_model("sim-1")
        assert (models_dir / GGUF).exists()
    finally:
        node.stop()


def test_cli_progress_line() -> None:
    from macmesh.transfer_progress import progress_line

    t = {"bytes_done": 41_200_000, "bytes_total": 98_400_000, "model": "m"}
    line = progress_line(t, 35_100_000)
    assert line == "[############..................]  41.9%  41.2/98.4 MB  35.1 MB/s  m"
    assert "preparing" in progress_line({"bytes_done": 0, "bytes_total": None}, None)


def test_cli_help_lists_copy_and_rm() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "macmesh", "models", "copy", "--help"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert out.returncode == 0 and "--limit" in out.stdout and "--no-wait" in out.stdout
