"""`macmesh bench routing`: workloads, numbers, an in-process run (fast) and the CLI (slow)."""

from __future__ import annotations

import itertools
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from macmesh.bench.report import Sample, compare, markdown, summarize
from macmesh.bench.routing import RoutingBenchConfig, _sim_args, gguf_threads, run_bench
from macmesh.bench.stats import percentile
from macmesh.bench.workloads import WORKLOADS, WorkloadSpec, build
from node.config import CacheConfig, SimModelSpec
from routing.policy import POLICY_NAMES
from tests.conftest import RunningNode, start_sim_node

ROOT = Path(__file__).resolve().parents[1]
MODEL = "sim-bench"

TINY = WorkloadSpec(
    groups=6,
    prompts_per_group=6,
    prefix_tokens=512,
    question_tokens=24,
    conversations=4,
    turns=3,
    system_tokens=256,
    message_tokens=64,
    reply_tokens=32,
    sessions=2,
    agent_turns=3,
    agent_prefix_tokens=512,
    pause_s=0.01,
    max_tokens=4,
)


def test_workloads_are_deterministic_and_salted() -> None:
    for name in WORKLOADS:
        a, b = build(name, TINY, "[run a]"), build(name, TINY, "[run a]")
        assert a == b, name
        other = build(name, TINY, "[run b]")
        assert all(r.messages[0]["content"].startswith("[run a]") for r in a)
        assert [len(r.messages) for r in a] == [len(r.messages) for r in other]
    shared = build("shared-prefix", TINY, "s")
    assert len(shared) == TINY.groups * TINY.prompts_per_group
    assert len(shared[0].messages[0]["content"]) >= TINY.prefix_tokens  # 1 token per byte
    turns = [r for r in build("multi-turn", TINY, "s") if r.session == 0]
    assert [r.turn for r in turns] == list(range(TINY.turns))
    # Each turn extends the previous one (history + the fixed reply + a new message).
    for prev, cur in itertools.pairwise(turns):
        assert cur.messages[: len(prev.messages)] == prev.messages
        assert cur.messages[len(prev.messages)]["role"] == "assistant"
    agent = build("agent", TINY, "s")
    assert {r.messages[0]["content"] for r in agent} == {agent[0].messages[0]["content"]}
    assert all(r.pause_s == TINY.pause_s for r in agent if r.turn)


