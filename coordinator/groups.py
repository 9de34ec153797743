"""Node groups seen from a coordinator: form, list and remove them through the members' agents.

The nodes hold the truth: each reports its rank of every group in its state
(`NodeState.groups`), so any coordinator lists the same groups and a group
outlives the coordinator that formed it. Forming is two rounds over the
members' agents: `CheckGroupRank` on every member (files, architecture, heads,
memory; each reserves its ring port) before anything starts, then
`StartGroupRank` with the shared host list and a fresh group token; rank 0's
answer comes once the whole group has loaded. Any failure stops every rank
already started. Rank 0's node then serves the group's model like any other.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from coordinator.nodes import NodeRegistry, NodeView
from mesh.errors import InvalidRequest, MeshError, Unavailable, from_code
from mesh.types import GroupRank
from proto import node_pb2 as pb
from routing.placement import NodeRoom, NoRoom, place_group

log = logging.getLogger(__name__)

STRATEGIES = ("tensor", "pipeline")
BACKENDS = ("ring", "jaccl")
# How long forming may take: every member loads its shard (a big model: minutes).
FORM_TIMEOUT = 900.0


@dataclass(frozen=True, slots=True)
class RankView:
    """One rank as its node reports it, with that node's liveness."""

    node: str
    online: bool
    report: GroupRank


@dataclass(slots=True)
class GroupView:
    """A group as the coordinator lists it: its ranks, and one state for the whole."""

    name: str
    model: str
    size: int
    strategy: str
    backend: str
    members: tuple[str, ...]
    ranks: list[RankView] = field(default_factory=list)

    @property
    def state(self) -> str:
        """up: every rank up on an online node; forming; otherwise down."""
        return self._state()[0]

    @property
    def detail(self) -> str:
        """Why it is down (empty when up)."""
        return self._state()[1]

    def _state(self) -> tuple[str, str]:
        by_rank = {r.report.rank: r for r in self.ranks}
        for i, node in enumerate(self.members):
            seen = by_rank.get(i)
            if seen is None:
                return "down", f"member {node} (rank {i}) no longer reports this group"
            if not seen.online:
                return "down", f"member {node} (rank {i}) is offline"
        down = next((r for r in self.ranks if r.report.state == "down"), None)
        if down is not None:
            return "down", f"rank {down.report.rank} on {down.node}: {down.report.detail}"
        if any(r.report.state == "forming" for r in self.ranks):
            return "forming", ""
        return "up", ""

    def json(self) -> dict[str, Any]:
        """The admin API's view of the group."""
        return {
            "name": self.name,
            "model": self.model,
            "size": self.size,
            "strategy": self.strategy,
            "backend": self.backend,
            "state": self.state,
            "detail": self.detail,
            "members": list(self.members),
            "serving_node": self.members[0] if self.members else "",
            "memory_bytes_per_member": max((r.report.memory_bytes for r in self.ranks), default=0),
            "ranks": [
                {
                    "rank": r.report.rank,
                    "node": r.node,
                    "online": r.online,
                    "state": r.report.state,
                    "detail": r.report.detail,
                    "host": r.report.host,
                    "memory_bytes": r.report.memory_bytes,
                    "started_at": r.report.started_at,
                }
                for r in sorted(self.ranks, key=lambda r: r.report.rank)
            ],
        }


@dataclass(frozen=True, slots=True)
class Proposal:
    """Members the coordinator proposes for a group, from the nodes' memory figures."""

    model: str
    members: tuple[str, ...]
    share_bytes: int
    need_bytes: int
    why: str

    def json(self) -> dict[str, Any]:
        return {
            "model": self.model,
            "nodes": list(self.members),
            "size": len(self.members),
            "memory_bytes_per_member": self.share_bytes,
            "memory_bytes": self.need_bytes,
            "why": self.why,
        }


# The memory figures placement goes by: (model's estimated bytes, each candidate's room).
Rooms = Callable[[str, list[NodeView]], tuple[int, list[NodeRoom]]]


