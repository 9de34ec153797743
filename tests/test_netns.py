"""A node on its own network host (a network namespace joined by a veth pair).

Needs root and `ip netns` (iproute2); skipped with the reason otherwise. The
addresses belong to namespaces this test creates and removes itself.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from tests.conftest import start_coordinator

MACMESH = str(Path(sys.executable).parent / "macmesh")
SECRET = "netns-secret-" + "1" * 20


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


@pytest.fixture
def netns() -> Iterator[tuple[str, str, str]]:
    """(namespace, coordinator-side IP, node-side IP), torn down afterwards."""
    if shutil.which("ip") is None:
        pytest.skip("iproute2 (`ip`) is not installed")
    tag = uuid.uuid4().hex[:6]
    ns, host_if, ns_if = f"mm-{tag}", f"mm{tag}a", f"mm{tag}b"
    subnet = 200 + int(tag[:2], 16) % 50
    host_ip, ns_ip = f"10.231.{subnet}.1", f"10.231.{subnet}.2"
    made = _ip("netns", "add", ns)
    if made.returncode != 0:
        pytest.skip(f"cannot create a network namespace here: {made.stderr.strip()}")
    try:
        steps = [
            ("link", "add", host_if, "type", "veth", "peer", "name", ns_if),
            ("link", "set", ns_if, "netns", ns),
            ("addr", "add", f"{host_ip}/24", "dev", host_if),
            ("link", "set", host_if, "up", "multicast", "on"),
            ("-n", ns, "addr", "add", f"{ns_ip}/24", "dev", ns_if),
            ("-n", ns, "link", "set", ns_if, "up", "multicast", "on"),
            ("-n", ns, "link", "set", "lo", "up"),
        ]
        for step in steps:
            out = _ip(*step)
            if out.returncode != 0:
                pytest.skip(f"cannot wire the namespace (ip {' '.join(step)}): {out.stderr}")
        yield ns, host_ip, ns_ip
    finally:
        _ip("link", "del", host_if)
        _ip("netns", "del", ns)


def _node(ns: str, ns_ip: str, home: Path, mesh: str, secret: str | None) -> subprocess.Popen[str]:
    env = {**os.environ, "MACMESH_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    env.pop("MACMESH_SECRET", None)
    if secret:
        env["MACMESH_SECRET"] = secret
    return subprocess.Popen(
        ["ip", "netns", "exec", ns, MACMESH, "node", "--host", ns_ip, "--grpc-port", "0",
         "--no-hf-cache", "--no-default-model", "--models-dir", str(home / "m"),
         "--mesh", mesh, "--bonjour-interface", ns_ip, "--sim-model", "far:50000:2000"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip


def test_node_in_another_namespace(netns: tuple[str, str, str], tmp_path: Path) -> None:
    ns, host_ip, ns_ip = netns
    mesh = f"netns-{uuid.uuid4().hex[:6]}"
    # Without a secret a node refuses a non-loopback address.
    open_node = _node(ns, ns_ip, tmp_path / "open", mesh, None)
    _, err = open_node.communicate(timeout=60)
    assert open_node.returncode == 1 and "without a mesh secret" in err

    proc = _node(ns, ns_ip, tmp_path / "node", mesh, SECRET)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        assert match and match.group(1).startswith(ns_ip), line
        coord = start_coordinator(
            CoordinatorConfig(
                home=tmp_path / "coord",
                secret=SECRET.encode(),
                discovery=True,
                mesh=mesh,
                bonjour_interfaces=(host_ip,),
            ),
            wait_nodes=0,
        )
        try:
            deadline = time.monotonic() + 10
            while httpx.get(coord.base_url + "/health").json()["nodes_online"] < 1:
                assert time.monotonic() < deadline, "the namespaced node was not found by Bonjour"
                time.sleep(0.1)
            (node,) = httpx.get(coord.base_url + "/api/nodes").json()["nodes"]
            assert node["address"].startswith(ns_ip)
            body = {"model": "far", "max_tokens": 4, "messages": [{"role": "user", "content": "x"}]}
            r = httpx.post(coord.base_url + "/v1/chat/completions", json=body, timeout=30)
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 4
        finally:
            coord.stop()
    finally:
        proc.terminate()
        proc.wait(20)
