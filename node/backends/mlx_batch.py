"""One MLX model's running batch: mlx-lm's `BatchGenerator` and the jobs in it.

New requests join between steps. Each engine turn is one `BatchGenerator.next()`:
one decode step for every stream in the batch, then one prefill chunk
(`prefill_chunk` tokens) for the prompts being prefilled. Which prompts go into
that chunk is decided here, by a token budget: prompts join the prefill while
their next chunks add up to at most `prefill_chunk` tokens (always at least
one), so a 20k-token prompt arriving mid-stream delays running streams by one
chunk per step, while a burst of short prompts is prefilled together.

Each job brings the KV cache its prompt-cache lease gave it (holding the cached
prefix) and only the uncached tail is prefilled; when it leaves, by finishing or
being removed, its own cache is extracted from the batch and handed back.

Memory: a batch's KV arrays are as long as its longest sequence for every row
(`BatchKVCache` pads), so `fits` checks (rows + 1) x the longest prompt +
max_tokens against what the node can give, before a job joins.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from typing import Any

import psutil

from node.backends.mlx_job import GenJob, logits_processors, make_sampler

log = logging.getLogger(__name__)

# Memory kept free for everything but the KV caches of running requests.
MEMORY_MARGIN_FRACTION = 0.05
MEMORY_MARGIN_MIN = 512 << 20


def _gib(n: int) -> str:
    return f"{n / (1 << 30):.2f} GiB"


def batchable(model: Any) -> bool:
    """Whether every layer cache of `model` can merge into a batch (mlx-lm's own test)."""
    from mlx_lm.models.cache import make_prompt_cache

    return all(hasattr(c, "merge") for c in make_prompt_cache(model))


def kv_bytes_per_token(model: Any) -> int:
    """KV cache bytes one token takes in `model`, measured on a one-token forward."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    cache = make_prompt_cache(model)
    model(mx.array([[0]], dtype=mx.uint32), cache=cache)
    mx.eval([c.state for c in cache])
    total = 0.0
    for c in cache:
        keys = getattr(c, "keys", None)
        values = getattr(c, "values", None)
        if keys is None or values is None or keys.ndim < 3 or not keys.shape[2]:
            continue
        total += (keys.nbytes + values.nbytes) / keys.shape[2]
    return max(1, round(total))


@dataclass
class Step:
    """What one batch step produced for one job: a token and mlx-lm's finish reason,
    or (token None) prefill progress."""

    job: GenJob
    token: int | None = None
    finish_reason: str | None = None
    # On finish: the job's own KV cache and the tokens it holds.
    cache: list[Any] | None = None
    cache_tokens: list[int] | None = None


class ModelBatch:
    """The batch of one model; lives on the engine thread."""

    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int, prefill_chunk: int) -> None:
        from mlx_lm.generate import BatchGenerator

        self.model = model
        self.prefill_chunk = prefill_chunk
        self.bytes_per_token = kv_bytes_per_token(model)
        self.gen: Any = BatchGenerator(
            model,
            stop_tokens=[[t] for t in sorted(tokenizer.eos_token_ids)],
            completion_batch_size=max_batch,
            # The token budget (`_feed`) decides what joins the prefill.
            prefill_batch_size=max_batch,
            prefill_step_size=prefill_chunk,
        )
        # Jobs inside the BatchGenerator, by uid; jobs admitted but not yet in it.
        self.jobs: dict[int, GenJob] = {}
        self.pending: deque[GenJob] = deque()
        # The most requests it has held at once (admitted ones included).
        self.max_size = 0

    def __len__(self) -> int:
        return len(self.jobs) + len(self.pending)

    @property
    def nbytes(self) -> int:
        """KV bytes the batch holds now."""
        return int(self.gen.prompt_cache_nbytes)

    def need_bytes(self, job: GenJob | None = None) -> int:
        """Worst-case KV bytes of the batch (with `job`) once every row is at its end."""
        rows = [*self.jobs.values(), *self.pending, *([job] if job is not None else [])]
        if not rows:
            return 0
        longest = max(len(j.prompt_ids) + j.sampling.max_tokens for j in rows)
        return len(rows) * longest * self.bytes_per_token

    def room(self, kv_budget: int | None) -> int:
        """Bytes the batch's KV caches may grow to: the budget, else the memory
        available now (plus what the batch holds) less a margin."""
        if kv_budget is not None:
            return kv_budget
        vm = psutil.virtual_memory()
        margin = max(int(vm.total * MEMORY_MARGIN_FRACTION), MEMORY_MARGIN_MIN)
        return max(vm.available + self.nbytes - margin, 0)

    def alone_bytes(self, job: GenJob) -> int:
        """KV bytes `job` needs at its end, alone."""
        return (len(job.prompt_ids) + job.sampling.max_tokens) * self.bytes_per_token

    def fits_alone(self, job: GenJob, room: int) -> bool:
        return self.alone_bytes(job) <= room

    def too_big(self, job: GenJob, room: int) -> str:
        """Why `job` can never join: its size against the room, naming what to lower."""
        return (
            f"prompt ({len(job.prompt_ids)} tokens) + max_tokens ({job.sampling.max_tokens}) "
            f"need {_gib(self.alone_bytes(job))} of KV cache for {job.model_id}; this node can "
            f"give {_gib(room)}: lower max_tokens or shorten the prompt"
        )

    def add(self, job: GenJob) -> None:
        """Admit `job`; it enters the BatchGenerator when the prefill budget allows."""
        job.to_prefill = len(job.prompt_ids) - job.cached
        job.batch = self
        self.pending.append(job)

    def _feed(self) -> list[GenJob]:
        """Insert pending jobs while their next prefill chunks fit the token budget."""
        chunk = self.prefill_chunk
        in_prefill = [j for j in self.jobs.values() if j.to_prefill > 1]
        budget = chunk - sum(min(j.to_prefill, chunk) for j in in_prefill)
        started: list[GenJob] = []
        while self.pending:
            job = self.pending[0]
            cost = min(job.to_prefill, chunk)
            if (in_prefill or started) and cost > budget:
                break
            self.pending.popleft()
            budget -= cost
            assert job.lease is not None
            (uid,) = self.gen.insert(
                [job.prompt_ids[job.cached :]],
                max_tokens=[job.sampling.max_tokens],
                caches=[job.lease.cache],
                all_tokens=[job.prompt_ids[: job.cached]],
                samplers=[make_sampler(job.sampling)],  # type: ignore[list-item]
                logits_processors=[logits_processors(job.sampling)],
            )
            job.uid = uid
            job.detokenizer = job.tokenizer.detokenizer
            self.jobs[uid] = job
            started.append(job)
        return started

    def step(self) -> tuple[list[GenJob], list[Step]]:
        """Insert what the budget allows, then one decode step and one prefill chunk.

        Returns the jobs that entered the batch and, per job, what it produced.
        """
        started = self._feed()
        if not self.jobs:
            return started, []
        prompt_responses, gen_responses = self.gen.next()
        out: list[Step] = []
        for p in prompt_responses:
            job = self.jobs.get(p.uid)
            if job is not None:
                done, total = p.progress
                job.to_prefill = 0 if p.end_of_prompt else max(total - done, 0)
                out.append(Step(job))
        for r in gen_responses:
            job = self.jobs.get(r.uid)
            if job is None:
                continue
            job.to_prefill = 0
            step = Step(job, int(r.token), r.finish_reason)
            if r.finish_reason is not None:
                # mlx-lm has already taken it out of the batch.
                del self.jobs[r.uid]
                step.cache, step.cache_tokens = r.prompt_cache, list(r.all_tokens)
            out.append(step)
        return started, out

    def remove(self, job: GenJob) -> tuple[list[Any], list[int]] | None:
        """Take `job` out; its KV cache and the tokens it holds (None if never inserted)."""
        if job.uid is None or job.uid not in self.jobs:
            if job in self.pending:
                self.pending.remove(job)
            return None
        del self.jobs[job.uid]
        caches = self.gen.remove([job.uid], return_prompt_caches=True)
        got = caches.get(job.uid)
        if got is None:
            return None
        cache, tokens = got
        return list(cache), list(tokens)

    def close(self) -> None:
        self.gen.close()
