"""`python -m node.groups --model DIR`: one rank of a node group (node.groups.rank)."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    from node.groups.rank import run

    parser = argparse.ArgumentParser(prog="python -m node.groups")
    parser.add_argument("--model", required=True, type=Path, help="the model's directory")
    args = parser.parse_args(argv)
    if not os.environ.get("MLX_HOSTFILE") or "MLX_RANK" not in os.environ:
        parser.error("MLX_RANK and MLX_HOSTFILE must be set")
    return run(args.model)


if __name__ == "__main__":
    sys.exit(main())
