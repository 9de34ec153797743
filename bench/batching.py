"""Concurrent streams: `macmesh up` (continuous batching) vs `mlx_lm.server`, same run.

Target (issue 16): at every concurrency level, macmesh's aggregate tok/s >= 0.95x
mlx_lm.server's and its TTFT p50 <= 1.1x.

What it measures
    Three servers on the same model dir (SmolLM2-135M, the embedded default
    model, prepared with `macmesh models prepare-default`), all started at
    once from this venv, each its own process, always stopped at the end:

    * `mlx_lm.server --model DIR` (the engine macmesh wraps; it batches with
      the same `BatchGenerator`);
    * `macmesh up --preload MODEL` (node + coordinator in one process, as
      `make up` runs it: continuous batching);
    * `macmesh up --no-batching --max-running 4`: the engine before batching
      (round-robin, one token per stream per turn, at most 4 running).

    At each level N (`--levels`, default 1 2 4 8), each round sends N
    streamed OpenAI `/v1/chat/completions` requests at once to one server
    (greedy, `--max-tokens` each; each prompt opens with a system message
    tagged per stream and round), and the servers take turns, rotating who
    goes first. Idle servers cost nothing (they wait on sockets). No prompt
    cache helps anyone: mlx_lm.server runs with `--prompt-cache-size 0`,
    because it reuses any common token prefix and the chat template's opening
    tokens are common to every prompt, while macmesh's cache reuses whole
    256-token blocks only (tuned for 20-30k-token agent prompts; the prompt
    cache benchmark measures it). On mlx[cpu] here every prompt token costs
    about 90 ms, so a handful of shared tokens would otherwise decide TTFT.

    Per round: aggregate tok/s = completion tokens of all N streams / wall
    time from sending to the last stream's end; TTFT = first content chunk per
    stream. Reported per server and level: median aggregate tok/s over
    rounds, TTFT p50 over every stream; ratios against mlx_lm.server.

How to run
    .venv/bin/python bench/batching.py                       # 1 2 4 8, 3 rounds
    .venv/bin/python bench/batching.py --levels 1 4 --rounds 2 --json-out /tmp/b.json

    Exit code 0 = PASS, 1 = FAIL (the target), 2 = a failed start or request.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import json
import os
import signal
import socket
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from macmesh.bench.procs import (
    DEFAULT_MODEL_ID,
    ManagedProcess,
    ProcessError,
    exit_on_sigterm,
    machine_info,
    prepare_default_model,
)
from macmesh.bench.stats import median, percentile
from macmesh.bench.streams import BenchError, Sample, run_openai

ENGINES = ("mlx_lm.server", "macmesh", "macmesh-no-batching")
# The system message opens the prompt with a tag of its own per stream and round,
# so no server's prompt cache serves any of it (mlx_lm.server reuses any common
# token prefix; macmesh's cache whole 256-token blocks): this measures batching.
SYSTEM = "{tag}: you are a storyteller."
PROMPT = "Write a long story about a lighthouse keeper and the sea."
START_TIMEOUT_S = 180.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    name: str
    proc: ManagedProcess
    base_url: str
    model: str


def start_servers(work: Path, model_dir: Path, extra: Sequence[str]) -> list[Server]:
    """The three servers, started together; ready once each answers /v1/models."""
    servers: list[Server] = []
    for name in ENGINES:
        port = free_port()
        if name == "mlx_lm.server":
            exe = [sys.executable, "-m", "mlx_lm.server"]
            # No prompt cache: the chat template's opening tokens, common to every
            # prompt, would be served from it (macmesh reuses whole 256-token blocks).
            args = [
                "--model", str(model_dir), "--host", "127.0.0.1", "--port", str(port),
                "--prompt-cache-size", "0",
            ]  # fmt: skip
            model = "default_model"
        else:
            exe = []
            args = [
                "up", "--http-port", str(port), "--grpc-port", "0", "--metrics-port", "-1",
                "--models-dir", str(model_dir.parent), "--no-hf-cache", "--no-bonjour",
                "--no-default-model", "--preload", DEFAULT_MODEL_ID, *extra,
            ]  # fmt: skip
            if name == "macmesh-no-batching":
                args += ["--no-batching", "--max-running", "4"]
            model = DEFAULT_MODEL_ID
        proc = ManagedProcess(
            name,
            args,
            home=work / f"{name}-home",
            log_path=work / f"{name}.log",
            ready="",
            exe=exe,
        )
        proc.start()
        servers.append(Server(name, proc, f"http://127.0.0.1:{port}", model))
    deadline = time.monotonic() + START_TIMEOUT_S
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        for s in servers:
            while True:
                try:
                    r = http.post(
                        f"{s.base_url}/v1/chat/completions",
                        json={
                            "model": s.model,
                            "messages": [{"role": "user", "content": "hi"}],
                            "max_tokens": 2,
                        },
                        timeout=120.0,
                    )
                    if r.status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if s.proc.proc is not None and s.proc.proc.poll() is not None:
                    raise ProcessError(f"{s.name} exited:\n{s.proc.log_tail()}")
                if time.monotonic() > deadline:
                    raise ProcessError(f"{s.name} did not answer in time:\n{s.proc.log_tail()}")
                time.sleep(0.5)
    return servers


@dataclass
class RoundResult:
    engine: str
    level: int
    round: int
    wall_s: float
    completion_tokens: int
    aggregate_tps: float
    ttft_s: list[float]


async def one_round(
    http: httpx.AsyncClient, s: Server, level: int, rnd: int, max_tokens: int
) -> RoundResult:
    tags = [f"{level * 1000 + rnd * 100 + i} {s.name}" for i in range(level)]
    t0 = time.perf_counter()
    samples: list[Sample] = await asyncio.gather(
        *(
            run_openai(http, s.base_url, s.model, PROMPT, max_tokens, system=SYSTEM.format(tag=t))
            for t in tags
        )
    )
    wall = time.perf_counter() - t0
    tokens = sum(x.completion_tokens for x in samples)
    return RoundResult(s.name, level, rnd, wall, tokens, tokens / wall, [x.ttft_s for x in samples])


async def run_all(
    servers: list[Server], levels: Sequence[int], rounds: int, max_tokens: int
) -> list[RoundResult]:
    out: list[RoundResult] = []
    timeout = httpx.Timeout(900.0, connect=10.0)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    async with httpx.AsyncClient(timeout=timeout, limits=limits, trust_env=False) as http:
        for s in servers:  # warm each once (first-request costs out of the figures)
            await one_round(http, s, 1, -1, 4)
        for level in levels:
            for rnd in range(rounds):
                k = rnd % len(servers)
                for s in servers[k:] + servers[:k]:
                    r = await one_round(http, s, level, rnd, max_tokens)
                    print(
                        f"N={level} round {rnd + 1}/{rounds} {s.name}: {r.aggregate_tps:.2f} tok/s,"
                        f" TTFT p50 {percentile(r.ttft_s, 50):.2f} s",
                        file=sys.stderr,
                        flush=True,
                    )
                    out.append(r)
    return out


def summarize(results: Sequence[RoundResult], levels: Sequence[int]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for level in levels:
        row: dict[str, Any] = {}
        for name in ENGINES:
            rs = [r for r in results if r.engine == name and r.level == level]
            row[name] = {
                "aggregate_tps": median([r.aggregate_tps for r in rs]),
                "ttft_p50_s": percentile([t for r in rs for t in r.ttft_s], 50),
            }
        base = row["mlx_lm.server"]
        for name in ENGINES[1:]:
            row[name]["aggregate_ratio"] = row[name]["aggregate_tps"] / base["aggregate_tps"]
            row[name]["ttft_ratio"] = row[name]["ttft_p50_s"] / base["ttft_p50_s"]
        table[str(level)] = row
    return table


def markdown(table: dict[str, Any]) -> str:
    head = (
        "| streams | mlx_lm.server tok/s | macmesh tok/s | ratio | macmesh no-batching tok/s "
        "| ratio | mlx_lm.server TTFT p50 s | macmesh TTFT p50 s | ratio "
        "| no-batching TTFT p50 s | ratio |\n"
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for level, row in table.items():
        b, m, o = row["mlx_lm.server"], row["macmesh"], row["macmesh-no-batching"]
        rows.append(
            f"| {level} | {b['aggregate_tps']:.2f} | {m['aggregate_tps']:.2f} "
            f"| {m['aggregate_ratio']:.2f}x | {o['aggregate_tps']:.2f} "
            f"| {o['aggregate_ratio']:.2f}x "
            f"| {b['ttft_p50_s']:.2f} | {m['ttft_p50_s']:.2f} | {m['ttft_ratio']:.2f}x "
            f"| {o['ttft_p50_s']:.2f} | {o['ttft_ratio']:.2f}x |"
        )
    return "\n".join([head, *rows])


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", type=int, nargs="+", default=[1, 2, 4, 8])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--min-ratio", type=float, default=0.95, help="target: aggregate tok/s")
    p.add_argument("--max-ttft-ratio", type=float, default=1.1, help="target: TTFT p50")
    p.add_argument(
        "--macmesh-arg",
        action="append",
        default=[],
        help="extra argument for both `macmesh up` servers (repeatable)",
    )
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if args.rounds < 1 or min(args.levels) < 1 or args.max_tokens < 2:
        p.error("need --rounds >= 1, levels >= 1 and --max-tokens >= 2")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    started = datetime.datetime.now(datetime.UTC)
    load_start = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-batch-") as tmp:
        work = Path(tmp)
        servers: list[Server] = []
        try:
            model_dir = prepare_default_model(work / "models")
            servers = start_servers(work, model_dir, args.macmesh_arg)
            results = asyncio.run(run_all(servers, args.levels, args.rounds, args.max_tokens))
        except (BenchError, ProcessError, httpx.HTTPError) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            return 2
        finally:
            for s in servers:
                s.proc.stop()
    load_end = os.getloadavg()
    table = summarize(results, args.levels)
    m = [table[str(lv)]["macmesh"] for lv in args.levels]
    ok = all(
        r["aggregate_ratio"] >= args.min_ratio and r["ttft_ratio"] <= args.max_ttft_ratio for r in m
    )
    print(
        f"\n{args.rounds} rounds per level, {args.max_tokens} max tokens per stream, greedy; "
        f"load average {load_start[0]:.2f} → {load_end[0]:.2f}\n"
    )
    print(markdown(table))
    print(
        f"\n**verdict: {'PASS' if ok else 'FAIL'}**: macmesh aggregate tok/s >= "
        f"{args.min_ratio:g}x and TTFT p50 <= {args.max_ttft_ratio:g}x mlx_lm.server "
        "at every level"
    )
    if args.json_out is not None:
        report = {
            "started_at": started.isoformat(),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "machine": {
                **machine_info({"mlx": "mlx", "mlx_lm": "mlx-lm"}),
                "loadavg_start": list(load_start),
                "loadavg_end": list(load_end),
            },
            "summary": table,
            "verdict": "PASS" if ok else "FAIL",
            "rounds": [asdict(r) for r in results],
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
