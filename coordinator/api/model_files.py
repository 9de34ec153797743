"""Admin API for model files on nodes: copy a model between nodes, delete one from a node.

    POST   /api/models/copy            {"model", "from", "to", "limit_mbps"?}
                                       202 {"transfer": {...}, "node": DEST_ID}: the copy runs
                                       on the destination node; follow it in its state
                                       (GET /api/transfers/{id}, GET /api/nodes)
    DELETE /api/models/{model}?node=NODE&force=true
                                       {"deleted", "node", "path", "bytes_freed", "was_loaded"}

Models are named by their id on the node (no alias resolution: these act on files).
The nodes do the work (node.models.copy, node.models.files); this module only finds
them in the registry and maps errors, once, to the admin API's envelope.
"""

from __future__ import annotations

import math
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coordinator.api.admin import transfer_json
from coordinator.api.common import json_object, openai_error, str_field
from coordinator.nodes import NodeRegistry
from mesh.errors import InvalidRequest, MeshError, ModelLoadError, Overloaded

router = APIRouter(prefix="/api", tags=["admin"])


def _registry(request: Request) -> NodeRegistry:
    registry: NodeRegistry = request.app.state.service.registry
    return registry


def _error(err: MeshError, *, copying: bool = False) -> JSONResponse:
    """The shared envelope, with statuses that fit file operations better than 500/503."""
    response = openai_error(err)
    if isinstance(err, ModelLoadError):
        response.status_code = 409  # loaded (rm without --force): a conflict, not a crash
    elif copying and isinstance(err, Overloaded):
        response.status_code = 507  # a copy's only RESOURCE_EXHAUSTED: no room on disk
        if "retry-after" in response.headers:
            del response.headers["retry-after"]
    return response


def _limit(data: dict[str, Any]) -> int:
    """`limit_mbps` (MB/s, 1 MB = 10^6 bytes) as bytes per second; 0 = no cap."""
    value = data.get("limit_mbps")
    if value is None:
        return 0
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise InvalidRequest("must be a number of MB/s", field="limit_mbps")
    if not math.isfinite(value) or value < 0:
        raise InvalidRequest("must be >= 0 (0 = no cap)", field="limit_mbps")
    return int(value * 1_000_000)


@router.post("/models/copy", status_code=202)
async def copy_model(request: Request) -> JSONResponse:
    """Start copying a model's files from one node to another."""
    registry = _registry(request)
    try:
        data = await json_object(request)
        model = str_field(data, "model", required=True)
        limit = _limit(data)
        source = registry.find(str_field(data, "from", required=True), field="from")
        dest = registry.find(str_field(data, "to", required=True), field="to")
        if source.node_id == dest.node_id:
            raise InvalidRequest(f"{source.node_id} is both source and destination", field="to")
        transfer = await dest.client.copy_model(model, source.target, source.node_id, limit)
    except MeshError as err:
        return _error(err, copying=True)
    return JSONResponse({"transfer": transfer_json(transfer, dest), "node": dest.node_id}, 202)


@router.delete("/models/{model:path}")
async def delete_model(
    request: Request, model: str, node: str | None = None, force: bool = False
) -> JSONResponse:
    """Delete a model's files from one node (refused while loaded unless `force`)."""
    registry = _registry(request)
    try:
        if not node:
            raise InvalidRequest("which node to delete it from (?node=ID)", field="node")
        view = registry.find(node)
        resp = await view.client.delete_model(model, force=force)
    except MeshError as err:
        return _error(err)
    return JSONResponse(
        {
            "deleted": model,
            "node": view.node_id,
            "path": resp.path,
            "bytes_freed": resp.bytes_freed,
            "was_loaded": resp.was_loaded,
        }
    )
