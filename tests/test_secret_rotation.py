"""Mesh secret rotation without downtime (mesh.auth.MeshSecret, rotate_secret): two
simulated nodes and a coordinator, each with its own home, under continuous load while the
secret rotates on one node, then the coordinator, then the other node; no request fails.
After the window the old secret is refused."""

from __future__ import annotations

import asyncio
import os
import stat
import threading
import time
import uuid
from pathlib import Path

import httpx
import pytest

from coordinator.config import CoordinatorConfig
from mesh.auth import (
    KEY_FILE,
    PREVIOUS_FILE,
    AuthConfigError,
    MeshSecret,
    load_secret,
    rotate_secret,
)
from mesh.client import NodeClient
from mesh.errors import Unauthenticated
from tests.conftest import RunningNode, start_coordinator, start_sim_node

OLD = "old-secret-0123456789abcdef0123"
NEW = "new-secret-0123456789abcdef0123"


def home_with(path: Path, secret: str) -> Path:
    path.mkdir(parents=True)
    (path / KEY_FILE).write_text(secret + "\n")
    (path / KEY_FILE).chmod(0o600)
    return path


def sim_node(home: Path, node_id: str) -> RunningNode:
    secret = MeshSecret.from_home(home)
    assert secret is not None
    return start_sim_node(home, "sim:20000:400", node_id=node_id, secret=secret)


def end_window(home: Path) -> None:
    """What the window's end does (without waiting an hour): the expiry is past."""
    old = (home / PREVIOUS_FILE).read_text().splitlines()[0]
    (home / PREVIOUS_FILE).write_text(f"{old}\nexpires={int(time.time()) - 1}\n")


async def lists_models(target: str, secret: bytes) -> bool:
    async with NodeClient(target, secret=secret, timeout=5) as client:
        try:
            await client.list_models()
        except Unauthenticated:
            return False
    return True


def test_secret_rotates_under_load_without_a_failed_request(tmp_path: Path) -> None:
    h1 = home_with(tmp_path / "n1", OLD)
    h2 = home_with(tmp_path / "n2", OLD)
    hc = home_with(tmp_path / "c", OLD)
    n1, n2 = sim_node(h1, "n1"), sim_node(h2, "n2")
    coord = start_coordinator(
        CoordinatorConfig(
            home=hc,
            peers=(n1.target, n2.target),
            routing_policy="round-robin",  # both nodes serve throughout
            secret=MeshSecret.from_home(hc),
        ),
        wait_nodes=2,
    )
    ok = 0
    failures: list[str] = []
    stop = threading.Event()
    lock = threading.Lock()

    def load(i: int) -> None:
        nonlocal ok
        with httpx.Client(base_url=coord.base_url, timeout=30) as http:
            n = 0
            while not stop.is_set():
                n += 1
                body = {
                    "model": "sim",
                    "messages": [{"role": "user", "content": f"{i} {n} {uuid.uuid4().hex}"}],
                    "max_tokens": 8,
                    "stream": n % 2 == 0,
                }
                try:
                    r = http.post("/v1/chat/completions", json=body)
                    good = r.status_code == 200 and "error" not in r.text
                    detail = f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as exc:
                    good, detail = False, repr(exc)
                with lock:
                    if good:
                        ok += 1
                    else:
                        failures.append(detail)

    def served() -> int:
        return ok

    threads = [threading.Thread(target=load, args=(i,)) for i in range(4)]
    try:
        for t in threads:
            t.start()

        def settle() -> None:  # past the 1 s reload check, with requests flowing
            before = served()
            time.sleep(1.3)
            assert served() > before

        settle()
        rotate_secret(h1, NEW)  # a node first
        settle()
        # In the window: node 1 takes both secrets; node 2 still only the old one.
        assert asyncio.run(lists_models(n1.target, OLD.encode()))
        assert asyncio.run(lists_models(n1.target, NEW.encode()))
        assert not asyncio.run(lists_models(n2.target, NEW.encode()))
        rotate_secret(hc, NEW)  # the coordinator signs with the new one (and the old)
        settle()
        rotate_secret(h2, NEW)  # the last node
        settle()
        for home in (h1, h2, hc):
            end_window(home)
        settle()
        settle()
        # After the window: the old secret is refused everywhere, the new one works.
        for target in (n1.target, n2.target):
            assert not asyncio.run(lists_models(target, OLD.encode()))
            assert asyncio.run(lists_models(target, NEW.encode()))
        health = httpx.get(coord.base_url + "/health").json()
        assert health["nodes_online"] == 2
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        coord.stop()
        n1.stop()
        n2.stop()
    assert not failures, failures[:5]
    assert ok > 20


def test_rotate_secret_files(tmp_path: Path) -> None:
    home = home_with(tmp_path / "h", OLD)
    with pytest.raises(AuthConfigError, match="nothing to rotate"):
        rotate_secret(home, OLD)
    with pytest.raises(AuthConfigError, match="too short"):
        rotate_secret(home, "short")
    rotate_secret(home, None, window=60)
    new = load_secret(home, env={})
    assert new is not None and new != OLD.encode() and len(new) == 64
    previous = (home / PREVIOUS_FILE).read_text().splitlines()
    assert previous[0] == OLD and previous[1].startswith("expires=")
    assert abs(int(previous[1].removeprefix("expires=")) - (time.time() + 60)) < 5
    for name in (KEY_FILE, PREVIOUS_FILE):
        assert stat.S_IMODE(os.stat(home / name).st_mode) == 0o600
    secret = MeshSecret.from_home(home)
    assert secret is not None
    assert secret.current == new and secret.accepted() == (new, OLD.encode())
    # Without a previous secret (or past its expiry) only the current one is accepted.
    fixed = MeshSecret(b"x" * 16)
    assert fixed.accepted() == (b"x" * 16,)
    with pytest.raises(AuthConfigError, match="to rotate"):
        rotate_secret(tmp_path / "empty")


def test_a_bad_file_keeps_the_secret_in_force(tmp_path: Path) -> None:
    home = home_with(tmp_path / "h", OLD)
    secret = MeshSecret.from_home(home)
    assert secret is not None
    (home / KEY_FILE).write_text("short\n")
    time.sleep(1.1)
    assert secret.current == OLD.encode()  # logged, not applied
    (home / KEY_FILE).write_text(NEW + "\n")
    time.sleep(1.1)
    assert secret.current == NEW.encode()


def test_cli_init_rotate(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from macmesh.cli import main

    home = home_with(tmp_path / "h", OLD)
    monkeypatch.setenv("MACMESH_HOME", str(home))
    monkeypatch.delenv("MACMESH_SECRET", raising=False)
    new_file = tmp_path / "copied-secret"
    new_file.write_text(NEW + "\n")
    assert main(["init", "--rotate", "--from", str(new_file), "--window", "120"]) == 0
    assert load_secret(home, env={}) == NEW.encode()
    assert (home / PREVIOUS_FILE).read_text().startswith(OLD + "\n")
    assert main(["init", "--window", "5"]) == 1  # --window only with --rotate