def test_orders() -> None:
    """`shuffled` reorders every round; `cyclic` keeps one order (G clients taking turns)."""

    def groups(order: str) -> list[list[int]]:
        reqs = build("shared-prefix", replace(TINY, order=order), "s")
        per_round = [reqs[i : i + TINY.groups] for i in range(0, len(reqs), TINY.groups)]
        return [[r.session // TINY.prompts_per_group for r in rnd] for rnd in per_round]

    cyclic = groups("cyclic")
    assert all(rnd == cyclic[0] for rnd in cyclic)
    assert sorted(cyclic[0]) == list(range(TINY.groups))
    shuffled = groups("shuffled")
    assert all(sorted(rnd) == list(range(TINY.groups)) for rnd in shuffled)
    assert len({tuple(rnd) for rnd in shuffled}) > 1
    with pytest.raises(ValueError, match="order"):
        build("shared-prefix", replace(TINY, order="sorted"), "s")


def test_gguf_nodes_do_not_oversubscribe_the_cores() -> None:
    assert gguf_threads(1) == (os.cpu_count() or 1)
    assert gguf_threads(64) == 1
    assert gguf_threads(3) * 3 <= max(3, os.cpu_count() or 1)


def test_sim_nodes_take_the_batch_alpha() -> None:
    def spec(config: RoutingBenchConfig) -> SimModelSpec:
        args = _sim_args(config)
        return SimModelSpec.parse(args[args.index("--sim-model") + 1])

    assert spec(RoutingBenchConfig(sim=2)) == SimModelSpec(MODEL, 400, 150, 32768)
    args = _sim_args(RoutingBenchConfig(sim=2, sim_rates=(600, 35), sim_batch_alpha=0.15))
    assert args[args.index("--sim-model") + 1] == f"{MODEL}:600:35:32768:0.15"


def test_numbers() -> None:
    assert math.isnan(percentile([], 50)) and percentile([], 50, empty=0.0) == 0.0
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.5
    assert percentile([5.0], 90) == 5.0
    samples = [
        Sample(0, 0, ok=True, ttft_s=0.1, prompt_tokens=100, cached_tokens=80, node="a",
               reason="cache-hit", completion_tokens=4),
        Sample(1, 0, ok=True, ttft_s=0.3, prompt_tokens=100, cached_tokens=0, node="a",
               reason="cold", completion_tokens=4),
        Sample(2, 0, error="HTTP 503"),
    ]  # fmt: skip
    s = summarize(samples, 2.0, {"a": "x:1", "b": "x:2"})
    assert s["hit_rate"] == 0.4
    assert s["errors"] == 1
    assert s["per_node"] == {"a": 2, "b": 0}
    assert s["reasons"] == {"cache-hit": 1, "cold": 1}
    assert s["output_tokens_per_s"] == 4.0
    rr = {**s, "hit_rate": 0.2, "ttft_p90_s": s["ttft_p90_s"] * 2}
    cmp = compare({"cache-aware": s, "round-robin": rr})
    assert cmp["hit_rate_ratio"] == pytest.approx(2.0)
    assert cmp["ttft_p90_ratio"] == pytest.approx(0.5)
    assert compare({"cache-aware": s}) == {"hit_rate_ratio": None, "ttft_p90_ratio": None}


@pytest.fixture
def sim_nodes(tmp_path: Path) -> Iterator[list[RunningNode]]:
    """3 simulated nodes (fast prefill), 4 cache slots each: 9 groups overflow any one node."""
    cache = CacheConfig(block_size=64, min_reuse=128, max_slots=4)
    nodes = [
        start_sim_node(tmp_path / f"n{i}", SimModelSpec(MODEL, 5000, 200, 32768), cache=cache)
        for i in range(3)
    ]
    yield nodes
    for n in nodes:
        n.stop()


def test_bench_in_process_cache_aware_wins(sim_nodes: list[RunningNode], tmp_path: Path) -> None:
    config = RoutingBenchConfig(
        nodes=tuple(n.target for n in sim_nodes),
        workloads=("shared-prefix",),
        # 9 groups on 3 nodes of 4 slots: round-robin cycles every group through every node.
        spec=replace(TINY, groups=9, max_tokens=40),
        # Requests mostly decode (200 tok/s), so a warm node is rarely behind on prefill
        # work: the cache-aware estimate then keeps a group on its node.
        concurrency=3,
        out=tmp_path / "out",
    )
    report = run_bench(config)
    assert report["simulated"] is True  # the nodes' backend is "sim", whatever the target flag
    assert report["target"]["model"] == MODEL
    res = report["workloads"]["shared-prefix"]
    assert list(res["policies"]) == list(POLICY_NAMES)
    for policy, s in res["policies"].items():
        assert s["requests"] == 9 * TINY.prompts_per_group, policy
        assert s["errors"] == 0, (policy, s["first_errors"])
        assert sum(s["per_node"].values()) == s["requests"]
        assert len(s["per_node"]) == 3
        assert 0 < s["ttft_p50_s"] <= s["ttft_p90_s"]
        assert s["requests_per_s"] > 0 and s["output_tokens_per_s"] > 0
    assert set(res["policies"]["round-robin"]["reasons"]) == {"round-robin"}
    ca, rr = res["policies"]["cache-aware"], res["policies"]["round-robin"]
    assert ca["hit_rate"] > rr["hit_rate"], (ca["hit_rate"], rr["hit_rate"])
    assert res["cache_aware_vs_round_robin"]["hit_rate_ratio"] is None or (
        res["cache_aware_vs_round_robin"]["hit_rate_ratio"] > 1
    )
    saved = json.loads((tmp_path / "out" / "routing.json").read_text())
    saved_ca = saved["workloads"]["shared-prefix"]["policies"]["cache-aware"]
    assert saved_ca["hit_rate"] == ca["hit_rate"]
    md = (tmp_path / "out" / "routing.md").read_text()
    assert md == markdown(report) + "\n"
    assert "SIMULATED" in md and "| cache-aware |" in md


@pytest.mark.slow
def test_cli_sim_8_all_workloads_with_plots(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = ["bench", "routing", "--sim", "8", "--workload", "all", "--out", str(out)]
    args += ["--sim-rates", "4000:1000", "--groups", "16", "--prompts-per-group", "4"]
    args += ["--conversations", "8", "--turns", "3", "--sessions", "4", "--agent-turns", "3"]
    proc = subprocess.run(
        [sys.executable, "-m", "macmesh", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=540,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    assert "SIMULATED" in proc.stdout
    report = json.loads((out / "routing.json").read_text())
    assert report["simulated"] is True and report["target"]["nodes"] == 8
    assert set(report["workloads"]) == set(WORKLOADS)
    for res in report["workloads"].values():
        assert list(res["policies"]) == list(POLICY_NAMES)
        assert all(p["errors"] == 0 for p in res["policies"].values())
    shared = report["workloads"]["shared-prefix"]["policies"]
    assert shared["cache-aware"]["hit_rate"] > shared["round-robin"]["hit_rate"]
    for png in ("ttft.png", "nodes.png"):
        assert (out / png).stat().st_size > 1000, png
