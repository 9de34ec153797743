"""Decode speed through a node with and without a speculative draft model.

What it measures
    One `macmesh node` process (the real deployment, started from this venv's
    `macmesh` console script) serving a target model and a draft model that
    shares its tokenizer. Each round sends the same chat prompt twice, greedy
    (temperature 0), `--max-tokens` new tokens: once plain, once with
    `draft_model` set; the order alternates between rounds (A/B, then B/A) and
    the two never run at the same time.

    * decode tok/s: the node's own `Usage`, `(completion_tokens - 1) /
      generation_seconds` (first token to the end, measured on the engine
      thread the same way on both sides);
    * end-to-end tok/s: completion tokens over request -> `Finish` at the
      client (prefill included: a draft prefills the prompt too);
    * acceptance: `accepted_draft_tokens / draft_tokens` from `Usage`.

    Greedy speculative decoding must not change the output: both sides must
    produce the same text and token count, else the run fails (exit code 2).
    At the end the node's state (`WatchState`) must report, for the target
    model, cumulative draft counters at least the sum of what the runs reported.

    The default pair is the embedded SmolLM2 drafting for itself, which checks
    the mechanics (every draft accepted) but cannot be faster: the draft costs
    as much as the target. A real speed-up needs a small draft for a large
    target (`--model-dir`, `--draft-dir`), e.g. a 0.5B and a 7B model of one
    family.

Backends
    `--backend mlx` is the only one implemented. A backend is a function in
    `BACKENDS` that starts a node serving a target and a draft and returns a
    `Setup` (the process, the two model ids, what to report); the measuring
    code does not care which backend serves the models.

How to run
    .venv/bin/python bench/speculative.py
    .venv/bin/python bench/speculative.py --rounds 5 --max-tokens 64 \\
        --model-dir ~/models/Qwen2.5-7B-Instruct-4bit \\
        --draft-dir ~/models/Qwen2.5-0.5B-Instruct-4bit --out /tmp/spec.json

    Exit code 0 when the median speculative/plain decode ratio >= --min-ratio
    (default 0: report only), 1 when below, 2 on an output mismatch, a failed
    request or wrong node counters.
"""

from __future__ import annotations

import argparse
import asyncio
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
    ModelLoad,
    SamplingParams,
    TextDelta,
)
from node.config import DEFAULT_NUM_DRAFT_TOKENS, NUM_DRAFT_TOKENS_ENV

DEFAULT_PROMPT = "Write a long story about a lighthouse keeper."
READY_PREFIX = "macmesh node listening on "
REQUEST_TIMEOUT_S = 900.0
SIDES = ("plain", "speculative")


# ---------- backends ----------


@dataclass
class Setup:
    """A node (not started yet) serving `model_id` and `draft_id`, and what to report."""

    node: ManagedProcess
    model_id: str
    draft_id: str
    info: dict[str, Any] = field(default_factory=dict)


def _node_process(workdir: Path, args: Sequence[str]) -> ManagedProcess:
    """A `macmesh node` child with its own MACMESH_HOME; `args` add the models."""
    base = [
        "node", "--grpc-port", "0", "--no-hf-cache", "--no-bonjour", "--no-default-model",
        "--shutdown-grace", "2",
    ]  # fmt: skip
    return ManagedProcess(
        "node",
        [*base, *args],
        home=workdir / "home",
        log_path=workdir / "node.log",
        ready=READY_PREFIX,
        label="the node",
        tail_on_exit=False,  # main prints the log tail with any failure
    )


def _link_model(models_dir: Path, model_dir: Path) -> str:
    """Offer `model_dir` in `models_dir` under its name; returns that id."""
    model_dir = model_dir.resolve()
    link = models_dir / model_dir.name
    if not link.exists():
        link.symlink_to(model_dir, target_is_directory=True)
    return model_dir.name


