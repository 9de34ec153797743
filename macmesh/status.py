"""`macmesh status`: the mesh as one coordinator sees it, as a table."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import httpx


def _gib(n: int | None) -> str:
    return f"{n / 2**30:.1f}" if n else "-"


def render_table(nodes: list[dict[str, Any]]) -> str:
    """One line per node: id, address, status, models, memory, load."""
    rows = [("NODE", "ADDRESS", "STATUS", "MODELS (*loaded)", "MEM GiB used/total", "RUN/WAIT")]
    for n in sorted(nodes, key=lambda n: (n.get("status") != "online", n["id"])):
        models = ", ".join(
            (m["id"] + ("*" if m.get("loaded") else "")) for m in n.get("models", [])
        )
        mem = n.get("memory") or {}
        status = n.get("status", "online" if n.get("online") else "offline")
        if n.get("error") and status != "online":
            status += f" ({n['error']})"
        rows.append(
            (
                n["id"],
                n["address"],
                status,
                models or "-",
                f"{_gib(mem.get('used_bytes'))}/{_gib(mem.get('total_bytes'))}",
                f"{n.get('running', 0)}/{n.get('waiting', 0)}",
            )
        )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def run_status(args: argparse.Namespace) -> int:
    """Print the table (or JSON); exit 1 when the coordinator cannot be reached."""
    key = args.api_key or next(
        (k.strip() for k in os.environ.get("MACMESH_API_KEYS", "").split(",") if k.strip()), None
    )
    headers = {"x-api-key": key} if key else {}
    url = args.coordinator.rstrip("/") + "/api/nodes"
    try:
        resp = httpx.get(url, headers=headers, timeout=10)
    except httpx.HTTPError as exc:
        print(
            f"macmesh: cannot reach the coordinator at {args.coordinator}: {exc}", file=sys.stderr
        )
        return 1
    if resp.status_code != 200:
        try:
            message = resp.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = resp.text
        print(f"macmesh: {url}: HTTP {resp.status_code}: {message}", file=sys.stderr)
        return 1
    nodes = resp.json()["nodes"]
    if args.json:
        print(json.dumps(nodes, indent=2))
    elif not nodes:
        print("no nodes known to this coordinator")
    else:
        print(render_table(nodes))
    return 0
