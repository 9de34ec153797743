"""The catalog watcher never stalls a stream: rescans of a large HF cache run beside decoding.

A node serves the real SmolLM2 while its Hugging Face cache (thousands of
files, in a temp dir) keeps changing, so the watcher rescans it again and
again; the tokens of a streaming request keep their pace.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import statistics
import threading
import time
from pathlib import Path

import pytest

from mesh.client import NodeClient
from mesh.types import ChatPrompt, GenerateRequest, Message, SamplingParams, TextDelta
from node.config import NodeConfig
from tests.conftest import start_node
from tests.test_catalog import safetensors_bytes

pytestmark = pytest.mark.model


def big_hf_cache(root: Path, repos: int, files_per_repo: int) -> Path:
    """huggingface_hub's layout: blobs by hash, snapshots of symlinks; half are MLX models."""
    revision = "0123456789abcdef0123456789abcdef01234567"
    for r in range(repos):
        repo = root / f"models--lab--model-{r:04d}"
        snap = repo / "snapshots" / revision
        (repo / "blobs").mkdir(parents=True)
        snap.mkdir(parents=True)
        (repo / "refs").mkdir()
        (repo / "refs" / "main").write_text(revision)
        files: dict[str, bytes] = {
            f"extra-{i}.txt": f"{r}-{i}".encode() for i in range(files_per_repo)
        }
        if r % 2 == 0:
            files["config.json"] = json.dumps({"model_type": "llama"}).encode()
            files["model.safetensors"] = safetensors_bytes(4 + r % 7)
        for name, data in files.items():
            digest = hashlib.sha256(data).hexdigest()
            (repo / "blobs" / digest).write_bytes(data)
            os.symlink(Path("../../blobs") / digest, snap / name)
    return root


async def test_stream_keeps_its_pace_while_a_large_cache_is_rescanned(
    models_dir: Path, tmp_path: Path
) -> None:
    hub = big_hf_cache(tmp_path / "hub", repos=400, files_per_repo=8)
    n_files = sum(1 for _ in hub.rglob("*"))
    assert n_files > 7000
    running = start_node(
        NodeConfig(
            grpc_port=0,
            home=tmp_path / "home",
            models_dir=models_dir,
            hf_cache_dir=hub,
            preload=("smollm2",),
        )
    )
    catalog = running.server.core.catalog  # type: ignore[union-attr]
    assert "lab/model-0000" in catalog.entries() and "lab/model-0001" not in catalog.entries()
    stop = threading.Event()

    def churn() -> None:
        # A download landing every 0.3 s: a new snapshot file changes the fingerprint.
        i = 0
        while not stop.is_set():
            snap = next((hub / "models--lab--model-0001" / "snapshots").iterdir())
            (snap / f"new-{i}.txt").write_text("x")
            i += 1
            stop.wait(0.3)

    request = GenerateRequest(
        model="smollm2",
        prompt=ChatPrompt((Message("user", "Write a long story about a lighthouse keeper."),)),
        sampling=SamplingParams(temperature=0, max_tokens=80),
    )

    async def gaps(client: NodeClient) -> list[float]:
        """Seconds between text events, the first one (prefill) left out."""
        stamps = [
            time.perf_counter()
            async for event in client.generate(request)
            if isinstance(event, TextDelta)
        ]
        return [b - a for a, b in itertools.pairwise(stamps[1:])]

    try:
        async with NodeClient(running.target, timeout=300) as client:
            await gaps(client)  # warm-up: the same work, unmeasured
            quiet = await gaps(client)  # no rescans: the baseline
            scans_before = catalog.scans
            churner = threading.Thread(target=churn, daemon=True)
            churner.start()
            busy = await gaps(client)
            stop.set()
            churner.join(5)
            scans = catalog.scans - scans_before
    finally:
        stop.set()
        running.stop()
    # Greedy: both runs emit the same text events. A token the detokenizer holds
    # back (part of a word) makes a gap of two token times in both; so each gap is
    # set against the same gap of the quiet run, scaled to the quiet run's median.
    assert len(busy) == len(quiet) > 20
    median = statistics.median(quiet)
    scaled = [b / q * median for b, q in zip(busy, quiet, strict=True)]
    worst = max(scaled)
    print(
        f"{n_files} files; {scans} rescans during a {len(busy) + 2}-event stream "
        f"({catalog.last_scan_seconds * 1000:.0f} ms each); token gaps: median "
        f"{statistics.median(busy) * 1000:.1f} ms (quiet: {median * 1000:.1f} ms), largest "
        f"against the quiet run {worst * 1000:.1f} ms = {worst / median:.2f}x the median"
    )
    assert scans >= 2, "the cache changed during the stream; the watcher should have rescanned"
    assert worst <= 2 * median, f"a gap grew to {worst / median:.2f}x the median"
