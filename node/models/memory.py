"""What a model takes in memory: the KV cache bytes one token costs, read from its
config (MLX `config.json`) or header (GGUF), and the resident estimate nodes report.

The estimate is the weights (the size on disk) plus the KV cache of one sequence
at the model's full context. MLX keeps the KV cache in the activations' dtype (read
from the weights: bf16/fp16 for most models, fp32 for some imports); llama-server's
default cache type is f16. Models
with sliding-window layers hold less than this for long contexts: the estimate
is an upper bound there. Nodes check it against what a load really takes
(`estimate_error`).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

KV_VALUE_BYTES = 2


def _positive_int(value: Any) -> int:
    if isinstance(value, bool):
        return 0
    if isinstance(value, int) and value > 0:
        return value
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return int(max(value))  # per-layer counts: the largest, for an upper bound
    return 0


def mlx_kv_bytes_per_token(config: Mapping[str, Any], value_bytes: int = KV_VALUE_BYTES) -> int:
    """KV bytes per token from an MLX/HF `config.json` (0 when it does not say), at
    `value_bytes` per value (the activations' dtype: node.models.scan.activation_bytes)."""
    text = config.get("text_config")
    if isinstance(text, Mapping) and "num_hidden_layers" in text:
        config = text
    layers = _positive_int(config.get("num_hidden_layers") or config.get("n_layers"))
    heads = _positive_int(config.get("num_attention_heads") or config.get("n_heads"))
    kv_heads = _positive_int(config.get("num_key_value_heads")) or heads
    head_dim = _positive_int(config.get("head_dim"))
    if not head_dim and heads:
        head_dim = _positive_int(config.get("hidden_size")) // heads
    return 2 * layers * kv_heads * head_dim * value_bytes


def gguf_kv_bytes_per_token(metadata: Mapping[str, Any], arch: str) -> int:
    """KV bytes per token from a GGUF header's metadata (0 when it does not say)."""
    layers = _positive_int(metadata.get(f"{arch}.block_count"))
    heads = _positive_int(metadata.get(f"{arch}.attention.head_count"))
    kv_heads = _positive_int(metadata.get(f"{arch}.attention.head_count_kv")) or heads
    key = _positive_int(metadata.get(f"{arch}.attention.key_length"))
    value = _positive_int(metadata.get(f"{arch}.attention.value_length"))
    if not (key and value) and heads:
        key = value = _positive_int(metadata.get(f"{arch}.embedding_length")) // heads
    return layers * kv_heads * (key + value) * KV_VALUE_BYTES


def estimated_bytes(size_bytes: int, kv_bytes_per_token: int, context_tokens: int) -> int:
    """Weights plus one sequence's KV cache at `context_tokens`."""
    return size_bytes + kv_bytes_per_token * max(context_tokens, 0)


def estimate_error(measured: int, estimated: int) -> float:
    """measured / estimated - 1 (0 when either is unknown)."""
    if measured <= 0 or estimated <= 0:
        return 0.0
    return measured / estimated - 1.0
