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

from macmesh.admin_client import AdminClient, AdminError, add_coordinator_flags

# Seconds between polls of a running copy, and how long a transfer the coordinator
# does not show yet (its node's next state push) is waited for.
POLL_SECONDS = 0.5
UNSEEN_GRACE_SECONDS = 15.0
BAR_WIDTH = 24


def _mb(n: float) -> str:
    return f"{n / 1e6:,.1f} MB"


def progress_line(transfer: dict[str, Any], rate: float) -> str:
    """`[#####.....]  42%  41.2/98.4 MB  35.1 MB/s` for a running transfer."""
    done, total = int(transfer.get("bytes_done") or 0), int(transfer.get("bytes_total") or 0)
    if total:
        frac = min(done / total, 1.0)
        filled = int(frac * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return f"[{bar}] {frac * 100:3.0f}%  {done / 1e6:,.1f}/{_mb(total)}  {rate / 1e6:,.1f} MB/s"
    return f"[{'.' * BAR_WIDTH}]  preparing (the source hashes the files)  {_mb(done)}"


def _lookup(client: AdminClient, node: str, transfer_id: str) -> dict[str, Any] | None:
    """The transfer's current record, or None while the coordinator does not show it."""
    try:
        body = client.get(f"/api/transfers/{quote(transfer_id, safe='')}")
    except AdminError as exc:
        if "HTTP 404" not in str(exc):
            raise
    else:
        record = body.get("transfer", body) if isinstance(body, dict) else None
        if isinstance(record, dict) and "state" in record:
            return record
    for view in client.get("/api/nodes").get("nodes", []):
        if node in (view.get("id"), view.get("address")):
            for t in view.get("transfers") or []:
                if t.get("id") == transfer_id:
                    return dict(t)
    return None


def follow(
    client: AdminClient, node: str, transfer: dict[str, Any], *, show: bool
) -> dict[str, Any]:
    """Poll until the transfer is done or failed; a progress bar on stderr when `show`."""
    tty = show and sys.stderr.isatty()
    first_seen: tuple[float, int] | None = None
    unseen_since = time.monotonic()
    rate = 0.0
    while transfer.get("state") == "running":
        time.sleep(POLL_SECONDS)
        record = _lookup(client, node, str(transfer["id"]))
        now = time.monotonic()
        if record is None:
            if now - unseen_since > UNSEEN_GRACE_SECONDS:
                raise AdminError(
                    f"the coordinator does not show transfer {transfer['id']} of node {node}"
                )
            continue
        unseen_since = now
        transfer = record
        done = int(transfer.get("bytes_done") or 0)
        if first_seen is None or not first_seen[1]:  # the rate counts from the first bytes
            first_seen = (now, done)
        elif now > first_seen[0] and transfer.get("state") == "running":
            rate = (done - first_seen[1]) / (now - first_seen[0])
        if tty:
            print("\r" + progress_line(transfer, rate), end="", file=sys.stderr, flush=True)
    if tty:
        print(file=sys.stderr)
    return transfer


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
        transfer = follow(client, node, transfer, show=not args.json)
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
    client = AdminClient.from_args(args, timeout=args.timeout)
    path = f"/api/models/{quote(args.model, safe='/')}"
    params = {"node": args.node, "force": "true" if args.force else "false"}
    try:
        out = client.call("DELETE", path, params=params)
    except AdminError as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps(out, indent=2))
    else:
        unloaded = " (unloaded first)" if out.get("was_loaded") else ""
        print(
            f"deleted {out['deleted']} from {out['node']}: {out['path']}, "
            f"{_mb(out['bytes_freed'])} freed{unloaded}"
        )
    return 0


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
