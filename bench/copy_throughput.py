"""`macmesh models copy` over loopback against `cp` of the same files on the same disk.

What it measures
    Two real `macmesh node` processes (their own MACMESH_HOMEs and models dirs,
    on one disk) and, per model set, the time from CopyModel to the transfer's
    "done" in the destination's state stream: manifest, every chunk over gRPC
    with its CRC-32, SHA-256 of every file, fsync, the atomic rename and the
    catalog rescan. Between rounds the copy is deleted from the destination
    (`rm`). The first copy of a set also pays the source's SHA-256 of the files
    (then cached in its home); it is reported apart ("cold"). For scale, the
    same files streamed from the source and dropped on arrival (ReadModelFile
    only: no CRC check, no write, no hash) show what the gRPC link alone
    carries on this machine ("stream only"). Baseline: `cp -r`
    of the same files to the same disk (and `cp` followed by an fsync of each
    file, since the copy fsyncs), the same number of rounds. Nothing is dropped
    from the page cache: both sides read from it. Medians; the ratio is mesh
    MB/s over `cp` MB/s (the issue's bar: >= 0.5).

    Sets: `synthetic` (a model dir of --shards safetensors files of random
    bytes, --size-mb in all), `smollm2` (the real SmolLM2 MLX dir), and
    `smollm2.gguf` (its GGUF file). One more copy of `smollm2` runs under a
    bandwidth cap (--limit-mbps) to show the cap holds.

How to run
    .venv/bin/python bench/copy_throughput.py [--rounds 5] [--size-mb 400] [--json-out f.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from macmesh.bench.procs import ManagedProcess, exit_on_sigterm, machine_info, prepare_default_model
from mesh.client import NodeClient

READY = "macmesh node listening on "
SYNTHETIC = "synthetic"
BAR = 0.5


def write_synthetic(models: Path, size_mb: int, shards: int) -> Path:
    """An MLX-shaped model dir the catalog accepts: config.json + safetensors of random bytes."""
    root = models / SYNTHETIC
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    per = size_mb * 1_000_000 // shards
    for i in range(shards):
        header = json.dumps({"w": {"dtype": "U8", "shape": [per], "data_offsets": [0, per]}})
        with (root / f"model-{i + 1:05d}-of-{shards:05d}.safetensors").open("wb") as f:
            f.write(struct.pack("<Q", len(header)) + header.encode())
            left = per
            while left:
                block = os.urandom(min(left, 8 << 20))
                f.write(block)
                left -= len(block)
    return root


def tree_bytes(path: Path) -> int:
    return (
        path.stat().st_size
        if path.is_file()
        else sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    )


def node(name: str, work: Path, models: Path) -> ManagedProcess:
    args = ["node", "--grpc-port", "0", "--metrics-port", "-1", "--no-bonjour", "--no-hf-cache",
            "--no-default-model", "--models-dir", str(models), "--min-free-disk", "0"]  # fmt: skip
    return ManagedProcess(
        name,
        args,
        home=work / f"home-{name}",
        log_path=work / f"{name}.log",
        ready=READY,
        unset=("MACMESH_SECRET",),
    )


async def copy_once(dest: str, source: str, model: str, limit: int = 0) -> float:
    """Seconds from CopyModel to the transfer's "done" in the destination's state."""
    async with NodeClient(dest) as client:
        t0 = time.perf_counter()
        started = await client.copy_model(model, source, "bench-source", limit)
        async for state in client.watch_state(20):
            t = next((t for t in state.transfers if t.id == started.id), None)
            if t is not None and t.state == "done":
                return time.perf_counter() - t0
            if t is not None and t.state == "failed":
                raise RuntimeError(f"copy of {model} failed: {t.error}")
    raise RuntimeError("state stream ended")


async def stream_once(source: str, model: str) -> float:
    """Seconds to stream every file of `model` from the source, dropping the bytes."""
    async with NodeClient(source) as client:
        manifest = await client.model_manifest(model)
        t0 = time.perf_counter()
        for f in manifest.files:
            async for _chunk in client.read_model_file(model, f.path, 0):
                pass
        return time.perf_counter() - t0


async def remove(dest: str, model: str) -> None:
    async with NodeClient(dest) as client:
        await client.delete_model(model)


def cp_once(src: Path, dst: Path, fsync: bool) -> float:
    """Seconds `cp -r` takes (then fsync of every file, when asked)."""
    t0 = time.perf_counter()
    subprocess.run(["cp", "-r", str(src), str(dst)], check=True)
    if fsync:
        for p in [dst] if dst.is_file() else [p for p in dst.rglob("*") if p.is_file()]:
            fd = os.open(p, os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)
    seconds = time.perf_counter() - t0
    shutil.rmtree(dst) if dst.is_dir() else dst.unlink()
    return seconds


def measure(
    model: str, path: Path, dest: str, source: str, scratch: Path, rounds: int
) -> dict[str, Any]:
    size = tree_bytes(path)
    mb = size / 1e6
    cold = asyncio.run(copy_once(dest, source, model))
    asyncio.run(remove(dest, model))
    mesh_s, cp_s, cp_sync_s, stream_s = [], [], [], []
    for _ in range(rounds):
        stream_s.append(asyncio.run(stream_once(source, model)))
        mesh_s.append(asyncio.run(copy_once(dest, source, model)))
        asyncio.run(remove(dest, model))
        cp_s.append(cp_once(path.resolve(), scratch / model, fsync=False))
        cp_sync_s.append(cp_once(path.resolve(), scratch / model, fsync=True))
    row: dict[str, Any] = {
        "bytes": size,
        "files": 1 if path.is_file() else sum(1 for p in path.rglob("*") if p.is_file()),
        "mesh_cold_mbps": mb / cold,
        "mesh_mbps": mb / statistics.median(mesh_s),
        "cp_mbps": mb / statistics.median(cp_s),
        "cp_fsync_mbps": mb / statistics.median(cp_sync_s),
        "stream_only_mbps": mb / statistics.median(stream_s),
        "mesh_seconds": mesh_s,
        "cp_seconds": cp_s,
        "cp_fsync_seconds": cp_sync_s,
    }
    row["ratio"] = row["mesh_mbps"] / row["cp_mbps"]
    row["ratio_vs_cp_fsync"] = row["mesh_mbps"] / row["cp_fsync_mbps"]
    return row


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--size-mb", type=int, default=400, help="synthetic set size (MB)")
    p.add_argument("--shards", type=int, default=4, help="synthetic set: safetensors files")
    p.add_argument("--limit-mbps", type=float, default=50.0, help="the capped run's cap")
    p.add_argument("--sets", nargs="+", default=[SYNTHETIC, "smollm2", "smollm2.gguf"])
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    rows: dict[str, Any] = {}
    capped: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-copy-") as t:
        work = Path(t)
        src_models, dst_models, scratch = work / "src-models", work / "dst-models", work / "cp"
        scratch.mkdir()
        prepare_default_model(src_models)
        gguf = src_models / "smollm2.gguf"
        if gguf.is_symlink():  # a real file on this disk, as a downloaded GGUF is
            target = gguf.resolve()
            gguf.unlink()
            shutil.copyfile(target, gguf)
        if SYNTHETIC in args.sets:
            write_synthetic(src_models, args.size_mb, args.shards)
        a, b = node("source", work, src_models), node("dest", work, dst_models)
        a.start()
        b.start()
        try:
            source, dest = a.wait_ready(120), b.wait_ready(120)
            for model in args.sets:
                rows[model] = measure(model, src_models / model, dest, source, scratch, args.rounds)
                r = rows[model]
                print(
                    f"{model}: mesh {r['mesh_mbps']:.0f} MB/s (cold {r['mesh_cold_mbps']:.0f}), "
                    f"cp {r['cp_mbps']:.0f} MB/s, ratio {r['ratio']:.2f}",
                    file=sys.stderr,
                    flush=True,
                )
            if "smollm2" in args.sets and args.limit_mbps > 0:
                limit = int(args.limit_mbps * 1e6)
                seconds = asyncio.run(copy_once(dest, source, "smollm2", limit))
                asyncio.run(remove(dest, "smollm2"))
                capped = {
                    "limit_mbps": args.limit_mbps,
                    "measured_mbps": tree_bytes(src_models / "smollm2") / 1e6 / seconds,
                }
        finally:
            b.stop()
            a.stop()
    print(
        "| set | files | MB | mesh copy MB/s | mesh, first copy MB/s | cp MB/s | cp+fsync MB/s "
        "| stream only MB/s | mesh / cp |\n|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    for model, r in rows.items():
        print(
            f"| {model} | {r['files']} | {r['bytes'] / 1e6:.0f} | {r['mesh_mbps']:.0f} "
            f"| {r['mesh_cold_mbps']:.0f} | {r['cp_mbps']:.0f} | {r['cp_fsync_mbps']:.0f} "
            f"| {r['stream_only_mbps']:.0f} | {r['ratio']:.2f} |"
        )
    if capped:
        cap, got = capped["limit_mbps"], capped["measured_mbps"]
        print(f"\ncapped at {cap:g} MB/s: measured {got:.1f} MB/s")
    worst = min((r["ratio"] for r in rows.values()), default=0.0)
    verdict = "PASS" if worst >= BAR else "FAIL"
    print(f"\n{verdict}: worst mesh/cp ratio {worst:.2f} (bar {BAR})")
    if args.json_out is not None:
        report = {
            "machine": machine_info({"grpcio": "grpcio", "protobuf": "protobuf"}),
            # Other work on the machine while it ran (1-minute load average at the end).
            "load_average_1m": os.getloadavg()[0],
            "rounds": args.rounds,
            "bar": BAR,
            "verdict": verdict,
            "sets": rows,
            "capped": capped,
        }
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if verdict == "PASS" else 1


if __name__ == "__main__":
    sys.exit(main())
