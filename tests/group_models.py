"""A tiny random-weight Qwen2 model for node-group tests: an architecture mlx-lm can split
both ways (tensor: `shard()`; pipeline: a `PipelineMixin` inner model), built in seconds
from a seed, with SmolLM2's tokenizer (and chat template) beside it. Random weights give
gibberish, but deterministic gibberish: greedy tokens must match token for token."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
    "generation_config.json",
)


def make_tiny_qwen2(dest: Path, tokenizer_from: Path, *, layers: int = 4, seed: int = 7) -> Path:
    """Write the model to `dest` (config.json, model.safetensors, the tokenizer files)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import qwen2

    source = json.loads((tokenizer_from / "config.json").read_text())
    config = {
        "model_type": "qwen2",
        "architectures": ["Qwen2ForCausalLM"],
        "hidden_size": 64,
        "num_hidden_layers": layers,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "rms_norm_eps": 1e-6,
        "vocab_size": int(source["vocab_size"]),
        "max_position_embeddings": 2048,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "torch_dtype": "float32",
        "bos_token_id": source.get("bos_token_id"),
        "eos_token_id": source.get("eos_token_id"),
    }
    dest.mkdir(parents=True, exist_ok=True)
    mx.random.seed(seed)
    model = qwen2.Model(qwen2.ModelArgs.from_dict(config))  # type: ignore[no-untyped-call]
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights)  # type: ignore[arg-type]
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    for name in TOKENIZER_FILES:
        if (tokenizer_from / name).exists():
            shutil.copy(tokenizer_from / name, dest / name)
    return dest