class GroupManager:
    """Forms, lists and removes node groups through the members' agents."""

    def __init__(self, registry: NodeRegistry, rooms: Rooms | None = None) -> None:
        """`rooms`: the placer's memory figures (coordinator.placement), for proposals."""
        self.registry = registry
        self._rooms = rooms
        # Names being formed by this coordinator right now: a second create is refused.
        self._forming: set[str] = set()

    def groups(self) -> list[GroupView]:
        """Every group an online node reports a rank of, by name (with the ranks of its
        offline members, as they last reported)."""
        online = {v.node_id for v in self.registry.online()}
        # Groups some online node reports; an offline member's last report adds its rank.
        live = {
            g.name for v in self.registry.online() if v.state is not None for g in v.state.groups
        }
        out: dict[str, GroupView] = {}
        for view in self.registry.nodes():
            if view.state is None:
                continue
            for g in view.state.groups:
                if g.name not in live:
                    continue
                group = out.get(g.name)
                if group is None or (g.rank == 0 and group.members != g.members):
                    # rank 0's report names the group's definition
                    group = GroupView(
                        g.name,
                        g.model,
                        g.size,
                        g.strategy,
                        g.backend,
                        g.members,
                        group.ranks if group is not None else [],
                    )
                    out[g.name] = group
                group.ranks = [
                    r for r in group.ranks if r.report.rank != g.rank or r.node != view.node_id
                ]
                group.ranks.append(RankView(view.node_id, view.node_id in online, g))
        return [out[n] for n in sorted(out)]

    def get(self, name: str) -> GroupView:
        """The group `name`; a NOT_FOUND error (404) naming the groups there are."""
        for g in self.groups():
            if g.name == name:
                return g
        names = ", ".join(g.name for g in self.groups()) or "none"
        raise from_code("NOT_FOUND", f"no group {name!r} (groups: {names})")

    def down_reason(self, model: str) -> str | None:
        """Why the group serving `model` is not up; None when `model` names no group."""
        for g in self.groups():
            if g.name == model:
                return None if g.state == "up" else f"{g.state}: {g.detail}".rstrip(": ")
        return None

    async def propose(
        self, name: str, model: str, size: int = 0, strategy: str = "tensor"
    ) -> Proposal:
        """Members for a group of `model`: the fewest nodes (2 or more; exactly `size`
        when given) whose free memory holds a 1/N share each, most free memory first,
        at a size the model can be split into (rank 0's node checks). Starts nothing."""
        if self._rooms is None:
            raise Unavailable("this coordinator cannot propose groups")
        if strategy not in STRATEGIES:
            raise InvalidRequest(f"must be one of {', '.join(STRATEGIES)}", field="strategy")
        views = [v for v in self.registry.online() if v.state is not None and v.model(model)]
        if not views:
            raise from_code("NOT_FOUND", f"no online node has model {model!r}")
        if len(views) < max(size, 2):
            holders = ", ".join(sorted(v.node_id for v in views))
            raise InvalidRequest(
                f"a group of {max(size, 2)} needs as many online nodes with {model!r}; "
                f"only {holders} {'has' if len(views) == 1 else 'have'} it "
                "(copy it with `macmesh models copy`)",
                field="size" if size else "model",
            )
        need, rooms = self._rooms(model, views)
        by_id = {v.node_id: v for v in views}
        short: NoRoom | None = None  # the memory refusal, if every size fits nowhere
        split = ""  # the model's refusal of every size that fits
        for n in [size] if size else range(2, len(views) + 1):
            placed = place_group(model, need, rooms, n)
            if isinstance(placed, NoRoom):
                short = short or placed
                continue
            try:  # the model must split into this size: ask (nothing starts)
                await by_id[placed.members[0]].client.check_group_rank(
                    pb.GroupRankRequest(
                        name=name, model=model, rank=0, hosts=[""] * n, strategy=strategy
                    )
                )
            except InvalidRequest as err:
                fits = "do not divide" in err.message or "at least as many layers" in err.message
                if size or not fits:
                    raise
                split = err.message
                continue
            return Proposal(model, placed.members, placed.share_bytes, need, placed.why)
        if split and short is None:
            raise InvalidRequest(f"no group size works: {split}", field="model")
        assert short is not None
        raise Unavailable(f"no group fits now: {short.message}" + (f"; {split}" if split else ""))

    async def create(
        self,
        name: str,
        model: str,
        nodes: list[str],
        *,
        strategy: str = "tensor",
        backend: str = "ring",
        timeout: float = FORM_TIMEOUT,
    ) -> GroupView:
        """Check every member, then start every rank; the formed group (or raise, with
        every started rank stopped again)."""
        if strategy not in STRATEGIES:
            raise InvalidRequest(f"must be one of {', '.join(STRATEGIES)}", field="strategy")
        if backend not in BACKENDS:
            raise InvalidRequest(f"must be one of {', '.join(BACKENDS)}", field="backend")
        if not nodes:  # the coordinator proposes them
            nodes = list((await self.propose(name, model, strategy=strategy)).members)
        if len(nodes) < 2:
            raise InvalidRequest("a group needs at least 2 member nodes", field="nodes")
        views = [self.registry.find(n, field="nodes") for n in nodes]
        ids = [v.node_id for v in views]
        dupes = sorted({i for i in ids if ids.count(i) > 1})
        if dupes:
            raise InvalidRequest(f"node {dupes[0]} is listed twice", field="nodes")
        existing = next((g for g in self.groups() if g.name == name), None)
        if existing is not None and existing.state != "down":
            raise InvalidRequest(
                f"group {name!r} already exists ({existing.state}); remove it first",
                field="name",
            )
        if name in self._forming:
            raise InvalidRequest(f"group {name!r} is being formed right now", field="name")
        self._forming.add(name)
        try:
            if existing is not None:  # a down group of that name: replaced
                await self._stop_all(existing)
            return await self._form(name, model, views, strategy, backend, timeout)
        finally:
            self._forming.discard(name)

    async def _form(
        self,
        name: str,
        model: str,
        views: list[NodeView],
        strategy: str,
        backend: str,
        timeout: float,
    ) -> GroupView:
        size = len(views)
        members = [v.node_id for v in views]

        def request(rank: int, **extra: Any) -> pb.GroupRankRequest:
            return pb.GroupRankRequest(
                name=name,
                model=model,
                rank=rank,
                members=members,
                strategy=strategy,
                backend=backend,
                **extra,
            )

        async def check(rank: int, view: NodeView) -> pb.CheckGroupRankResponse:
            hint = view.target.rpartition(":")[0].strip("[]")
            try:
                return await view.client.check_group_rank(
                    request(rank, hosts=[""] * size, host_hint=hint)
                )
            except MeshError as err:
                raise from_code(err.code, f"{view.node_id}: {err.message}") from None

        checks = await _all([check(i, v) for i, v in enumerate(views)])
        hosts = [c.host for c in checks]
        _check_reachable(members, hosts)
        control = checks[0].control
        token = secrets.token_urlsafe(24)
        log.info("forming group %s: %s over %s", name, model, ", ".join(hosts))

        async def start(rank: int, view: NodeView) -> GroupRank:
            try:
                return await view.client.start_group_rank(
                    request(rank, hosts=hosts, control=control, token=token), timeout=timeout
                )
            except MeshError as err:
                raise from_code(err.code, f"{view.node_id} (rank {rank}): {err.message}") from None

        try:
            await _all([start(i, v) for i, v in enumerate(views)])
        except BaseException:
            await asyncio.gather(
                *(v.client.stop_group_rank(name) for v in views), return_exceptions=True
            )
            raise
        # The members' next state pushes carry the ranks; wait for them so the answer
        # (and the next request) sees the group up.
        group: GroupView | None = None
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(10):
                while True:
                    group = next((g for g in self.groups() if g.name == name), None)
                    if group is not None and group.state == "up" and len(group.ranks) == size:
                        return group
                    await self.registry.wait_changed(1.0)
        if group is None:
            raise Unavailable(f"group {name!r} formed, but its members have not reported it yet")
        return group

    async def remove(self, name: str) -> GroupView:
        """Stop every rank of `name` (rank 0 first: it shuts the group down cleanly)."""
        group = self.get(name)
        await self._stop_all(group)
        return group

    async def _stop_all(self, group: GroupView) -> None:
        views = {v.node_id: v for v in self.registry.online()}
        order = sorted(group.ranks, key=lambda r: r.report.rank)
        for r in order[:1]:
            if r.node in views:
                with contextlib.suppress(MeshError):
                    await views[r.node].client.stop_group_rank(group.name)
        await asyncio.gather(
            *(
                views[r.node].client.stop_group_rank(group.name)
                for r in order[1:]
                if r.node in views
            ),
            return_exceptions=True,
        )
        # Wait (briefly) for the members' states to drop the group.
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                while any(g.name == group.name for g in self.groups()):
                    await self.registry.wait_changed(0.5)


