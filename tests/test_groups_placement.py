"""Node groups and memory: where a group's members go, and a member's share counted.

The pure rule (routing.placement.place_group), table-driven; the coordinator's placement
counting a group rank as a resident that is never evicted; a node refusing a rank past
its `--memory-budget` before anything starts (a real node over gRPC).
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, cast

import pytest

from coordinator.nodes import NodeView
from coordinator.placement import Placer
from coordinator.settings import SettingsStore
from mesh.client import NodeClient
from mesh.errors import Overloaded
from mesh.types import GroupRank, Memory, ModelInfo, NodeState
from node.config import NodeConfig
from proto import node_pb2 as pb
from routing.placement import GroupPlacement, NodeRoom, NoRoom, Resident, place, place_group
from tests.conftest import start_node

GB = 2**30


def room(node: str, free_gb: float) -> NodeRoom:
    return NodeRoom(node, int(free_gb * GB), 100 * GB, 128 * GB)


@pytest.mark.parametrize(
    ("nodes", "need_gb", "size", "expect"),
    [
        # 12 GiB over 2: 6 each; the two with the most free memory, most first.
        ([room("a", 7), room("b", 9), room("c", 6.5)], 12, 2, ("b", "a")),
        # Ties: the lowest node id first.
        ([room("b", 8), room("a", 8), room("c", 8)], 12, 3, ("a", "b", "c")),
        # 2 members cannot hold 6 each; 3 can hold 4 each.
        ([room("a", 5), room("b", 5), room("c", 5)], 12, 2, None),
        ([room("a", 5), room("b", 5), room("c", 5)], 12, 3, ("a", "b", "c")),
        # More members than nodes with the files.
        ([room("a", 50), room("b", 50)], 12, 3, None),
    ],
)
def test_group_members_by_free_memory(
    nodes: list[NodeRoom], need_gb: float, size: int, expect: tuple[str, ...] | None
) -> None:
    out = place_group("m", int(need_gb * GB), nodes, size)
    if expect is None:
        assert isinstance(out, NoRoom)
    else:
        assert isinstance(out, GroupPlacement), out
        assert out.members == expect
        assert out.share_bytes == -(-int(need_gb * GB) // size)


def test_no_room_for_a_group_names_the_share_and_the_nodes() -> None:
    out = place_group("big", 12 * GB, [room("a", 5), room("b", 3)], 2)
    assert isinstance(out, NoRoom)
    assert "6.00 GiB on each of 2 nodes" in out.message
    assert "a 5.00 GiB" in out.message and "b 3.00 GiB" in out.message
    few = place_group("big", GB, [room("a", 5)], 3)
    assert isinstance(few, NoRoom) and "needs 3 online nodes" in few.message


def test_placement_counts_a_member_share_and_never_evicts_it(tmp_path: Path) -> None:
    """A node with a budget of 8 GiB holding a 5 GiB group rank has 3 GiB for models, and
    a model needing 4 GiB fits nowhere: the rank is not something to evict."""
    state = NodeState(
        node_id="a",
        version="test",
        sequence=1,
        timestamp=0.0,
        models=(
            ModelInfo(
                id="small",
                backend="mlx",
                source="",
                path="",
                size_bytes=4 * GB,
                estimated_bytes=4 * GB,
            ),
            # rank 0's group model is listed loaded; its memory is the rank's share below
            ModelInfo(
                id="g",
                backend="group",
                source="group",
                path="",
                loaded=True,
                estimated_bytes=5 * GB,
            ),
        ),
        memory=Memory(total_bytes=128 * GB, available_bytes=100 * GB, budget_bytes=8 * GB),
        groups=(GroupRank(name="g", model="big", rank=0, size=2, state="up", memory_bytes=5 * GB),),
    )
    view = NodeView(target="127.0.0.1:1", client=cast(Any, None), state=state)
    placer = Placer(cast(Any, None), SettingsStore(tmp_path))
    need, rooms = placer.rooms("small", [view])
    assert need == 4 * GB
    (r,) = rooms
    assert r.loaded == (Resident("group:g", 5 * GB, 0.0, busy=True, pinned=True),)
    assert r.free_bytes == 3 * GB
    out = place("small", need, rooms)
    assert isinstance(out, NoRoom), out


def test_a_node_refuses_a_rank_past_its_memory_budget(models_dir: Path, tmp_path: Path) -> None:
    node = start_node(
        NodeConfig(
            grpc_port=0,
            home=tmp_path,
            models_dir=models_dir,
            scan_hf_cache=False,
            memory_budget=10 * 2**20,
        )
    )
    try:

        async def check() -> str:
            async with NodeClient(node.target, timeout=30) as c:
                with pytest.raises(Overloaded) as err:
                    await c.check_group_rank(
                        pb.GroupRankRequest(name="g", model="smollm2", rank=0, hosts=["", "", ""])
                    )
                return err.value.message

        message = asyncio.run(check())
        assert "group 'g' needs about" in message and "memory budget is 0.01 GiB" in message
    finally:
        node.stop()


def test_a_loopback_member_beside_remote_ones_is_refused() -> None:
    """A node reached at 127.0.0.1 (the coordinator's own) would give the others a ring
    address they cannot reach: refused before anything starts, naming the fix."""
    from coordinator.groups import _check_reachable
    from mesh.errors import InvalidRequest

    _check_reachable(["a", "b"], ["127.0.0.1:1", "127.0.0.1:2"])  # one machine: fine
    _check_reachable(["a", "b"], ["10.0.0.1:1", "10.0.0.2:2"])
    with pytest.raises(InvalidRequest, match=r"^nodes: a would listen .*--group-host"):
        _check_reachable(["a", "b"], ["127.0.0.1:1", "10.0.0.2:2"])
