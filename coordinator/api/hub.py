"""Admin API for the Hugging Face Hub: pull a model onto a node, follow transfers, search.

    POST /api/models/pull                {"repo", "file"?, "revision"?, "node"?}
                                         202 {"transfer": {...}, "node": ID}; the download
                                         runs on the node (node.models.pull); "node" may be
                                         left out when exactly one node is online
    GET  /api/transfers?node=NODE        {"transfers": [...]}: every node's pulls and copies,
                                         running first, as of its last state
    GET  /api/transfers/{id}             {"transfer": {...}, "node": ID}
    GET  /api/models/search?q=TEXT&limit=N&kind=mlx|gguf
                                         {"results": [...]}: MLX and GGUF repos on the Hub
    GET  /api/hub/repos/{repo}?revision=R
                                         one repo's files, sizes, GGUF quantizations

A transfer shows `percent` when its total is known and `served`: whether its
node's catalog lists the model now. Errors use the admin API's envelope
(coordinator.api.common.openai_error): a bad field 400, an unknown transfer
or repo 404, an unreachable Hub or no online node 503.
"""

from __future__ import annotations

import asyncio
import time

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coordinator.api.admin import transfer_json
from coordinator.api.common import json_object, openai_error, str_field
from coordinator.hub_search import KINDS, MAX_LIMIT, repo_files, search_hub
from coordinator.nodes import NodeRegistry, NodeView
from mesh.errors import InvalidRequest, MeshError, Unavailable, from_code
from mesh.types import Transfer

router = APIRouter(prefix="/api", tags=["admin"])

# How long a pull's answer waits for the node's state to list the new transfer, so
# that GET /api/transfers/{id} finds it at once.
LISTED_WAIT_SECONDS = 2.0


def _registry(request: Request) -> NodeRegistry:
    registry: NodeRegistry = request.app.state.service.registry
    return registry


def _transfers(registry: NodeRegistry) -> list[tuple[NodeView, Transfer]]:
    """Every node's transfers from its last state (an offline node's too: its last word)."""
    return [(v, t) for v in registry.nodes() if v.state is not None for t in v.state.transfers]


def _find(registry: NodeRegistry, transfer_id: str) -> tuple[NodeView, Transfer] | None:
    return next(((v, t) for v, t in _transfers(registry) if t.id == transfer_id), None)


def _pull_node(registry: NodeRegistry, node: str | None) -> NodeView:
    """The named online node, else the only one online."""
    if node:
        return registry.find(node)
    online = registry.online()
    if len(online) == 1:
        return online[0]
    if not online:
        raise Unavailable("no node is online to pull onto")
    names = ", ".join(sorted(v.node_id for v in online))
    raise InvalidRequest(f"{len(online)} nodes are online ({names}): say which", field="node")


@router.post("/models/pull", status_code=202)
async def pull_model(request: Request) -> JSONResponse:
    """Start downloading a Hub repo (or one file of it) onto a node."""
    registry = _registry(request)
    try:
        data = await json_object(request, 'expected a JSON object: {"repo": "ORG/NAME", ...}')
        repo = str_field(data, "repo", required=True)
        view = _pull_node(registry, str_field(data, "node"))
        transfer = await view.client.pull_model(
            repo, str_field(data, "file"), str_field(data, "revision")
        )
    except MeshError as err:
        return openai_error(err)
    deadline = time.monotonic() + LISTED_WAIT_SECONDS
    while _find(registry, transfer.id) is None and time.monotonic() < deadline:
        await registry.wait_changed(deadline - time.monotonic())
    found = _find(registry, transfer.id)
    if found is not None:
        view, transfer = found
    return JSONResponse({"transfer": transfer_json(transfer, view), "node": view.node_id}, 202)


@router.get("/transfers")
async def list_transfers(request: Request, node: str | None = None) -> JSONResponse:
    """Pulls and copies on every node (or one), running ones first."""
    registry = _registry(request)
    rows = _transfers(registry)
    if node:
        rows = [(v, t) for v, t in rows if node in (v.node_id, v.target)]
    rows.sort(key=lambda vt: (vt[1].state != "running", -vt[1].started))
    return JSONResponse({"transfers": [transfer_json(t, v) for v, t in rows]})


@router.get("/transfers/{transfer_id}")
async def get_transfer(request: Request, transfer_id: str) -> JSONResponse:
    """One transfer, as its node last reported it."""
    found = _find(_registry(request), transfer_id)
    if found is None:
        err = from_code(
            "NOT_FOUND",
            f"no transfer {transfer_id!r} in any node's state "
            "(finished ones are kept an hour; a restarted node forgets them)",
        )
        return openai_error(err)
    view, transfer = found
    return JSONResponse({"transfer": transfer_json(transfer, view), "node": view.node_id})


def _limit(raw: str | None) -> int:
    if raw is None or raw == "":
        return 20
    try:
        limit = int(raw)
    except ValueError:
        raise InvalidRequest(f"{raw!r} is not a number", field="limit") from None
    if not 1 <= limit <= MAX_LIMIT:
        raise InvalidRequest(f"must be 1..{MAX_LIMIT}", field="limit")
    return limit


@router.get("/models/search")
async def search_models(request: Request) -> JSONResponse:
    """MLX and GGUF repos on the Hub matching `q`, most downloaded first."""
    params = request.query_params
    try:
        limit = _limit(params.get("limit"))
        kind = params.get("kind") or ""
        if kind and kind not in KINDS:
            raise InvalidRequest(f"must be one of {', '.join(KINDS)}", field="kind")
        kinds = (kind,) if kind else KINDS
        query = params.get("q", "")
        results = await asyncio.to_thread(search_hub, query, kinds=kinds, limit=limit)
    except MeshError as err:
        return openai_error(err)
    return JSONResponse({"query": query, "results": [r.to_json() for r in results]})


@router.get("/hub/repos/{repo:path}")
async def hub_repo(request: Request, repo: str, revision: str = "") -> JSONResponse:
    """One Hub repo's files: which GGUF file to pull, and how big each is."""
    try:
        return JSONResponse(await asyncio.to_thread(repo_files, repo, revision))
    except MeshError as err:
        return openai_error(err)
