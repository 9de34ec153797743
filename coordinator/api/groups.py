"""Admin API for node groups (coordinator.groups): one MLX model sharded over several nodes.

    GET    /api/groups              {"groups": [GROUP, ...]}
    GET    /api/groups/{name}       GROUP
    GET    /api/groups/propose?model=M[&size=N][&strategy=S]
                                    {"model", "nodes", "size", "memory_bytes_per_member",
                                    "memory_bytes", "why"}: the members the coordinator
                                    would pick from the nodes' memory figures (the fewest
                                    nodes, 2 or more, whose free memory holds a share each,
                                    at a size the model's heads divide); starts nothing
    POST   /api/groups              {"name", "model", "nodes"?: [NODE, ...], "strategy"?,
                                    "backend"?}  201 GROUP once every rank has loaded;
                                    without "nodes", the proposed members
    DELETE /api/groups/{name}       GROUP as it was, after every rank stopped

GROUP: name, model, size, strategy, backend, state (forming | up | down), detail
(why it is down), members (node ids in rank order; rank 0 serves the model),
serving_node, memory_bytes_per_member and ranks (rank, node, online, state,
detail, host, memory_bytes, started_at). Errors come in the OpenAI envelope:
400 naming the field, 404 for an unknown group or a member without the model,
409 when a member cannot load its shard, 503 when a member is unreachable.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coordinator.api.common import json_object, openai_error, str_field
from coordinator.groups import GroupManager
from mesh.errors import InvalidRequest, MeshError, ModelLoadError

router = APIRouter(prefix="/api", tags=["admin"])


def _groups(request: Request) -> GroupManager:
    groups: GroupManager = request.app.state.service.groups
    return groups


def _error(err: MeshError) -> JSONResponse:
    response = openai_error(err)
    if isinstance(err, ModelLoadError):
        response.status_code = 409  # a member's files or load: a conflict, not a crash
    return response


def _nodes(data: dict[str, Any]) -> list[str]:
    """`nodes`; absent or empty: the coordinator proposes the members."""
    nodes = data.get("nodes")
    if nodes is None:
        return []
    if not isinstance(nodes, list) or not all(isinstance(n, str) and n for n in nodes):
        raise InvalidRequest("must be a list of node ids or addresses", field="nodes")
    return list(nodes)


def _size(value: str | None) -> int:
    if value is None or value == "":
        return 0
    if not value.isdigit() or int(value) < 2:
        raise InvalidRequest("must be a whole number >= 2", field="size")
    return int(value)


@router.get("/groups")
async def list_groups(request: Request) -> JSONResponse:
    """Every node group the nodes report, with each rank's state."""
    return JSONResponse({"groups": [g.json() for g in _groups(request).groups()]})


@router.get("/groups/propose")
async def propose_group(
    request: Request,
    model: str = "",
    name: str = "proposal",
    size: str | None = None,
    strategy: str = "tensor",
) -> JSONResponse:
    """Members the coordinator would pick for a group of `model` (nothing starts)."""
    try:
        if not model:
            raise InvalidRequest("field required", field="model")
        proposal = await _groups(request).propose(name, model, _size(size), strategy)
    except MeshError as err:
        return _error(err)
    return JSONResponse(proposal.json())


@router.get("/groups/{name}")
async def get_group(request: Request, name: str) -> JSONResponse:
    """One node group."""
    try:
        return JSONResponse(_groups(request).get(name).json())
    except MeshError as err:
        return _error(err)


@router.post("/groups", status_code=201)
async def create_group(request: Request) -> JSONResponse:
    """Form a group: check every member, start every rank, answer once it has loaded."""
    try:
        data = await json_object(request)
        group = await _groups(request).create(
            str_field(data, "name", required=True),
            str_field(data, "model", required=True),
            _nodes(data),
            strategy=str_field(data, "strategy") or "tensor",
            backend=str_field(data, "backend") or "ring",
        )
    except MeshError as err:
        return _error(err)
    return JSONResponse(group.json(), 201)


@router.delete("/groups/{name}")
async def remove_group(request: Request, name: str) -> JSONResponse:
    """Stop every rank of a group (its model is no longer served)."""
    try:
        group = await _groups(request).remove(name)
    except MeshError as err:
        return _error(err)
    return JSONResponse({**group.json(), "state": "removed"})
