"""What a model takes in memory (node.models.memory), checked against the real thing.

The KV bytes per token read from SmolLM2's `config.json` and from its GGUF header
must equal what its KV cache really takes per token in MLX; a loaded model's
weights must match the estimate; the node reports both, and its memory budget,
in its state.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.client import NodeClient
from mesh.types import NodeState
from node.backends.mlx import MLXBackend
from node.models.gguf_catalog import gguf_entry
from node.models.memory import (
    estimate_error,
    estimated_bytes,
    gguf_kv_bytes_per_token,
    mlx_kv_bytes_per_token,
)
from node.models.scan import mlx_entry
from tests.conftest import RunningNode, start_smollm2_node


def test_kv_bytes_per_token_from_configs() -> None:
    llama = {"num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
             "hidden_size": 576}  # fmt: skip
    assert mlx_kv_bytes_per_token(llama) == 2 * 30 * 3 * 64 * 2
    assert mlx_kv_bytes_per_token(llama, 4) == 2 * 30 * 3 * 64 * 4
    # head_dim given, no GQA; nested text config (multimodal models).
    gemma = {"text_config": {"num_hidden_layers": 2, "num_attention_heads": 4, "head_dim": 256}}
    assert mlx_kv_bytes_per_token(gemma) == 2 * 2 * 4 * 256 * 2
    assert mlx_kv_bytes_per_token({"model_type": "unknown"}) == 0
    meta = {
        "llama.block_count": 30,
        "llama.attention.head_count": 9,
        "llama.attention.head_count_kv": 3,
        "llama.embedding_length": 576,
    }
    assert gguf_kv_bytes_per_token(meta, "llama") == 2 * 30 * 3 * 64 * 2
    # Per-layer KV head counts: the largest, for an upper bound.
    per_layer = {**meta, "llama.attention.head_count_kv": [3, 1, 3]}
    assert gguf_kv_bytes_per_token(per_layer, "llama") == 2 * 30 * 3 * 64 * 2
    assert estimated_bytes(1000, 10, 50) == 1500
    assert estimate_error(110, 100) == pytest.approx(0.1)
    assert estimate_error(0, 100) == 0.0


@pytest.mark.model
def test_estimates_match_the_real_smollm2(models_dir: Path) -> None:
    from mlx_lm import load

    from node.backends.mlx_batch import kv_bytes_per_token

    entry = mlx_entry("smollm2", models_dir / "smollm2", "models-dir")
    gguf = gguf_entry(models_dir / "smollm2.gguf", "models-dir")
    assert entry is not None and gguf is not None
    model, _ = load(str(models_dir / "smollm2"))[:2]
    measured = kv_bytes_per_token(model)  # a real KV cache after a one-token forward
    assert entry.kv_bytes_per_token == measured > 0
    # llama-server keeps f16 KV; this MLX import computes in fp32 (its F32 scales).
    assert gguf.kv_bytes_per_token * 2 == measured
    assert entry.estimated_bytes == entry.size_bytes + measured * entry.context_length


@pytest.fixture(scope="module")
def budget_node(
    models_dir: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RunningNode]:
    running = start_smollm2_node(
        tmp_path_factory.mktemp("budget"),
        models_dir,
        memory_budget=6 << 30,
    )
    yield running
    running.stop()


@pytest.mark.model
def test_the_node_reports_estimates_errors_and_its_budget(budget_node: RunningNode) -> None:
    async def state() -> NodeState:
        async with NodeClient(budget_node.target, timeout=60) as c:
            stream = c.watch_state()
            snap = await anext(stream)
            await stream.aclose()
            return snap

    snap = asyncio.run(state())
    assert snap.memory.budget_bytes == 6 << 30
    models = {m.id: m for m in snap.models}
    mlx, gguf = models["smollm2"], models["smollm2.gguf"]
    assert mlx.loaded and not gguf.loaded
    assert mlx.kv_bytes_per_token == 2 * gguf.kv_bytes_per_token > 0
    assert mlx.estimated_bytes == mlx.size_bytes + mlx.kv_bytes_per_token * mlx.context_length
    assert gguf.estimated_bytes == gguf.size_bytes + gguf.kv_bytes_per_token * gguf.context_length
    # The load measured the weights: within a few percent of the files they came from.
    assert mlx.memory_bytes > 0 and abs(mlx.estimate_error) < 0.1
    core = budget_node.server.core
    assert core is not None
    assert core.backend(MLXBackend).loaded()["smollm2"].estimate_error == mlx.estimate_error
