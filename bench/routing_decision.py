"""One routing decision (prefix-index lookup + policy) against a large index.

Target (issue 7): a decision for a 32k-token prompt (128 blocks of 256) with
8 nodes and 1,000,000 indexed blocks takes p99 <= 2 ms, tokenization and
hashing excluded.

What it measures
    A `routing.prefix.PrefixIndex` is filled through `set_node`, as node
    reports fill it: each of `--nodes` nodes reports the chains of some
    synthetic 32k-token prompts plus random 64-bit hashes, up to `--blocks`
    distinct hashes in all. The prompts share 4 system prompts of 16 blocks;
    each prompt is held in full by one node and, with an evicted block, by
    the next one; one "hot" prompt is held by every node (the longest walk
    for every node slot). A few provisional entries are live, one expired.

    A decision is what the coordinator does per request once the prompt is
    hashed: `cached_blocks(hashes, now, block_size)`, one `Candidate` per node
    (rates and queues from a rotating set of load snapshots) and
    `routing.policy.choose`. Queries cycle through every prompt, the hot
    one, a prompt that shares only half of a chain and one nothing holds.
    Each decision is timed alone (`perf_counter_ns`); the GC stays on, as in
    the coordinator. Reported apart: hashing the 32k-token prompt
    (`block_hashes`), applying a node report with 1% of its blocks changed,
    and re-applying an unchanged one. Index memory is tracemalloc's count of
    what the build allocated (dicts, sets, bitmasks), not the hash ints
    themselves, which the node snapshots hold anyway.

    Every query's `cached_blocks` is checked against a brute-force count from
    the same construction; a difference is a correctness bug (exit code 2).

How to run
    .venv/bin/python bench/routing_decision.py
    .venv/bin/python bench/routing_decision.py --iterations 5000 \\
        --json-out /tmp/bench_routing.json

    Exit code 0 when p99 <= --target-ms (PASS), 1 when above (FAIL), 2 on a
    wrong lookup.
"""

from __future__ import annotations

import argparse
import datetime
import gc
import json
import os
import platform
import random
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from macmesh.bench.stats import percentile
from mesh.types import CachedPrefix
from routing.policy import POLICY_NAMES, Candidate, Decision, RoundRobin, choose
from routing.prefix import PrefixIndex, block_hashes

MODEL = "bench-model"
VOCAB = 151_000
SYSTEM_BLOCKS = 16
FAMILIES = 16
FOREVER = 1e18  # provisional entries that outlive the run
CONFIG_KEYS = (
    "iterations",
    "warmup",
    "nodes",
    "blocks",
    "prompt_tokens",
    "block_size",
    "policy",
    "seed",
)


@dataclass
class Setup:
    """The index and what the timed loop asks it."""

    index: PrefixIndex
    nodes: list[str]
    block_size: int
    prompt_tokens: int
    queries: list[tuple[str, list[int]]]  # (name, block hashes)
    expected: list[dict[str, int]]  # brute-force cached_blocks per query
    reports: dict[str, tuple[int, ...]]  # what each node reported
    loads: list[list[dict[str, Any]]]  # per snapshot, per node: Candidate fields
    build_s: float = 0.0
    memory_bytes: int = 0
    hash_ms: list[float] = field(default_factory=list)


def _tokens(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(VOCAB) for _ in range(n)]


