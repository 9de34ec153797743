"""A long prompt arriving mid-stream: the running stream's worst inter-token gap, by chunk.

What it measures
    For each `--chunks` value, a `macmesh node --prefill-chunk C` process (its
    own MACMESH_HOME, the embedded SmolLM2 model, no prompt cache so every
    prefill is real) serves a running greedy stream; once that stream has
    produced a few tokens, a prompt of about `--prompt-tokens` tokens arrives.
    Reported per chunk size: the running stream's worst and median gap between
    tokens while the long prompt prefills, its gap before (steady decode), and
    the long prompt's time to first token, against the same prompt's time to
    first token alone on the same node (the cost of interleaving). The gap
    should be about one chunk's prefill time plus one decode step, not the
    whole prefill.

How to run
    .venv/bin/python bench/prefill_gap.py --prompt-tokens 384 --chunks 64 128 256 512
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from macmesh.bench.procs import (
    DEFAULT_MODEL_ID,
    ManagedProcess,
    exit_on_sigterm,
    machine_info,
    prepare_default_model,
)
from mesh.client import NodeClient
from mesh.types import (
    ChatPrompt,
    Finish,
    GenerateRequest,
    Message,
    SamplingParams,
    TextDelta,
)


def chat(text: str, max_tokens: int) -> GenerateRequest:
    return GenerateRequest(
        model=DEFAULT_MODEL_ID,
        prompt=ChatPrompt((Message("user", text),)),
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )


async def ttft(client: NodeClient, req: GenerateRequest) -> tuple[float, int]:
    t0 = time.perf_counter()
    first = 0.0
    tokens = 0
    async for ev in client.generate(req):
        if isinstance(ev, TextDelta) and not first:
            first = time.perf_counter() - t0
        if isinstance(ev, Finish):
            tokens = ev.usage.prompt_tokens
    return first, tokens


async def measure(target: str, prompt: str, tag: int) -> dict[str, Any]:
    async with NodeClient(target, timeout=3600) as c:
        await c.wait_ready(60)
        long_alone, n = await ttft(c, chat(f"{tag}a. {prompt}", 1))
        arrivals: list[float] = []

        async def running() -> None:
            story = chat(f"{tag}. Write a long story about a dragon.", 4000)
            async for ev in c.generate(story):
                if isinstance(ev, TextDelta):
                    arrivals.append(time.perf_counter())
                if t_done and time.perf_counter() > t_done + 1.0:
                    break

        t_done = 0.0
        task = asyncio.ensure_future(running())
        while len(arrivals) < 6:
            await asyncio.sleep(0.01)
        t_long = time.perf_counter()
        long_busy, _ = await ttft(c, chat(f"{tag}b. {prompt}", 1))
        t_done = time.perf_counter()
        await task
    gaps = list(itertools.pairwise(arrivals))
    during = [b - a for a, b in gaps if t_long <= b <= t_done]
    before = [b - a for a, b in gaps if b < t_long]
    return {
        "prompt_tokens": n,
        "worst_gap_s": max(during) if during else float("nan"),
        "median_gap_during_s": statistics.median(during) if during else float("nan"),
        "median_gap_before_s": statistics.median(before) if before else float("nan"),
        "long_ttft_alone_s": long_alone,
        "long_ttft_busy_s": long_busy,
    }


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--prompt-tokens", type=int, default=384)
    p.add_argument("--chunks", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    # ~6 tokens per line in SmolLM2's tokenizer.
    prompt = " ".join(f"Line {i}: a fox." for i in range(max(args.prompt_tokens // 7, 1)))
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-gap-") as tmp:
        work = Path(tmp)
        models = work / "models"
        prepare_default_model(models)
        for chunk in args.chunks:
            node_args = [
                "node", "--grpc-port", "0", "--metrics-port", "-1", "--no-bonjour",
                "--no-hf-cache", "--no-default-model", "--models-dir", str(models),
                "--preload", DEFAULT_MODEL_ID, "--prefill-chunk", str(chunk),
            ]  # fmt: skip
            node = ManagedProcess(
                f"node-{chunk}",
                node_args,
                home=work / f"home-{chunk}",
                log_path=work / f"node-{chunk}.log",
                ready="macmesh node listening on ",
                env={"MLX_CACHE_MAX_SLOTS": "0"},
            )
            node.start()
            try:
                target = node.wait_ready(120)
                row = asyncio.run(measure(target, prompt, chunk))
            finally:
                node.stop()
            rows[str(chunk)] = row
            print(f"chunk {chunk}: {row}", file=sys.stderr, flush=True)
    print(
        "| prefill chunk | prompt tokens | worst gap s | median gap during s "
        "| median gap before s | long TTFT with a stream s | long TTFT alone s |\n"
        "|---:|---:|---:|---:|---:|---:|---:|"
    )
    for chunk, r in rows.items():
        print(
            f"| {chunk} | {r['prompt_tokens']} | {r['worst_gap_s']:.2f} "
            f"| {r['median_gap_during_s']:.2f} | {r['median_gap_before_s']:.2f} "
            f"| {r['long_ttft_busy_s']:.2f} | {r['long_ttft_alone_s']:.2f} |"
        )
    if args.json_out is not None:
        report = {"machine": machine_info({"mlx": "mlx", "mlx_lm": "mlx-lm"}), "chunks": rows}
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