def setup_mlx(args: argparse.Namespace, workdir: Path) -> Setup:
    """MLX models in a temporary models dir; the default pair is SmolLM2 drafting for itself."""
    models_dir = workdir / "models"
    models_dir.mkdir()
    if args.model_dir is None:
        model_dir = prepare_default_model(models_dir)
        model_id = model_dir.name
    else:
        model_dir = args.model_dir.resolve()
        model_id = _link_model(models_dir, model_dir)
    draft_dir = args.draft_dir.resolve() if args.draft_dir is not None else model_dir
    draft_id = _link_model(models_dir, draft_dir) if draft_dir != model_dir else model_id
    preload = [model_id] if draft_id == model_id else [model_id, draft_id]
    node_args = ["--models-dir", str(models_dir)]
    for mid in preload:
        node_args += ["--preload", mid]
    return Setup(
        node=_node_process(workdir, node_args),
        model_id=model_id,
        draft_id=draft_id,
        info={"backend": "mlx", "model_dir": str(model_dir), "draft_dir": str(draft_dir)},
    )


def setup_gguf(args: argparse.Namespace, workdir: Path) -> Setup:
    """GGUF files served by llama-server; the default pair is the SmolLM2 GGUF drafting for itself.

    `--model-dir` / `--draft-dir` name .gguf files here. The node runs one llama-server
    for the plain requests and one started with `--spec-draft-model` for the others.
    """
    from node.models.default import DEFAULT_GGUF_ID

    models_dir = workdir / "models"
    models_dir.mkdir()
    if args.model_dir is None:
        prepare_default_model(models_dir)  # links the embedded GGUF as smollm2.gguf
        model_path = (models_dir / DEFAULT_GGUF_ID).resolve()
        model_id = DEFAULT_GGUF_ID
    else:
        model_path = args.model_dir.resolve()
        model_id = model_path.name
        (models_dir / model_id).symlink_to(model_path)
    draft_path = args.draft_dir.resolve() if args.draft_dir is not None else model_path
    draft_id = model_id
    if draft_path != model_path:
        draft_id = draft_path.name
        (models_dir / draft_id).symlink_to(draft_path)
    return Setup(
        node=_node_process(workdir, ["--models-dir", str(models_dir)]),
        model_id=model_id,
        draft_id=draft_id,
        info={"backend": "gguf", "model": str(model_path), "draft": str(draft_path)},
    )


BACKENDS: dict[str, Callable[[argparse.Namespace, Path], Setup]] = {
    "mlx": setup_mlx,
    "gguf": setup_gguf,
}


# ---------- measurements ----------


@dataclass
class Sample:
    """One generation on one side."""

    side: str  # "plain" | "speculative"
    text: str
    tokens: int
    finish_reason: str
    ttft_s: float  # request -> first visible text, at the client
    total_s: float  # request -> Finish, at the client
    decode_tps: float  # from Usage: (completion_tokens - 1) / generation_seconds
    e2e_tps: float  # completion tokens / total_s
    draft_tokens: int
    accepted_draft_tokens: int
    usage: dict[str, Any]


@dataclass
class Round:
    index: int
    order: str  # "plain,speculative" or "speculative,plain"
    warmup: bool
    plain: Sample
    speculative: Sample
    ratio: float  # speculative / plain decode tok/s
    e2e_ratio: float
    acceptance: float  # accepted / proposed draft tokens
    mismatch: str = ""


def _rate(steps: float, seconds: float) -> float:
    return steps / seconds if steps > 0 and seconds > 0 else 0.0