def build(
    *, nodes: int, blocks: int, block_size: int, prompt_tokens: int, seed: int, memory: bool
) -> Setup:
    """The index (`blocks` distinct reported hashes over `nodes` nodes) and the queries."""
    rng = random.Random(seed)
    names = [f"node-{i}" for i in range(nodes)]
    per_prompt = prompt_tokens // block_size
    sys_tokens = SYSTEM_BLOCKS * block_size
    systems = [_tokens(rng, sys_tokens) for _ in range(4)]
    prompts = [systems[f % 4] + _tokens(rng, prompt_tokens - sys_tokens) for f in range(FAMILIES)]
    t0 = time.perf_counter()
    chains = [block_hashes(MODEL, p, block_size) for p in prompts]
    hash_ms = [(time.perf_counter() - t0) * 1000 / len(chains)]
    hot = block_hashes(MODEL, systems[0] + _tokens(rng, prompt_tokens - sys_tokens), block_size)

    held: dict[str, set[int]] = {n: set(hot) for n in names}
    for f, chain in enumerate(chains):
        held[names[f % nodes]].update(chain)
        # The next node holds it too, minus one block lost to eviction.
        hole = rng.randrange(SYSTEM_BLOCKS, per_prompt)
        held[names[(f + 1) % nodes]].update(h for i, h in enumerate(chain) if i != hole)
    distinct = set().union(*held.values())
    fill = max(0, blocks - len(distinct))
    reports: dict[str, tuple[int, ...]] = {}
    for i, n in enumerate(names):
        extra = fill // nodes + (1 if i < fill % nodes else 0)
        randoms = [rng.getrandbits(64) for _ in range(extra)]
        reports[n] = tuple(held[n]) + tuple(randoms)
    snapshots = {n: (CachedPrefix(MODEL, block_size, hs),) for n, hs in reports.items()}

    gc.collect()
    if memory:
        tracemalloc.start()
    t0 = time.perf_counter()
    index = PrefixIndex()
    for n in names:
        index.set_node(n, snapshots[n])
    build_s = time.perf_counter() - t0
    # Recent routings: live provisional entries, and one already expired.
    prov: dict[str, set[int]] = {n: set() for n in names}
    for k in range(8):
        node, chain = names[(3 * k + 2) % nodes], chains[(5 * k) % FAMILIES]
        index.add_provisional(node, chain[: per_prompt // 2], FOREVER, block_size)
        prov[node].update(chain[: per_prompt // 2])
    index.add_provisional(names[0], chains[1], -1.0, block_size)
    mem = tracemalloc.get_traced_memory()[0] if memory else 0
    if memory:
        tracemalloc.stop()

    fresh = block_hashes(MODEL, _tokens(rng, prompt_tokens), block_size)
    half = chains[3][: per_prompt // 2] + fresh[per_prompt // 2 :]
    queries = [(f"prompt-{f}", c) for f, c in enumerate(chains)]
    queries += [("hot", hot), ("half", half), ("miss", fresh)]
    expected = []
    for _, q in queries:
        counts = {}
        for n in names:
            have = held[n] | prov[n]
            run = 0
            while run < len(q) and q[run] in have:
                run += 1
            if run:
                counts[n] = run
        expected.append(counts)
    loads = [
        [
            {
                "prefill_tps": 0.0 if i == nodes - 1 else rng.uniform(800, 3000),
                "decode_tps": rng.uniform(20, 60),
                "queued_prefill_tokens": rng.randrange(0, 20000),
                "running": rng.randrange(0, 5),
                "waiting": rng.randrange(0, 3),
            }
            for i in range(nodes)
        ]
        for _ in range(16)
    ]
    return Setup(
        index, names, block_size, prompt_tokens, queries, expected, reports, loads,
        build_s=build_s, memory_bytes=mem, hash_ms=hash_ms,
    )  # fmt: skip


def decide(setup: Setup, q: int, snap: int, now: float, policy: str, rr: RoundRobin) -> Decision:
    """One routing decision: index lookup, candidates, policy (what the timed loop times).

    As `ChatService.place` does it: the prompt's leading cached blocks per node and
    every node's cache occupancy (for a prefix nobody holds), then `choose`.
    """
    counts = setup.index.cached_blocks(setup.queries[q][1], now, setup.block_size)
    occupancy = setup.index.occupancy(now)
    bs = setup.block_size
    first = setup.queries[q][1][:1]
    cands = [
        Candidate(
            node_id=n,
            loaded=True,
            cached_tokens=counts.get(n, 0) * bs,
            cache_blocks=occupancy.get(n, 0),
            **load,
        )
        for n, load in zip(setup.nodes, setup.loads[snap], strict=True)
    ]
    return choose(
        cands, setup.prompt_tokens, policy, round_robin=rr, affinity=first[0] if first else 1
    )


def check(setup: Setup, now: float = 0.0) -> list[str]:
    """Queries whose cached_blocks differ from the brute-force count."""
    bad = []
    for (name, q), want in zip(setup.queries, setup.expected, strict=True):
        got = setup.index.cached_blocks(q, now, setup.block_size)
        if got != want:
            bad.append(f"{name}: got {got}, expected {want}")
    return bad


def time_decisions(setup: Setup, iterations: int, policy: str) -> list[float]:
    """Milliseconds per decision, each timed alone."""
    rr = RoundRobin()
    out = []
    nq, ns = len(setup.queries), len(setup.loads)
    for i in range(iterations):
        t0 = time.perf_counter_ns()
        decide(setup, i % nq, i % ns, float(i), policy, rr)
        out.append((time.perf_counter_ns() - t0) / 1e6)
    return out


def time_updates(setup: Setup, rounds: int, seed: int) -> dict[str, float]:
    """p50 ms of set_node with 1% of a node's blocks changed, and with none changed."""
    rng = random.Random(seed + 1)
    node = setup.nodes[0]
    base = setup.reports[node]
    changed = list(base)
    for i in rng.sample(range(len(base)), max(1, len(base) // 100)):
        changed[i] = rng.getrandbits(64)
    a = (CachedPrefix(MODEL, setup.block_size, base),)
    b = (CachedPrefix(MODEL, setup.block_size, tuple(changed)),)
    # Equal, not identical: a report decoded off the wire is a new tuple each time.
    again = {id(a): (CachedPrefix(MODEL, setup.block_size, tuple(list(base))),)}
    again[id(b)] = (CachedPrefix(MODEL, setup.block_size, tuple(changed)),)
    diff_ms, same_ms = [], []
    for r in range(rounds):
        report = b if r % 2 == 0 else a
        t0 = time.perf_counter_ns()
        setup.index.set_node(node, report)
        diff_ms.append((time.perf_counter_ns() - t0) / 1e6)
        t0 = time.perf_counter_ns()
        setup.index.set_node(node, again[id(report)])
        same_ms.append((time.perf_counter_ns() - t0) / 1e6)
    if rounds % 2:
        setup.index.set_node(node, a)  # leave the index as built
    return {
        "blocks_per_report": len(base),
        "changed_blocks": len(base) // 100,
        "diff_p50_ms": percentile(diff_ms, 50),
        "unchanged_p50_ms": percentile(same_ms, 50),
    }


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Routing decision time against a large prefix index.")
    p.add_argument("--iterations", type=int, default=5000, help="timed decisions")
    p.add_argument("--warmup", type=int, default=500, help="untimed decisions first")
    p.add_argument("--nodes", type=int, default=8)
    p.add_argument("--blocks", type=int, default=1_000_000, help="distinct indexed hashes")
    p.add_argument("--prompt-tokens", type=int, default=32768)
    p.add_argument("--block-size", type=int, default=256)
    p.add_argument("--policy", choices=POLICY_NAMES, default="cache-aware")
    p.add_argument("--update-rounds", type=int, default=10, help="timed node reports")
    p.add_argument("--target-ms", type=float, default=2.0, help="target: p99 decision time")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--no-memory", action="store_true", help="skip tracemalloc during the build")
    p.add_argument("--json-out", type=Path, help="write all numbers here")
    args = p.parse_args(argv)
    if args.iterations < 1 or args.warmup < 0 or args.nodes < 1 or args.update_rounds < 0:
        p.error("need --iterations >= 1, --nodes >= 1, --warmup >= 0 and --update-rounds >= 0")
    if args.block_size < 1 or args.prompt_tokens < (SYSTEM_BLOCKS + 2) * args.block_size:
        p.error(f"need --block-size >= 1 and --prompt-tokens >= {SYSTEM_BLOCKS + 2} blocks")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = datetime.datetime.now(datetime.UTC)
    setup = build(
        nodes=args.nodes,
        blocks=args.blocks,
        block_size=args.block_size,
        prompt_tokens=args.prompt_tokens,
        seed=args.seed,
        memory=not args.no_memory,
    )
    mismatches = check(setup)
    rr = RoundRobin()
    for i in range(args.warmup):
        decide(setup, i % len(setup.queries), i % len(setup.loads), 0.0, args.policy, rr)
    ms = time_decisions(setup, args.iterations, args.policy)
    updates = time_updates(setup, args.update_rounds, args.seed) if args.update_rounds else {}
    mismatches += check(setup)  # still right after the updates
    stats = setup.index.stats()
    summary = {
        "p50_ms": percentile(ms, 50),
        "p90_ms": percentile(ms, 90),
        "p99_ms": percentile(ms, 99),
        "max_ms": max(ms),
        "mean_ms": sum(ms) / len(ms),
    }
    ok = summary["p99_ms"] <= args.target_ms
    verdict = "MISMATCH" if mismatches else ("PASS" if ok else "FAIL")
    blocks = args.prompt_tokens // args.block_size

    print(
        f"### routing decision: {args.policy}, {args.nodes} nodes, {stats.hashes:,} indexed "
        f"blocks, {args.prompt_tokens} prompt tokens ({blocks} blocks of {args.block_size})\n"
    )
    print(f"index build {setup.build_s:.2f} s, memory {setup.memory_bytes / 2**20:.1f} MiB")
    print(f"hashing the prompt (excluded): {setup.hash_ms[0]:.2f} ms\n")
    print("| decisions | p50 ms | p90 ms | p99 ms | max ms | mean ms |")
    print("|---:|---:|---:|---:|---:|---:|")
    print(
        f"| {len(ms)} | {summary['p50_ms']:.3f} | {summary['p90_ms']:.3f} | "
        f"{summary['p99_ms']:.3f} | {summary['max_ms']:.3f} | {summary['mean_ms']:.3f} |"
    )
    if updates:
        print(
            f"\nnode report of {updates['blocks_per_report']:,} blocks: "
            f"{updates['changed_blocks']:,} changed {updates['diff_p50_ms']:.2f} ms, "
            f"unchanged {updates['unchanged_p50_ms']:.2f} ms (p50)"
        )
    for m in mismatches:
        print(f"!!! wrong lookup (correctness bug): {m}")
    print(f"\n**verdict: {verdict}**: p99 {summary['p99_ms']:.3f} ms vs {args.target_ms:g} ms")

    if args.json_out is not None:
        report = {
            "started_at": started.isoformat(),
            "argv": sys.argv[1:] if argv is None else list(argv),
            "target": {"p99_ms": args.target_ms},
            "config": {k: getattr(args, k) for k in CONFIG_KEYS},
            "machine": {
                "platform": platform.platform(),
                "machine": platform.machine(),
                "python": platform.python_version(),
                "cpu_count": os.cpu_count(),
                "loadavg": list(os.getloadavg()),
            },
            "index": {
                "hashes": stats.hashes,
                "provisional": stats.provisional,
                "nodes": stats.nodes,
                "build_s": setup.build_s,
                "memory_bytes": setup.memory_bytes,
            },
            "hashing_ms": setup.hash_ms[0],
            "summary": summary,
            "updates": updates,
            "verdict": verdict,
            "mismatches": mismatches,
            "decisions_ms": ms,
        }
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(report, indent=2) + "\n")
    if mismatches:
        return 2
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
