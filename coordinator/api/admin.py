"""Admin API under /api/: config files (validated, atomic, applied at once) and the mesh view.

Routes (seed-compatible where MLX Studio had one):

    GET    /api/aliases                     {"aliases": {...}}
    PUT    /api/aliases                     replace all (body: the object, or {"aliases": {...}})
    POST   /api/aliases                     set one: {"alias": ..., "model_path"|"model": ...}
    DELETE /api/aliases/{alias}
    GET    /api/routing/config              claude_routing.json
    PUT    /api/routing/config              replace (POST is accepted too)
    GET    /api/routing/resolve/{model}     how a name resolves now, and where it would go
    GET    /api/inference-settings          inference_settings.json
    PUT    /api/inference-settings          replace
    GET    /api/nodes                       every known node with its live state
    GET    /api/models                      every model in the mesh: per node loaded or on disk,
                                            sizes, idle time; its ttl and pin

Validate only: every route above that changes a file (PUT, POST and DELETE of aliases, PUT
of the routing config and inference settings; lifecycle's PUT /api/model-settings too)
takes `?dry_run=true`: the body is parsed and validated exactly as a save would, the answer
is `{"status": "valid", <name>: <what would be written>}` (<name> as in the save's answer:
aliases, routing, inference, models) and nothing is written. Errors are the same 400 in
either mode, `param` naming the field path: `aliases[<alias>]`, `tiers.sonnet.max_tokens`,
`default_model`, `temperature`. A file is replaced whole or not at all.
"""

from __future__ import annotations

import time
from typing import Any

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from coordinator.api.common import json_body, openai_error
from coordinator.groups import GroupManager
from coordinator.nodes import NodeRegistry, NodeView
from coordinator.service import ChatService
from coordinator.settings import SettingsStore
from mesh.errors import InvalidRequest, MeshError, ModelNotFound
from mesh.types import Transfer

router = APIRouter(prefix="/api", tags=["admin"])


def _service(request: Request) -> ChatService:
    service: ChatService = request.app.state.service
    return service


def _settings(request: Request) -> SettingsStore:
    settings: SettingsStore = request.app.state.settings
    return settings


_TRUE = ("true", "1", "yes")
_FALSE = ("false", "0", "no", "")


def dry_run(request: Request) -> bool:
    """`?dry_run=true`: validate as a save would, write nothing."""
    value = request.query_params.get("dry_run")
    if value is None or value.lower() in _FALSE:
        return False
    if value.lower() in _TRUE:
        return True
    raise InvalidRequest(f"must be true or false, got {value!r}", field="dry_run")


def save_settings(request: Request, settings: SettingsStore, name: str, data: Any) -> JSONResponse:
    """Replace config file `name` with `data`, or with `?dry_run=true` only validate it.

    Answers `{"status": "updated"|"valid", name: data}`, or the 400 naming the field."""
    try:
        if dry_run(request):
            return JSONResponse({"status": "valid", name: settings.validate(name, data)})
        saved = settings.replace(name, data)
    except MeshError as err:
        return openai_error(err)
    return JSONResponse({"status": "updated", name: saved})


def _replace(request: Request, name: str, data: Any) -> JSONResponse:
    return save_settings(request, _settings(request), name, data)


@router.get("/aliases")
async def get_aliases(request: Request) -> JSONResponse:
    s = _settings(request)
    return JSONResponse({"aliases": s.raw("aliases"), "error": s.errors().get("aliases")})


@router.put("/aliases")
async def put_aliases(request: Request) -> JSONResponse:
    try:
        data = await json_body(request)
    except MeshError as err:
        return openai_error(err)
    if isinstance(data, dict) and set(data) == {"aliases"}:
        data = data["aliases"]
    return _replace(request, "aliases", data)


@router.post("/aliases")
async def set_alias(request: Request) -> JSONResponse:
    try:
        data = await json_body(request)
        if not isinstance(data, dict) or not isinstance(data.get("alias"), str):
            raise InvalidRequest("expected {'alias': ..., 'model': ...}", field="alias")
        target = data.get("model", data.get("model_path"))
        if target is None:
            raise InvalidRequest("field required", field="model")
    except MeshError as err:
        return openai_error(err)
    aliases = dict(_settings(request).raw("aliases") or {})
    aliases[data["alias"]] = target
    return _replace(request, "aliases", aliases)


@router.delete("/aliases/{alias:path}")
async def delete_alias(request: Request, alias: str) -> JSONResponse:
    aliases = dict(_settings(request).raw("aliases") or {})
    if alias not in aliases:
        return openai_error(ModelNotFound(alias, aliases))
    del aliases[alias]
    return _replace(request, "aliases", aliases)


@router.get("/routing/config")
async def get_routing(request: Request) -> JSONResponse:
    s = _settings(request)
    return JSONResponse({**(s.raw("routing") or {}), "error": s.errors().get("routing")})


@router.api_route("/routing/config", methods=["PUT", "POST"])
async def put_routing(request: Request) -> JSONResponse:
    try:
        data = await json_body(request)
    except MeshError as err:
        return openai_error(err)
    if isinstance(data, dict):
        data.pop("error", None)  # what GET adds
    return _replace(request, "routing", data)


@router.get("/routing/resolve/{name:path}")
async def resolve_preview(request: Request, name: str) -> JSONResponse:
    service = _service(request)
    try:
        res = service.resolve(name)
    except MeshError as err:
        return openai_error(err)
    nodes = [v.node_id for v in service.registry.served_models().get(res.model, [])]
    return JSONResponse(
        {
            "original": name,
            "resolved": res.model,
            "backend": res.backend,
            "draft_model": res.draft_model,
            "rule": res.rule,
            "tier": res.tier,
            "nodes": nodes,
        }
    )