async def run_one(
    client: NodeClient, setup: Setup, side: str, messages: list[dict[str, str]], max_tokens: int
) -> Sample:
    """One greedy generation, with the draft when `side` is "speculative"."""
    request = GenerateRequest(
        model=setup.model_id,
        prompt=ChatPrompt(tuple(Message(m["role"], m["content"]) for m in messages)),
        sampling=SamplingParams(temperature=0.0, max_tokens=max_tokens),
        draft_model=setup.draft_id if side == "speculative" else "",
    )
    out: list[str] = []
    ttft = 0.0
    finish: Finish | None = None
    t_req = time.perf_counter()
    async for event in client.generate(request):
        if isinstance(event, TextDelta) and event.text:
            ttft = ttft or time.perf_counter() - t_req
            out.append(event.text)
        elif isinstance(event, ErrorEvent):
            raise RuntimeError(f"node error {event.code}: {event.message}")
        elif isinstance(event, Finish):
            finish = event
    total = time.perf_counter() - t_req
    if finish is None:
        raise RuntimeError("the node's stream ended without a Finish event")
    u = finish.usage
    return Sample(
        side=side,
        text="".join(out),
        tokens=u.completion_tokens,
        finish_reason=finish.reason.value,
        ttft_s=ttft,
        total_s=total,
        decode_tps=_rate(u.completion_tokens - 1, u.generation_seconds),
        e2e_tps=_rate(u.completion_tokens, total),
        draft_tokens=u.draft_tokens,
        accepted_draft_tokens=u.accepted_draft_tokens,
        usage=asdict(u),
    )


def _compare(index: int, order: str, warmup: bool, plain: Sample, spec: Sample) -> Round:
    mismatch = ""
    if spec.tokens != plain.tokens:
        mismatch = f"token count: plain {plain.tokens}, speculative {spec.tokens}"
    elif spec.text != plain.text:
        at = next(
            (i for i, (a, b) in enumerate(zip(plain.text, spec.text, strict=False)) if a != b),
            min(len(plain.text), len(spec.text)),
        )
        mismatch = (
            f"text differs at char {at}: plain {plain.text[at : at + 40]!r}, "
            f"speculative {spec.text[at : at + 40]!r}"
        )
    elif spec.draft_tokens <= 0 or not 0 <= spec.accepted_draft_tokens <= spec.draft_tokens:
        mismatch = (
            f"draft counters: {spec.draft_tokens} proposed, {spec.accepted_draft_tokens} accepted"
        )
    return Round(
        index=index,
        order=order,
        warmup=warmup,
        plain=plain,
        speculative=spec,
        ratio=spec.decode_tps / plain.decode_tps if plain.decode_tps > 0 else 0.0,
        e2e_ratio=spec.e2e_tps / plain.e2e_tps if plain.e2e_tps > 0 else 0.0,
        acceptance=_rate(spec.accepted_draft_tokens, spec.draft_tokens),
        mismatch=mismatch,
    )


async def target_load(client: NodeClient, model_id: str) -> ModelLoad | None:
    """The target's entry in the node's current state."""
    states = client.watch_state()
    try:
        state = await anext(states)
    finally:
        await states.aclose()
    return next((x for x in state.load if x.model == model_id), None)


async def run_rounds(
    args: argparse.Namespace, setup: Setup, target: str
) -> tuple[list[Round], ModelLoad | None]:
    messages = [{"role": "user", "content": args.prompt}]
    done: list[Round] = []
    async with NodeClient(target, timeout=REQUEST_TIMEOUT_S) as client:
        await client.wait_ready(30.0)
        for i in range(args.warmup + args.rounds):
            warmup = i < args.warmup
            index = i - args.warmup + 1
            order = SIDES if i % 2 == 0 else SIDES[::-1]
            got: dict[str, Sample] = {}
            for side in order:  # strictly one after the other
                got[side] = await run_one(client, setup, side, messages, args.max_tokens)
            r = _compare(index, ",".join(order), warmup, got["plain"], got["speculative"])
            label = "warmup" if warmup else f"round {index}/{args.rounds}"
            print(
                f"{label}: plain {r.plain.decode_tps:.2f} tok/s, speculative "
                f"{r.speculative.decode_tps:.2f} tok/s, ratio {r.ratio:.3f}, acceptance "
                f"{r.acceptance:.1%} ({r.plain.tokens} tokens, {r.order})",
                file=sys.stderr,
                flush=True,
            )
            if r.mismatch:
                print(f"!!! MISMATCH in {label}: {r.mismatch}", file=sys.stderr)
            done.append(r)
        load = await target_load(client, setup.model_id)
    return done, load


