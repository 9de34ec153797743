"""What `macmesh bench routing` measured: samples, per-policy summaries, the ratios
between policies, and the report (markdown, JSON, plots)."""

from __future__ import annotations

import json
import sys
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from macmesh.bench.stats import percentile


@dataclass(slots=True)
class Sample:
    """One request as the client saw it."""

    session: int
    turn: int
    ok: bool = False
    error: str = ""
    ttft_s: float = 0.0
    total_s: float = 0.0
    prompt_tokens: int = 0
    cached_tokens: int = 0
    completion_tokens: int = 0
    node: str = ""
    reason: str = ""


def summarize(samples: Sequence[Sample], wall_s: float, nodes: dict[str, str]) -> dict[str, Any]:
    """One policy's numbers: hit rate, TTFT p50/p90, throughput, per-node load, reasons."""
    ok = [s for s in samples if s.ok]
    prompt = sum(s.prompt_tokens for s in ok)
    cached = sum(s.cached_tokens for s in ok)
    ttfts = [s.ttft_s for s in ok]
    per_node = Counter(s.node for s in ok)
    out_tokens = sum(s.completion_tokens for s in ok)
    return {
        "requests": len(samples),
        "errors": len(samples) - len(ok),
        "prompt_tokens": prompt,
        "cached_tokens": cached,
        "hit_rate": cached / prompt if prompt else 0.0,
        "ttft_p50_s": percentile(ttfts, 50, empty=0.0),
        "ttft_p90_s": percentile(ttfts, 90, empty=0.0),
        "total_p50_s": percentile([s.total_s for s in ok], 50, empty=0.0),
        "wall_s": wall_s,
        "requests_per_s": len(ok) / wall_s if wall_s > 0 else 0.0,
        "output_tokens_per_s": out_tokens / wall_s if wall_s > 0 else 0.0,
        "per_node": {n: per_node.get(n, 0) for n in sorted(set(nodes) | set(per_node))},
        "reasons": dict(sorted(Counter(s.reason for s in ok).items())),
        "first_errors": [s.error for s in samples if not s.ok][:5],
        "samples": [asdict(s) for s in samples],
    }


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def compare(policies: dict[str, dict[str, Any]]) -> dict[str, float | None]:
    """cache-aware vs round-robin: hit rate ratio and TTFT p90 ratio (None if not both ran)."""
    ca, rr = policies.get("cache-aware"), policies.get("round-robin")
    if ca is None or rr is None:
        return {"hit_rate_ratio": None, "ttft_p90_ratio": None}
    return {
        "hit_rate_ratio": _ratio(ca["hit_rate"], rr["hit_rate"]),
        "ttft_p90_ratio": _ratio(ca["ttft_p90_s"], rr["ttft_p90_s"]),
    }


# ---- the run ----------------------------------------------------------------------------


def _ms(s: float) -> str:
    return f"{s * 1000:.0f} ms"


def _x(v: float | None) -> str:
    return "n/a" if v is None else f"{v:.2f}x"


def markdown(report: dict[str, Any]) -> str:
    """The report as markdown tables (one per workload)."""
    target = report["target"]
    head = "SIMULATED " if report["simulated"] else ""
    lines = [f"# {head}routing benchmark", ""]
    desc = f"{target['nodes']} {target['mode']} nodes, model `{target['model']}`"
    if report["simulated"]:
        desc = "SIMULATED engines (node/backends/sim.py): " + desc
    if "sim_rates" in target:
        rates = target["sim_rates"]
        alpha = target.get("sim_batch_alpha")
        desc += (
            f"; {rates[0]:g} prefill / {rates[1]:g} decode tok/s"
            + (f", batch alpha {alpha:g}" if alpha is not None else "")
            + f", cache env {target['sim_env'] or 'defaults'}"
        )
    lines += [desc, ""]
    for workload, res in report["workloads"].items():
        lines += [
            f"## {head}{workload}",
            "",
            "| policy | requests | errors | token hit rate | TTFT p50 | TTFT p90 "
            "| req/s | out tok/s | requests per node | reasons |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|---|",
        ]
        for policy, s in res["policies"].items():
            per_node = " ".join(str(v) for v in s["per_node"].values())
            reasons = ", ".join(f"{k} {v}" for k, v in s["reasons"].items())
            lines.append(
                f"| {policy} | {s['requests']} | {s['errors']} | {s['hit_rate']:.1%} "
                f"| {_ms(s['ttft_p50_s'])} | {_ms(s['ttft_p90_s'])} | {s['requests_per_s']:.2f} "
                f"| {s['output_tokens_per_s']:.1f} | {per_node} | {reasons} |"
            )
        cmp = res["cache_aware_vs_round_robin"]
        lines += [
            "",
            f"cache-aware vs round-robin: hit rate {_x(cmp['hit_rate_ratio'])}, "
            f"TTFT p90 {_x(cmp['ttft_p90_ratio'])}",
            "",
        ]
    return "\n".join(lines)


def write_report(report: dict[str, Any], out: Path) -> list[Path]:
    """routing.json, routing.md and (with matplotlib) ttft.png, nodes.png under `out`."""
    out.mkdir(parents=True, exist_ok=True)
    written = [out / "routing.json", out / "routing.md"]
    written[0].write_text(json.dumps(report, indent=2) + "\n")
    written[1].write_text(markdown(report) + "\n")
    written += plot(report, out)
    return written


def plot(report: dict[str, Any], out: Path) -> list[Path]:
    """ttft.png (TTFT CDF per policy) and nodes.png (requests per node per policy)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: no plots (pip install 'matplotlib>=3.8')", file=sys.stderr
        )
        return []
    head = "SIMULATED " if report["simulated"] else ""
    workloads = report["workloads"]
    n = len(workloads)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], workloads.items(), strict=True):
        for policy, s in res["policies"].items():
            xs = sorted(x["ttft_s"] * 1000 for x in s["samples"] if x["ok"])
            ys = [(i + 1) / len(xs) for i in range(len(xs))]
            ax.step(xs, ys, where="post", label=policy)
        ax.set(title=f"{head}{name}", xlabel="TTFT (ms)", ylabel="fraction of requests")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    ttft = out / "ttft.png"
    fig.savefig(ttft, dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, (name, res) in zip(axes[0], workloads.items(), strict=True):
        pols = list(res["policies"].items())
        width = 0.8 / max(1, len(pols))
        for k, (policy, s) in enumerate(pols):
            counts = list(s["per_node"].values())
            shift = (k - (len(pols) - 1) / 2) * width  # the group centred on its node
            ax.bar([i + shift for i in range(len(counts))], counts, width, label=policy)
        ax.set(title=f"{head}{name}", xlabel="node (index)", ylabel="requests")
        ax.legend()
    fig.tight_layout()
    nodes = out / "nodes.png"
    fig.savefig(nodes, dpi=110)
    plt.close(fig)
    return [ttft, nodes]
