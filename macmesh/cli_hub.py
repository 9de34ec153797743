"""`macmesh models pull` and `macmesh models search`: the Hugging Face Hub, through a
coordinator's admin API (coordinator.api.hub).

`pull` starts the download on a node (POST /api/models/pull), then follows it
(GET /api/transfers/{id} every half second) with a progress bar on stderr until
it is done (exit 0) or failed (exit 1, with the node's error). `search` prints
MLX and GGUF repos matching a text, most downloaded first.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from macmesh.admin_client import AdminClient, AdminError, add_coordinator_flags, run_admin
from macmesh.transfer_progress import ProgressBar, follow, human_bytes


def cmd_models_pull(args: argparse.Namespace) -> int:
    body = {"repo": args.repo, "file": args.file, "revision": args.revision, "node": args.node}
    client = AdminClient.from_args(args)
    try:
        started = client.post("/api/models/pull", {k: v for k, v in body.items() if v})
        transfer, node = started["transfer"], started["node"]
        if args.no_wait:
            if args.json:
                print(json.dumps(started, indent=2))
            else:
                print(f"pulling {transfer['source']} on {node}: transfer {transfer['id']}")
            return 0
        bar = ProgressBar(sys.stderr)
        try:
            transfer = follow(client, transfer, bar)
        except KeyboardInterrupt:
            bar.close()
            print(
                f"macmesh: stopped waiting; the pull goes on on {node} (transfer {transfer['id']})",
                file=sys.stderr,
            )
            return 130
        finally:
            bar.close()
    except AdminError as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps({"transfer": transfer, "node": node}, indent=2))
    if transfer.get("state") != "done":
        print(f"macmesh: pull failed on {node}: {transfer.get('error')}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"pulled {transfer['source']} onto {node}: {transfer.get('path')}")
        if transfer.get("served"):
            print(f"served as {transfer['model']!r}")
        else:
            print(
                f"note: {node} does not list {transfer['model']!r} as a model "
                "(not an MLX dir or a top-level GGUF file, or the node runs with --no-hf-cache)"
            )
    return 0


def cmd_models_search(args: argparse.Namespace) -> int:
    params: dict[str, Any] = {"q": args.text, "limit": args.limit}
    if args.kind:
        params["kind"] = args.kind
    found: list[dict[str, Any]] = []

    def search(client: AdminClient) -> int:
        found.extend(client.get("/api/models/search", params=params)["results"])
        return 0

    if run_admin(args, search, timeout=60):
        return 1
    results = found
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if not results:
        print(f"no MLX or GGUF repos match {args.text!r}")
        return 0
    width = max(len(r["repo"]) for r in results)
    qwidth = min(max(len("quantization"), *(len(r["quantization"] or "") for r in results)), 40)
    print(f"{'repo':<{width}}  {'kind':<4}  {'quantization':<{qwidth}}  {'size':>10}  "
          f"{'downloads':>10}")  # fmt: skip
    for r in results:
        quant = r["quantization"] or "?"
        if len(quant) > qwidth:
            quant = quant[: qwidth - 1] + "…"
        print(
            f"{r['repo']:<{width}}  {r['kind']:<4}  {quant:<{qwidth}}  "
            f"{human_bytes(r['size_bytes']):>10}  {r['downloads']:>10,}"
        )
    return 0


def add_parsers(msub: Any) -> None:
    """Register this module's `macmesh models` actions."""
    p = msub.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub onto a node",
        description="Download a Hub repo (its MLX files, or its only GGUF file) or one file "
        "(--file) into a node's Hugging Face cache, with progress; a pull that was "
        "interrupted resumes. The node uses its own HF_TOKEN / token file and HF_ENDPOINT.",
    )
    p.add_argument("repo", help="Hub repo id, e.g. mlx-community/Qwen3-4B-4bit")
    p.add_argument("--file", help="one file of the repo, e.g. a GGUF quantization")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--node", help="node id or address (default: the only online node)")
    p.add_argument("--no-wait", action="store_true", help="return once the pull has started")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(p)
    p.set_defaults(func=cmd_models_pull)
    q = msub.add_parser(
        "search",
        help="search the Hugging Face Hub for MLX and GGUF models",
        description="MLX and GGUF repos on the Hub whose name matches TEXT, most downloaded "
        "first, with quantization and size (the repo's storage on the Hub: for a GGUF repo, "
        "every quantization together). The coordinator asks the Hub.",
    )
    q.add_argument("text", help="words in the repo name, e.g. 'qwen3 4b'")
    q.add_argument("--kind", choices=("mlx", "gguf"), help="only this kind (default both)")
    q.add_argument("--limit", type=int, default=20, help="results (default 20, at most 100)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(q)
    q.set_defaults(func=cmd_models_search)
