"""Decode speed through a node's gRPC stream vs. plain `mlx_lm.stream_generate`.

What it measures
    The same model, the same chat prompt and greedy sampling (temperature 0),
    `--max-tokens` new tokens, on two paths, in the same run:

    * baseline: `mlx_lm.stream_generate` in this process, the prompt rendered
      exactly as the node renders it (`apply_chat_template(..., tokenize=False)`
      then `encode(..., add_special_tokens=False)`);
    * node: a separate `macmesh node` process (the real deployment) started
      from this venv's `macmesh` console script, driven with
      `mesh.client.NodeClient.generate`; times are taken when each `TextDelta`
      arrives at the client.

    Decode tok/s is measured the same way on both sides: the steps between the
    first and the last token that carried visible text, divided by the time
    between their arrivals (the client can only see text; greedy output is
    identical on both sides, so the steps are the same). TTFT is request ->
    first visible text (the baseline clock starts before rendering the
    prompt, the node's before the RPC). The node's own `Usage`-reported decode
    rate, `(completion_tokens - 1) / generation_seconds`, is reported too.

    Rounds alternate the order (A/B, then B/A) and the two sides never run at
    the same time: the node is idle between requests. Results are medians and
    the median of the per-round ratio node/baseline. Both sides must produce
    the same token count and the same text; a mismatch is a correctness bug
    and fails the run (exit code 2).

How to run
    make bench           # .venv/bin/python bench/node_decode.py
    .venv/bin/python bench/node_decode.py --rounds 5 --max-tokens 64 \\
        --json-out /tmp/bench_node.json

    Exit code 0 when the median ratio >= --min-ratio (PASS), 1 when below
    (FAIL), 2 on an output mismatch or a failed request.
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import datetime
import json
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from macmesh.bench.procs import ManagedProcess, exit_on_sigterm, machine_info, prepare_default_model
from macmesh.bench.stats import median
from mesh.client import NodeClient
from mesh.errors import MeshError
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    GenerateRequest,
    Message,
    ReasoningDelta,
    SamplingParams,
    TextDelta,
    ToolCallEvent,
)

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."
READY_PREFIX = "macmesh node listening on "
REQUEST_TIMEOUT_S = 900.0


# ---------- measurements ----------


@dataclass
class Sample:
    """One generation on one side."""

    side: str  # "baseline" | "node"
    text: str
    tokens: int  # generated tokens, counted as the node counts them
    finish_reason: str
    ttft_s: float  # request -> first visible text
    decode_steps: int  # tokens between the first and the last visible text
    decode_s: float  # time between them
    decode_tps: float
    # (seconds since the request, cumulative text length) per text arrival.
    arrivals: list[tuple[float, int]] = field(default_factory=list)
    # Baseline only: rate over every yielded token, as stream_generate sees it.
    token_tps: float | None = None
    # Baseline only: per token, cumulative text length after it.
    token_chars: list[int] = field(default_factory=list)
    # Node only: the Usage the node reported.
    usage: dict[str, Any] | None = None
    usage_decode_tps: float | None = None


@dataclass
class Round:
    index: int
    order: str  # "baseline,node" or "node,baseline"
    warmup: bool
    baseline: Sample
    node: Sample
    ratio: float
    mismatch: str = ""


def _rate(steps: int, seconds: float) -> float:
    return steps / seconds if steps > 0 and seconds > 0 else 0.0


def _decode_span(
    arrivals: Sequence[tuple[float, int]], token_chars: Sequence[int]
) -> tuple[int, float]:
    """(token steps, seconds) between the first and last visible text arrivals.

    An arrival that brought the text up to `c` characters belongs to the first
    token after which the baseline text was that long.
    """
    if len(arrivals) < 2 or not token_chars:
        return 0, 0.0
    (t0, c0), (t1, c1) = arrivals[0], arrivals[-1]
    i0 = min(bisect.bisect_left(token_chars, c0), len(token_chars) - 1)
    i1 = min(bisect.bisect_left(token_chars, c1), len(token_chars) - 1)
    return i1 - i0, t1 - t0


class Baseline:
    """mlx_lm in this process, rendering and sampling exactly as the node does."""

    def __init__(self, model_dir: Path) -> None:
        import mlx.core as mx
        from mlx_lm import load

        loaded = load(str(model_dir))
        self.model: Any = loaded[0]
        self.tokenizer: Any = loaded[1]
        self._sampler: Callable[[Any], Any] = lambda logprobs: mx.argmax(logprobs, axis=-1)

    def run(self, messages: list[dict[str, str]], max_tokens: int) -> Sample:
        from mlx_lm import stream_generate

        t_req = time.perf_counter()
        tok = self.tokenizer
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        ids = list(tok.encode(text, add_special_tokens=False))
        out: list[str] = []
        token_times: list[float] = []
        token_chars: list[int] = []
        arrivals: list[tuple[float, int]] = []
        chars = 0
        finish = ""
        for resp in stream_generate(
            self.model, tok, ids, max_tokens=max_tokens, sampler=self._sampler
        ):
            now = time.perf_counter() - t_req
            if resp.text:
                out.append(resp.text)
                chars += len(resp.text)
                arrivals.append((now, chars))
            if resp.finish_reason in (None, "length"):  # the node's count
                token_times.append(now)
                token_chars.append(chars)
            finish = resp.finish_reason or finish
        steps, span = _decode_span(arrivals, token_chars)
        all_span = token_times[-1] - token_times[0] if len(token_times) > 1 else 0.0
        return Sample(
            side="baseline",
            text="".join(out),
            tokens=len(token_times),
            finish_reason=finish,
            ttft_s=arrivals[0][0] if arrivals else 0.0,
            decode_steps=steps,
            decode_s=span,
            decode_tps=_rate(steps, span),
            arrivals=arrivals,
            token_tps=_rate(len(token_times) - 1, all_span),
            token_chars=token_chars,
        )


async def run_node(
    client: NodeClient, model_id: str, messages: list[dict[str, str]], max_tokens: int
) -> Sample:
    """One greedy generation through the node; times are client-side arrivals."""
    request = GenerateRequest(
        model=model_id,
        prompt=ChatPrompt(tuple(Message(m["role"], m["content"]) for m in messages)),
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
    )
    out: list[str] = []
    arrivals: list[tuple[float, int]] = []
    chars = 0
    finish: Finish | None = None
    t_req = time.perf_counter()
    async for event in client.generate(request):
        now = time.perf_counter() - t_req
        if isinstance(event, TextDelta):
            if event.text:
                out.append(event.text)
                chars += len(event.text)
                arrivals.append((now, chars))
        elif isinstance(event, ErrorEvent):
            raise RuntimeError(f"node error {event.code}: {event.message}")
        elif isinstance(event, ReasoningDelta | ToolCallEvent):
            raise RuntimeError(f"unexpected event from the node: {event!r}")
        elif isinstance(event, Finish):
            finish = event
    if finish is None:
        raise RuntimeError("the node's stream ended without a Finish event")
    u = finish.usage
    usage_tps = _rate(u.completion_tokens - 1, u.generation_seconds)
    return Sample(
        side="node",
        text="".join(out),
        tokens=u.completion_tokens,
        finish_reason=finish.reason.value,
        ttft_s=arrivals[0][0] if arrivals else 0.0,
        decode_steps=0,  # filled in against the baseline's token positions
        decode_s=0.0,
        decode_tps=0.0,
        arrivals=arrivals,
        usage=asdict(u),
        usage_decode_tps=usage_tps,
    )


def _compare(index: int, order: str, warmup: bool, base: Sample, node: Sample) -> Round:
    mismatch = ""
    if node.tokens != base.tokens:
        mismatch = f"token count: baseline {base.tokens}, node {node.tokens}"
    elif node.text != base.text:
        at = next(
            (i for i, (a, b) in enumerate(zip(base.text, node.text, strict=False)) if a != b),
            min(len(base.text), len(node.text)),
        )
        mismatch = (
            f"text differs at char {at}: baseline {base.text[at : at + 40]!r}, "
            f"node {node.text[at : at + 40]!r}"
        )
    node.decode_steps, node.decode_s = _decode_span(node.arrivals, base.token_chars)
    node.decode_tps = _rate(node.decode_steps, node.decode_s)
    ratio = node.decode_tps / base.decode_tps if base.decode_tps > 0 else 0.0
    return Round(index, order, warmup, base, node, ratio, mismatch)


# ---------- the node process ----------


def node_process(models_dir: Path, model_id: str, workdir: Path) -> ManagedProcess:
    """A `macmesh node` child with its own MACMESH_HOME, preloading `model_id`."""
    args = [
        "node", "--grpc-port", "0", "--no-hf-cache", "--no-bonjour",
        "--no-default-model", "--models-dir", str(models_dir), "--preload", model_id,
        "--shutdown-grace", "2",
    ]  # fmt: skip
    return ManagedProcess(
        "node",
        args,
        home=workdir / "home",
        log_path=workdir / "node.log",
        ready=READY_PREFIX,
        label="the node",
        tail_on_exit=False,  # main prints the log tail with any failure
    )


# ---------- reporting ----------


def summarize(rounds: Sequence[Round]) -> dict[str, float]:
    return {
        "median_baseline_tps": median([r.baseline.decode_tps for r in rounds]),
        "median_node_tps": median([r.node.decode_tps for r in rounds]),
        "median_ratio": median([r.ratio for r in rounds]),
        "median_baseline_ttft_s": median([r.baseline.ttft_s for r in rounds]),
        "median_node_ttft_s": median([r.node.ttft_s for r in rounds]),
        "median_baseline_token_tps": median([r.baseline.token_tps or 0.0 for r in rounds]),
        "median_node_usage_tps": median([r.node.usage_decode_tps or 0.0 for r in rounds]),
    }


def markdown_table(rounds: Sequence[Round], summary: dict[str, float]) -> str:
    head = (
        "| round | order | baseline tok/s | node tok/s | ratio | baseline TTFT s "
        "| node TTFT s | node Usage tok/s |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {r.index} | {r.order.replace(',', ' → ')} | {r.baseline.decode_tps:.2f} "
        f"| {r.node.decode_tps:.2f} | {r.ratio:.3f} | {r.baseline.ttft_s:.2f} "
        f"| {r.node.ttft_s:.2f} | {r.node.usage_decode_tps or 0.0:.2f} |"
        for r in rounds
    ]
    s = summary
    rows.append(
        f"| **median** | | **{s['median_baseline_tps']:.2f}** | **{s['median_node_tps']:.2f}** "
        f"| **{s['median_ratio']:.3f}** | {s['median_baseline_ttft_s']:.2f} "
        f"| {s['median_node_ttft_s']:.2f} | {s['median_node_usage_tps']:.2f} |"
    )
    return "\n".join([head, *rows])


# ---------- main ----------


async def run_rounds(
    args: argparse.Namespace, baseline: Baseline, target: str, model_id: str
) -> list[Round]:
    messages = [{"role": "user", "content": args.prompt}]
    done: list[Round] = []
    async with NodeClient(target, timeout=REQUEST_TIMEOUT_S) as client:
        await client.wait_ready(30.0)
        total = args.warmup + args.rounds
        for i in range(total):
            warmup = i < args.warmup
            index = i - args.warmup + 1
            node_first = i % 2 == 1
            order = "node,baseline" if node_first else "baseline,node"
            # Strictly one after the other: the node is idle while the baseline
            # runs (the engine thread blocks on its inbox between requests).
            if node_first:
                node = await run_node(client, model_id, messages, args.max_tokens)
                base = baseline.run(messages, args.max_tokens)
            else:
                base = baseline.run(messages, args.max_tokens)
                node = await run_node(client, model_id, messages, args.max_tokens)
            r = _compare(index, order, warmup, base, node)
            label = "warmup" if warmup else f"round {index}/{args.rounds}"
            print(
                f"{label}: baseline {base.decode_tps:.2f} tok/s, node {node.decode_tps:.2f} "
                f"tok/s, ratio {r.ratio:.3f} ({base.tokens} tokens, {order})",
                file=sys.stderr,
                flush=True,
            )
            if r.mismatch:
                print(f"!!! OUTPUT MISMATCH in {label}: {r.mismatch}", file=sys.stderr)
            if base.tokens < args.max_tokens:
                print(
                    f"warning: the model stopped after {base.tokens} of {args.max_tokens} "
                    "tokens; use a prompt that makes it write more",
                    file=sys.stderr,
                )
            done.append(r)
    return done


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description="Decode tok/s through a node's gRPC stream vs mlx_lm.stream_generate."
    )
    p.add_argument("--rounds", type=int, default=5, help="measured rounds (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message")
    p.add_argument(
        "--model-dir", type=Path, help="an MLX model dir (default: the embedded SmolLM2)"
    )
    p.add_argument("--json-out", type=Path, help="write all raw numbers here")
    p.add_argument("--min-ratio", type=float, default=0.95, help="PASS when median ratio >= this")
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.max_tokens < 3:
        p.error("need --rounds >= 1, --warmup >= 0, --max-tokens >= 3")
    if args.model_dir is not None and not (args.model_dir / "config.json").is_file():
        p.error(f"--model-dir {args.model_dir} is not an MLX model dir (no config.json)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-") as tmp:
        work = Path(tmp)
        models_dir = work / "models"
        models_dir.mkdir()
        if args.model_dir is None:
            model_dir = prepare_default_model(models_dir)
        else:
            model_dir = args.model_dir.resolve()
            (models_dir / model_dir.name).symlink_to(model_dir, target_is_directory=True)
        model_id = model_dir.name
        node = node_process(models_dir, model_id, work)
        load_start = os.getloadavg()
        started = datetime.datetime.now(datetime.UTC)
        try:
            node.start()
            baseline = Baseline(model_dir)  # loads while the node loads
            target = node.wait_ready()
            all_rounds = asyncio.run(run_rounds(args, baseline, target, model_id))
        except (RuntimeError, MeshError) as exc:
            print(f"bench failed: {exc}\nnode log tail:\n{node.log_tail()}", file=sys.stderr)
            return 2
        finally:
            node.stop()
        load_end = os.getloadavg()

    rounds = [r for r in all_rounds if not r.warmup]
    summary = summarize(rounds)
    mismatches = [f"round {r.index}: {r.mismatch}" for r in all_rounds if r.mismatch]
    ok = summary["median_ratio"] >= args.min_ratio
    verdict = "MISMATCH" if mismatches else ("PASS" if ok else "FAIL")

    print(markdown_table(rounds, summary))
    print()
    print(
        f"{verdict}: median node/baseline decode ratio {summary['median_ratio']:.3f} "
        f"(threshold {args.min_ratio}); load average {load_start[0]:.2f} at start, "
        f"{load_end[0]:.2f} at end"
    )
    for m in mismatches:
        print(f"!!! output mismatch (correctness bug): {m}")

    if args.json_out is not None:
        report = {
            "started_at": started.isoformat(),
            "config": {
                "rounds": args.rounds,
                "warmup": args.warmup,
                "max_tokens": args.max_tokens,
                "prompt": args.prompt,
                "model_dir": str(args.model_dir or ""),
                "model_id": model_id,
                "min_ratio": args.min_ratio,
            },
            "machine": {
                **machine_info({"mlx": "mlx", "mlx_lm": "mlx-lm", "grpcio": "grpcio"}),
                "loadavg_start": list(load_start),
                "loadavg_end": list(load_end),
            },
            "summary": summary,
            "verdict": verdict,
            "mismatches": mismatches,
            "rounds": [asdict(r) for r in rounds],
            "warmup_rounds": [asdict(r) for r in all_rounds if r.warmup],
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    if mismatches:
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