# ---------- reporting ----------


def summarize(rounds: Sequence[Round]) -> dict[str, float]:
    proposed = sum(r.speculative.draft_tokens for r in rounds)
    accepted = sum(r.speculative.accepted_draft_tokens for r in rounds)
    return {
        "median_plain_tps": median([r.plain.decode_tps for r in rounds]),
        "median_speculative_tps": median([r.speculative.decode_tps for r in rounds]),
        "median_ratio": median([r.ratio for r in rounds]),
        "median_plain_e2e_tps": median([r.plain.e2e_tps for r in rounds]),
        "median_speculative_e2e_tps": median([r.speculative.e2e_tps for r in rounds]),
        "median_e2e_ratio": median([r.e2e_ratio for r in rounds]),
        "median_plain_ttft_s": median([r.plain.ttft_s for r in rounds]),
        "median_speculative_ttft_s": median([r.speculative.ttft_s for r in rounds]),
        "draft_tokens": proposed,
        "accepted_draft_tokens": accepted,
        "acceptance": _rate(accepted, proposed),
    }


def markdown_table(rounds: Sequence[Round], s: dict[str, float]) -> str:
    head = (
        "| round | order | plain tok/s | speculative tok/s | ratio | acceptance "
        "| plain e2e tok/s | spec. e2e tok/s | plain TTFT s | spec. TTFT s |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = [
        f"| {r.index} | {r.order.replace(',', ' → ')} | {r.plain.decode_tps:.2f} "
        f"| {r.speculative.decode_tps:.2f} | {r.ratio:.3f} | {r.acceptance:.1%} "
        f"| {r.plain.e2e_tps:.2f} | {r.speculative.e2e_tps:.2f} | {r.plain.ttft_s:.2f} "
        f"| {r.speculative.ttft_s:.2f} |"
        for r in rounds
    ]
    rows.append(
        f"| **median** | | **{s['median_plain_tps']:.2f}** | **{s['median_speculative_tps']:.2f}** "
        f"| **{s['median_ratio']:.3f}** | {s['acceptance']:.1%} (all) "
        f"| {s['median_plain_e2e_tps']:.2f} | {s['median_speculative_e2e_tps']:.2f} "
        f"| {s['median_plain_ttft_s']:.2f} | {s['median_speculative_ttft_s']:.2f} |"
    )
    return "\n".join([head, *rows])


def _counter_problem(all_rounds: Sequence[Round], load: ModelLoad | None) -> str:
    """Whether the node's cumulative counters cover every run's Usage."""
    proposed = sum(r.speculative.draft_tokens for r in all_rounds)
    accepted = sum(r.speculative.accepted_draft_tokens for r in all_rounds)
    if load is None:
        return "the node's state has no entry for the target model"
    if load.draft_tokens < proposed or load.accepted_draft_tokens < accepted:
        return (
            f"node state reports {load.draft_tokens} proposed / {load.accepted_draft_tokens} "
            f"accepted, the runs {proposed} / {accepted}"
        )
    return ""


