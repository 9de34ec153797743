"""The one-at-a-time MLX path: mlx-lm's `stream_generate`, one token per turn.

Requests the batch cannot take run here: speculative ones (a `draft_model`,
which mlx-lm does not batch either), models whose KV caches cannot be merged
into a batch (recurrent or otherwise unmergeable layers), and every request
when batching is off (`--no-batching`). The engine steps each such request
one token per turn between the batch's steps.

Speculative decoding goes through mlx-lm's own `speculative_generate_step`
via `stream_generate(draft_model=...)`; see `speculative_stream` for what the
engine adds around it (an abortable prefill, the prompt as repetition-penalty
context) and `count_draft` for how the draft counters are kept. Speculative
requests do not use the prompt cache: their two caches (target and draft)
must be filled in step, which the target-only slots cannot give.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from typing import Any

from node.backends.mlx_job import (
    Aborted,
    GenJob,
    logits_processors,
    make_sampler,
    with_prompt_context,
)
from node.backends.outparse import OutputParser
from node.cache import PromptCaches

log = logging.getLogger(__name__)

# Prompt chunk size of the speculative prefill (mlx-lm's own default for it:
# two models' activations are live at once).
SPECULATIVE_PREFILL_STEP = 512


def start(job: GenJob, caches: PromptCaches | None, lease_cache: Callable[[GenJob], None]) -> None:
    """Make `job.gen`: a speculative stream, or `stream_generate` on its leased cache.

    `lease_cache` leases the job's prompt cache (the engine's, shared with the
    batched path) and sets `job.lease` / `job.cached`.
    """
    from mlx_lm.generate import stream_generate

    def progress(_done: int, _total: int) -> None:
        if job.cancelled:
            raise Aborted

    processors = logits_processors(job.sampling) or None
    job.parser = OutputParser(job.parser_config)
    # Before the cache lookup: a copy of a long prefix is part of the prefill.
    job.started_at = time.perf_counter()
    sampler = make_sampler(job.sampling)  # None: mlx-lm's own argmax
    if job.draft_model is not None:
        log.debug(
            "%s: %s drafted by %s, %d tokens a round",
            job.request_id,
            job.model_id,
            job.draft_model_id,
            job.num_draft_tokens,
        )
        job.gen = speculative_stream(job, sampler, processors)
        return
    cache = None
    if caches is not None:
        lease_cache(job)
        assert job.lease is not None
        cache = job.lease.cache
        if processors and job.cached:
            processors = with_prompt_context(processors, job.prompt_ids[: job.cached])
    job.gen = stream_generate(
        job.model,
        job.tokenizer,
        job.prompt_ids[job.cached :],
        max_tokens=job.sampling.max_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_progress_callback=progress,
        prompt_cache=cache,
    )


def speculative_stream(
    job: GenJob,
    sampler: Callable[[Any], Any] | None,
    processors: list[Callable[[Any, Any], Any]] | None,
) -> Iterator[Any]:
    """`stream_generate` with the draft, after a prefill that can be abandoned.

    mlx-lm's speculative path drops `prompt_progress_callback`, so a cancelled
    request could not stop during a long prefill. Instead the engine prefills
    both models' caches itself (all but the last prompt token, in chunks,
    checking the cancel flag between them) and hands mlx-lm the last token
    plus the filled caches, exactly as mlx-lm's own prefill would leave them
    (its server passes the two caches concatenated the same way).
    """
    import mlx.core as mx
    from mlx_lm.generate import generation_stream, stream_generate
    from mlx_lm.models.cache import make_prompt_cache

    model_cache = make_prompt_cache(job.model)
    draft_cache = make_prompt_cache(job.draft_model)
    prompt = mx.array(job.prompt_ids, dtype=mx.uint32)
    head = len(job.prompt_ids) - 1
    with mx.stream(generation_stream):
        for begin in range(0, head, SPECULATIVE_PREFILL_STEP):
            if job.cancelled:
                raise Aborted
            chunk = prompt[begin : min(begin + SPECULATIVE_PREFILL_STEP, head)][None]
            job.model(chunk, cache=model_cache)
            job.draft_model(chunk, cache=draft_cache)
            mx.eval([c.state for c in model_cache] + [c.state for c in draft_cache])
            mx.clear_cache()
    if job.cancelled:
        raise Aborted
    if processors:
        processors = with_prompt_context(processors, job.prompt_ids[:-1])
    yield from stream_generate(
        job.model,
        job.tokenizer,
        prompt[head:],
        max_tokens=job.sampling.max_tokens,
        draft_model=job.draft_model,
        num_draft_tokens=job.num_draft_tokens,
        sampler=sampler,
        logits_processors=processors,
        prompt_cache=model_cache + draft_cache,
    )


def count_draft(job: GenJob, resp: Any, completion: bool) -> None:
    """Update the job's draft counters for one response of the speculative stream.

    mlx-lm's `speculative_generate_step` works in rounds: the draft proposes
    `min(num_draft_tokens, max_tokens - tokens so far)` tokens, the target
    checks them in one pass, then the step yields the accepted prefix
    (`from_draft=True`) and one token of the target's own (`from_draft=False`),
    unless `max_tokens` ends the round first. `stream_generate` turns every
    token into exactly one response (an EOS into the final one). So a round
    starts at the first response and after each `from_draft=False` one, and
    what it proposed is known there: `draft_tokens` counts every proposal made,
    also those of a round cut short by a stop sequence or a cancel.
    `accepted_draft_tokens` counts the draft's tokens among the completion
    tokens (an EOS is not one), so it never exceeds `completion_tokens`.
    """
    if not job.round_open:
        left = job.sampling.max_tokens - job.spec_seen
        job.draft_tokens += max(0, min(job.num_draft_tokens, left))
        job.round_open = True
    job.spec_seen += 1
    if not resp.from_draft:
        job.round_open = False
    elif completion:
        job.accepted_draft_tokens += 1
