"""The mesh with real processes on loopback: Bonjour, secrets, failures, two coordinators."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest

from coordinator.config import CoordinatorConfig
from proto import node_pb2 as pb
from proto import node_pb2_grpc as pb_grpc
from tests.conftest import RunningCoordinator, start_coordinator

pytestmark = pytest.mark.model

MACMESH = str(Path(sys.executable).parent / "macmesh")
SECRET = "lab-secret-" + "0" * 24


@dataclass
class NodeProc:
    """One `macmesh node` process; restartable under the same MACMESH_HOME."""

    home: Path
    args: list[str]
    secret: str
    proc: subprocess.Popen[str] | None = None
    target: str = ""
    http: str = ""
    lines: list[str] = field(default_factory=list)

    @property
    def node_id(self) -> str:
        return (self.home / "node_id").read_text().strip()

    def start(self) -> NodeProc:
        env = {**os.environ, "MACMESH_HOME": str(self.home), "MACMESH_SECRET": self.secret}
        env["PYTHONUNBUFFERED"] = "1"
        self.proc = subprocess.Popen(
            [MACMESH, "node", "--grpc-port", "0", "--no-hf-cache", *self.args],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
        )  # fmt: skip
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        match = re.search(r"node listening on (\S+)", line)
        assert match, f"node did not start: {line!r}"
        self.target = match.group(1)
        if "--coordinator" in self.args:
            line = self.proc.stdout.readline()
            http = re.search(r"coordinator listening on (\S+)", line)
            assert http, line
            self.http = http.group(1)
        return self

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> float:
    """Poll `check`; the seconds it took. Fails with `what` after `timeout`."""
    t0 = time.monotonic()
    while not check():
        assert time.monotonic() - t0 < timeout, f"not within {timeout}s: {what}"
        time.sleep(0.05)
    return time.monotonic() - t0


def nodes(url: str) -> dict[str, dict[str, Any]]:
    return {n["id"]: n for n in httpx.get(url + "/api/nodes").json()["nodes"]}


def online_ids(url: str) -> set[str]:
    return {i for i, n in nodes(url).items() if n["status"] == "online"}


def chat(url: str, model: str, max_tokens: int = 3) -> httpx.Response:
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "messages": messages}
    return httpx.post(url + "/v1/chat/completions", json=body, timeout=120)


@dataclass
class Mesh:
    name: str
    real: NodeProc
    sim: NodeProc
    coordinating: NodeProc
    stray: NodeProc
    coordinator: RunningCoordinator


@pytest.fixture(scope="module")
def mesh(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Mesh]:
    name = f"test-{uuid.uuid4().hex[:8]}"
    common = ["--mesh", name, "--bonjour-interface", "127.0.0.1"]
    base = tmp_path_factory.mktemp("mesh")
    procs = [
        NodeProc(base / "real", [*common, "--models-dir", str(models_dir), "--preload", "smollm2"],
                 SECRET),
        NodeProc(base / "sim", [*common, "--no-default-model", "--models-dir", str(base / "none"),
                                "--sim-model", "shared:50000:2000"], SECRET),
        NodeProc(base / "coord", [*common, "--no-default-model", "--models-dir", str(base / "none"),
                                  "--sim-model", "other:50000:2000", "--coordinator",
                                  "--http-port", "0"], SECRET),
        # Announces itself in the same mesh, serves the same model, wrong secret.
        NodeProc(base / "stray", [*common, "--no-default-model", "--models-dir", str(base / "none"),
                                  "--sim-model", "shared:50000:2000"], "not-the-" + SECRET),
    ]  # fmt: skip
    try:
        for p in procs:
            p.start()
        coordinator = start_coordinator(
            CoordinatorConfig(
                home=base / "coordinator",
                secret=SECRET.encode(),
                discovery=True,
                mesh=name,
                bonjour_interfaces=("127.0.0.1",),
            ),
            wait_nodes=0,
        )
        real, sim, coordinating, stray = procs
        yield Mesh(name, real, sim, coordinating, stray, coordinator=coordinator)
        coordinator.stop()
    finally:
        for p in procs:
            p.stop()


def test_bonjour_finds_every_node_and_rejects_the_stray(mesh: Mesh) -> None:
    url = mesh.coordinator.base_url
    good = {mesh.real.node_id, mesh.sim.node_id, mesh.coordinating.node_id}
    took = wait_until(lambda: online_ids(url) == good, 5, "all nodes visible via Bonjour")

    # A node that never proved the secret has no trusted id: it is listed by address.
    def stray() -> dict[str, Any]:
        return next((n for n in nodes(url).values() if n["address"] == mesh.stray.target), {})

    wait_until(lambda: stray().get("status") == "rejected", 15, "the stray shows as rejected")
    assert took < 5
    assert "wrong mesh secret" in (stray()["error"] or "")


def test_requests_land_only_where_the_model_is(mesh: Mesh) -> None:
    url = mesh.coordinator.base_url
    wait_until(lambda: len(online_ids(url)) == 3, 5, "mesh up")
    r = chat(url, "smollm2")
    assert r.status_code == 200, r.text
    assert r.headers["x-macmesh-node"] == mesh.real.node_id
    assert (r.json()["choices"][0]["message"]["content"] or "").startswith("The capital")
    for _ in range(6):
        r = chat(url, "shared")
        assert r.status_code == 200, r.text
        # The stray serves "shared" too, but never proved the secret: it gets nothing.
        assert r.headers["x-macmesh-node"] == mesh.sim.node_id
    r = chat(url, "other")
    assert r.headers["x-macmesh-node"] == mesh.coordinating.node_id


def test_a_second_coordinator_serves_too(mesh: Mesh) -> None:
    other = mesh.coordinating.http
    wait_until(lambda: len(online_ids(other)) == 3, 5, "the node's coordinator sees the mesh")
    assert chat(other, "shared").headers["x-macmesh-node"] == mesh.sim.node_id
    assert chat(mesh.coordinator.base_url, "other").status_code == 200


def test_calls_without_the_secret_are_rejected(mesh: Mesh) -> None:
    async def call() -> grpc.StatusCode:
        async with grpc.aio.insecure_channel(mesh.sim.target) as channel:
            try:
                await pb_grpc.NodeStub(channel).ListModels(pb.ListModelsRequest())
            except grpc.aio.AioRpcError as exc:
                return exc.code()
        return grpc.StatusCode.OK

    import asyncio

    assert asyncio.run(call()) == grpc.StatusCode.UNAUTHENTICATED


def test_kill_9_then_restart_under_the_same_id(mesh: Mesh) -> None:
    url = mesh.coordinator.base_url
    wait_until(lambda: len(online_ids(url)) == 3, 5, "mesh up")
    node_id = mesh.real.node_id
    mesh.real.kill9()
    took = wait_until(lambda: node_id not in online_ids(url), 5, "the dead node is dropped")
    t0 = time.monotonic()
    r = chat(url, "smollm2")
    assert time.monotonic() - t0 < 1.0, "no node for the model: answer at once"
    assert r.status_code == 503 and r.headers["retry-after"], r.text
    a = httpx.post(
        url + "/v1/messages",
        json={"model": "smollm2", "max_tokens": 3, "messages": [{"role": "user", "content": "x"}]},
    )
    assert a.status_code == 503 and a.json()["error"]["type"] == "overloaded_error"
    mesh.real.start()
    assert mesh.real.node_id == node_id
    back = wait_until(lambda: node_id in online_ids(url), 5, "the restarted node rejoins")
    r = chat(url, "smollm2")
    assert r.status_code == 200 and r.headers["x-macmesh-node"] == node_id
    print(f"dropped after {took:.2f}s, rejoined after {back:.2f}s")
