"""Write small synthetic GGUF files with gguf-py, the way llama.cpp's converter does.

Weights are given with HF/mlx_lm names and in HF layout; `write_tiny_gguf`
renames them, applies llama.cpp's Q/K RoPE permutation for "llama", and
quantizes the tensors named in `qtypes`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = [("Ġ", "t"), ("h", "e"), ("Ġt", "he"), ("i", "n"), ("Ġ", "a"), ("1", "2")]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bytes_to_unicode() -> list[str]:
    """GPT-2's printable stand-in for each byte value, in byte order."""
    keep = [*range(ord("!"), ord("~") + 1), *range(0xA1, 0xAC + 1), *range(0xAE, 0xFF + 1)]
    out: dict[int, str] = {}
    extra = 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return [out[b] for b in range(256)]


def tiny_vocab() -> tuple[list[str], list[int], list[str]]:
    """tokens, token types, merges: 3 control tokens, 256 bytes, a few merges."""
    tokens = SPECIALS + bytes_to_unicode() + [a + b for a, b in MERGES]
    types = [3] * len(SPECIALS) + [1] * (len(tokens) - len(SPECIALS))
    return tokens, types, [f"{a} {b}" for a, b in MERGES]


@dataclass
class TinyModel:
    """Parameters of a tiny model and its float32 weights in HF layout."""

    arch: str = "llama"
    layers: int = 2
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    ffn: int = 128
    head_dim: int = 16
    rope_theta: float = 10000.0
    eps: float = 1e-5
    ctx: int = 256
    tied: bool = True
    weights: dict[str, np.ndarray[Any, Any]] = field(default_factory=dict)

    @property
    def vocab(self) -> int:
        return len(tiny_vocab()[0])

    def config(self) -> dict[str, Any]:
        """An mlx_lm ModelArgs dict for the reference model."""
        return {
            "model_type": self.arch,
            "hidden_size": self.hidden,
            "num_hidden_layers": self.layers,
            "intermediate_size": self.ffn,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "rms_norm_eps": self.eps,
            "rope_theta": self.rope_theta,
            "max_position_embeddings": self.ctx,
            "vocab_size": self.vocab,
            "tie_word_embeddings": self.tied,
        }


def make_tiny(arch: str = "llama", *, seed: int = 0, tied: bool = True) -> TinyModel:
    """A TinyModel with random weights (norms near 1, projections ~ N(0, 0.1))."""
    # qwen3 gets a head_dim other than hidden / heads, to exercise attention.key_length.
    m = TinyModel(arch=arch, tied=tied, head_dim=32 if arch == "qwen3" else 16)
    rng = np.random.default_rng(seed)

    def mat(rows: int, cols: int) -> np.ndarray[Any, Any]:
        return (rng.standard_normal((rows, cols)) * 0.1).astype(np.float32)

    def norm(n: int) -> np.ndarray[Any, Any]:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    w = m.weights
    w["model.embed_tokens.weight"] = mat(m.vocab, m.hidden)
    w["model.norm.weight"] = norm(m.hidden)
    if not tied:
        w["lm_head.weight"] = mat(m.vocab, m.hidden)
    q_rows, kv_rows = m.heads * m.head_dim, m.kv_heads * m.head_dim
    for i in range(m.layers):
        p = f"model.layers.{i}."
        w[p + "self_attn.q_proj.weight"] = mat(q_rows, m.hidden)
        w[p + "self_attn.k_proj.weight"] = mat(kv_rows, m.hidden)
        w[p + "self_attn.v_proj.weight"] = mat(kv_rows, m.hidden)
        w[p + "self_attn.o_proj.weight"] = mat(m.hidden, q_rows)
        w[p + "mlp.gate_proj.weight"] = mat(m.ffn, m.hidden)
        w[p + "mlp.up_proj.weight"] = mat(m.ffn, m.hidden)
        w[p + "mlp.down_proj.weight"] = mat(m.hidden, m.ffn)
        w[p + "input_layernorm.weight"] = norm(m.hidden)
        w[p + "post_attention_layernorm.weight"] = norm(m.hidden)
        if arch == "qwen2":
            for proj, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                w[p + f"self_attn.{proj}_proj.bias"] = (rng.standard_normal(rows) * 0.1).astype(
                    np.float32
                )
        if arch == "qwen3":
            w[p + "self_attn.q_norm.weight"] = norm(m.head_dim)
            w[p + "self_attn.k_norm.weight"] = norm(m.head_dim)
    return m


_GLOBAL = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
}


def gguf_name(hf: str) -> str:
    """GGUF tensor name for an HF parameter name."""
    module, _, suffix = hf.rpartition(".")
    if module in _GLOBAL:
        return f"{_GLOBAL[module]}.{suffix}"
    _, _, layer, rest = module.split(".", 3)
    return f"blk.{layer}.{_BLOCK[rest]}.{suffix}"


def permute(w: np.ndarray[Any, Any], n_head: int) -> np.ndarray[Any, Any]:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute."""
    return (
        w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def write_tiny_gguf(
    path: Path,
    m: TinyModel,
    *,
    qtypes: dict[str, Q] | None = None,
    raw: dict[str, tuple[np.ndarray[Any, Any], Q]] | None = None,
    arch_name: str | None = None,
    pre: str = "smollm",
    extra_kv: dict[str, Any] | None = None,
) -> Path:
    """Write `m` as a GGUF file; `qtypes` maps HF names to a ggml type, `raw` adds
    tensors (GGUF name -> (bytes, type)) verbatim."""
    arch = arch_name or m.arch
    w = gguf.GGUFWriter(str(path), arch)
    w.add_block_count(m.layers)
    w.add_context_length(m.ctx)
    w.add_embedding_length(m.hidden)
    w.add_feed_forward_length(m.ffn)
    w.add_head_count(m.heads)
    w.add_head_count_kv(m.kv_heads)
    w.add_layer_norm_rms_eps(m.eps)
    w.add_rope_freq_base(m.rope_theta)
    if m.head_dim != m.hidden // m.heads:
        w.add_key_length(m.head_dim)
        w.add_value_length(m.head_dim)
    tokens, types, merges = tiny_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT_TEMPLATE)
    for key, value in (extra_kv or {}).items():
        if isinstance(value, bool):
            w.add_bool(key, value)
        elif isinstance(value, str):
            w.add_string(key, value)
        elif isinstance(value, float):
            w.add_float32(key, value)
        else:
            w.add_uint32(key, value)
    for hf, value in m.weights.items():
        name = gguf_name(hf)
        if m.arch == "llama" and ("attn_q." in name or "attn_k." in name):
            value = permute(value, m.heads if "attn_q." in name else m.kv_heads)
        qtype = (qtypes or {}).get(hf, Q.F32)
        if qtype == Q.F32:
            w.add_tensor(name, value)
        elif qtype == Q.F16:
            w.add_tensor(name, value.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(value, qtype), raw_dtype=qtype)
    for name, (data, qtype) in (raw or {}).items():
        w.add_tensor(name, data, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def dequantized(m: TinyModel, qtypes: dict[str, Q]) -> dict[str, np.ndarray[Any, Any]]:
    """The weights as the quantized GGUF holds them, back in float32."""
    out = dict(m.weights)
    for hf, qtype in qtypes.items():
        if qtype not in (Q.F32, Q.F16):
            out[hf] = gguf.quants.dequantize(gguf.quants.quantize(out[hf], qtype), qtype)
    return out
