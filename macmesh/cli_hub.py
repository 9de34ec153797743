"""`macmesh models pull` and `macmesh models search`: the Hugging Face Hub, through a
coordinator's admin API (coordinator.api.hub).

`pull` starts the download on a node (POST /api/models/pull), then follows it
(GET /api/transfers/{id} every half second) with a progress bar on stderr until
it is done (exit 0) or failed (exit 1, with the node's error). `search` prints
MLX and GGUF repos matching a text, most downloaded first.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import Any, TextIO

from macmesh.admin_client import AdminClient, AdminError, add_coordinator_flags

POLL_SECONDS = 0.5
# A new transfer may take a moment to appear in the node state the coordinator holds.
NOT_LISTED_GRACE_SECONDS = 5.0
BAR_WIDTH = 30


def human_bytes(n: int | None) -> str:
    """1.2 GB, 850 MB, 12 kB; "?" when unknown."""
    if n is None:
        return "?"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:,.1f} {unit}"
    return f"{n} B"


def progress_line(t: dict[str, Any], rate: float | None) -> str:
    """`[#####.....]  42.0%  41.9/99.8 MB  12.3 MB/s  MODEL` (no bar while the total is unknown)."""
    done = int(t.get("bytes_done") or 0)
    total = t.get("bytes_total")
    speed = f"{rate / 1e6:,.1f} MB/s" if rate is not None else "-- MB/s"
    name = t.get("model") or t.get("source") or ""
    if total:
        fraction = min(done / total, 1.0)
        filled = int(fraction * BAR_WIDTH)
        bar = "#" * filled + "." * (BAR_WIDTH - filled)
        return (
            f"[{bar}] {100 * fraction:5.1f}%  {done / 1e6:,.1f}/{total / 1e6:,.1f} MB  "
            f"{speed}  {name}"
        )
    return f"{done / 1e6:,.1f} MB  {speed}  {name}"


class ProgressBar:
    """Redraws one line on a terminal; elsewhere (a log) prints a line per 10%."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.tty = out.isatty()
        self._step = -1
        self._last: tuple[float, int] | None = None
        self._rate: float | None = None

    def update(self, t: dict[str, Any]) -> None:
        now, done = time.monotonic(), int(t.get("bytes_done") or 0)
        if self._last is not None and now > self._last[0] and done >= self._last[1]:
            instant = (done - self._last[1]) / (now - self._last[0])
            # Smoothed: the node reports in chunks, so single polls jump.
            self._rate = instant if self._rate is None else 0.7 * self._rate + 0.3 * instant
        self._last = (now, done)
        line = progress_line(t, self._rate)
        if self.tty:
            self.out.write("\r" + line + "\x1b[K")
            self.out.flush()
            return
        percent = t.get("percent")
        step = int(percent // 10) if isinstance(percent, int | float) else 0
        if step > self._step:
            self._step = step
            print(line, file=self.out, flush=True)

    def close(self) -> None:
        """End the redrawn line (once)."""
        if self.tty and self._last is not None:
            self.out.write("\n")
            self.out.flush()
        self._last = None


def _follow(client: AdminClient, transfer: dict[str, Any], bar: ProgressBar) -> dict[str, Any]:
    """Poll the transfer until it ends; its last record. AdminError if it goes missing."""
    started = time.monotonic()
    tid = transfer["id"]
    while transfer.get("state") == "running":
        bar.update(transfer)
        time.sleep(POLL_SECONDS)
        try:
            transfer = client.get(f"/api/transfers/{tid}")["transfer"]
        except AdminError as exc:
            missing = "HTTP 404" in str(exc)
            if missing and time.monotonic() - started < NOT_LISTED_GRACE_SECONDS:
                continue
            raise
    bar.update(transfer)
    return transfer


def cmd_models_pull(args: argparse.Namespace) -> int:
    body = {"repo": args.repo, "file": args.file, "revision": args.revision, "node": args.node}
    client = AdminClient.from_args(args)
    try:
        started = client.post("/api/models/pull", {k: v for k, v in body.items() if v})
        transfer, node = started["transfer"], started["node"]
        if args.no_wait:
            if args.json:
                print(json.dumps(started, indent=2))
            else:
                print(f"pulling {transfer['source']} on {node}: transfer {transfer['id']}")
            return 0
        bar = ProgressBar(sys.stderr)
        try:
            transfer = _follow(client, transfer, bar)
        except KeyboardInterrupt:
            bar.close()
            print(
                f"macmesh: stopped waiting; the pull goes on on {node} (transfer {transfer['id']})",
                file=sys.stderr,
            )
            return 130
        finally:
            bar.close()
    except AdminError as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps({"transfer": transfer, "node": node}, indent=2))
    if transfer.get("state") != "done":
        print(f"macmesh: pull failed on {node}: {transfer.get('error')}", file=sys.stderr)
        return 1
    if not args.json:
        print(f"pulled {transfer['source']} onto {node}: {transfer.get('path')}")
        if transfer.get("served"):
            print(f"served as {transfer['model']!r}")
        else:
            print(
                f"note: {node} does not list {transfer['model']!r} as a model "
                "(not an MLX dir or a top-level GGUF file, or the node runs with --no-hf-cache)"
            )
    return 0


