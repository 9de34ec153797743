"""The coordinator's OpenAPI document (`/openapi.json`), with every request body in it.

The handlers read their bodies by hand (so errors name fields as clients wrote them,
in each API's own envelope), which leaves FastAPI nothing to describe. This adds the
bodies: the protocol models' own JSON schemas for the Anthropic and OpenAI routes, and
the documented fields of the admin and audio routes' bodies. Fuzzers (schemathesis, tests/
test_fuzz.py) and client generators read it.
"""

from __future__ import annotations

import warnings
from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from coordinator.api.anthropic_protocol import CountTokensRequest, MessagesRequest
from coordinator.api.openai_protocol import ChatCompletionRequest, CompletionRequest

_REF = "#/components/schemas/{model}"

_MODELS: dict[tuple[str, str], type[BaseModel]] = {
    ("post", "/v1/messages"): MessagesRequest,
    ("post", "/anthropic/v1/messages"): MessagesRequest,
    ("post", "/v1/messages/count_tokens"): CountTokensRequest,
    ("post", "/anthropic/v1/messages/count_tokens"): CountTokensRequest,
    ("post", "/v1/chat/completions"): ChatCompletionRequest,
    ("post", "/v1/completions"): CompletionRequest,
}


def _object(required: tuple[str, ...] = (), **properties: Any) -> dict[str, Any]:
    out: dict[str, Any] = {"type": "object", "properties": properties}
    if required:
        out["required"] = list(required)
    return out


_STR = {"type": "string"}
_MAP = {"type": "object"}  # free-form: names to settings (docs/coordinator.md)

_ADMIN: dict[tuple[str, str], dict[str, Any]] = {
    ("put", "/api/aliases"): _object(aliases=_MAP),
    ("post", "/api/aliases"): _object(("alias",), alias=_STR, model=_STR, model_path=_STR),
    ("put", "/api/routing/config"): _MAP,
    ("post", "/api/routing/config"): _MAP,
    ("put", "/api/inference-settings"): _MAP,
    ("put", "/api/model-settings"): _MAP,
    ("post", "/api/models/load"): _object(("model",), model=_STR, node=_STR),
    ("post", "/api/models/unload"): _object(("model",), model=_STR, node=_STR),
    ("post", "/api/models/pull"): _object(
        ("repo",), repo=_STR, node=_STR, file=_STR, revision=_STR
    ),
    ("post", "/api/models/copy"): _object(
        ("model", "from", "to"),
        model=_STR,
        to=_STR,
        limit_mbps={"type": "number"},
        **{"from": _STR},
    ),
    ("post", "/api/groups"): _object(
        ("name", "model"),
        name=_STR,
        model=_STR,
        nodes={"type": "array", "items": _STR},
        strategy={"type": "string", "enum": ["tensor", "pipeline"]},
        backend={"type": "string", "enum": ["ring", "jaccl"]},
    ),
    ("post", "/v1/audio/speech"): _object(
        ("model", "input"),
        model=_STR,
        input=_STR,
        voice=_STR,
        instructions=_STR,
        response_format=_STR,
        stream_format=_STR,
        speed={"type": "number"},
    ),
}
# Multipart bodies, as OpenAI's audio API takes them.
_FORMS: dict[tuple[str, str], dict[str, Any]] = {
    ("post", "/v1/audio/transcriptions"): _object(
        ("file", "model"),
        file={"type": "string", "format": "binary"},
        model=_STR,
        language=_STR,
        prompt=_STR,
        response_format=_STR,
        temperature={"type": "number"},
    ),
}


def _json_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"application/json": {"schema": schema}}}


def _form_body(schema: dict[str, Any]) -> dict[str, Any]:
    return {"required": True, "content": {"multipart/form-data": {"schema": schema}}}


def build_openapi(app: FastAPI) -> dict[str, Any]:
    """The document, with request bodies and unique operation ids."""
    with warnings.catch_warnings():
        # One handler serving two methods: FastAPI warns of the duplicate id fixed below.
        warnings.filterwarnings("ignore", "Duplicate Operation ID", UserWarning)
        doc = get_openapi(title=app.title, version=app.version, routes=app.routes)
    schemas: dict[str, Any] = doc.setdefault("components", {}).setdefault("schemas", {})
    seen: set[str] = set()
    for path, ops in doc.get("paths", {}).items():
        for method, op in ops.items():
            key = (method, path)
            if key in _MODELS:
                model = _MODELS[key]
                schema = model.model_json_schema(ref_template=_REF)
                schemas.update(schema.pop("$defs", {}))
                schemas[model.__name__] = schema
                op["requestBody"] = _json_body({"$ref": _REF.format(model=model.__name__)})
            elif key in _ADMIN:
                op["requestBody"] = _json_body(_ADMIN[key])
            elif key in _FORMS:
                op["requestBody"] = _form_body(_FORMS[key])
            # One handler serving two methods gets one id from FastAPI: make them unique.
            op_id = op.get("operationId")
            if op_id in seen:
                op["operationId"] = f"{op_id}_{method}"
            seen.add(op["operationId"])
    return doc


def install(app: FastAPI) -> None:
    """Serve `build_openapi`'s document at /openapi.json (built once, on first use)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = build_openapi(app)
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
