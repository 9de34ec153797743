"""Whether an MLX draft model can draft for a target: same tokenizer, rewindable caches.

Checked once per (target, draft) pair before the first speculative request, so an
incompatible pair is refused with a clear error instead of producing wrong text.
"""

from __future__ import annotations

from typing import Any

from mesh.errors import InvalidRequest


def check_draft_tokenizer(target_id: str, target_tok: Any, draft_id: str, draft_tok: Any) -> None:
    """Raise InvalidRequest unless both tokenizers map the same tokens to the same ids.

    The draft proposes token ids that the target checks as its own, so a draft
    with another vocabulary would be wrong, not just slow. (Embedding tables
    padded to different sizes are fine: only the tokenizers are compared.)
    """
    if target_tok is draft_tok:
        return
    why = ""
    n_target, n_draft = len(target_tok), len(draft_tok)
    if n_target != n_draft:
        why = f"vocabulary sizes differ ({n_target} vs {n_draft} tokens)"
    else:
        t_vocab: dict[str, int] = target_tok.get_vocab()
        d_vocab: dict[str, int] = draft_tok.get_vocab()
        if t_vocab != d_vocab:
            differ = sum(1 for k, v in t_vocab.items() if d_vocab.get(k) != v) or "some"
            why = f"same vocabulary size ({n_target}) but {differ} tokens map to other ids"
    if why:
        raise InvalidRequest(
            f"draft model {draft_id!r} cannot draft for {target_id!r}: their tokenizers "
            f"differ: {why}",
            field="draft_model",
        )


def check_speculative_cache(model_id: str, model: Any, role: str) -> None:
    """Raise InvalidRequest if mlx-lm's speculative step cannot use `model`'s cache.

    Rejected drafts are undone by trimming the KV caches, which sliding-window
    and recurrent caches cannot do; mlx-lm also splits the combined cache list
    at `len(model.layers)`. Runs on the engine thread (it builds a cache).
    """
    from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache

    cache = make_prompt_cache(model)
    layers = getattr(model, "layers", None)
    if not can_trim_prompt_cache(cache):
        kinds = sorted({type(c).__name__ for c in cache if not c.is_trimmable()})
        why = f"its KV cache ({', '.join(kinds)}) cannot be rewound"
    elif layers is None or len(cache) != len(layers):
        why = "its cache does not have one entry per layer"
    else:
        return
    raise InvalidRequest(
        f"{role} model {model_id!r} cannot be used for speculative decoding: {why}",
        field="draft_model",
    )
