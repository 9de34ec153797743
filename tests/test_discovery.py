"""Bonjour discovery with real zeroconf on 127.0.0.1 (as python-zeroconf's own tests do).

Each test browses its own mesh name with fresh node ids, so another run of
these tests on the same machine (multicast on loopback is shared) is ignored.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import time
import uuid
from collections.abc import AsyncIterator, Callable

import pytest
from zeroconf.asyncio import AsyncZeroconf

from mesh.discovery import (
    PROTOCOL_VERSION,
    Announcement,
    Announcer,
    Browser,
    DuplicateNodeId,
    Peer,
    announce_addresses,
    pick_target,
)

LO = ["127.0.0.1"]
MDNS_GROUP = "224.0.0.251"


def loopback_multicast_problem() -> str:
    """Why multicast on 127.0.0.1 does not work here ("" when it does): a real probe."""
    rx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    tx = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    with rx, tx:
        try:
            rx.bind(("", 0))  # an ephemeral port: leaves 5353 and other mDNS users alone
            group = struct.pack("4s4s", socket.inet_aton(MDNS_GROUP), socket.inet_aton(LO[0]))
            rx.setsockopt(socket.IPPROTO_IP, socket.IP_ADD_MEMBERSHIP, group)
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_IF, socket.inet_aton(LO[0]))
            tx.setsockopt(socket.IPPROTO_IP, socket.IP_MULTICAST_LOOP, 1)
            tx.sendto(b"macmesh-probe", (MDNS_GROUP, rx.getsockname()[1]))
            rx.settimeout(1.0)
            data, _ = rx.recvfrom(64)
        except OSError as exc:
            return f"multicast on 127.0.0.1 fails ({exc}); try `ip link set lo multicast on`"
    return "" if data == b"macmesh-probe" else "multicast on 127.0.0.1 returned garbage"


@pytest.fixture(scope="module", autouse=True)
def _needs_loopback_multicast() -> None:
    if problem := loopback_multicast_problem():
        pytest.skip(problem)


class Seen:
    """Records a browser's callbacks."""

    def __init__(self) -> None:
        self.found: list[Peer] = []
        self.lost: list[Peer] = []

    def on_found(self, peer: Peer) -> None:
        self.found.append(peer)

    async def on_lost(self, peer: Peer) -> None:  # async, like NodeRegistry.remove
        self.lost.append(peer)

    async def until(self, what: str, check: Callable[[], bool], timeout: float = 5.0) -> float:
        """Wait for `check()`; returns the seconds it took."""
        start = time.monotonic()
        while not check():
            if time.monotonic() - start > timeout:
                pytest.fail(f"not within {timeout} s: {what}; found={self.found} lost={self.lost}")
            await asyncio.sleep(0.02)
        return time.monotonic() - start


@pytest.fixture
def mesh() -> str:
    return f"test-{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def browsing(mesh: str) -> AsyncIterator[tuple[Browser, Seen]]:
    seen = Seen()
    async with Browser(seen.on_found, seen.on_lost, mesh=mesh, interfaces=LO) as browser:
        yield browser, seen


def node(mesh: str, port: int, node_id: str = "", version: str = PROTOCOL_VERSION) -> Announcer:
    node_id = node_id or f"n-{uuid.uuid4().hex[:8]}"
    ann = Announcement(node_id=node_id, grpc_port=port, mesh=mesh, version=version, host=LO[0])
    return Announcer(ann, interfaces=LO)


async def test_found_then_lost_on_goodbye(mesh: str, browsing: tuple[Browser, Seen]) -> None:
    browser, seen = browsing
    announcer = node(mesh, 50123)
    await announcer.start()
    node_id = announcer.announcement.node_id
    await seen.until("found", lambda: bool(seen.found))
    (peer,) = seen.found
    assert peer == Peer(
        node_id=node_id,
        addresses=("127.0.0.1",),
        port=50123,
        mesh=mesh,
        proto=PROTOCOL_VERSION,
        target="127.0.0.1:50123",
    )
    assert browser.peers == (peer,)

    await announcer.close()
    await seen.until("lost after close", lambda: bool(seen.lost))
    assert seen.lost == [peer]
    assert not browser.peers


