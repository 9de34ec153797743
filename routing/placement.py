"""Where a model that no node has loaded should load, and what it may evict there.

Inputs are what nodes report (budget, available memory, each loaded model's
resident estimate, idle time, whether a request for it runs) plus the
lifetimes from the config files (`ttl`, `pin`). Rules, in order:

1. Only nodes that have the model's files are candidates.
2. A node where it fits in the free memory now wins; among several, the one
   left with the most free memory (ties: lowest node id).
3. Otherwise a node where it fits after unloading idle, unpinned models,
   least recently used first; fewest models evicted wins, then fewest bytes.
   A pinned model, or one with a request running or waiting, is never evicted.
4. Otherwise it fits nowhere: `NoRoom` names the model's size and the largest
   free memory (and what evicting would add) on any node.

"Free" is the node's budget (`--memory-budget`) less what its loaded models
take, capped by the memory the machine has available; without a budget, the
available memory less a safety margin. Pure: no I/O, no clocks.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import InvalidRequest

# Share of total memory left alone on a node without a budget (the OS, other apps).
MARGIN_FRACTION = 0.05


@dataclass(frozen=True, slots=True)
class Lifetime:
    """How long a loaded model stays: `ttl` idle seconds (None = forever); `pin` never unloads."""

    ttl: float | None = None
    pin: bool = False


@dataclass(frozen=True, slots=True)
class ModelSettings:
    """`model_settings.json`: a default idle TTL, and per-model (or wildcard) lifetimes."""

    default_ttl: float | None = None
    models: Mapping[str, Lifetime] = field(default_factory=dict)


def _ttl(value: Any, where: str) -> float | None:
    if value is None or value == 0:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        raise InvalidRequest("must be a number of seconds >= 0, or null", field=where)
    return float(value)


def parse_lifetime(value: Mapping[str, Any], where: str) -> Lifetime:
    """`ttl` and `pin` of a config entry (a model_settings.json entry, an alias or tier object)."""
    pin = value.get("pin", False)
    if not isinstance(pin, bool):
        raise InvalidRequest("must be true or false", field=f"{where}.pin")
    return Lifetime(ttl=_ttl(value.get("ttl"), f"{where}.ttl"), pin=pin)


def parse_model_settings(data: Any) -> ModelSettings:
    """Validate `model_settings.json`: `{"default_ttl": S|null, "models": {ID: {ttl, pin}}}`."""
    if not isinstance(data, Mapping):
        raise InvalidRequest("model_settings.json must be a JSON object")
    unknown = set(data) - {"default_ttl", "models"}
    if unknown:
        raise InvalidRequest(
            "unknown key (expected default_ttl, models)", field=", ".join(sorted(unknown))
        )
    raw = data.get("models", {})
    if not isinstance(raw, Mapping):
        raise InvalidRequest("must be an object of model id -> {ttl, pin}", field="models")
    models: dict[str, Lifetime] = {}
    for name, value in raw.items():
        if not isinstance(value, Mapping):
            raise InvalidRequest("must be an object {ttl, pin}", field=f"models[{name}]")
        extra = set(value) - {"ttl", "pin"}
        if extra:
            raise InvalidRequest(
                f"unknown key {sorted(extra)[0]!r} (expected ttl, pin)", field=f"models[{name}]"
            )
        models[name] = parse_lifetime(value, f"models[{name}]")
    return ModelSettings(default_ttl=_ttl(data.get("default_ttl"), "default_ttl"), models=models)


def lifetime(
    model: str, settings: ModelSettings, entries: Sequence[tuple[str, Lifetime]] = ()
) -> Lifetime:
    """The lifetime of `model`.

    `entries` are (target model, lifetime) of alias and tier entries. Pinned if
    any entry for it pins it. TTL: its model_settings.json entry (exact id, then
    the first matching wildcard), else the shortest an alias/tier entry for it
    sets, else `default_ttl`.
    """
    exact = settings.models.get(model)
    own = exact or next(
        (
            lt
            for pattern, lt in settings.models.items()
            if any(c in pattern for c in "*?[") and fnmatch.fnmatchcase(model, pattern)
        ),
        None,
    )
    mine = [lt for target, lt in entries if target == model]
    pin = (own is not None and own.pin) or any(lt.pin for lt in mine)
    if pin:
        return Lifetime(ttl=None, pin=True)
    if own is not None and own.ttl is not None:
        return Lifetime(ttl=own.ttl)
    ttls = [lt.ttl for lt in mine if lt.ttl is not None]
    if ttls:
        return Lifetime(ttl=min(ttls))
    return Lifetime(ttl=settings.default_ttl)


# ---------- placement ----------


@dataclass(frozen=True, slots=True)
class Resident:
    """A model loaded on a node, as placement sees it."""

    model: str
    bytes: int
    idle_seconds: float
    # A request for it runs or waits there now.
    busy: bool
    pinned: bool = False

    @property
    def evictable(self) -> bool:
        return not self.busy and not self.pinned


@dataclass(frozen=True, slots=True)
class NodeRoom:
    """One node that has the model's files: its memory and what it holds."""

    node_id: str
    # `--memory-budget` (0 = none).
    budget_bytes: int
    available_bytes: int
    total_bytes: int
    loaded: tuple[Resident, ...] = ()

    @property
    def free_bytes(self) -> int:
        """What a new model may take here now."""
        margin = int(self.total_bytes * MARGIN_FRACTION)
        available = max(self.available_bytes - margin, 0)
        if not self.budget_bytes:
            return available
        used = sum(r.bytes for r in self.loaded)
        return max(min(self.budget_bytes - used, available), 0)


