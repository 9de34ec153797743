"""Model lifetimes across the mesh: load where it fits (evicting idle models), unload on TTL.

`Placer.ensure_loaded` runs when a request names a model that no online node
has loaded: it picks the node by `routing.placement.place` (files there, room
there, or room after unloading idle, unpinned models, least recently used
first), unloads those, loads the model, and returns the node. Loads are
single-flight per model on this coordinator: a burst of first requests waits
(at most `load_wait` seconds) for the one load; nodes single-flight their own
loads too, so two coordinators loading at once load once per node.

`Placer.reap` unloads loaded models idle past their TTL (`model_settings.json`,
alias and tier `ttl`; pinned models never). Every unload the placer asks for
is `if_idle`: the node refuses it while a request for the model is in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass

from coordinator.nodes import NodeRegistry, NodeView
from coordinator.settings import SettingsStore
from mesh.errors import MeshError, ModelLoadError, Unavailable
from routing.aliases import Resolution
from routing.placement import NodeRoom, NoRoom, Placement, Resident, place

log = logging.getLogger(__name__)

# ModelInfo.backend of a node group's model (node.backends.group): not loaded or
# unloaded like a model; its members' memory shows as their ranks' shares.
GROUP_BACKEND = "group"

# How long a request waits for its model to load before it gets a retryable 503.
DEFAULT_LOAD_WAIT = 300.0
# How often idle models are checked against their TTL.
REAP_SECONDS = 1.0


@dataclass(frozen=True, slots=True)
class Loaded:
    """Where a cold model was loaded, and why there (for the header and the log)."""

    node: NodeView
    why: str
    seconds: float


class Placer:
    """Loads models where they fit and unloads idle ones; one per coordinator."""

    def __init__(
        self,
        registry: NodeRegistry,
        settings: SettingsStore,
        *,
        load_wait: float = DEFAULT_LOAD_WAIT,
    ) -> None:
        self.registry = registry
        self.settings = settings
        self.load_wait = load_wait
        self._loads: dict[str, asyncio.Task[Loaded]] = {}
        # (node target, model) that refused an idle unload (built in): not retried
        # until the model is busy again.
        self._sticky: set[tuple[str, str]] = set()
        # Counters for tests and the admin API.
        self.loads_started = 0
        self.evictions = 0
        self.ttl_unloads = 0

    # ---------- placement ----------

    def rooms(self, model: str, views: list[NodeView]) -> tuple[int, list[NodeRoom]]:
        """The model's estimated size and each candidate node's memory, from their states."""
        need = 0
        rooms: list[NodeRoom] = []
        for v in views:
            if v.state is None:
                continue
            info = v.model(model)
            if info is not None:
                need = max(need, info.estimated_bytes or info.size_bytes)
            busy = {x.model for x in v.state.load if x.running or x.waiting}
            residents = tuple(
                Resident(
                    model=m.id,
                    bytes=m.estimated_bytes or m.memory_bytes or m.size_bytes,
                    idle_seconds=m.idle_seconds,
                    busy=m.id in busy or m.idle_seconds <= 0,
                    pinned=self.settings.lifetime(m.id).pin,
                )
                for m in v.state.models
                if m.loaded and m.backend != GROUP_BACKEND  # counted as its rank's share
            ) + tuple(
                # A node group's share here: never evicted (`macmesh groups rm` stops it).
                Resident(
                    model=f"group:{g.name}",
                    bytes=g.memory_bytes,
                    idle_seconds=0.0,
                    busy=True,
                    pinned=True,
                )
                for g in v.state.groups
                if g.state != "down"
            )
            mem = v.state.memory
            rooms.append(
                NodeRoom(
                    node_id=v.node_id,
                    budget_bytes=mem.budget_bytes,
                    available_bytes=mem.available_bytes,
                    total_bytes=mem.total_bytes,
                    loaded=residents,
                )
            )
        return need, rooms

    def plan(self, model: str, views: list[NodeView]) -> Placement | NoRoom:
        """Where `model` would load now (no side effects): for previews and the admin API."""
        need, rooms = self.rooms(model, views)
        return place(model, need, rooms)

    async def ensure_loaded(self, res: Resolution, views: list[NodeView]) -> Loaded:
        """Load `res.model` on the node placement picks (once per burst); raises if none fits."""
        task = self._loads.get(res.model)
        if task is None:
            task = asyncio.create_task(self._load(res.model, views), name=f"load {res.model}")
            self._loads[res.model] = task
            task.add_done_callback(lambda _: self._loads.pop(res.model, None))
        try:
            # Shielded: a caller that gives up does not cancel the load the others wait on.
            return await asyncio.wait_for(asyncio.shield(task), self.load_wait)
        except TimeoutError:
            raise Unavailable(
                f"model {res.model!r} is still loading after {self.load_wait:.0f}s; retry later"
            ) from None

    async def _load(self, model: str, views: list[NodeView]) -> Loaded:
        self.loads_started += 1
        t0 = time.perf_counter()
        decision = self.plan(model, views)
        if isinstance(decision, NoRoom):
            log.warning("placement: %s", decision.message)
            raise Unavailable(decision.message)
        by_id = {v.node_id: v for v in views}
        view = by_id[decision.node_id]
        for victim in decision.evict:
            try:
                await view.client.unload_model(victim, if_idle=True)
            except ModelLoadError as err:  # it became busy since the node's last report
                raise Unavailable(
                    f"model {model!r}: {view.node_id} needs {victim!r} unloaded to make room, "
                    f"but {err.message}; retry shortly"
                ) from None
            self.evictions += 1
            log.info(
                "placement: unloaded %s on %s to make room for %s", victim, view.node_id, model
            )
        await view.client.load_model(model)
        seconds = time.perf_counter() - t0
        log.info(
            "placement: loaded %s on %s in %.2fs (%s)", model, view.node_id, seconds, decision.why
        )
        return Loaded(view, decision.why, seconds)

    # ---------- idle TTLs ----------

    async def reap(self) -> int:
        """Unload every loaded model idle past its TTL; returns how many were unloaded."""
        unloaded = 0
        for view in self.registry.online():
            assert view.state is not None
            for m in view.state.models:
                key = (view.target, m.id)
                if not m.loaded or m.idle_seconds <= 0 or m.backend == GROUP_BACKEND:
                    self._sticky.discard(key)
                    continue
                life = self.settings.lifetime(m.id)
                if life.pin or life.ttl is None or m.idle_seconds < life.ttl or key in self._sticky:
                    continue
                try:
                    was = await view.client.unload_model(m.id, if_idle=True)
                except ModelLoadError:
                    continue  # a request arrived meanwhile: idle again later
                except MeshError as err:
                    log.warning("ttl: cannot unload %s on %s: %s", m.id, view.node_id, err.message)
                    continue
                if not was:
                    self._sticky.add(key)  # e.g. a built-in model that never unloads
                    continue
                unloaded += 1
                self.ttl_unloads += 1
                log.info(
                    "ttl: unloaded %s on %s after %.0fs idle (ttl %.0fs)",
                    m.id,
                    view.node_id,
                    m.idle_seconds,
                    life.ttl,
                )
        return unloaded

    async def run(self) -> None:
        """Reap idle models until cancelled."""
        while True:
            with contextlib.suppress(MeshError):
                await self.reap()
            await asyncio.sleep(REAP_SECONDS)
