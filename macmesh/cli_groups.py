"""`macmesh groups create|propose|list|rm`: node groups (one MLX model over several nodes), via a
coordinator's admin API (/api/groups; docs/groups.md)."""

from __future__ import annotations

import argparse
import json
import time
from typing import Any
from urllib.parse import quote

from macmesh.admin_client import AdminClient, add_coordinator_flags, run_admin


def _gib(n: float) -> str:
    return f"{n / 2**30:.2f} GiB"


def _describe(g: dict[str, Any]) -> str:
    members = ", ".join(g["members"])
    line = (
        f"{g['name']}: {g['state']}  model {g['model']}, {g['strategy']}/{g['backend']} over "
        f"{g['size']} nodes ({members}); served by {g['serving_node']}, "
        f"{_gib(g['memory_bytes_per_member'])} per member"
    )
    return line + (f"\n  {g['detail']}" if g.get("detail") else "")


def cmd_groups_create(args: argparse.Namespace) -> int:
    """`macmesh groups create NAME --model M --nodes A,B,C [--strategy] [--backend]`."""
    body: dict[str, Any] = {
        "name": args.name,
        "model": args.model,
        "strategy": args.strategy,
        "backend": args.backend,
    }
    if args.nodes:
        body["nodes"] = [n.strip() for n in args.nodes.split(",") if n.strip()]

    def create(client: AdminClient) -> int:
        t0 = time.monotonic()
        group = client.post("/api/groups", body)
        if args.json:
            print(json.dumps(group, indent=2))
        else:
            print(f"formed in {time.monotonic() - t0:.1f}s\n{_describe(group)}")
        return 0

    return run_admin(args, create, timeout=args.timeout)


def cmd_groups_propose(args: argparse.Namespace) -> int:
    """`macmesh groups propose --model M [--size N]`: the members the coordinator would pick."""

    def propose(client: AdminClient) -> int:
        params: dict[str, Any] = {"model": args.model, "strategy": args.strategy}
        if args.size:
            params["size"] = args.size
        out = client.get("/api/groups/propose", params=params)
        if args.json:
            print(json.dumps(out, indent=2))
        else:
            print(
                f"{out['model']} ({_gib(out['memory_bytes'])}) over {out['size']} nodes: "
                f"{','.join(out['nodes'])}\n  {out['why']}"
            )
        return 0

    return run_admin(args, propose, timeout=60)


def cmd_groups_list(args: argparse.Namespace) -> int:
    """`macmesh groups list [--json]`."""

    def show(client: AdminClient) -> int:
        groups = client.get("/api/groups")["groups"]
        if args.json:
            print(json.dumps(groups, indent=2))
        elif not groups:
            print("no node groups")
        else:
            for g in groups:
                print(_describe(g))
                for r in g["ranks"]:
                    where = r["node"] + ("" if r["online"] else " (offline)")
                    print(f"  rank {r['rank']}: {where}  {r['state']}  {r['host']}")
        return 0

    return run_admin(args, show)


def cmd_groups_rm(args: argparse.Namespace) -> int:
    """`macmesh groups rm NAME`: stop every rank."""

    def remove(client: AdminClient) -> int:
        out = client.call("DELETE", f"/api/groups/{quote(args.name, safe='')}")
        print(json.dumps(out, indent=2) if args.json else f"removed group {out['name']}")
        return 0

    return run_admin(args, remove, timeout=120)


def add_groups_parser(sub: Any) -> None:
    """Register `macmesh groups`."""
    p = sub.add_parser("groups", help="node groups: one MLX model sharded over several nodes")
    gsub = p.add_subparsers(dest="action", required=True)
    q = gsub.add_parser("create", help="form a group (check every member, load every shard)")
    q.add_argument("name", help="the group's name: the model id clients ask for")
    q.add_argument("--model", required=True, help="the MLX model (its id on every member)")
    q.add_argument(
        "--nodes",
        help="member node ids or addresses, comma-separated, rank 0 first "
        "(default: the coordinator proposes them from the nodes' free memory)",
    )
    q.add_argument("--strategy", default="tensor", choices=("tensor", "pipeline"))
    q.add_argument("--backend", default="ring", choices=("ring", "jaccl"))
    q.add_argument(
        "--timeout", type=float, default=900, help="seconds to wait for it to form (default 900)"
    )
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(q)
    q.set_defaults(func=cmd_groups_create)
    q = gsub.add_parser("propose", help="the members the coordinator would pick for a model")
    q.add_argument("--model", required=True, help="the MLX model")
    q.add_argument("--size", type=int, default=0, help="exactly this many members")
    q.add_argument("--strategy", default="tensor", choices=("tensor", "pipeline"))
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(q)
    q.set_defaults(func=cmd_groups_propose)
    q = gsub.add_parser("list", help="every group, its state and its ranks")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(q)
    q.set_defaults(func=cmd_groups_list)
    q = gsub.add_parser("rm", help="stop a group on every member")
    q.add_argument("name")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(q)
    q.set_defaults(func=cmd_groups_rm)