def cmd_models_search(args: argparse.Namespace) -> int:
    client = AdminClient.from_args(args, timeout=60)
    params: dict[str, Any] = {"q": args.text, "limit": args.limit}
    if args.kind:
        params["kind"] = args.kind
    try:
        results = client.get("/api/models/search", params=params)["results"]
    except AdminError as exc:
        print(f"macmesh: {exc}", file=sys.stderr)
        return 1
    finally:
        client.close()
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    if not results:
        print(f"no MLX or GGUF repos match {args.text!r}")
        return 0
    width = max(len(r["repo"]) for r in results)
    qwidth = min(max(len("quantization"), *(len(r["quantization"] or "") for r in results)), 40)
    print(f"{'repo':<{width}}  {'kind':<4}  {'quantization':<{qwidth}}  {'size':>10}  "
          f"{'downloads':>10}")  # fmt: skip
    for r in results:
        quant = r["quantization"] or "?"
        if len(quant) > qwidth:
            quant = quant[: qwidth - 1] + "…"
        print(
            f"{r['repo']:<{width}}  {r['kind']:<4}  {quant:<{qwidth}}  "
            f"{human_bytes(r['size_bytes']):>10}  {r['downloads']:>10,}"
        )
    return 0


def add_parsers(msub: Any) -> None:
    """Register this module's `macmesh models` actions."""
    p = msub.add_parser(
        "pull",
        help="download a model from the Hugging Face Hub onto a node",
        description="Download a Hub repo (its MLX files, or its only GGUF file) or one file "
        "(--file) into a node's Hugging Face cache, with progress; a pull that was "
        "interrupted resumes. The node uses its own HF_TOKEN / token file and HF_ENDPOINT.",
    )
    p.add_argument("repo", help="Hub repo id, e.g. mlx-community/Qwen3-4B-4bit")
    p.add_argument("--file", help="one file of the repo, e.g. a GGUF quantization")
    p.add_argument("--revision", help="branch, tag or commit (default main)")
    p.add_argument("--node", help="node id or address (default: the only online node)")
    p.add_argument("--no-wait", action="store_true", help="return once the pull has started")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(p)
    p.set_defaults(func=cmd_models_pull)
    q = msub.add_parser(
        "search",
        help="search the Hugging Face Hub for MLX and GGUF models",
        description="MLX and GGUF repos on the Hub whose name matches TEXT, most downloaded "
        "first, with quantization and size (the repo's storage on the Hub: for a GGUF repo, "
        "every quantization together). The coordinator asks the Hub.",
    )
    q.add_argument("text", help="words in the repo name, e.g. 'qwen3 4b'")
    q.add_argument("--kind", choices=("mlx", "gguf"), help="only this kind (default both)")
    q.add_argument("--limit", type=int, default=20, help="results (default 20, at most 100)")
    q.add_argument("--json", action="store_true", help="machine-readable output")
    add_coordinator_flags(q)
    q.set_defaults(func=cmd_models_search)
