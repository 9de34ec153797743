"""`macmesh requests`: the coordinator's recent requests as a table, or followed live.

The same API as the web UI's Requests page (GET /api/requests, /api/requests/events)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any

import httpx

from macmesh.admin_client import AdminClient, AdminError, add_coordinator_flags, run_admin

COLUMNS = (
    ("time", 8),
    ("api", 9),
    ("model", 28),
    ("node", 12),
    ("reason", 12),
    ("prompt", 7),
    ("cached", 7),
    ("out", 5),
    ("ttft", 7),
    ("tok/s", 6),
    ("outcome", 0),
)


def _params(args: argparse.Namespace) -> dict[str, str]:
    params = {"limit": str(args.limit)}
    for key in ("model", "node", "api", "key", "q"):
        value = getattr(args, key)
        if value:
            params[key] = value
    if args.failed:
        params["ok"] = "false"
    return params


def row(r: dict[str, Any]) -> str:
    """One record as a table line."""
    requested, model = r.get("requested") or "?", r.get("model")
    name = requested if not model or model == requested else f"{requested} -> {model}"
    ttft = r.get("ttft_seconds")
    tps = r.get("tokens_per_second")
    cells = (
        time.strftime("%H:%M:%S", time.localtime(r["time"])),
        r.get("api") or "",
        name,
        r.get("node") or "-",
        r.get("route_reason") or "-",
        str(r.get("prompt_tokens", 0)),
        str(r.get("cached_tokens", 0)),
        str(r.get("completion_tokens", 0)),
        f"{ttft:.2f}s" if ttft is not None else "-",
        f"{tps:.1f}" if tps is not None else "-",
        r.get("outcome") or "",
    )
    return "  ".join(c.ljust(w) if w else c for c, (_, w) in zip(cells, COLUMNS, strict=True))


def _header() -> str:
    return "  ".join(name.ljust(w) if w else name for name, w in COLUMNS)


def _print(records: list[dict[str, Any]], as_json: bool) -> None:
    for r in records:
        print(json.dumps(r) if as_json else row(r), flush=True)


def _follow(client: AdminClient, args: argparse.Namespace) -> int:
    """Read the event stream until interrupted; reconnect (from the last seq) if it drops."""
    params = _params(args)
    after = 0
    headers = {"x-api-key": client.key} if client.key else {}
    while True:
        if after:
            params["after"] = str(after)
        try:
            with httpx.stream(
                "GET",
                client.base + "/api/requests/events",
                params=params,
                headers=headers,
                timeout=httpx.Timeout(10, read=60),
            ) as resp:
                if resp.status_code >= 400:
                    resp.read()
                    raise AdminError(f"HTTP {resp.status_code}: {resp.text}")
                for line in resp.iter_lines():
                    if line.startswith("data:"):
                        body = json.loads(line[5:])
                        _print(body["requests"], args.json)
                        after = max(after, body.get("last_seq", after))
        except httpx.HTTPError as exc:
            print(f"macmesh: lost the stream ({exc}); reconnecting", file=sys.stderr)
            time.sleep(2)


def cmd_requests(args: argparse.Namespace) -> int:
    def show(client: AdminClient) -> int:
        if not args.json:
            print(_header())
        if args.follow:
            return _follow(client, args)
        body = client.get("/api/requests", params=_params(args))
        _print(body["requests"], args.json)
        return 0

    try:
        return run_admin(args, show)
    except KeyboardInterrupt:
        return 0


def add_requests_parser(sub: Any) -> None:
    """The `requests` command."""
    p = sub.add_parser(
        "requests", help="the coordinator's recent requests (model, node, route, TTFT, outcome)"
    )
    add_coordinator_flags(p)
    p.add_argument("-f", "--follow", action="store_true", help="keep printing new requests")
    p.add_argument("--model", help="only this requested or resolved model")
    p.add_argument("--node", help="only requests served by this node id")
    p.add_argument("--api", choices=("openai", "anthropic"), help="only this API")
    p.add_argument("--key", help="only requests made with this API key name (see api_keys.json)")
    p.add_argument("--failed", action="store_true", help="only refused, failed or cancelled ones")
    p.add_argument("-q", help="only records holding this text")
    p.add_argument("-n", "--limit", type=int, default=50, help="how many (default 50, max 1000)")
    p.add_argument("--json", action="store_true", help="one JSON object per line")
    p.set_defaults(func=cmd_requests)
