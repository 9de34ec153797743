"""Build a Hugging Face tokenizer (tokenizer.json and friends) from GGUF metadata.

GGUF stores a byte-level BPE vocabulary as `tokenizer.ggml.tokens` (already in
GPT-2's byte-to-unicode form), `merges` ("a b" strings) and `token_type`; the
pre-tokenizer is only named (`tokenizer.ggml.pre`), so its regex comes from a
table here that mirrors llama.cpp's llama-vocab.cpp and the original
tokenizer.json files.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, processors
from tokenizers import pre_tokenizers as pre

from node.models.gguf import GGUFImportError, GGUFValue

# llama.cpp token types (llama_token_type): CONTROL tokens are HF special added
# tokens; USER_DEFINED ones are HF added tokens with special=False.
CONTROL = 3
USER_DEFINED = 4

_LLAMA3_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
SUPPORTED_PRE = ("default", "gpt2", "smollm", "llama-bpe", "llama3", "qwen2")


@dataclass(frozen=True)
class TokenizerSpec:
    """The tokenizer described by a GGUF file's metadata, validated."""

    tokens: list[str]
    merges: list[tuple[str, str]]
    token_types: list[int]
    pre: str
    bos_id: int | None
    eos_id: int | None
    unk_id: int | None
    pad_id: int | None
    add_bos: bool
    add_eos: bool
    chat_template: str | None

    def token(self, token_id: int | None) -> str | None:
        """The token string for an id, or None."""
        if token_id is None or not 0 <= token_id < len(self.tokens):
            return None
        return self.tokens[token_id]


def _opt_int(meta: Mapping[str, GGUFValue], key: str) -> int | None:
    value = meta.get(key)
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _str_list(meta: Mapping[str, GGUFValue], key: str) -> list[str]:
    value = meta.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise GGUFImportError(f"GGUF metadata {key} is missing or not a list of strings")
    return [str(v) for v in value]


def tokenizer_spec(meta: Mapping[str, GGUFValue]) -> TokenizerSpec:
    """Validate the tokenizer metadata of a GGUF file (cheap: no weights involved).

    Raises GGUFImportError for tokenizer models or pre-tokenizers not supported.
    """
    model = meta.get("tokenizer.ggml.model")
    if model != "gpt2":
        raise GGUFImportError(
            f"tokenizer.ggml.model {model!r} is not supported (only byte-level BPE, 'gpt2'); "
            "serve this GGUF through the llama.cpp backend or use an MLX model instead"
        )
    pre_name = meta.get("tokenizer.ggml.pre", "default")
    if pre_name not in SUPPORTED_PRE:
        raise GGUFImportError(
            f"tokenizer.ggml.pre {pre_name!r} is not supported; supported: "
            + ", ".join(SUPPORTED_PRE)
        )
    tokens = _str_list(meta, "tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _str_list(meta, "tokenizer.ggml.merges")]
    if not tokens or any(len(m) != 2 for m in merges):
        raise GGUFImportError("GGUF tokenizer has no tokens or malformed merges")
    types = meta.get("tokenizer.ggml.token_type", [])
    token_types = [int(t) for t in types if isinstance(t, int)] if isinstance(types, list) else []
    template = meta.get("tokenizer.chat_template")
    return TokenizerSpec(
        tokens=tokens,
        merges=[(a, b) for a, b in merges],
        token_types=token_types if len(token_types) == len(tokens) else [1] * len(tokens),
        pre=str(pre_name),
        bos_id=_opt_int(meta, "tokenizer.ggml.bos_token_id"),
        eos_id=_opt_int(meta, "tokenizer.ggml.eos_token_id"),
        unk_id=_opt_int(meta, "tokenizer.ggml.unknown_token_id"),
        pad_id=_opt_int(meta, "tokenizer.ggml.padding_token_id"),
        add_bos=meta.get("tokenizer.ggml.add_bos_token") is True,
        add_eos=meta.get("tokenizer.ggml.add_eos_token") is True,
        chat_template=template if isinstance(template, str) else None,
    )


def _pre_tokenizer(name: str) -> pre.PreTokenizer:
    if name == "smollm":
        # As in HF's SmolLM2 tokenizer.json: every digit is its own pre-token.
        return pre.Sequence(
            [
                pre.Digits(individual_digits=True),
                pre.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if name in ("llama-bpe", "llama3", "qwen2"):
        regex = _QWEN2_REGEX if name == "qwen2" else _LLAMA3_REGEX
        return pre.Sequence(
            [
                pre.Split(Regex(regex), behavior="isolated", invert=False),
                pre.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    return pre.ByteLevel(add_prefix_space=False, use_regex=True)


def build_tokenizer(spec: TokenizerSpec) -> Tokenizer:
    """A `tokenizers.Tokenizer` equivalent to the GGUF's byte-level BPE tokenizer."""
    vocab = {tok: i for i, tok in enumerate(spec.tokens)}
    # Llama 3 tokenizers look a whole pre-token up in the vocab before merging.
    ignore_merges = spec.pre in ("llama-bpe", "llama3")
    bpe = models.BPE(vocab=vocab, merges=spec.merges, ignore_merges=ignore_merges)
    tok = Tokenizer(bpe)
    if spec.pre == "qwen2":
        tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = _pre_tokenizer(spec.pre)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(
        [
            AddedToken(t, special=True, normalized=False)
            for t, kind in zip(spec.tokens, spec.token_types, strict=True)
            if kind == CONTROL
        ]
    )
    tok.add_tokens(
        [
            AddedToken(t, special=False, normalized=False)
            for t, kind in zip(spec.tokens, spec.token_types, strict=True)
            if kind == USER_DEFINED
        ]
    )
    byte_level = processors.ByteLevel(trim_offsets=False)
    bos, eos = spec.token(spec.bos_id), spec.token(spec.eos_id)
    use_bos = spec.add_bos and bos is not None
    use_eos = spec.add_eos and eos is not None
    if use_bos or use_eos:
        head = f"{bos}:0 " if use_bos else ""
        tail = f" {eos}:0" if use_eos else ""
        specials = [(t, vocab[t]) for t, on in ((bos, use_bos), (eos, use_eos)) if on and t]
        template = processors.TemplateProcessing(
            single=f"{head}$A:0{tail}",
            pair=f"{head}$A:0{tail} {head.replace(':0', ':1')}$B:1{tail.replace(':0', ':1')}",
            special_tokens=specials,
        )
        tok.post_processor = processors.Sequence([byte_level, template])
    else:
        tok.post_processor = byte_level
    return tok


def _write_json(path: Path, data: Mapping[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_tokenizer_files(spec: TokenizerSpec, dest: Path, *, model_max_length: int) -> None:
    """Write tokenizer.json, tokenizer_config.json, special_tokens_map.json and
    chat_template.jinja (when the GGUF has a template) into `dest`."""
    build_tokenizer(spec).save(str(dest / "tokenizer.json"))
    specials = {
        "bos_token": spec.token(spec.bos_id),
        "eos_token": spec.token(spec.eos_id),
        "unk_token": spec.token(spec.unk_id),
        "pad_token": spec.token(spec.pad_id),
    }
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        **specials,
        "add_bos_token": spec.add_bos,
        "add_eos_token": spec.add_eos,
        "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False,
    }
    if spec.chat_template is not None:
        config["chat_template"] = spec.chat_template
        (dest / "chat_template.jinja").write_text(spec.chat_template, encoding="utf-8")
    _write_json(dest / "tokenizer_config.json", config)
    _write_json(
        dest / "special_tokens_map.json", {k: v for k, v in specials.items() if v is not None}
    )
