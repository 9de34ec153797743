"""Import a GGUF file into an MLX model directory that `mlx_lm.load` reads.

Only tensor types that `mlx.core.load` maps onto MLX's own affine quantization
(group size 32) are accepted, so quantized weights are copied bit for bit:
Q4_0, Q4_1, Q8_0, plus F32/F16/BF16. Everything is validated from the header
before any weight is loaded, and the directory is built beside `dest` and
renamed into place, so a failed import leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from node.models.gguf import (
    GGUFFormatError,
    GGUFHeader,
    GGUFImportError,
    GGUFValue,
    TensorInfo,
    read_header,
)
from node.models.tokenizer_build import TokenizerSpec, tokenizer_spec, write_tokenizer_files

__all__ = ["GGUFFormatError", "GGUFImportError", "ImportResult", "import_gguf", "needs_import"]

IMPORTER_VERSION = 1
MANIFEST = "macmesh_import.json"
SUPPORTED_ARCHITECTURES = ("llama", "qwen2", "qwen3")
QUANT_BITS = {"Q4_0": 4, "Q4_1": 4, "Q8_0": 8}
SUPPORTED_TYPES = ("F32", "F16", "BF16", *QUANT_BITS)
GROUP_SIZE = 32  # the block size of every GGUF type accepted here
_REQUIRED_FILES = ("config.json", "model.safetensors", "tokenizer.json", MANIFEST)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
}
_QK_NORMS = ("attn_q_norm", "attn_k_norm")
_LLAMA_PARTS = {f"{p}.weight" for p in _BLOCK_NAMES if p not in _QK_NORMS}
_ARCH_BLOCK_PARTS = {
    "llama": _LLAMA_PARTS | {f"{p}.bias" for p in ("attn_q", "attn_k", "attn_v", "attn_output")},
    "qwen2": _LLAMA_PARTS | {f"{p}.bias" for p in ("attn_q", "attn_k", "attn_v")},
    "qwen3": _LLAMA_PARTS | {f"{p}.weight" for p in _QK_NORMS},
}
_HF_CLASSES = dict(llama="LlamaForCausalLM", qwen2="Qwen2ForCausalLM", qwen3="Qwen3ForCausalLM")
_ROPE_FREQS = "rope_freqs.weight"  # llama.cpp's precomputed Llama 3 RoPE factors


@dataclass(frozen=True)
class ImportResult:
    """What `import_gguf` produced (or found already up to date)."""

    path: Path
    model_type: str
    quantization: str
    tensor_count: int
    seconds: float
    skipped: bool = False


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            digest.update(chunk)
    return digest.hexdigest()


def _read_manifest(dest: Path) -> dict[str, Any] | None:
    try:
        data = json.loads((dest / MANIFEST).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def needs_import(src: Path, dest: Path) -> bool:
    """True unless `dest` is a complete import of the current content of `src`.

    Size and mtime decide cheaply; when only the mtime changed, the sha256 of
    the source is compared with the one recorded at import time. Raises
    FileNotFoundError when `src` does not exist.
    """
    manifest = _read_manifest(dest)
    if manifest is None or manifest.get("importer_version") != IMPORTER_VERSION:
        return True
    if not all((dest / name).is_file() for name in _REQUIRED_FILES):
        return True
    st = src.stat()
    if manifest.get("source_size") != st.st_size:
        return True
    if manifest.get("source_mtime_ns") == st.st_mtime_ns:
        return False
    return bool(_sha256(src) != manifest.get("source_sha256"))


def _f32(value: float) -> float:
    """Shortest decimal that is the same float32 (1e-05, not 9.99999974e-06)."""
    target = np.float32(value)
    for digits in range(6, 10):
        short = float(f"{value:.{digits}g}")
        if np.float32(short) == target:
            return short
    return float(value)


def _hf_name(gguf_name: str, arch: str) -> str | None:
    """HF/mlx_lm parameter name for a GGUF tensor name, None when unknown."""
    base, _, suffix = gguf_name.rpartition(".")
    if base in _GLOBAL_NAMES and suffix == "weight":
        return f"{_GLOBAL_NAMES[base]}.weight"
    parts = gguf_name.split(".", 2)
    if len(parts) != 3 or parts[0] != "blk" or not parts[1].isdigit():
        return None
    if parts[2] not in _ARCH_BLOCK_PARTS[arch]:
        return None
    part, _, suffix = parts[2].partition(".")
    return f"model.layers.{parts[1]}.{_BLOCK_NAMES[part]}.{suffix}"


def _check_supported(header: GGUFHeader) -> str:
    arch = header.architecture
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{header.path.name}: architecture {arch!r} is not supported for MLX import; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}. Serve it through the "
            "llama.cpp backend instead"
        )
    bad = [t for t in header.tensors if t.type_name not in SUPPORTED_TYPES]
    if bad:
        kinds = ", ".join(f"{k} x{n}" for k, n in Counter(t.type_name for t in bad).items())
        raise GGUFImportError(
            f"{header.path.name}: tensor {bad[0].name!r} has type {bad[0].type_name}, which "
            f"MLX cannot load; {len(bad)} of {len(header.tensors)} tensors have unsupported "
            f"types ({kinds}). Supported: {', '.join(SUPPORTED_TYPES)}. Re-quantize to "
            "Q4_0/Q4_1/Q8_0 with llama-quantize, use an MLX model from mlx-community, "
            "or serve the GGUF through the llama.cpp backend"
        )
    unknown = [
        t.name for t in header.tensors if t.name != _ROPE_FREQS and not _hf_name(t.name, arch)
    ]
    if unknown:
        raise GGUFImportError(
            f"{header.path.name}: {len(unknown)} tensors have no {arch} counterpart in mlx_lm "
            f"(first: {unknown[0]!r}); serve this GGUF through the llama.cpp backend"
        )
    return arch


def _read_raw(header: GGUFHeader, t: TensorInfo, dtype: type[np.generic]) -> np.ndarray[Any, Any]:
    return np.fromfile(header.path, dtype=dtype, count=t.n_elements, offset=t.offset).reshape(
        t.shape
    )


def _llama3_rope_scaling(factors: np.ndarray[Any, Any], base: float, dims: int) -> dict[str, Any]:
    """Recover HF's llama3 rope_scaling from llama.cpp's rope_freqs tensor.

    Each factor is clamp(s, 0, 1) blended, with s = (L / wavelen - low) / (high -
    low): linear in 1 / wavelen, so two points in the blended band fix it; low is
    taken as 1 (every Llama 3.x) and high and L follow.
    """
    factor = float(factors.max())
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2) / dims)
    low, high, orig = 1.0, 4.0, 8192.0  # Llama 3.1 values, when the band is too narrow
    mid = (factors > 1 + 1e-4) & (factors < factor * (1 - 1e-4))
    if mid.sum() >= 2:
        smooth = (1 / factors[mid] - 1 / factor) / (1 - 1 / factor)
        a, b = np.polyfit(1 / wavelen[mid], smooth, 1)
        if b < 0 < a:
            high, orig = round(1 - 1 / b, 4), float(round(-a / b))
    s = np.clip((orig / wavelen - low) / (high - low), 0, 1)
    expected = 1 / ((1 - s) / factor + s)
    if not np.allclose(expected, factors, rtol=1e-3):
        raise GGUFImportError("rope_freqs does not match Llama 3 RoPE scaling; not supported")
    return {
        "rope_type": "llama3",
        "factor": _f32(factor),
        "low_freq_factor": low,
        "high_freq_factor": high,
        "original_max_position_embeddings": int(orig),
    }


def _model_config(header: GGUFHeader, arch: str, spec: TokenizerSpec) -> dict[str, Any]:
    meta = header.metadata

    def get(key: str, kind: type[int] | type[float], default: float | None = None) -> Any:
        value: GGUFValue | float | None = meta.get(f"{arch}.{key}", default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise GGUFImportError(f"GGUF metadata {arch}.{key} is missing or not a number")
        return kind(value)

    hidden, heads = get("embedding_length", int), get("attention.head_count", int)
    head_dim = get("attention.key_length", int, hidden // heads)
    if get("rope.dimension_count", int, head_dim) != head_dim:
        raise GGUFImportError(f"partial rotary embeddings are not supported for {arch}")
    tensors = {t.name: t for t in header.tensors}
    config: dict[str, Any] = {
        "architectures": [_HF_CLASSES[arch]],
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count", int),
        "intermediate_size": get("feed_forward_length", int),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", int, heads),
        "head_dim": head_dim,
        "rms_norm_eps": _f32(get("attention.layer_norm_rms_epsilon", float, 1e-5)),
        "rope_theta": _f32(get("rope.freq_base", float, 10000.0)),
        "max_position_embeddings": get("context_length", int),
        "vocab_size": tensors["token_embd.weight"].shape[0],
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "bos_token_id": spec.bos_id,
        "eos_token_id": spec.eos_id,
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling in ("linear", "yarn"):
        config["rope_scaling"] = {"type": scaling, "factor": get("rope.scaling.factor", float)}
        if scaling == "yarn":
            orig = get("rope.scaling.original_context_length", int)
            config["rope_scaling"]["original_max_position_embeddings"] = orig
    elif scaling != "none":
        raise GGUFImportError(f"RoPE scaling {scaling!r} is not supported")
    if _ROPE_FREQS in tensors:
        freqs = _read_raw(header, tensors[_ROPE_FREQS], np.float32)
        if float(freqs.max()) > 1.0 + 1e-6:
            config["rope_scaling"] = _llama3_rope_scaling(freqs, config["rope_theta"], head_dim)
    return config


def _quantization(header: GGUFHeader, arch: str) -> tuple[dict[str, Any] | None, str]:
    """config.json's quantization block and a one-line summary for humans."""
    types = {
        (_hf_name(t.name, arch) or t.name).removesuffix(".weight"): t.type_name
        for t in header.tensors
        if t.name.endswith(".weight") and len(t.shape) == 2 and t.name != _ROPE_FREQS
    }
    quantized = {m: ty for m, ty in types.items() if ty in QUANT_BITS}
    if not quantized:
        main = Counter(types.values()).most_common(1)[0][0].lower()
        return None, f"unquantized ({main})"
    bits = Counter(QUANT_BITS[ty] for ty in quantized.values()).most_common(1)[0][0]
    block: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": bits}
    for module, ty in types.items():
        if ty not in QUANT_BITS:
            block[module] = False  # mlx_lm's class_predicate leaves it a float layer
        elif QUANT_BITS[ty] != bits:
            block[module] = {"group_size": GROUP_SIZE, "bits": QUANT_BITS[ty]}
    layer_types = Counter(ty for m, ty in types.items() if m.startswith("model.layers."))
    main_type = layer_types.most_common(1)[0][0]
    parts = [f"{main_type.lower()} (group {GROUP_SIZE})"]
    for module, label in (("model.embed_tokens", "embed"), ("lm_head", "lm_head")):
        if module in types and types[module] != main_type:
            parts.append(f"{label} {types[module].lower()}")
    parts += [f"{n} layer tensors {ty.lower()}" for ty, n in layer_types.items() if ty != main_type]
    return block, ", ".join(parts)


