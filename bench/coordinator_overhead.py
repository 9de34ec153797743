"""Coordinator overhead: the HTTP APIs vs straight to the node's gRPC, same run.

Target (the issue): added p50 TTFT <= 5 ms and decode throughput ratio
(coordinator / direct) >= 0.98.

What it measures
    One `macmesh node` process and one `macmesh coordinator --peer NODE`
    process (separate processes, as in a real mesh), each with its own
    temporary `MACMESH_HOME`, started from this venv's `macmesh` script and
    always stopped at the end (SIGTERM, then SIGKILL). The same chat (one user
    message), greedy (`temperature` 0), `max_tokens` new tokens, goes down
    three paths in every round, one after the other, never at the same time:

    * direct:    `mesh.client.NodeClient.generate` on a kept-open gRPC channel
                 (a `ChatPrompt`; the node renders it);
    * anthropic: `POST /v1/messages`, `stream: true`;
    * openai:    `POST /v1/chat/completions`, `stream: true`.

    The two HTTP paths share one kept-open `httpx.AsyncClient`; SSE lines are
    read raw and timestamped on arrival. The order of the three paths
    rotates through all six permutations, so each path takes each position
    equally often. Warmup rounds (not counted) open the connections first,
    so connection setup is not in the measured numbers; a few extra "cold"
    requests (fresh channel / fresh HTTP client each) are reported apart.

    TTFT is request sent -> arrival of the first text delta (direct: the first
    `TextDelta`; Anthropic: the first `content_block_delta` / `text_delta`;
    OpenAI: the first chunk with a non-empty `delta.content`). Decode rate is
    (deltas after the first) / (last delta time - first delta time); the
    coordinator forwards each node `TextDelta` as one SSE event, so the three
    paths count the same deltas (checked). Per round: added TTFT =
    coordinator TTFT - direct TTFT, and ratio = coordinator rate / direct
    rate. Reported: median TTFT per path, p50/p90 of the per-round added TTFT,
    the median per-round ratio; also end to end ("e2e": request sent -> end of
    the stream, i.e. the gRPC stream closed / the HTTP body finished after
    `message_stop` or `[DONE]`), which is not part of the target. Every path
    must produce the same text, the same number of deltas, the same completion
    token count and finish reason; otherwise the run fails (exit code 2).

    Back-to-back rounds (`--b2b`, after the measured rounds): each path sends
    the request twice with no pause on the same connection, and only the
    second is timed. The pause between paths (`--gap`, 0.1 s) otherwise lets
    every connection go idle first; a request that follows the previous one
    at once is what SDK clients and agent loops do, and on TCP it can behave
    differently (delayed ACKs). Added TTFT is judged on both kinds of rounds.

    Two probes, timed alone on the warm connections, hint where added TTFT
    goes: the RenderPrompt RPC the coordinator makes before Generate, and an
    HTTP round trip to the coordinator that does no mesh work (GET /health).

    Engines (`--engine sim|mlx|both`):

    * sim: a SIMULATED engine (`--sim-model sim:PREFILL:DECODE`): the node
      sleeps prompt_tokens / PREFILL s, then emits one word per 1 / DECODE s.
      Timing noise is ~1 ms, so the 5 ms TTFT budget is judged here.
    * mlx: the real SmolLM2-135M default model on MLX (`macmesh models
      prepare-default`, `--preload smollm2`). Slow and noisy on CPU; the
      realism check for the throughput ratio.

How to run
    .venv/bin/python bench/coordinator_overhead.py                 # both engines
    .venv/bin/python bench/coordinator_overhead.py --engine sim --rounds 30 \\
        --json-out /tmp/bench_coord.json

    `--coordinator-cmd "CMD"` starts the coordinator with CMD instead of this
    venv's `macmesh` (the arguments `coordinator --port 0 --peer NODE` are
    appended), to A/B-test a coordinator change without installing it.

    Exit code 0 = PASS, 1 = FAIL (the sim verdict; the mlx verdict when only
    mlx runs), 2 = output mismatch, a failed request or a failed start.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import itertools
import json
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from macmesh.bench.overhead import (
    PATHS,
    Round,
    b2b_table,
    make_round,
    rounds_table,
    summarize,
    summarize_b2b,
    summary_table,
    verdict,
)
from macmesh.bench.procs import (
    DEFAULT_MODEL_ID,
    ManagedProcess,
    ProcessError,
    exit_on_sigterm,
    machine_info,
    prepare_default_model,
)
from macmesh.bench.stats import median
from macmesh.bench.streams import BenchError, Sample, run_anthropic, run_direct, run_openai
from mesh.client import NodeClient
from mesh.errors import MeshError
from mesh.types import (
    ChatPrompt,
    Message,
)

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."
MLX_MODEL_ID = DEFAULT_MODEL_ID  # what `macmesh models prepare-default` imports
SIM_MODEL_ID = "sim"
# Distributions whose versions go into the JSON report.
VERSIONED = ("grpcio", "httpx", "fastapi", "uvicorn", "mlx", "mlx-lm")
ORDERS = list(itertools.permutations(PATHS))
NODE_READY = "macmesh node listening on "
COORD_READY = "macmesh coordinator listening on "
REQUEST_TIMEOUT_S = 900.0
ENGINE_DEFAULTS = {
    # engine: (rounds, warmup, max_tokens, back-to-back rounds)
    # mlx: a 2.7 s TTFT hides millisecond effects; its back-to-back rounds cost minutes.
    "sim": (30, 2, 64, 10),
    "mlx": (5, 1, 32, 0),
}


@dataclass
class EngineConfig:
    engine: str
    model: str
    rounds: int
    warmup: int
    cold: int
    b2b: int
    max_tokens: int
    prompt: str
    gap_s: float


@dataclass
class Results:
    rounds: list[Round]  # warmup rounds included (flagged)
    b2b: list[Round]  # the second request of each back-to-back pair
    cold: list[Sample]
    probes: dict[str, float]


async def run_rounds(cfg: EngineConfig, node_target: str, base_url: str) -> Results:
    """Warmup, measured and back-to-back rounds and probes on kept-open connections,
    then the cold requests."""
    done: list[Round] = []
    b2b: list[Round] = []
    timeout = httpx.Timeout(REQUEST_TIMEOUT_S, connect=10.0)
    # trust_env=False: no proxy between the bench and 127.0.0.1.
    async with (
        NodeClient(node_target, timeout=REQUEST_TIMEOUT_S) as node,
        httpx.AsyncClient(timeout=timeout, trust_env=False) as http,
    ):
        await node.wait_ready(30.0)
        args = (cfg.model, cfg.prompt, cfg.max_tokens)

        async def one(path: str) -> Sample:
            if path == "direct":
                return await run_direct(node, *args)
            if path == "anthropic":
                return await run_anthropic(http, base_url, *args)
            return await run_openai(http, base_url, *args)

        for i in range(cfg.warmup + cfg.rounds):
            warmup = i < cfg.warmup
            index = i - cfg.warmup + 1
            order = ORDERS[i % len(ORDERS)]
            samples: dict[str, Sample] = {}
            for p in order:
                samples[p] = await one(p)
                await asyncio.sleep(cfg.gap_s)  # connections idle, the node settled
            r = make_round(index, ",".join(order), warmup, samples)
            label = "warmup" if warmup else f"round {index}/{cfg.rounds}"
            d = samples["direct"]
            print(
                f"[{cfg.engine}] {label}: direct TTFT {d.ttft_s * 1e3:.1f} ms, "
                f"{d.decode_tps:.2f} tok/s; added TTFT anthropic "
                f"{r.added_ttft_ms['anthropic']:+.1f} ms, openai {r.added_ttft_ms['openai']:+.1f}"
                f" ms; ratio {r.ratio['anthropic']:.3f} / {r.ratio['openai']:.3f} ({r.order})",
                file=sys.stderr,
                flush=True,
            )
            if r.mismatch:
                print(f"!!! OUTPUT MISMATCH in {label}: {r.mismatch}", file=sys.stderr)
            done.append(r)
        for j in range(cfg.b2b):
            order = ORDERS[j % len(ORDERS)]
            samples = {}
            for p in order:
                first = await one(p)
                samples[p] = await one(p)  # at once, on the same connection
                if first.text != samples[p].text:
                    raise BenchError(f"{p}: back-to-back requests gave different text")
                await asyncio.sleep(cfg.gap_s)
            r = make_round(j + 1, ",".join(order), False, samples)
            print(
                f"[{cfg.engine}] back-to-back {j + 1}/{cfg.b2b}: direct TTFT "
                f"{samples['direct'].ttft_s * 1e3:.1f} ms; added TTFT anthropic "
                f"{r.added_ttft_ms['anthropic']:+.1f} ms, openai "
                f"{r.added_ttft_ms['openai']:+.1f} ms",
                file=sys.stderr,
                flush=True,
            )
            if r.mismatch:
                print(f"!!! OUTPUT MISMATCH in back-to-back {j + 1}: {r.mismatch}", file=sys.stderr)
            b2b.append(r)
        probes = await run_probes(node, http, base_url, cfg)

    cold: list[Sample] = []
    for _ in range(cfg.cold):
        for p in PATHS:
            # A fresh channel / client per request: connection setup is counted.
            if p == "direct":
                async with NodeClient(node_target, timeout=REQUEST_TIMEOUT_S) as fresh:
                    cold.append(await run_direct(fresh, *args, cold=True))
            else:
                async with httpx.AsyncClient(timeout=timeout, trust_env=False) as fresh_http:
                    run = run_anthropic if p == "anthropic" else run_openai
                    cold.append(await run(fresh_http, base_url, *args, cold=True))
            await asyncio.sleep(cfg.gap_s)
    return Results(done, b2b, cold, probes)


async def run_probes(
    node: NodeClient, http: httpx.AsyncClient, base_url: str, cfg: EngineConfig, n: int = 20
) -> dict[str, float]:
    """Where the added TTFT can go: two fixed costs of the coordinator path, timed alone.

    `render_rpc_ms`: the RenderPrompt RPC the coordinator makes before Generate
    (same chat, same model). `http_health_ms`: an HTTP round trip to the
    coordinator that does no mesh work (GET /health).
    """
    chat = ChatPrompt((Message("user", cfg.prompt),))
    render: list[float] = []
    health: list[float] = []
    for _ in range(n):
        t0 = time.perf_counter()
        await node.render(cfg.model, chat)
        render.append((time.perf_counter() - t0) * 1e3)
        t0 = time.perf_counter()
        (await http.get(f"{base_url}/health")).raise_for_status()
        health.append((time.perf_counter() - t0) * 1e3)
    return {"render_rpc_ms": median(render), "http_health_ms": median(health)}


# ---------- processes ----------


def service(
    name: str, args: list[str], workdir: Path, ready: str, exe: Sequence[str] = ()
) -> ManagedProcess:
    """A `macmesh` child with its own MACMESH_HOME under `workdir`."""
    return ManagedProcess(
        name,
        args,
        home=workdir / f"{name}-home",
        log_path=workdir / f"{name}.log",
        ready=ready,
        exe=exe,
    )


def wait_coordinator(base_url: str, model: str, timeout: float = 60.0) -> None:
    """Until /health reports a node online and /v1/models lists `model`."""
    deadline = time.monotonic() + timeout
    last = ""
    with httpx.Client(timeout=5.0, trust_env=False) as http:
        while time.monotonic() < deadline:
            try:
                health = http.get(f"{base_url}/health").json()
                if health.get("nodes_online", 0) >= 1:
                    ids = [m["id"] for m in http.get(f"{base_url}/v1/models").json()["data"]]
                    if model in ids:
                        return
                    last = f"models {ids}"
                else:
                    last = f"health {health}"
            except (httpx.HTTPError, ValueError, KeyError) as exc:
                last = repr(exc)
            time.sleep(0.05)
    raise BenchError(f"the coordinator did not see {model!r} in {timeout:g}s (last: {last})")


def run_engine(
    cfg: EngineConfig, args: argparse.Namespace, work: Path
) -> tuple[Results, dict[str, Any]]:
    work.mkdir(parents=True)
    node_args = [
        "node", "--grpc-port", "0", "--no-hf-cache", "--no-bonjour", "--no-default-model",
        "--shutdown-grace", "2",
    ]  # fmt: skip
    if cfg.engine == "sim":
        node_args += ["--sim-model", f"{SIM_MODEL_ID}:{args.sim_prefill}:{args.sim_decode}"]
    else:
        models_dir = work / "models"
        prepare_default_model(models_dir)
        node_args += ["--models-dir", str(models_dir), "--preload", MLX_MODEL_ID]
    node = service("node", node_args, work, NODE_READY)
    coord: ManagedProcess | None = None
    try:
        node.start()
        target = node.wait_ready()
        coord = service(
            "coordinator",
            ["coordinator", "--port", "0", "--no-bonjour", "--peer", target],
            work,
            COORD_READY,
            exe=shlex.split(args.coordinator_cmd or ""),
        )
        coord.start()
        base_url = coord.wait_ready(60.0)
        wait_coordinator(base_url, cfg.model)
        print(f"[{cfg.engine}] node {target}, coordinator {base_url}", file=sys.stderr, flush=True)
        results = asyncio.run(run_rounds(cfg, target, base_url))
    except (
        BenchError,
        ProcessError,
        MeshError,
        httpx.HTTPError,
        subprocess.CalledProcessError,
    ) as exc:
        tails = f"node log tail:\n{node.log_tail()}"
        if coord is not None:
            tails += f"\ncoordinator log tail:\n{coord.log_tail()}"
        raise BenchError(f"{cfg.engine}: {exc}\n{tails}") from exc
    finally:
        if coord is not None:
            coord.stop()
        node.stop()
    return results, {"node": target, "coordinator": base_url}


# ---------- main ----------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="TTFT and decode tok/s through the coordinator's HTTP APIs vs the node's gRPC."
    )
    p.add_argument("--engine", choices=("sim", "mlx", "both"), default="both")
    p.add_argument("--rounds", type=int, help="measured rounds (default 30 sim, 5 mlx)")
    p.add_argument("--warmup", type=int, help="unmeasured rounds first (default 2 sim, 1 mlx)")
    p.add_argument("--max-tokens", type=int, help="tokens per generation (default 64 sim, 32 mlx)")
    p.add_argument("--cold", type=int, default=3, help="cold-connection requests per path")
    p.add_argument("--b2b", type=int, help="back-to-back pairs per path (default 10 sim, 0 mlx)")
    p.add_argument(
        "--coordinator-cmd",
        help="start the coordinator with this command instead of the venv's `macmesh`",
    )
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message")
    p.add_argument("--sim-prefill", type=float, default=2000.0, help="sim prefill tok/s")
    p.add_argument("--sim-decode", type=float, default=100.0, help="sim decode tok/s")
    p.add_argument("--gap", type=float, default=0.1, help="seconds idle between requests")
    p.add_argument("--max-added-ttft-ms", type=float, default=5.0, help="target: added p50 TTFT")
    p.add_argument("--min-ratio", type=float, default=0.98, help="target: decode tok/s ratio")
    p.add_argument("--json-out", type=Path, help="write all raw numbers here")
    args = p.parse_args(argv)
    if (args.rounds is not None and args.rounds < 1) or (
        args.warmup is not None and args.warmup < 0
    ):
        p.error("need --rounds >= 1 and --warmup >= 0")
    if args.max_tokens is not None and args.max_tokens < 3:
        p.error("need --max-tokens >= 3")
    if args.cold < 0 or args.gap < 0 or (args.b2b is not None and args.b2b < 0):
        p.error("need --cold >= 0, --b2b >= 0 and --gap >= 0")
    return args


def engine_config(engine: str, args: argparse.Namespace) -> EngineConfig:
    rounds, warmup, max_tokens, b2b = ENGINE_DEFAULTS[engine]
    return EngineConfig(
        engine=engine,
        model=SIM_MODEL_ID if engine == "sim" else MLX_MODEL_ID,
        rounds=args.rounds if args.rounds is not None else rounds,
        warmup=args.warmup if args.warmup is not None else warmup,
        cold=args.cold,
        b2b=args.b2b if args.b2b is not None else b2b,
        max_tokens=args.max_tokens if args.max_tokens is not None else max_tokens,
        prompt=args.prompt,
        gap_s=args.gap,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    engines = ["sim", "mlx"] if args.engine == "both" else [args.engine]
    started = datetime.datetime.now(datetime.UTC)
    load_start = os.getloadavg()
    results: dict[str, Any] = {}
    mismatches: list[str] = []
    judged: str = engines[0]  # sim when it runs
    verdicts: dict[str, bool] = {}
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-coord-") as tmp:
        for engine in engines:
            cfg = engine_config(engine, args)
            eng_load_start = os.getloadavg()
            try:
                res, where = run_engine(cfg, args, Path(tmp) / engine)
            except (BenchError, ProcessError) as exc:
                print(f"bench failed: {exc}", file=sys.stderr)
                return 2
            eng_load_end = os.getloadavg()
            all_rounds, probes = res.rounds, res.probes
            rounds = [r for r in all_rounds if not r.warmup]
            summary = summarize(rounds, res.cold)
            b2b = summarize_b2b(res.b2b)
            ok, why = verdict(summary, b2b, args.max_added_ttft_ms, args.min_ratio)
            bad = [f"{engine} round {r.index}: {r.mismatch}" for r in all_rounds if r.mismatch]
            bad += [f"{engine} back-to-back {r.index}: {r.mismatch}" for r in res.b2b if r.mismatch]
            mismatches += bad
            verdicts[engine] = ok
            word = "MISMATCH" if bad else ("PASS" if ok else "FAIL")
            title = (
                f"SIMULATED engine (sim:{args.sim_prefill:g}:{args.sim_decode:g}: sleeps "
                f"prompt/{args.sim_prefill:g} s, then one word per 1/{args.sim_decode:g} s)"
                if engine == "sim"
                else f"real MLX engine ({MLX_MODEL_ID}, SmolLM2-135M)"
            )
            ref = all_rounds[-1].samples["direct"]
            print(f"\n### {engine}: {title}\n")
            print(
                f"{cfg.rounds} rounds (+{cfg.warmup} warmup) {cfg.gap_s:g} s apart, "
                f"{cfg.b2b} back-to-back rounds, {cfg.max_tokens} max tokens, "
                f"{ref.deltas} text deltas / {ref.completion_tokens} completion tokens per "
                f"request, finish `{ref.finish_reason}`; load average "
                f"{eng_load_start[0]:.2f} → {eng_load_end[0]:.2f}\n"
            )
            print(summary_table(summary))
            print()
            if b2b:
                print(b2b_table(b2b))
                print()
            print(rounds_table(rounds))
            print()
            judged_note = "" if engine == judged else " (reported, not judged)"
            print(f"**{engine} verdict: {word}**{judged_note}: {why}")
            print(
                f"\nprobes (medians of 20, warm connections): RenderPrompt RPC "
                f"{probes['render_rpc_ms']:.2f} ms, HTTP GET /health "
                f"{probes['http_health_ms']:.2f} ms"
            )
            for m in bad:
                print(f"!!! output mismatch (correctness bug): {m}")
            results[engine] = {
                "config": asdict(cfg),
                "endpoints": where,
                "loadavg_start": list(eng_load_start),
                "loadavg_end": list(eng_load_end),
                "summary": summary,
                "back_to_back": b2b,
                "probes": probes,
                "verdict": word,
                "verdict_detail": why,
                "judged": engine == judged,
                "mismatches": bad,
                "text": ref.text,
                "rounds": [asdict(r) for r in rounds],
                "warmup_rounds": [asdict(r) for r in all_rounds if r.warmup],
                "b2b_rounds": [asdict(r) for r in res.b2b],
                "cold": [asdict(s) for s in res.cold],
            }
    load_end = os.getloadavg()
    print(f"\nload average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end")

    if args.json_out is not None:
        report = {
            "started_at": started.isoformat(),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "coordinator_cmd": args.coordinator_cmd or "",
            "targets": {
                "max_added_ttft_p50_ms": args.max_added_ttft_ms,
                "min_ratio": args.min_ratio,
            },
            "machine": {
                **machine_info({d: d for d in VERSIONED}),
                "loadavg_start": list(load_start),
                "loadavg_end": list(load_end),
            },
            "judged_engine": judged,
            "verdict": "MISMATCH" if mismatches else ("PASS" if verdicts[judged] else "FAIL"),
            "mismatches": mismatches,
            "engines": results,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    if mismatches:
        return 2
    return 0 if verdicts[judged] else 1


if __name__ == "__main__":
    sys.exit(main())