def _loopback(host: str) -> bool:
    ip = host.rpartition(":")[0].strip("[]")
    try:
        return ipaddress.ip_address(ip).is_loopback
    except ValueError:
        return ip == "localhost"


def _check_reachable(members: list[str], hosts: list[str]) -> None:
    """A member whose ring address is loopback cannot be reached by members elsewhere
    (a node this coordinator reaches at 127.0.0.1, e.g. its own): refuse before starting."""
    local = [m for m, h in zip(members, hosts, strict=True) if _loopback(h)]
    if local and len(local) < len(members):
        raise InvalidRequest(
            f"{', '.join(local)} would listen for the group on a loopback address "
            f"({', '.join(h for h in hosts if _loopback(h))}), which the other members "
            "cannot reach: start it with `macmesh node --group-host IP` (an address the "
            "others reach, e.g. its Thunderbolt bridge), or reach it at that address",
            field="nodes",
        )


async def _all(calls: list[Any]) -> list[Any]:
    """Every call's result; on the first failure the others are cancelled and it raises."""
    tasks = [asyncio.ensure_future(c) for c in calls]
    try:
        return list(await asyncio.gather(*tasks))
    except BaseException:
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


__all__ = ["BACKENDS", "STRATEGIES", "GroupManager", "GroupView"]
