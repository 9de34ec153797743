"""`macmesh bench routing`: replay workloads against routing policies side by side."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from mesh.auth import load_secret
from mesh.paths import macmesh_home
from routing.policy import POLICY_NAMES


def _csv(value: str) -> tuple[str, ...]:
    return tuple(v.strip() for v in value.split(",") if v.strip())


def cmd_bench_routing(args: argparse.Namespace) -> int:
    from macmesh.bench.routing import RoutingBenchConfig, main
    from macmesh.bench.workloads import WORKLOADS, WorkloadSpec

    policies = _csv(args.policies)
    bad = [p for p in policies if p not in POLICY_NAMES]
    if bad or not policies:
        raise SystemExit(f"--policies: one or more of {', '.join(POLICY_NAMES)}")
    workloads = WORKLOADS if args.workload == "all" else (args.workload,)
    try:
        prefill, decode = (float(x) for x in args.sim_rates.split(":"))
    except ValueError:
        raise SystemExit("--sim-rates: PREFILL:DECODE tokens/s, e.g. 400:150") from None
    if args.sim and not 1 <= args.sim <= 32:
        raise SystemExit("--sim: 1 to 32 nodes")
    if args.sim_batch_alpha is not None and args.sim_batch_alpha < 0:
        raise SystemExit("--sim-batch-alpha: >= 0 (1 = no batching gain)")
    sim_env = {
        name: str(value)
        for name, value in (
            ("MLX_CACHE_MAX_SLOTS", args.sim_cache_slots),
            ("MLX_CACHE_BLOCK_SIZE", args.sim_block_size),
            ("MLX_CACHE_MIN_REUSE", args.sim_min_reuse),
            ("MLX_CACHE_MAX_TOKENS", args.sim_cache_tokens),
        )
        if value is not None
    }
    spec = WorkloadSpec(
        groups=args.groups,
        prompts_per_group=args.prompts_per_group,
        prefix_tokens=args.prefix_tokens,
        question_tokens=args.question_tokens,
        conversations=args.conversations,
        turns=args.turns,
        sessions=args.sessions,
        agent_turns=args.agent_turns,
        agent_prefix_tokens=args.agent_prefix_tokens,
        pause_s=args.pause,
        max_tokens=args.max_tokens,
        seed=args.seed,
        order=args.order,
        **({"chars_per_token": args.chars_per_token} if args.chars_per_token else {}),
    )
    config = RoutingBenchConfig(
        nodes=_csv(args.nodes or ""),
        sim=args.sim or 0,
        gguf=args.gguf or 0,
        gguf_slots=args.gguf_slots,
        sim_rates=(prefill, decode),
        sim_batch_alpha=args.sim_batch_alpha,
        sim_env=sim_env,
        policies=policies,
        workloads=workloads,
        spec=spec,
        concurrency=args.concurrency,
        model=args.model,
        out=args.out,
        secret=load_secret(macmesh_home()) if args.nodes else None,
    )
    return main(config)


def _add_bench_routing_args(p: argparse.ArgumentParser) -> None:
    from macmesh.bench.workloads import DEFAULT_SIM_RATES, ORDERS, WORKLOADS, WorkloadSpec

    d = WorkloadSpec()
    t = p.add_argument_group("target (one of)").add_mutually_exclusive_group(required=True)
    t.add_argument("--nodes", metavar="HOST:PORT,...", help="an existing mesh's nodes")
    t.add_argument("--sim", type=int, metavar="N", help="start N SIMULATED nodes (8-16 typical)")
    t.add_argument("--gguf", type=int, metavar="N", help="start N real nodes serving smollm2.gguf")
    s = p.add_argument_group("simulated nodes")
    s.add_argument(
        "--sim-rates",
        default=f"{DEFAULT_SIM_RATES[0]:g}:{DEFAULT_SIM_RATES[1]:g}",
        metavar="PREFILL:DECODE",
        help="tokens/s (default: llama-server SmolLM2 on a 2-core Linux box; a Mac 7B "
        "is about 600:35)",
    )
    s.add_argument(
        "--sim-batch-alpha",
        type=float,
        metavar="ALPHA",
        help="how decode scales with the batch: each of b streams runs at DECODE / "
        "(1 + (b - 1) * ALPHA); 1 = no batching gain, 0.15 = an Apple GPU (default: the "
        "sim's, 0.7)",
    )
    s.add_argument("--sim-cache-slots", type=int, metavar="N", help="MLX_CACHE_MAX_SLOTS")
    s.add_argument("--sim-block-size", type=int, metavar="N", help="MLX_CACHE_BLOCK_SIZE")
    s.add_argument("--sim-min-reuse", type=int, metavar="N", help="MLX_CACHE_MIN_REUSE")
    s.add_argument("--sim-cache-tokens", type=int, metavar="N", help="MLX_CACHE_MAX_TOKENS")
    p.add_argument(
        "--gguf-slots", type=int, default=2, metavar="N", help="llama-server slots per --gguf node"
    )
    p.add_argument(
        "--policies", default=",".join(POLICY_NAMES), help="comma list (default all three)"
    )
    p.add_argument(
        "--workload", choices=(*WORKLOADS, "all"), default="shared-prefix", help="what to replay"
    )
    p.add_argument(
        "--concurrency", type=int, default=0, help="requests in flight (default 2 x nodes)"
    )
    p.add_argument("--model", help="model to request (default: the one every node has loaded)")
    p.add_argument("--out", type=Path, metavar="DIR", help="write routing.json/.md, *.png")
    w = p.add_argument_group("workload sizes (tokens)")
    for flag, key, what in (
        ("--groups", "groups", "shared-prefix: system prompts"),
        ("--prompts-per-group", "prompts_per_group", "shared-prefix: questions per group"),
        ("--prefix-tokens", "prefix_tokens", "shared-prefix: system prompt size"),
        ("--question-tokens", "question_tokens", "shared-prefix: question size"),
        ("--conversations", "conversations", "multi-turn: conversations"),
        ("--turns", "turns", "multi-turn: turns each"),
        ("--sessions", "sessions", "agent: concurrent sessions"),
        ("--agent-turns", "agent_turns", "agent: turns each"),
        ("--agent-prefix-tokens", "agent_prefix_tokens", "agent: tools + system prompt"),
        ("--max-tokens", "max_tokens", "tokens generated per request"),
        ("--seed", "seed", "text generator seed"),
    ):
        w.add_argument(
            flag, type=int, default=getattr(d, key), help=f"{what} (default %(default)s)"
        )
    w.add_argument(
        "--pause",
        type=float,
        default=d.pause_s,
        help="agent: seconds between turns (default %(default)s)",
    )
    w.add_argument(
        "--order",
        choices=ORDERS,
        default=d.order,
        help="each round's request order: shuffled anew, or the same every round (cyclic)",
    )
    w.add_argument(
        "--chars-per-token",
        type=float,
        help="characters per token of the text (default 1 = sim tokenizer; 4 with --gguf)",
    )


def add_bench_parser(sub: Any) -> None:
    """The `bench` command and its benchmarks."""
    p = sub.add_parser("bench", help="benchmarks against a mesh")
    bsub = p.add_subparsers(dest="bench_command", required=True, metavar="BENCH")
    q = bsub.add_parser(
        "routing",
        help="replay workloads and compare routing policies side by side",
        description="Replay a workload through one coordinator per routing policy (each "
        "with cold caches) and compare token hit rate, TTFT and per-node load.",
    )
    _add_bench_routing_args(q)
    q.set_defaults(func=cmd_bench_routing)
