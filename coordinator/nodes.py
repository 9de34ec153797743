"""The one owner of the coordinator's view of the mesh.

Each known node gets a `NodeClient` and a task that follows its `WatchState`
stream; nodes push, coordinators never poll per request. A node whose state
is older than `stale_after` seconds (or whose stream broke) is offline until
its stream comes back; the watcher reconnects with backoff.

Nodes push at least every `heartbeat_ms` (1 s), so `stale_after` (2.5 s) takes a
node that hangs with its connection open out of rotation within 1.5 s of its
first missed push. A node that flaps (out of rotation twice within `FLAP_WINDOW`)
gets no new requests after it comes back until it has pushed steadily for
`SETTLE_SECONDS`.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass, field

import grpc

from mesh.auth import MeshSecret
from mesh.client import NodeClient
from mesh.errors import InvalidRequest, MeshError, Unauthenticated
from mesh.types import ModelInfo, NodeState
from routing.prefix import PrefixIndex

log = logging.getLogger(__name__)

# A node that failed authentication is retried this rarely (its secret may get fixed).
REJECTED_RETRY_SECONDS = 10.0
HEARTBEAT_MS = 1000
STALE_AFTER = 2.5
# Flap damping: this many outages within FLAP_WINDOW seconds mean a flapping node, which
# must then push state for SETTLE_SECONDS before it is routed to again.
FLAP_OUTAGES = 2
FLAP_WINDOW = 60.0
SETTLE_SECONDS = 3.0


@dataclass
class NodeView:
    """What this coordinator knows about one node."""

    target: str
    client: NodeClient
    state: NodeState | None = None
    last_seen: float = 0.0
    error: str = ""
    # Streams this coordinator has open there (load before the next state push).
    inflight: int = 0
    # Uncached prompt tokens of those streams not yet past their first token: prefill
    # work there that the node's own report may not show yet.
    inflight_prefill: int = 0
    # Failed mutual authentication: never routed to, shown as rejected.
    rejected: bool = False
    # Found by Bonjour (vs a static peer): removed when it says goodbye.
    discovered: bool = False
    # When it last went out of rotation (monotonic), recent ones first; and, for a node
    # that flaps, when it may be routed to again.
    outages: list[float] = field(default_factory=list)
    settle_until: float = 0.0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    @property
    def node_id(self) -> str:
        return self.state.node_id if self.state else self.target

    def status(self, stale_after: float) -> str:
        """online | draining | offline | rejected | connecting."""
        if self.rejected:
            return "rejected"
        if self.state is None:
            return "offline" if self.error else "connecting"
        now = time.monotonic()
        fresh = now - self.last_seen < stale_after
        if self.state.draining and fresh:  # a stopped node's last word was "draining"
            return "draining"
        if fresh and now < self.settle_until:
            return "settling"
        return "online" if self.online(stale_after) else "offline"

    def online(self, stale_after: float) -> bool:
        """In rotation: reporting, fresh, not draining, and (after flapping) settled."""
        now = time.monotonic()
        return (
            self.state is not None
            and not self.rejected
            and not self.state.draining
            and now - self.last_seen < stale_after
            and now >= self.settle_until
        )

    def reported(self, now: float, stale_after: float) -> None:
        """A state push arrived at `now`: note an outage it ends, and damp a flapping node."""
        if self.state is None:  # the first ever: nothing to recover from
            return
        if self.last_seen and now - self.last_seen < stale_after:
            return  # steady
        self.outages = [t for t in self.outages if now - t < FLAP_WINDOW]
        self.outages.append(now)
        if len(self.outages) >= FLAP_OUTAGES:
            self.settle_until = now + SETTLE_SECONDS
            log.warning(
                "node %s is flapping (%d outages in %.0f s): no new requests for %.0f s",
                self.node_id,
                len(self.outages),
                FLAP_WINDOW,
                SETTLE_SECONDS,
            )

    def model(self, model_id: str) -> ModelInfo | None:
        if self.state is None:
            return None
        return next((m for m in self.state.models if m.id == model_id), None)

    @property
    def load(self) -> int:
        """Queued work there: running + waiting per its last state, or our own count."""
        reported = (self.state.running + self.state.waiting) if self.state else 0
        return max(reported, self.inflight)


class NodeRegistry:
    """Known nodes and their live state."""

    def __init__(
        self,
        peers: tuple[str, ...] = (),
        *,
        heartbeat_ms: int = HEARTBEAT_MS,
        stale_after: float = STALE_AFTER,
        secret: bytes | MeshSecret | None = None,
        credentials: grpc.ChannelCredentials | None = None,
    ) -> None:
        self.heartbeat_ms = heartbeat_ms
        self.stale_after = stale_after
        self._secret = secret
        self._credentials = credentials
        self._nodes: dict[str, NodeView] = {}
        self._peers = peers
        self._background: set[asyncio.Task[None]] = set()
        # Every model some node has served since start -> when last seen: a model
        # whose nodes are all down is "unavailable, retry", not "unknown".
        self.known_models: dict[str, float] = {}
        self._changed = asyncio.Event()
        # Block hash -> views (by target) whose prompt caches hold it.
        self.prefix = PrefixIndex()
        # Models the config files name by path: sent to every node on each (re)connect.
        self.model_paths: tuple[str, ...] = ()

    async def start(self) -> None:
        for target in self._peers:
            self.add(target)

    def add(self, target: str, *, discovered: bool = False) -> NodeView:
        """Start following a node (idempotent). Only an address to try: the node must
        prove it knows the mesh secret before it gets any traffic."""
        view = self._nodes.get(target)
        if view is None:
            client = NodeClient(target, secret=self._secret, credentials=self._credentials)
            view = NodeView(target=target, client=client, discovered=discovered)
            view._task = asyncio.create_task(self._watch(view), name=f"watch {target}")
            self._nodes[target] = view
        return view

    def set_model_paths(self, paths: tuple[str, ...]) -> None:
        """New config paths: every node's state stream reopens to carry them."""
        if paths == self.model_paths:
            return
        self.model_paths = paths
        log.info("model paths from the config files: %s", ", ".join(paths) or "none")
        for view in self._nodes.values():
            old = view._task
            if old is not None:
                # It ends at its next await (the view keeps its state meanwhile); held
                # until then so it is not collected mid-cancel.
                old.cancel()
                self._background.add(old)
                old.add_done_callback(self._background.discard)
            view._task = asyncio.create_task(self._watch(view), name=f"watch {view.target}")

    async def remove(self, target: str) -> None:
        view = self._nodes.pop(target, None)
        if view is not None:
            await self._stop(view)

    async def close(self) -> None:
        views = list(self._nodes.values())
        self._nodes.clear()
        await asyncio.gather(*(self._stop(v) for v in views))

    async def _stop(self, view: NodeView) -> None:
        self.prefix.drop_node(view.target)
        if view._task is not None:
            view._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await view._task
        await view.client.close()

    async def _watch(self, view: NodeView) -> None:
        backoff = 0.2
        while True:
            try:
                async for state in view.client.watch_state(self.heartbeat_ms, self.model_paths):
                    if view.state is None or view.error:
                        log.info("node %s (%s) is up", state.node_id, view.target)
                        self._forget_stale_twins(view, state.node_id)
                    now = time.monotonic()
                    view.reported(now, self.stale_after)
                    view.state, view.last_seen, view.error = state, now, ""
                    self.prefix.set_node(view.target, state.cache)
                    for m in state.models:
                        self.known_models[m.id] = view.last_seen
                    view.rejected = False
                    backoff = 0.2
                    self._notify()
                view.error = "state stream ended"
                view.last_seen = 0.0  # a broken stream means offline now, not when stale
                self.prefix.drop_node(view.target)
            except Unauthenticated as exc:
                if not view.rejected:
                    log.warning("node at %s rejected: %s", view.target, exc.message)
                view.rejected, view.error, view.state = True, exc.message, None
                self.prefix.drop_node(view.target)
                backoff = REJECTED_RETRY_SECONDS  # it may be fixed; don't hammer it
            except MeshError as exc:
                if not view.error:
                    log.warning("node %s unreachable: %s", view.target, exc.message)
                view.error = exc.message
                view.last_seen = 0.0
                self.prefix.drop_node(view.target)
            self._notify()
            await asyncio.sleep(backoff)
            backoff = max(backoff, min(backoff * 2, 2.0))

    def _forget_stale_twins(self, view: NodeView, node_id: str) -> None:
        """A restarted node shows up at a new address: drop its old, dead entry."""
        for other in list(self._nodes.values()):
            if (
                other is not view
                and other.discovered
                and other.node_id == node_id
                and not other.online(self.stale_after)
            ):
                log.info("node %s moved from %s to %s", node_id, other.target, view.target)
                self._nodes.pop(other.target, None)
                task = asyncio.create_task(self._stop(other))
                self._background.add(task)
                task.add_done_callback(self._background.discard)

    def _notify(self) -> None:
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_changed(self, timeout: float) -> None:
        """Wait for any node's state to change (or `timeout`)."""
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._changed.wait(), timeout)

    def nodes(self) -> list[NodeView]:
        return list(self._nodes.values())

    def online(self) -> list[NodeView]:
        """Online nodes, one view per node id (a node found twice counts once)."""
        best: dict[str, NodeView] = {}
        for v in self._nodes.values():
            if v.online(self.stale_after):
                seen = best.get(v.node_id)
                if seen is None or v.last_seen > seen.last_seen:
                    best[v.node_id] = v
        return list(best.values())

    def find(self, node: str, field: str = "node") -> NodeView:
        """The online node with id or address `node` (what `--node` flags name).

        Raises InvalidRequest naming `field` and the online nodes when there is none.
        """
        online = self.online()
        for view in online:
            if node in (view.node_id, view.target):
                return view
        names = ", ".join(sorted(v.node_id for v in online)) or "none"
        raise InvalidRequest(f"no online node {node!r} (online: {names})", field=field)

    def served_models(self) -> dict[str, list[NodeView]]:
        """Model id -> online nodes that can serve it (loaded or loadable)."""
        out: dict[str, list[NodeView]] = {}
        for view in self.online():
            assert view.state is not None
            for m in view.state.models:
                out.setdefault(m.id, []).append(view)
        return out
