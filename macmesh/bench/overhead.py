"""What the coordinator-overhead bench measured: rounds of the three paths,
their summaries, the verdict against the targets and the markdown tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from macmesh.bench.stats import median, percentile
from macmesh.bench.streams import Sample

PATHS = ("direct", "anthropic", "openai")
COORD_PATHS = ("anthropic", "openai")
PATH_LABELS = {
    "direct": "direct node gRPC",
    "anthropic": "coordinator Anthropic `/v1/messages`",
    "openai": "coordinator OpenAI `/v1/chat/completions`",
}


@dataclass
class Round:
    index: int
    order: str
    warmup: bool
    samples: dict[str, Sample]
    added_ttft_ms: dict[str, float]
    ratio: dict[str, float]
    added_e2e_ms: dict[str, float]
    mismatch: str = ""


def _check_same(samples: dict[str, Sample]) -> str:
    ref = samples["direct"]
    for p in COORD_PATHS:
        s = samples[p]
        for what in ("deltas", "completion_tokens", "finish_reason"):
            a, b = getattr(ref, what), getattr(s, what)
            if a != b:
                return f"{what}: direct {a!r}, {p} {b!r}"
        if s.text != ref.text:
            at = next(
                (i for i, (x, y) in enumerate(zip(ref.text, s.text, strict=False)) if x != y),
                min(len(ref.text), len(s.text)),
            )
            return (
                f"text differs at char {at}: direct {ref.text[at : at + 40]!r}, "
                f"{p} {s.text[at : at + 40]!r}"
            )
    return ""


def make_round(index: int, order: str, warmup: bool, samples: dict[str, Sample]) -> Round:
    d = samples["direct"]
    added = {p: (samples[p].ttft_s - d.ttft_s) * 1e3 for p in COORD_PATHS}
    ratio = {
        p: samples[p].decode_tps / d.decode_tps if d.decode_tps > 0 else 0.0 for p in COORD_PATHS
    }
    e2e = {p: (samples[p].total_s - d.total_s) * 1e3 for p in COORD_PATHS}
    return Round(index, order, warmup, samples, added, ratio, e2e, _check_same(samples))


def summarize(rounds: Sequence[Round], cold: Sequence[Sample]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for p in PATHS:
        ss = [r.samples[p] for r in rounds]
        row: dict[str, float] = {
            "median_ttft_ms": median([s.ttft_s * 1e3 for s in ss]),
            "median_decode_tps": median([s.decode_tps for s in ss]),
            "median_e2e_ms": median([s.total_s * 1e3 for s in ss]),
            "cold_median_ttft_ms": median([s.ttft_s * 1e3 for s in cold if s.path == p]),
        }
        if p != "direct":
            added = [r.added_ttft_ms[p] for r in rounds]
            row["added_ttft_p50_ms"] = percentile(added, 50)
            row["added_ttft_p90_ms"] = percentile(added, 90)
            row["median_ratio"] = median([r.ratio[p] for r in rounds])
            row["min_ratio"] = min(r.ratio[p] for r in rounds)
            row["added_e2e_p50_ms"] = percentile([r.added_e2e_ms[p] for r in rounds], 50)
        out[p] = row
    return out


def summarize_b2b(b2b: Sequence[Round]) -> dict[str, Any]:
    """TTFT and e2e of the second request of each back-to-back pair."""
    if not b2b:
        return {}
    out: dict[str, Any] = {}
    for p in PATHS:
        ss = [r.samples[p] for r in b2b]
        row: dict[str, float] = {
            "median_ttft_ms": median([s.ttft_s * 1e3 for s in ss]),
            "median_e2e_ms": median([s.total_s * 1e3 for s in ss]),
        }
        if p != "direct":
            added = [r.added_ttft_ms[p] for r in b2b]
            row["added_ttft_p50_ms"] = percentile(added, 50)
            row["added_ttft_p90_ms"] = percentile(added, 90)
            row["added_e2e_p50_ms"] = percentile([r.added_e2e_ms[p] for r in b2b], 50)
        out[p] = row
    return out


def verdict(
    summary: dict[str, Any], b2b: dict[str, Any], max_added_ms: float, min_ratio: float
) -> tuple[bool, str]:
    """PASS when added p50 TTFT (idle and back-to-back) and the ratio meet the targets."""
    added = [summary[p]["added_ttft_p50_ms"] for p in COORD_PATHS]
    added += [b2b[p]["added_ttft_p50_ms"] for p in COORD_PATHS if b2b]
    worst_ratio = min(summary[p]["median_ratio"] for p in COORD_PATHS)
    ok = max(added) <= max_added_ms and worst_ratio >= min_ratio
    a, o = summary["anthropic"], summary["openai"]
    text = (
        f"added p50 TTFT {a['added_ttft_p50_ms']:.2f} ms (anthropic), "
        f"{o['added_ttft_p50_ms']:.2f} ms (openai)"
    )
    if b2b:
        text += (
            f"; back-to-back {b2b['anthropic']['added_ttft_p50_ms']:.2f} ms (anthropic), "
            f"{b2b['openai']['added_ttft_p50_ms']:.2f} ms (openai)"
        )
    text += (
        f" vs <= {max_added_ms:g} ms; ratio {a['median_ratio']:.3f} (anthropic), "
        f"{o['median_ratio']:.3f} (openai) vs >= {min_ratio:g}"
    )
    return ok, text


def summary_table(summary: dict[str, Any]) -> str:
    head = (
        "| path | median TTFT ms | added TTFT p50 ms | added TTFT p90 ms "
        "| median decode tok/s | ratio vs direct (median) | cold TTFT ms | median e2e ms "
        "| added e2e p50 ms |\n"
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    rows = []
    for p in PATHS:
        s = summary[p]
        if p == "direct":
            extra = "| — | — | "
        else:
            extra = f"| {s['added_ttft_p50_ms']:+.2f} | {s['added_ttft_p90_ms']:+.2f} | "
        ratio = "—" if p == "direct" else f"{s['median_ratio']:.3f}"
        e2e = "—" if p == "direct" else f"{s['added_e2e_p50_ms']:+.2f}"
        rows.append(
            f"| {PATH_LABELS[p]} | {s['median_ttft_ms']:.1f} {extra}"
            f"{s['median_decode_tps']:.2f} | {ratio} | {s['cold_median_ttft_ms']:.1f} "
            f"| {s['median_e2e_ms']:.1f} | {e2e} |"
        )
    return "\n".join([head, *rows])


def b2b_table(b2b: dict[str, Any]) -> str:
    head = (
        "| path (second of two requests sent back to back) | median TTFT ms "
        "| added TTFT p50 ms | added TTFT p90 ms | median e2e ms | added e2e p50 ms |\n"
        "|---|---:|---:|---:|---:|---:|"
    )
    rows = []
    for p in PATHS:
        s = b2b[p]
        if p == "direct":
            row = f"| {PATH_LABELS[p]} | {s['median_ttft_ms']:.1f} | — | — "
            rows.append(row + f"| {s['median_e2e_ms']:.1f} | — |")
        else:
            rows.append(
                f"| {PATH_LABELS[p]} | {s['median_ttft_ms']:.1f} | {s['added_ttft_p50_ms']:+.2f} "
                f"| {s['added_ttft_p90_ms']:+.2f} | {s['median_e2e_ms']:.1f} "
                f"| {s['added_e2e_p50_ms']:+.2f} |"
            )
    return "\n".join([head, *rows])


def rounds_table(rounds: Sequence[Round]) -> str:
    head = (
        "| round | order | direct TTFT ms | +anthropic ms | +openai ms | direct tok/s "
        "| ratio anthropic | ratio openai |\n|---|---|---:|---:|---:|---:|---:|---:|"
    )
    short = {"direct": "D", "anthropic": "A", "openai": "O"}
    rows = [
        f"| {r.index} | {'→'.join(short[p] for p in r.order.split(','))} "
        f"| {r.samples['direct'].ttft_s * 1e3:.1f} | {r.added_ttft_ms['anthropic']:+.2f} "
        f"| {r.added_ttft_ms['openai']:+.2f} | {r.samples['direct'].decode_tps:.2f} "
        f"| {r.ratio['anthropic']:.3f} | {r.ratio['openai']:.3f} |"
        for r in rounds
    ]
    return "\n".join([head, *rows])
