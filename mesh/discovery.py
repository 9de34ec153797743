"""Bonjour (mDNS / DNS-SD) discovery: nodes announce, coordinators browse.

A node registers `_macmesh._tcp.local.` with a TXT record that says who it is
(`id`, `mesh`, `port`, `proto`) and nothing secret. An announcement is trusted
for nothing but an address to try: whoever connects authenticates on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import ipaddress
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass

import ifaddr
from zeroconf import DNSQuestionType, InterfaceChoice, ServiceInfo, ServiceStateChange, Zeroconf
from zeroconf.asyncio import AsyncServiceBrowser, AsyncServiceInfo, AsyncZeroconf

log = logging.getLogger(__name__)

SERVICE_TYPE = "_macmesh._tcp.local."
PROTOCOL_VERSION = "1"
DEFAULT_MESH = "default"
RESOLVE_TIMEOUT = 3.0
QM = DNSQuestionType.QM

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
# Interface addresses to use (tests: ["127.0.0.1"]) or InterfaceChoice.All.
Interfaces = Sequence[str] | InterfaceChoice
# Called with a Peer; may return an awaitable (e.g. `NodeRegistry.remove`), which is awaited.
PeerCallback = Callable[["Peer"], object]


class DuplicateNodeId(RuntimeError):
    """Another live node on the network already announces this node id."""


def _label(node_id: str) -> str:
    """A DNS label (letters, digits, '-', at most 63 bytes) derived from a node id."""
    return re.sub(r"[^A-Za-z0-9-]+", "-", node_id).strip("-")[:63] or "node"


@dataclass(frozen=True, slots=True, kw_only=True)
class Announcement:
    """What a node announces. `host` is its gRPC bind address ("", 0.0.0.0, :: = all)."""

    node_id: str
    grpc_port: int
    mesh: str = DEFAULT_MESH
    version: str = PROTOCOL_VERSION
    host: str = ""
    addresses: tuple[str, ...] = ()  # explicit addresses; overrides those derived from `host`

    def to_service_info(self) -> ServiceInfo:
        """The DNS-SD records of this announcement."""
        label = _label(self.node_id)
        return ServiceInfo(
            SERVICE_TYPE,
            f"{label}.{SERVICE_TYPE}",
            port=self.grpc_port,
            properties={
                "id": self.node_id,
                "mesh": self.mesh,
                "port": str(self.grpc_port),
                "proto": self.version,
            },
            server=f"{label}.local.",
            parsed_addresses=list(self.addresses) or announce_addresses(self.host),
        )


def announce_addresses(host: str) -> list[str]:
    """The addresses to announce for a server bound to `host`.

    A specific address is announced as is (127.0.0.1 only when bound to it);
    a wildcard means every non-loopback interface address of its family.
    """
    if host == "localhost":
        host = "127.0.0.1"
    with contextlib.suppress(ValueError):  # a host name: fall through to every interface
        ip = ipaddress.ip_address(host)
        if not ip.is_unspecified:
            return [str(ip)]
    want6 = host != "0.0.0.0"  # "", [::] and host names listen on both families
    found: list[str] = []
    for adapter in ifaddr.get_adapters():
        for entry in adapter.ips:
            # ifaddr gives IPv6 as (address, flowinfo, scope_id); AAAA records carry no scope.
            addr: IPAddress = (
                ipaddress.IPv6Address(entry.ip[0])
                if isinstance(entry.ip, tuple)
                else ipaddress.IPv4Address(entry.ip)
            )
            if not addr.is_loopback and (want6 or addr.version == 4) and str(addr) not in found:
                found.append(str(addr))
    # A machine with no network at all can still run a one-machine mesh.
    return found or ["127.0.0.1"]


def pick_target(addresses: Iterable[str], port: int) -> str:
    """A `host:port` to dial: IPv4 on a local subnet first, then any IPv4, then IPv6.

    Link-local IPv6 keeps its scope (`[fe80::1%4]:port`): it means nothing without one.
    """
    ips = [ipaddress.ip_address(a) for a in addresses]
    if not ips:
        raise ValueError("no addresses")
    subnets = [
        ipaddress.ip_network(f"{e.ip}/{e.network_prefix}", strict=False)
        for a in ifaddr.get_adapters()
        for e in a.ips
        if isinstance(e.ip, str)
    ]

    def rank(ip: IPAddress) -> int:
        if ip.version == 4:
            on_link = any(ip in net for net in subnets)
            return (0 if not ip.is_link_local else 1) if on_link else 2
        return 4 if ip.is_link_local else 3

    best = min(ips, key=rank)
    return f"{best}:{port}" if best.version == 4 else f"[{best}]:{port}"


class Announcer:
    """Announces one node until closed. Use as an async context manager."""

    def __init__(
        self,
        announcement: Announcement,
        *,
        interfaces: Interfaces = InterfaceChoice.All,
        check_timeout: float = 2.0,
    ) -> None:
        self.announcement = announcement
        # Well over 1 s: a responder multicasts a record at most once a second (RFC 6762
        # §14), so a node that has just announced answers our check 1.0-1.5 s late.
        self._check_ms = int(check_timeout * 1000)
        self._interfaces = interfaces
        self._zc: AsyncZeroconf | None = None

    async def start(self) -> None:
        """Check the name is free, then announce; DuplicateNodeId if a live node holds it."""
        info = self.announcement.to_service_info()
        zc = AsyncZeroconf(interfaces=self._interfaces)
        try:
            # Only a live responder answers for a name, never a cache: a restarted node's
            # old records were withdrawn by its goodbye or died with it, so its id is free.
            # zeroconf's own probe asks QU, and a unicast answer to port 5353 may land on
            # another mDNS socket of this host (mDNSResponder, a second process) and be
            # missed; so ask QM (answers come by multicast) and skip that probe.
            taken = AsyncServiceInfo(SERVICE_TYPE, info.name)
            if await taken.async_request(zc.zeroconf, self._check_ms, question_type=QM):
                raise DuplicateNodeId(
                    f"node id {self.announcement.node_id!r} is already announced"
                    f" at {taken.parsed_addresses()} port {taken.port}"
                )
            await (await zc.async_register_service(info, cooperating_responders=True))
        except BaseException:
            await zc.async_close()
            raise
        self._zc = zc
        log.info("announcing %s on %s", info.name, info.parsed_addresses())

    async def close(self) -> None:
        """Send goodbyes (browsers drop us at once) and release the sockets."""
        zc, self._zc = self._zc, None
        if zc is not None:
            await zc.async_close()

    async def __aenter__(self) -> Announcer:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


@dataclass(frozen=True, slots=True)
class Peer:
    """A node found on the network; `target` is the address to dial."""

    node_id: str
    addresses: tuple[str, ...]
    port: int
    mesh: str
    proto: str
    target: str


def _peer_from(info: ServiceInfo, mesh: str) -> Peer | str:
    """The peer an answer describes, or why it is not one of ours."""
    props = info.decoded_properties
    node_id, proto, peer_mesh = (props.get(k) or "" for k in ("id", "proto", "mesh"))
    addresses = tuple(info.parsed_scoped_addresses())
    if proto != PROTOCOL_VERSION:
        return f"protocol {proto!r}, not {PROTOCOL_VERSION!r}"
    if peer_mesh != mesh:
        return f"mesh {peer_mesh!r}, not {mesh!r}"
    if not node_id or not info.port or not addresses:
        return "incomplete announcement (no id, port or address)"
    return Peer(node_id, addresses, info.port, mesh, proto, pick_target(addresses, info.port))


class Browser:
    """Follows the nodes of one mesh: `on_found(peer)` / `on_lost(peer)`.

    Callbacks run one at a time, in order, on the event loop that called `start`.
    A peer whose target changes is reported lost, then found again.
    """

    def __init__(
        self,
        on_found: PeerCallback,
        on_lost: PeerCallback,
        *,
        mesh: str = DEFAULT_MESH,
        interfaces: Interfaces = InterfaceChoice.All,
        resolve_timeout: float = RESOLVE_TIMEOUT,
    ) -> None:
        self.mesh = mesh
        self._on_found, self._on_lost = on_found, on_lost
        self._interfaces = interfaces
        self._timeout_ms = int(resolve_timeout * 1000)
        self._peers: dict[str, Peer] = {}  # service name -> peer reported found
        self._ignored: dict[str, str] = {}  # service name -> why
        self._resolving: dict[str, asyncio.Task[None]] = {}
        self._events: asyncio.Queue[tuple[PeerCallback, Peer]] = asyncio.Queue()
        self._zc: AsyncZeroconf | None = None
        self._browser: AsyncServiceBrowser | None = None
        self._dispatcher: asyncio.Task[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def peers(self) -> tuple[Peer, ...]:
        """The peers found and not lost."""
        return tuple(self._peers.values())

    @property
    def ignored(self) -> Mapping[str, str]:
        """Services seen but not followed (other mesh, other protocol, unusable): name -> why."""
        return dict(self._ignored)

    async def start(self) -> None:
        """Start browsing; callbacks follow as nodes come and go."""
        self._loop = asyncio.get_running_loop()
        self._dispatcher = asyncio.create_task(self._dispatch(), name="discovery callbacks")
        self._zc = AsyncZeroconf(interfaces=self._interfaces)
        self._browser = AsyncServiceBrowser(
            self._zc.zeroconf, SERVICE_TYPE, handlers=[self._on_change]
        )

    async def close(self) -> None:
        """Stop browsing; peers are not reported lost."""
        if self._browser is not None:
            await self._browser.async_cancel()
            self._browser = None
        tasks = [*self._resolving.values(), *([self._dispatcher] if self._dispatcher else [])]
        self._resolving.clear()
        self._dispatcher = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._zc is not None:
            await self._zc.async_close()
            self._zc = None

    async def __aenter__(self) -> Browser:
        await self.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def _on_change(
        self, zeroconf: Zeroconf, service_type: str, name: str, state_change: ServiceStateChange
    ) -> None:
        # zeroconf fires handlers from its own context; touch our state on our loop only.
        assert self._loop is not None
        self._loop.call_soon_threadsafe(self._handle, name, state_change)

    def _handle(self, name: str, change: ServiceStateChange) -> None:
        if self._browser is None:  # closed meanwhile
            return
        if (pending := self._resolving.pop(name, None)) is not None:
            pending.cancel()  # superseded by this newer event
        if change is ServiceStateChange.Removed:
            self._ignored.pop(name, None)
            self._drop(name)
            return
        task = asyncio.create_task(self._resolve(name), name=f"resolve {name}")
        self._resolving[name] = task
        task.add_done_callback(self._resolved)

    def _resolved(self, task: asyncio.Task[None]) -> None:
        name = task.get_name().removeprefix("resolve ")
        if self._resolving.get(name) is task:
            del self._resolving[name]
        if not task.cancelled() and (exc := task.exception()) is not None:
            log.error("resolving %s failed", name, exc_info=exc)

    async def _resolve(self, name: str) -> None:
        assert self._zc is not None
        info = AsyncServiceInfo(SERVICE_TYPE, name)
        if not await info.async_request(self._zc.zeroconf, self._timeout_ms, question_type=QM):
            log.warning("no answer resolving %s within %d ms", name, self._timeout_ms)
            return
        peer = _peer_from(info, self.mesh)
        if isinstance(peer, str):
            if self._ignored.get(name) != peer:
                log.info("ignoring %s: %s", name, peer)
            self._ignored[name] = peer
            self._drop(name)
            return
        self._ignored.pop(name, None)
        old = self._peers.get(name)
        self._peers[name] = peer
        if old is not None and old.target != peer.target:
            self._events.put_nowait((self._on_lost, old))
        if old is None or old.target != peer.target:
            log.info("found node %s at %s", peer.node_id, peer.target)
            self._events.put_nowait((self._on_found, peer))

    def _drop(self, name: str) -> None:
        if (peer := self._peers.pop(name, None)) is not None:
            log.info("lost node %s at %s", peer.node_id, peer.target)
            self._events.put_nowait((self._on_lost, peer))

    async def _dispatch(self) -> None:
        while True:
            callback, peer = await self._events.get()
            try:
                result = callback(peer)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                # A consumer's bug must not end discovery for every other node.
                log.exception("discovery callback failed for node %s", peer.node_id)