# ---------- main ----------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Node decode tok/s with and without a draft model.")
    p.add_argument("--backend", choices=sorted(BACKENDS), default="mlx")
    p.add_argument("--rounds", type=int, default=3, help="measured rounds (default 3)")
    p.add_argument("--warmup", type=int, default=1, help="unmeasured rounds first (default 1)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens per generation")
    p.add_argument("--prompt", default=DEFAULT_PROMPT, help="the user message")
    p.add_argument("--model-dir", type=Path, help="target model dir (default: embedded SmolLM2)")
    p.add_argument("--draft-dir", type=Path, help="draft model dir (default: the target itself)")
    p.add_argument(
        "--num-draft-tokens",
        type=int,
        default=DEFAULT_NUM_DRAFT_TOKENS,
        help=f"tokens the draft proposes per round (default {DEFAULT_NUM_DRAFT_TOKENS})",
    )
    p.add_argument("--out", "--json-out", dest="out", type=Path, help="write all numbers here")
    p.add_argument(
        "--min-ratio", type=float, default=0.0, help="PASS when the median ratio >= this"
    )
    args = p.parse_args(argv)
    if args.rounds < 1 or args.warmup < 0 or args.max_tokens < 3 or args.num_draft_tokens < 1:
        p.error("need --rounds >= 1, --warmup >= 0, --max-tokens >= 3, --num-draft-tokens >= 1")
    for name in ("model_dir", "draft_dir"):
        path = getattr(args, name)
        if path is not None and not (path / "config.json").is_file():
            p.error(f"--{name.replace('_', '-')} {path} is not an MLX model dir (no config.json)")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, exit_on_sigterm)
    # The node reads it when it starts (its --num-draft-tokens flag sets the same).
    os.environ[NUM_DRAFT_TOKENS_ENV] = str(args.num_draft_tokens)
    with tempfile.TemporaryDirectory(prefix="macmesh-bench-spec-") as tmp:
        setup = BACKENDS[args.backend](args, Path(tmp))
        load_start = os.getloadavg()
        started = datetime.datetime.now(datetime.UTC)
        try:
            setup.node.start()
            target = setup.node.wait_ready()
            all_rounds, load = asyncio.run(run_rounds(args, setup, target))
        except (RuntimeError, MeshError) as exc:
            print(f"bench failed: {exc}\nnode log tail:\n{setup.node.log_tail()}", file=sys.stderr)
            return 2
        finally:
            setup.node.stop()
        load_end = os.getloadavg()

    rounds = [r for r in all_rounds if not r.warmup]
    summary = summarize(rounds)
    problems = [f"round {r.index}: {r.mismatch}" for r in all_rounds if r.mismatch]
    if counters := _counter_problem(all_rounds, load):
        problems.append(counters)
    ok = summary["median_ratio"] >= args.min_ratio
    verdict = "MISMATCH" if problems else ("PASS" if ok else "FAIL")

    print(markdown_table(rounds, summary))
    print()
    print(
        f"plain {summary['median_plain_tps']:.2f} tok/s, speculative "
        f"{summary['median_speculative_tps']:.2f} tok/s (draft {setup.draft_id!r} for "
        f"{setup.model_id!r}, {args.num_draft_tokens} draft tokens per round)"
    )
    print(
        f"acceptance {summary['acceptance']:.1%} ({summary['accepted_draft_tokens']:.0f} of "
        f"{summary['draft_tokens']:.0f} proposed tokens)"
    )
    print(
        f"{verdict}: median speculative/plain decode ratio {summary['median_ratio']:.3f} "
        f"(end-to-end {summary['median_e2e_ratio']:.3f}; threshold {args.min_ratio}); "
        f"load average {load_start[0]:.2f} at start, {load_end[0]:.2f} at end"
    )
    for m in problems:
        print(f"!!! {m}")

    if args.out is not None:
        report = {
            "started_at": started.isoformat(),
            "config": {
                "backend": args.backend,
                "rounds": args.rounds,
                "warmup": args.warmup,
                "max_tokens": args.max_tokens,
                "prompt": args.prompt,
                "num_draft_tokens": args.num_draft_tokens,
                "model_id": setup.model_id,
                "draft_id": setup.draft_id,
                "min_ratio": args.min_ratio,
                **setup.info,
            },
            "machine": {
                **machine_info({"mlx": "mlx", "mlx_lm": "mlx-lm", "grpcio": "grpcio"}),
                "loadavg_start": list(load_start),
                "loadavg_end": list(load_end),
            },
            "summary": summary,
            "node_load": asdict(load) if load is not None else None,
            "verdict": verdict,
            "mismatches": problems,
            "rounds": [asdict(r) for r in rounds],
            "warmup_rounds": [asdict(r) for r in all_rounds if r.warmup],
        }
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    if problems:
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