async def test_two_nodes_found_other_mesh_and_protocol_ignored(
    mesh: str, browsing: tuple[Browser, Seen]
) -> None:
    browser, seen = browsing
    ours = [node(mesh, 50001), node(mesh, 50002)]
    other_mesh = node(f"{mesh}-other", 50003)
    other_proto = node(mesh, 50004, version="99")
    everyone = [*ours, other_mesh, other_proto]
    await asyncio.gather(*(a.start() for a in everyone))
    try:
        names = {a: a.announcement.to_service_info().name for a in everyone}
        await seen.until("both found", lambda: len(seen.found) == 2)
        await seen.until(
            "others ignored",
            lambda: names[other_mesh] in browser.ignored and names[other_proto] in browser.ignored,
        )
        assert {(p.node_id, p.port) for p in seen.found} == {
            (a.announcement.node_id, a.announcement.grpc_port) for a in ours
        }
        assert "mesh" in browser.ignored[names[other_mesh]]
        assert "protocol '99'" in browser.ignored[names[other_proto]]
    finally:
        await asyncio.gather(*(a.close() for a in everyone))


async def test_restart_same_id_new_port(mesh: str, browsing: tuple[Browser, Seen]) -> None:
    browser, seen = browsing
    first = node(mesh, 50010)
    await first.start()
    node_id = first.announcement.node_id
    await seen.until("first found", lambda: bool(seen.found))
    await first.close()

    second = node(mesh, 50011, node_id=node_id)
    await second.start()  # the same id comes back: nobody holds the name any more
    try:
        await seen.until("found again", lambda: len(seen.found) == 2)
        assert [p.port for p in seen.lost] == [50010]
        assert [(p.node_id, p.port) for p in seen.found] == [(node_id, 50010), (node_id, 50011)]
        assert [p.target for p in browser.peers] == ["127.0.0.1:50011"]
    finally:
        await second.close()


async def test_changed_records_are_lost_then_found(
    mesh: str, browsing: tuple[Browser, Seen]
) -> None:
    """A node that crashed and came back (no goodbye) re-announces changed records."""
    browser, seen = browsing
    ann = Announcement(node_id=f"n-{uuid.uuid4().hex[:8]}", grpc_port=50020, mesh=mesh, host=LO[0])
    async with AsyncZeroconf(interfaces=LO) as zc:
        await (await zc.async_register_service(ann.to_service_info()))
        await seen.until("found", lambda: bool(seen.found))
        moved = Announcement(node_id=ann.node_id, grpc_port=50021, mesh=mesh, host=LO[0])
        await (await zc.async_update_service(moved.to_service_info()))
        await seen.until("found at the new port", lambda: len(seen.found) == 2)
        assert [p.port for p in seen.lost] == [50020]
        assert [p.port for p in browser.peers] == [50021]


async def test_a_live_duplicate_node_id_is_refused(mesh: str) -> None:
    async with node(mesh, 50030) as first:
        # A record multicast in the last second is repeated only a second later (RFC 6762
        # §14): let the announcement settle so that the check gets its answer at once.
        await asyncio.sleep(1.0)
        with pytest.raises(DuplicateNodeId, match=first.announcement.node_id):
            await node(mesh, 50031, node_id=first.announcement.node_id).start()


def test_announced_addresses_follow_the_bind_address() -> None:
    assert announce_addresses("127.0.0.1") == ["127.0.0.1"]
    assert announce_addresses("localhost") == ["127.0.0.1"]
    assert announce_addresses("10.1.2.3") == ["10.1.2.3"]
    everywhere = announce_addresses("0.0.0.0")
    assert everywhere and all(":" not in a for a in everywhere)
    # Loopback only when bound to it (or when the machine has no other address).
    assert "::1" not in announce_addresses("::")
    assert "127.0.0.1" not in everywhere or everywhere == ["127.0.0.1"]


def test_target_prefers_ipv4_and_keeps_the_ipv6_scope() -> None:
    assert pick_target(["fd00::5", "192.0.2.77"], 7) == "192.0.2.77:7"
    assert pick_target(["fe80::1%4", "fd00::5"], 7) == "[fd00::5]:7"
    assert pick_target(["fe80::1%4"], 7) == "[fe80::1%4]:7"
    assert pick_target(["127.0.0.1", "203.0.113.9"], 7) == "127.0.0.1:7"  # on a local subnet
