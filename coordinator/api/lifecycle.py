"""Admin API for model lifetimes: load and unload on a chosen node, placement previews,
and `model_settings.json` (idle TTLs and pins).

    POST /api/models/load        {"model", "node"?}   load where placement says (or on `node`)
    POST /api/models/unload      {"model", "node"?}   unload there (or everywhere it is loaded)
    GET  /api/models/placement/{model}                where a cold load would go now, and why
    GET  /api/model-settings                          model_settings.json
    PUT  /api/model-settings                          replace (validated, atomic);
                                                      `?dry_run=true` validates only
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coordinator.api.admin import save_settings
from coordinator.api.common import json_body, json_object, openai_error, str_field
from coordinator.nodes import NodeView
from coordinator.service import ChatService
from mesh.errors import InvalidRequest, MeshError, Unavailable
from routing.placement import NoRoom

router = APIRouter(prefix="/api", tags=["admin"])


def _service(request: Request) -> ChatService:
    service: ChatService = request.app.state.service
    return service


async def _body(request: Request) -> tuple[str, str | None]:
    """`{"model", "node"?}`: the model name and the node, if one was named."""
    data = await json_object(request)
    return str_field(data, "model", required=True), str_field(data, "node") or None


def _views(service: ChatService, model: str, node: str | None) -> list[NodeView]:
    views = service.registry.served_models().get(model, [])
    if node is None:
        return views
    view = service.registry.find(node)
    if view not in views:
        raise InvalidRequest(f"node {view.node_id} has no model {model!r}", field="node")
    return [view]


@router.post("/models/load")
async def load(request: Request) -> JSONResponse:
    """Load a model where placement picks (evicting idle models if needed), or on `node`."""
    service = _service(request)
    try:
        name, node = await _body(request)
        res = service.resolve(name)
        views = _views(service, res.model, node)
        service.candidates(res)  # the right error when no node has it
        loaded_on = [v for v in views if (i := v.model(res.model)) is not None and i.loaded]
        if loaded_on:
            return JSONResponse(
                {"model": res.model, "node": loaded_on[0].node_id, "already_loaded": True}
            )
        t0 = time.perf_counter()
        placed = await service.placer.ensure_loaded(res, views)
    except MeshError as err:
        return openai_error(err)
    return JSONResponse(
        {
            "model": res.model,
            "node": placed.node.node_id,
            "already_loaded": False,
            "why": placed.why,
            "load_seconds": round(time.perf_counter() - t0, 3),
        }
    )


@router.post("/models/unload")
async def unload(request: Request) -> JSONResponse:
    """Unload a model on `node`, or on every node that has it loaded; waits for in-flight
    requests there (new ones go to other nodes meanwhile)."""
    service = _service(request)
    try:
        name, node = await _body(request)
        res = service.resolve(name)
        views = _views(service, res.model, node)
        targets = [v for v in views if (i := v.model(res.model)) is not None and i.loaded]
        results = await asyncio.gather(
            *(v.client.unload_model(res.model) for v in targets), return_exceptions=True
        )
    except MeshError as err:
        return openai_error(err)
    unloaded, failed = [], {}
    for view, result in zip(targets, results, strict=True):
        if isinstance(result, MeshError):
            failed[view.node_id] = result.message
        elif isinstance(result, BaseException):
            raise result
        elif result:
            unloaded.append(view.node_id)
    if failed and not unloaded:
        detail = "; ".join(f"{n}: {m}" for n, m in failed.items())
        return openai_error(Unavailable(f"could not unload {res.model!r}: {detail}"))
    return JSONResponse({"model": res.model, "unloaded": unloaded, "failed": failed})


@router.get("/models/placement/{name:path}")
async def placement(request: Request, name: str) -> JSONResponse:
    """Where a cold load of `name` would go now (no side effects)."""
    service = _service(request)
    try:
        res = service.resolve(name)
        views = service.candidates(res)
    except MeshError as err:
        return openai_error(err)
    plan = service.placer.plan(res.model, views)
    loaded = [v.node_id for v in views if (i := v.model(res.model)) is not None and i.loaded]
    life = service.settings.lifetime(res.model)
    out: dict[str, Any] = {
        "model": res.model,
        "loaded_on": loaded,
        "ttl": life.ttl,
        "pin": life.pin,
    }
    if isinstance(plan, NoRoom):
        out.update(fits=False, message=plan.message, need_bytes=plan.need_bytes)
    else:
        out.update(fits=True, node=plan.node_id, evict=list(plan.evict), why=plan.why)
    return JSONResponse(out)


@router.get("/model-settings")
async def get_model_settings(request: Request) -> JSONResponse:
    s = _service(request).settings
    return JSONResponse({**(s.raw("models") or {}), "error": s.errors().get("models")})


@router.put("/model-settings")
async def put_model_settings(request: Request) -> JSONResponse:
    settings = _service(request).settings
    try:
        data = await json_body(request)
    except MeshError as err:
        return openai_error(err)
    if isinstance(data, dict):
        data.pop("error", None)  # what GET adds
    return save_settings(request, settings, "models", data)