def _unpermute(w: mx.array, n_head: int) -> mx.array:
    """Undo llama.cpp's RoPE row permutation of Q/K (also exact on scales/biases)."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _load_weights(header: GGUFHeader, arch: str, config: dict[str, Any]) -> dict[str, mx.array]:
    raw = mx.load(str(header.path))
    if not isinstance(raw, dict):
        raise GGUFImportError(f"mx.load returned no tensor dict for {header.path.name}")
    for t in header.tensors:
        if t.type_name == "BF16":  # mx.load narrows BF16 to float16 (overflows past 65504)
            bits = _read_raw(header, t, np.uint16)
            raw[t.name] = mx.array(bits).view(mx.bfloat16)
    heads = {"attn_q": config["num_attention_heads"], "attn_k": config["num_key_value_heads"]}
    weights: dict[str, mx.array] = {}
    for name, value in raw.items():
        if name == _ROPE_FREQS:
            continue  # folded into config.rope_scaling
        base, _, suffix = name.rpartition(".")
        kind = "weight" if suffix in ("scales", "biases") else suffix
        hf = _hf_name(f"{base}.{kind}", arch)
        if hf is None:
            raise GGUFImportError(f"unexpected tensor {name!r} from mx.load")
        part = base.rsplit(".", 1)[-1]
        if arch == "llama" and part in heads:
            value = _unpermute(value, heads[part])
        weights[hf.removesuffix(kind) + suffix] = value
    return weights


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def _result_from_manifest(dest: Path, started: float) -> ImportResult:
    m = _read_manifest(dest) or {}
    return ImportResult(
        path=dest,
        model_type=str(m.get("model_type", "")),
        quantization=str(m.get("quantization", "")),
        tensor_count=int(m.get("tensor_count", 0)),
        seconds=time.monotonic() - started,
        skipped=True,
    )


def import_gguf(src: Path, dest: Path, *, overwrite: bool = False) -> ImportResult:
    """Convert the GGUF file `src` into an MLX model directory at `dest`.

    Returns at once (skipped=True) when `dest` is an up-to-date import of `src`.
    Raises GGUFImportError, before loading any weight and without writing
    anything, for unsupported architectures, tensor types or tokenizers, and
    when `dest` exists (not as an import of `src`) and `overwrite` is False.
    """
    started = time.monotonic()
    src, dest = Path(src), Path(dest)
    if not src.is_file():
        raise GGUFImportError(f"GGUF file not found: {src}")
    st = src.stat()  # before reading: a later change then shows as a new mtime
    if dest.exists() and not overwrite:
        if not needs_import(src, dest):
            return _result_from_manifest(dest, started)
        raise GGUFImportError(
            f"{dest} already exists and is not an up-to-date import of {src.name}; "
            "pass overwrite=True to replace it"
        )
    header = read_header(src)
    arch = _check_supported(header)
    spec = tokenizer_spec(header.metadata)
    config = _model_config(header, arch, spec)
    quant, summary = _quantization(header, arch)
    if quant is not None:
        config["quantization"] = quant
        config["quantization_config"] = quant
    weights = _load_weights(header, arch, config)

    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.importing-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        del weights
        _write_json(tmp / "config.json", config)
        gen = {k: config[k] for k in ("bos_token_id", "eos_token_id") if config[k] is not None}
        _write_json(tmp / "generation_config.json", gen)
        write_tokenizer_files(spec, tmp, model_max_length=config["max_position_embeddings"])
        _write_json(
            tmp / MANIFEST,
            {
                "importer_version": IMPORTER_VERSION,
                "source": src.name,
                "source_sha256": _sha256(src),
                "source_size": st.st_size,
                "source_mtime_ns": st.st_mtime_ns,
                "output_size": sum(p.stat().st_size for p in tmp.iterdir()),
                "tensor_types": header.type_counts(),
                "tensor_count": len(header.tensors),
                "model_type": arch,
                "quantization": summary,
                "imported_at": datetime.now(UTC).isoformat(timespec="seconds"),
            },
        )
        if dest.exists():
            old = dest.with_name(f".{dest.name}.old-{uuid.uuid4().hex[:8]}")
            os.replace(dest, old)
            os.replace(tmp, dest)
            shutil.rmtree(old) if old.is_dir() else old.unlink()
        else:
            os.replace(tmp, dest)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return ImportResult(dest, arch, summary, len(header.tensors), time.monotonic() - started)
