"""`macmesh models copy` and `macmesh models rm`: model files between nodes, via a coordinator.

`copy` starts the copy on the destination node (POST /api/models/copy), then
follows its transfer record (GET /api/transfers/{id}, else the node's
transfers in GET /api/nodes) with a progress bar on stderr until it is done
or failed. `rm` is DELETE /api/models/{model}?node=...
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any
from urllib.parse import quote

from macmesh.admin_client import AdminClient, AdminError, add_coordinator_flags, run_admin
from macmesh.transfer_progress import ProgressBar, follow


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def cmd_models_copy(args: argparse.Namespace) -> int:
    """`macmesh models copy MODEL --from NODE --to NODE [--limit MB/s] [--no-wait]`."""
    if args.limit is not None and args.limit <= 0:
        print("macmesh: --limit must be > 0 (MB/s)", file=sys.stderr)
        return 2
    body: dict[str, Any] = {"model": args.model, "from": args.source, "to": args.dest}
    if args.limit is not None:
        body["limit_mbps"] = args.limit
    client = AdminClient.from_args(args)
    t0 = time.monotonic()
    try:
        started = client.post("/api/models/copy", body)
        transfer, node = started["transfer"], started["node"]
        if args.no_wait:
            print(json.dumps(started, indent=2) if args.json else f"copying: {transfer['id']}")
            return 0
        bar = None if args.json else ProgressBar(sys.stderr)
        try:
            transfer = follow(client, transfer, bar)
        finally:
            if bar is not None:
                bar.close()
    except AdminError as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps({"transfer": transfer, "node": node}, indent=2))
    if transfer.get("state") != "done":
        print(f"macmesh: copy of {args.model} failed: {transfer.get('error')}", file=sys.stderr)
        return 1
    if not args.json:
        seconds = time.monotonic() - t0
        size = int(transfer.get("bytes_total") or 0)
        print(
            f"copied {args.model} to {node}: {transfer.get('path')} "
            f"({_mb(size)} in {seconds:.1f}s, {size / 1e6 / max(seconds, 1e-9):,.1f} MB/s)"
        )
    return 0


def cmd_models_rm(args: argparse.Namespace) -> int:
    """`macmesh models rm MODEL --node NODE [--force]`."""
    path = f"/api/models/{quote(args.model, safe='/')}"
    params = {"node": args.node, "force": "true" if args.force else "false"}

    def delete(client: AdminClient) -> int:
        out = client.call("DELETE", path, params=params)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            unloaded = " (unloaded first)" if out.get("was_loaded") else ""
            print(
                f"deleted {out['deleted']} from {out['node']}: {out['path']}, "
                f"{_mb(out['bytes_freed'])} freed{unloaded}"
            )
        return 0

    return run_admin(args, delete, timeout=args.timeout)


def add_parsers(msub: Any) -> None:
    """Register this module's `macmesh models` actions."""
    q = msub.add_parser("copy", help="copy a model's files from one node to another")
    q.add_argument("model", help="the model id on the source node")
    q.add_argument("--from", dest="source", required=True, help="source node id or address")
    q.add_argument("--to", dest="dest", required=True, help="destination node id or address")
    q.add_argument("--limit", type=float, metavar="MB/s", help="bandwidth cap (1 MB = 10^6 B)")
    q.add_argument("--no-wait", action="store_true", help="start it and return")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(q)
    q.set_defaults(func=cmd_models_copy)
    q = msub.add_parser("rm", help="delete a model's files from a node")
    q.add_argument("model", help="the model id on that node")
    q.add_argument("--node", required=True, help="node id or address")
    q.add_argument("--force", action="store_true", help="unload it first if it is loaded")
    q.add_argument("--timeout", type=float, default=300, help="seconds to wait (default 300)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(q)
    q.set_defaults(func=cmd_models_rm)