@router.get("/inference-settings")
async def get_inference(request: Request) -> JSONResponse:
    s = _settings(request)
    return JSONResponse({**(s.raw("inference") or {}), "error": s.errors().get("inference")})


@router.put("/inference-settings")
async def put_inference(request: Request) -> JSONResponse:
    try:
        data = await json_body(request)
    except MeshError as err:
        return openai_error(err)
    if isinstance(data, dict):
        data.pop("error", None)
    return _replace(request, "inference", data)


def _node_json(view: NodeView, stale_after: float, indexed: int) -> dict[str, Any]:
    state = view.state
    online = view.online(stale_after)
    out: dict[str, Any] = {
        "id": view.node_id,
        "address": view.target,
        "status": view.status(stale_after),
        "online": online,
        "error": view.error or None,
        "inflight": view.inflight,
        # Prompt-cache blocks of this node in the routing index (as last reported).
        "indexed_blocks": indexed,
        "last_seen_seconds": round(time.monotonic() - view.last_seen, 3)
        if view.last_seen
        else None,
    }
    if state is not None:
        out.update(
            version=state.version,
            draining=state.draining,
            metrics_port=state.metrics_port or None,
            running=state.running,
            waiting=state.waiting,
            memory={
                "total_bytes": state.memory.total_bytes,
                "used_bytes": state.memory.used_bytes,
                "available_bytes": state.memory.available_bytes,
                "framework_bytes": state.memory.framework_bytes,
                "budget_bytes": state.memory.budget_bytes or None,
            },
            models=[
                {
                    "id": m.id,
                    "backend": m.backend,
                    "kind": m.kind,
                    "loaded": m.loaded,
                    "context_length": m.context_length,
                    "size_bytes": m.size_bytes,
                    "memory_bytes": m.memory_bytes,
                    "estimated_bytes": m.estimated_bytes,
                    "kv_bytes_per_token": m.kv_bytes_per_token,
                    "estimate_error": m.estimate_error if m.loaded else None,
                    "idle_seconds": m.idle_seconds if m.loaded else None,
                }
                for m in state.models
            ],
            transfers=[transfer_json(t, view) for t in state.transfers],
            load=[
                {
                    "model": x.model,
                    "running": x.running,
                    "waiting": x.waiting,
                    "queued_prefill_tokens": x.queued_prefill_tokens,
                    "prefill_tokens_per_second": x.prefill_tokens_per_second,
                    "decode_tokens_per_second": x.decode_tokens_per_second,
                    "aggregate_decode_tokens_per_second": x.aggregate_decode_tokens_per_second,
                    "draft_tokens": x.draft_tokens,
                    "accepted_draft_tokens": x.accepted_draft_tokens,
                }
                for x in state.load
            ],
            cache=[
                {"model": c.model, "block_size": c.block_size, "blocks": len(c.block_hashes)}
                for c in state.cache
            ],
        )
    return out


def nodes_json(registry: NodeRegistry) -> dict[str, Any]:
    """The body of GET /api/nodes (also the payload of the web UI's event stream)."""
    indexed = registry.prefix.stats().nodes
    return {
        "nodes": [
            _node_json(v, registry.stale_after, indexed.get(v.target, 0)) for v in registry.nodes()
        ],
        # Node groups (coordinator.groups), as GET /api/groups lists them.
        "groups": [g.json() for g in GroupManager(registry).groups()],
    }


@router.get("/nodes")
async def list_nodes(request: Request) -> JSONResponse:
    return JSONResponse(nodes_json(_service(request).registry))


def transfer_json(t: Transfer, view: NodeView | None = None) -> dict[str, Any]:
    """A pull or copy as the admin API shows it: `percent` once the total is known, and
    (given its node) `node` and `served`, whether that node lists the model now."""
    out: dict[str, Any] = {
        "id": t.id,
        "kind": t.kind,
        "model": t.model,
        "source": t.source,
        "state": t.state,
        "bytes_done": t.bytes_done,
        "bytes_total": t.bytes_total or None,
        "percent": round(100 * t.bytes_done / t.bytes_total, 1) if t.bytes_total else None,
        "error": t.error or None,
        "started": t.started,
        "finished": t.finished or None,
        "path": t.path or None,
    }
    if view is not None:
        out["node"] = view.node_id
        out["served"] = bool(t.model) and view.model(t.model) is not None
    return out


@router.get("/models")
async def list_models(request: Request) -> JSONResponse:
    """The mesh-wide table: each model, and on each node loaded or on disk, with sizes and
    its lifetime (ttl, pin)."""
    service = _service(request)
    models: list[dict[str, Any]] = []
    for model_id, views in sorted(service.registry.served_models().items()):
        infos = sorted(
            ((v, i) for v in views if (i := v.model(model_id)) is not None),
            key=lambda vi: vi[0].node_id,
        )
        first = infos[0][1]
        life = service.settings.lifetime(model_id)
        models.append(
            {
                "id": model_id,
                "backend": first.backend,
                "kind": first.kind,  # chat | stt | tts (mesh.audio)
                "context_length": first.context_length,
                "quantization": first.quantization,
                "size_bytes": first.size_bytes,
                "estimated_bytes": first.estimated_bytes,
                "ttl": life.ttl,
                "pin": life.pin,
                "nodes": [
                    {
                        "id": v.node_id,
                        "loaded": i.loaded,
                        "source": i.source,
                        "path": i.path,
                        "memory_bytes": i.memory_bytes,
                        "idle_seconds": i.idle_seconds if i.loaded else None,
                    }
                    for v, i in infos
                ],
            }
        )
    aliases = _settings(request).raw("aliases") or {}
    return JSONResponse({"models": models, "aliases": aliases})