@dataclass(frozen=True, slots=True)
class Placement:
    """Load on `node_id` after unloading `evict` (in that order); `why` says so in words."""

    node_id: str
    evict: tuple[str, ...]
    why: str


@dataclass(frozen=True, slots=True)
class NoRoom:
    """It fits nowhere: the words for the error, and the figures in them."""

    message: str
    need_bytes: int
    largest_free_bytes: int


def _gb(n: int) -> str:
    return f"{n / 2**30:.2f} GiB"


def place(model: str, need_bytes: int, nodes: Sequence[NodeRoom]) -> Placement | NoRoom:
    """Pick the node for `model` (needing `need_bytes`; 0 = unknown) by the rules above."""
    if not nodes:
        return NoRoom(f"model {model!r}: no online node has its files", need_bytes, 0)
    ordered = sorted(nodes, key=lambda n: n.node_id)
    fits = [n for n in ordered if n.free_bytes >= need_bytes]
    if fits:
        best = max(fits, key=lambda n: n.free_bytes)  # max keeps the first (lowest id) on ties
        why = (
            f"{best.node_id} has room: needs {_gb(need_bytes)}, {_gb(best.free_bytes)} free"
            if need_bytes
            else f"{best.node_id} has the most free memory ({_gb(best.free_bytes)}; size unknown)"
        )
        return Placement(best.node_id, (), why)
    options: list[tuple[int, int, str, tuple[Resident, ...]]] = []
    for n in ordered:
        free, evicted = n.free_bytes, []
        # Least recently used first: the longest idle goes first.
        for r in sorted(n.loaded, key=lambda r: -r.idle_seconds):
            if free >= need_bytes:
                break
            if r.evictable:
                evicted.append(r)
                free += r.bytes
        if free >= need_bytes:
            options.append((len(evicted), sum(r.bytes for r in evicted), n.node_id, tuple(evicted)))
    if options:
        _, _, node_id, chosen = min(options)
        names = ", ".join(f"{r.model} ({_gb(r.bytes)}, idle {r.idle_seconds:.0f}s)" for r in chosen)
        why = f"{node_id} after unloading {names}: needs {_gb(need_bytes)}"
        return Placement(node_id, tuple(r.model for r in chosen), why)
    largest = max(ordered, key=lambda n: n.free_bytes)
    reclaim = max(
        ordered, key=lambda n: n.free_bytes + sum(r.bytes for r in n.loaded if r.evictable)
    )
    reclaimable = reclaim.free_bytes + sum(r.bytes for r in reclaim.loaded if r.evictable)
    message = (
        f"model {model!r} needs about {_gb(need_bytes)} of memory and fits on no node: "
        f"the largest free memory is {_gb(largest.free_bytes)} on {largest.node_id}"
    )
    if reclaimable > largest.free_bytes:
        message += (
            f" ({_gb(reclaimable)} on {reclaim.node_id} if every idle, unpinned model there "
            "were unloaded)"
        )
    message += f"; nodes with its files: {', '.join(n.node_id for n in ordered)}"
    return NoRoom(message, need_bytes, largest.free_bytes)


# ---------- node groups ----------


@dataclass(frozen=True, slots=True)
class GroupPlacement:
    """The members of a node group, rank order (the most free memory first)."""

    members: tuple[str, ...]
    share_bytes: int
    why: str


def place_group(
    model: str, need_bytes: int, nodes: Sequence[NodeRoom], size: int
) -> GroupPlacement | NoRoom:
    """`size` members for a group sharding `model` (needing `need_bytes` in all): the nodes
    with the most free memory now (ties: lowest id), each needing 1/size of it. No
    evictions: a group is formed by an admin, who unloads what should make room."""
    share = -(-need_bytes // max(size, 1))
    ordered = sorted(nodes, key=lambda n: (-n.free_bytes, n.node_id))
    if len(ordered) < size:
        return NoRoom(
            f"a group of {size} for {model!r} needs {size} online nodes with its files; "
            f"there are {len(ordered)}"
            + (f" ({', '.join(n.node_id for n in ordered)})" if ordered else ""),
            need_bytes,
            ordered[0].free_bytes if ordered else 0,
        )
    chosen = ordered[:size]
    if chosen[-1].free_bytes < share:
        return NoRoom(
            f"model {model!r} needs about {_gb(need_bytes)}: {_gb(share)} on each of {size} "
            f"nodes, but only {sum(n.free_bytes >= share for n in ordered)} have that much free "
            f"({', '.join(f'{n.node_id} {_gb(n.free_bytes)}' for n in ordered)})",
            need_bytes,
            chosen[0].free_bytes,
        )
    why = f"{_gb(share)} on each of " + ", ".join(
        f"{n.node_id} ({_gb(n.free_bytes)} free)" for n in chosen
    )
    return GroupPlacement(tuple(n.node_id for n in chosen), share, why)
