"""One MLX generation as the engine thread sees it, and its per-request sampling.

A `GenJob` is shared between the event loop (which submits it, reads its
events and may set `cancelled`) and the engine thread (which runs it, batched
or alone). Sampling is per request whatever the batch: each sampler owns its
PRNG key, so a seed reproduces however requests are batched or interleaved.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from mesh.types import GenerateEvent
from node.backends.outparse import OutputParser, ParserConfig
from node.backends.stats import Admission, ModelStats
from node.cache import Lease
from node.sampling import ResolvedSampling

# Tokens the repetition penalty looks back on (mlx-lm's default, made explicit
# because every path hands the prompt's tail to the processor itself).
REPETITION_CONTEXT = 20


class Aborted(Exception):
    """Raised inside a prefill (progress callback, speculative prefill) to abandon a request."""


@dataclass(eq=False)
class GenJob:
    """One generation, shared between the event loop and the engine thread."""

    request_id: str
    model_id: str
    model: Any
    tokenizer: Any
    prompt_ids: list[int]
    sampling: ResolvedSampling
    parser_config: ParserConfig
    stats: ModelStats
    loop: asyncio.AbstractEventLoop
    # Speculative decoding: the draft model (shares the tokenizer) and how many
    # tokens it proposes per round; None = plain decoding.
    draft_model: Any = None
    draft_model_id: str = ""
    num_draft_tokens: int = 0
    # Block hashes of `prompt_ids` (node.cache), when the submitter has them,
    # and the prompt tokens it expects the cache to serve (queue accounting).
    prompt_hashes: list[int] | None = None
    predicted_cached: int = 0
    events: asyncio.Queue[GenerateEvent] = field(default_factory=asyncio.Queue)
    enqueued_at: float = field(default_factory=time.perf_counter)
    # Set from the event loop; read by the engine thread (a plain bool is
    # enough under the GIL: the thread only ever polls it).
    cancelled: bool = False
    finished: bool = False
    # The model's counters for this job (waiting/running/queued prefill);
    # changed only under the engine's lock.
    admission: Admission | None = None
    # Engine-thread state.
    parser: OutputParser | None = None
    tokens: int = 0  # completion tokens so far
    started_at: float = 0.0
    first_at: float = 0.0
    # Prompt cache: the lease and the prompt tokens it served.
    lease: Lease | None = None
    cached: int = 0
    # Tokens generated and fed to the model (the cache holds them too).
    out_tokens: list[int] = field(default_factory=list)
    # The one-at-a-time path: mlx-lm's response iterator.
    gen: Iterator[Any] | None = None
    # The batched path: the BatchGenerator uid, the streaming detokenizer,
    # prompt tokens still to prefill, and the KV bytes reserved for it.
    uid: int | None = None
    batch: Any = None  # its node.backends.mlx_batch.ModelBatch
    detokenizer: Any = None
    to_prefill: int = 0
    reserved_bytes: int = 0
    # Speculative bookkeeping (node.backends.mlx_solo.count_draft).
    draft_tokens: int = 0
    accepted_draft_tokens: int = 0
    spec_seen: int = 0
    round_open: bool = False

    @property
    def batched(self) -> bool:
        return self.uid is not None


def make_sampler(s: ResolvedSampling) -> Callable[[Any], Any] | None:
    """A sampler with its own PRNG key; None for greedy (the batch's shared argmax)."""
    import mlx.core as mx
    from mlx_lm.sample_utils import apply_min_p, apply_top_k, apply_top_p

    if s.greedy:
        return None
    seed = s.seed if s.seed is not None else secrets.randbits(63)
    key = [mx.random.key(seed % (1 << 63))]
    inv_temp = 1.0 / s.temperature

    def sample(logprobs: Any) -> Any:
        if 0.0 < s.top_p < 1.0:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p > 0.0:
            logprobs = apply_min_p(logprobs, s.min_p)
        # top_k at or past the vocabulary keeps every token (mlx-lm raises, which would
        # fail the whole batch step: every request in it).
        if 0 < s.top_k < logprobs.shape[-1]:
            logprobs = apply_top_k(logprobs, s.top_k)
        key[0], sub = mx.random.split(key[0])
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def logits_processors(s: ResolvedSampling) -> list[Callable[[Any, Any], Any]]:
    """The repetition penalty, when asked for (mlx-lm's processor)."""
    if s.repetition_penalty == 1.0:
        return []
    from mlx_lm.sample_utils import make_logits_processors

    procs: list[Callable[[Any, Any], Any]] = make_logits_processors(
        repetition_penalty=s.repetition_penalty,
        repetition_context_size=REPETITION_CONTEXT,
    )
    return procs


def with_prompt_context(
    processors: list[Callable[[Any, Any], Any]], context_ids: list[int]
) -> list[Callable[[Any, Any], Any]]:
    """The processors, each seeing `context_ids`' tail before the tokens it is given.

    mlx-lm's one-at-a-time paths only track the tokens they feed the model
    themselves: the speculative step from the last prompt token on (the engine
    prefilled the rest), and `generate_step` from the first token not served
    by the prompt cache. Prepending the tail of the prompt tokens they did not
    see makes the repetition penalty see the same window on every path (the
    batch tracks the whole prompt itself), so greedy output matches.
    """
    import mlx.core as mx

    head = mx.array(context_ids[-REPETITION_CONTEXT:], dtype=mx.uint32)

    def wrap(proc: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
        return lambda tokens, logits: proc(mx.concatenate([head, tokens]), logits)

    return [wrap(p) for p in processors]
