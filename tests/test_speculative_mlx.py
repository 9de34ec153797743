"""Speculative decoding on the MLX backend, through real gRPC with the real SmolLM2.

The node here is this module's own: its models dir holds `smollm2`, a copy of
it under another id (`smollm2-draft`: same tokenizer, a second loaded model),
a copy whose tokenizer has one token more (`smollm2-othertok`: not a valid
draft) and, where the default model offers it, `smollm2.gguf` (not MLX).
SmolLM2 drafting for itself is slower than plain decoding on a CPU, but under
greedy sampling its drafts are all accepted, which makes the counters
predictable. MLX on CPU is slow, prefill especially (and a draft
doubles it): prompts are short raw text, generations a few tokens.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from mesh.client import NodeClient
from mesh.errors import InvalidRequest, ModelNotFound
from mesh.types import (
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    ModelLoad,
    SamplingParams,
    TextDelta,
    TextPrompt,
)
from node.backends.mlx import MLXBackend
from node.backends.mlx_draft import check_draft_tokenizer
from node.backends.stats import ModelStats
from node.config import (
    DEFAULT_NUM_DRAFT_TOKENS,
    NUM_DRAFT_TOKENS_ENV,
    NodeConfig,
    resolve_num_draft_tokens,
)
from tests.conftest import RunningNode, start_node

STORY = "Once upon a time, a lighthouse keeper"
PARIS = "The capital of France is"
EXTRA_TOKEN = "<|macmesh-extra|>"


def _link_copy(src: Path, dest: Path, skip: frozenset[str] = frozenset()) -> None:
    """A model dir whose files are symlinks to `src`'s (except `skip`)."""
    dest.mkdir()
    for f in src.iterdir():
        if f.name not in skip:
            (dest / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def spec_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    src = models_dir / "smollm2"
    out = tmp_path_factory.mktemp("spec-models")
    (out / "smollm2").symlink_to(src, target_is_directory=True)
    gguf = models_dir / "smollm2.gguf"  # the same model for llama-server, where offered
    if gguf.exists():
        (out / gguf.name).symlink_to(gguf.resolve())
    _link_copy(src, out / "smollm2-draft")
    bad = out / "smollm2-othertok"
    _link_copy(src, bad, skip=frozenset({"tokenizer.json"}))
    tok = json.loads((src / "tokenizer.json").read_text())
    ids = [*tok["model"]["vocab"].values(), *(t["id"] for t in tok["added_tokens"])]
    tok["added_tokens"].append(
        {
            "id": max(ids) + 1,
            "content": EXTRA_TOKEN,
            "single_word": False,
            "lstrip": False,
            "rstrip": False,
            "normalized": False,
            "special": True,
        }
    )
    (bad / "tokenizer.json").write_text(json.dumps(tok))
    return out


@pytest.fixture(scope="module")
def spec_node(spec_models: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = start_node(
        NodeConfig(
            host="127.0.0.1",
            grpc_port=0,
            home=tmp_path_factory.mktemp("spec-home"),
            models_dir=spec_models,
            scan_hf_cache=False,
            preload=("smollm2",),
            max_running=4,
        )
    )
    yield running
    running.stop()


@pytest.fixture
async def spec_client(spec_node: RunningNode) -> AsyncIterator[NodeClient]:
    async with NodeClient(spec_node.target, timeout=300) as c:
        yield c


def text_req(text: str, draft: str = "", **sampling: Any) -> GenerateRequest:
    return GenerateRequest(
        model="smollm2",
        prompt=TextPrompt(text),
        sampling=SamplingParams(**sampling),
        draft_model=draft,
    )


async def collect(client: NodeClient, req: GenerateRequest) -> tuple[str, Finish]:
    events: list[GenerateEvent] = [ev async for ev in client.generate(req)]
    fin = events[-1]
    assert isinstance(fin, Finish), events
    return "".join(e.text for e in events if isinstance(e, TextDelta)), fin


async def smollm2_load(client: NodeClient) -> ModelLoad:
    states = client.watch_state()
    try:
        state = await anext(states)
    finally:
        await states.aclose()
    return next(x for x in state.load if x.model == "smollm2")


# ---------- through the node ----------


@pytest.mark.model
async def test_greedy_draft_gives_the_same_text_and_counts(spec_client: NodeClient) -> None:
    before = await smollm2_load(spec_client)
    plain_text, plain = await collect(spec_client, text_req(STORY, temperature=0.0, max_tokens=12))
    assert plain.usage.completion_tokens == 12 and plain.reason is FinishReason.LENGTH
    assert plain.usage.draft_tokens == plain.usage.accepted_draft_tokens == 0
    for draft in ("smollm2", "smollm2-draft"):
        text, fin = await collect(
            spec_client, text_req(STORY, draft, temperature=0.0, max_tokens=12)
        )
        assert text == plain_text, draft
        assert fin.reason is FinishReason.LENGTH
        u = fin.usage
        assert u.completion_tokens == 12
        assert 0 < u.accepted_draft_tokens <= u.draft_tokens
        assert u.accepted_draft_tokens <= u.completion_tokens
        # Rounds of N drafts + 1 target token, the last one cut at max_tokens:
        # with every draft accepted that is ceil(12 / (N + 1)) rounds.
        n = DEFAULT_NUM_DRAFT_TOKENS
        rounds = -(-12 // (n + 1))
        assert u.draft_tokens <= rounds * n
        # The same weights under greedy: (nearly) everything is accepted.
        assert u.accepted_draft_tokens >= 0.75 * u.draft_tokens, u
    # The draft was loaded like any model and stays loaded.
    models = {m.id: m for m in await spec_client.list_models()}
    assert models["smollm2-draft"].loaded
    assert not models["smollm2-othertok"].loaded
    # Cumulative counters, reported for the target model in the node's state.
    after = await smollm2_load(spec_client)
    assert after.draft_tokens > before.draft_tokens
    assert after.accepted_draft_tokens > before.accepted_draft_tokens
    assert after.accepted_draft_tokens - before.accepted_draft_tokens <= (
        after.draft_tokens - before.draft_tokens
    )


@pytest.mark.model
async def test_concurrent_plain_and_speculative_streams(spec_client: NodeClient) -> None:
    """Stepped round-robin on the one engine thread, neither disturbs the other."""
    (plain_text, plain), (spec_text, spec) = await asyncio.gather(
        collect(spec_client, text_req(STORY, temperature=0.0, max_tokens=10)),
        collect(spec_client, text_req(STORY, "smollm2", temperature=0.0, max_tokens=10)),
    )
    assert spec_text == plain_text and plain_text.strip()
    assert plain.usage.completion_tokens == spec.usage.completion_tokens == 10
    assert plain.usage.draft_tokens == 0 < spec.usage.accepted_draft_tokens


@pytest.mark.model
async def test_node_state_adds_up_the_usage(spec_client: NodeClient) -> None:
    before = await smollm2_load(spec_client)
    req = text_req(PARIS, "smollm2-draft", temperature=0.0, max_tokens=6)
    got = [(await collect(spec_client, req))[1].usage for _ in range(2)]
    after = await smollm2_load(spec_client)
    assert after.draft_tokens - before.draft_tokens == sum(u.draft_tokens for u in got)
    assert after.accepted_draft_tokens - before.accepted_draft_tokens == sum(
        u.accepted_draft_tokens for u in got
    )
    # The draft's own model entry drafted nothing.
    states = spec_client.watch_state()
    state = await anext(states)
    await states.aclose()
    draft_load = [x for x in state.load if x.model == "smollm2-draft"]
    assert all(x.draft_tokens == 0 for x in draft_load)


@pytest.mark.model
async def test_repetition_penalty_and_stop_sequence_with_draft(spec_client: NodeClient) -> None:
    # The penalty must see the prompt on the speculative path as well.
    req: dict[str, Any] = {"temperature": 0.0, "max_tokens": 10, "repetition_penalty": 1.3}
    plain_text, _ = await collect(spec_client, text_req(STORY, **req))
    text, fin = await collect(spec_client, text_req(STORY, "smollm2", **req))
    assert text == plain_text
    assert fin.usage.draft_tokens > 0
    # Stop sequences are cut from the text as without a draft.
    text, fin = await collect(
        spec_client, text_req(PARIS, "smollm2", temperature=0.0, max_tokens=12, stop=["."])
    )
    assert fin.reason is FinishReason.STOP_SEQUENCE and fin.stop_sequence == "."
    assert text.strip() == "Paris"
    assert 0 < fin.usage.accepted_draft_tokens <= fin.usage.draft_tokens


@pytest.mark.model
async def test_seeded_sampling_with_draft_reproduces(spec_client: NodeClient) -> None:
    req: dict[str, Any] = {
        "temperature": 0.5,
        "top_p": 0.9,
        "top_k": 40,
        "seed": 7,
        "max_tokens": 8,
    }
    first, fin1 = await collect(spec_client, text_req(STORY, "smollm2", **req))
    second, fin2 = await collect(spec_client, text_req(STORY, "smollm2", **req))
    # Each request has its own PRNG: the same seed, the same drafts and output.
    assert first == second and first.strip()
    u1, u2 = fin1.usage, fin2.usage
    assert u1.draft_tokens == u2.draft_tokens > 0
    assert u1.accepted_draft_tokens == u2.accepted_draft_tokens <= u1.draft_tokens


class _CountingModel:
    """A model proxy that counts forward passes (run on the engine thread)."""

    def __init__(self, model: Any) -> None:
        self._model = model
        self.calls = 0

    def __call__(self, inputs: Any, cache: Any = None) -> Any:
        self.calls += 1
        return self._model(inputs, cache=cache)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._model, name)


@pytest.mark.model
async def test_draft_tokens_are_the_drafts_forward_passes(
    spec_client: NodeClient, spec_node: RunningNode
) -> None:
    """`draft_tokens` is what the draft really proposed: one forward pass per token."""
    from node.backends.mlx_solo import SPECULATIVE_PREFILL_STEP

    assert spec_node.server.core is not None
    mlx = spec_node.server.core.backend(MLXBackend)
    lm = mlx._models["smollm2"]
    counting = _CountingModel(lm.model)
    # The same weights under another id, so only the draft's passes are counted.
    mlx._models["smollm2-counted"] = replace(
        lm, entry=replace(lm.entry, id="smollm2-counted"), model=counting, stats=ModelStats()
    )
    try:
        # Sampling at temperature 1: some drafts are rejected.
        req = text_req(STORY, "smollm2-counted", temperature=1.0, seed=3, max_tokens=10)
        _, fin = await collect(spec_client, req)
    finally:
        del mlx._models["smollm2-counted"]
        mlx._draft_ok.discard(("smollm2", "smollm2-counted"))
    u = fin.usage
    prefill_passes = -(-(u.prompt_tokens - 1) // SPECULATIVE_PREFILL_STEP)
    assert u.draft_tokens == counting.calls - prefill_passes
    assert 0 <= u.accepted_draft_tokens < u.draft_tokens


@pytest.mark.model
async def test_unknown_and_incompatible_drafts_are_refused(
    spec_client: NodeClient, spec_models: Path
) -> None:
    with pytest.raises(ModelNotFound):
        await collect(spec_client, text_req(PARIS, "no-such-draft", temperature=0.0, max_tokens=3))
    with pytest.raises(InvalidRequest) as err:
        await collect(
            spec_client, text_req(PARIS, "smollm2-othertok", temperature=0.0, max_tokens=3)
        )
    msg = str(err.value)
    assert "smollm2-othertok" in msg and "'smollm2'" in msg and "vocabulary sizes" in msg
    if (spec_models / "smollm2.gguf").exists():
        # Another backend's model cannot draft for an MLX one (refused before loading).
        with pytest.raises(InvalidRequest, match=r"'smollm2.gguf' is a gguf model"):
            await collect(
                spec_client, text_req(PARIS, "smollm2.gguf", temperature=0.0, max_tokens=3)
            )
    # The node still serves, with and without a draft.
    text, _ = await collect(spec_client, text_req(PARIS, temperature=0.0, max_tokens=4))
    assert text.strip().startswith("Paris")
    text, _ = await collect(spec_client, text_req(PARIS, "smollm2", temperature=0.0, max_tokens=4))
    assert text.strip().startswith("Paris")


@pytest.mark.model
async def test_cancel_stops_a_speculative_generation(
    spec_client: NodeClient, spec_node: RunningNode
) -> None:
    assert spec_node.server.core is not None
    mlx = spec_node.server.core.backend(MLXBackend)
    stream = spec_client.generate(text_req(STORY, "smollm2", temperature=0.0, max_tokens=400))
    async for ev in stream:
        if isinstance(ev, TextDelta):
            break
    await stream.aclose()
    cancelled_at = mlx.tokens_generated
    deadline = time.monotonic() + 10
    while mlx.running and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert mlx.running == 0, "the cancelled generation is still running"
    # Tokens already verified in the current round (up to N drafts + 1) are handed out one
    # per engine step, with no model work between them, so they can all pass before the
    # cancel arrives over gRPC: at most one round plus the token in flight.
    assert mlx.tokens_generated - cancelled_at <= 3 + 1 + 1


# ---------- units (no model) ----------


class _FakeTokenizer:
    def __init__(self, vocab: dict[str, int]) -> None:
        self._vocab = vocab

    def __len__(self) -> int:
        return len(self._vocab)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)


def test_check_draft_tokenizer() -> None:
    base = {"a": 0, "b": 1, "c": 2}
    check_draft_tokenizer("t", _FakeTokenizer(base), "d", _FakeTokenizer(dict(base)))
    with pytest.raises(InvalidRequest, match=r"'d' cannot draft for 't'.*sizes differ \(3 vs 4"):
        check_draft_tokenizer("t", _FakeTokenizer(base), "d", _FakeTokenizer({**base, "x": 3}))
    with pytest.raises(InvalidRequest, match=r"same vocabulary size \(3\) but 2 tokens map"):
        check_draft_tokenizer(
            "t", _FakeTokenizer(base), "d", _FakeTokenizer({"a": 0, "b": 2, "c": 1})
        )


def test_num_draft_tokens_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(NUM_DRAFT_TOKENS_ENV, raising=False)
    assert resolve_num_draft_tokens() == DEFAULT_NUM_DRAFT_TOKENS == 3
    monkeypatch.setenv(NUM_DRAFT_TOKENS_ENV, "5")
    assert resolve_num_draft_tokens() == 5
    assert resolve_num_draft_tokens(2) == 2  # the node config wins over the env
    monkeypatch.setenv(NUM_DRAFT_TOKENS_ENV, "many")
    with pytest.raises(ValueError, match=NUM_DRAFT_TOKENS_ENV):
        resolve_num_draft_tokens()
    with pytest.raises(ValueError, match=">= 1"):
        resolve_num_draft_tokens(0)


def test_cancel_during_speculative_prefill() -> None:
    """The engine's own prefill checks the cancel flag between chunks."""
    pytest.importorskip("mlx_lm")
    from node.backends.mlx_job import Aborted
    from node.backends.mlx_solo import SPECULATIVE_PREFILL_STEP, speculative_stream

    calls: list[int] = []
    job = SimpleNamespace(cancelled=False, prompt_ids=list(range(3 * SPECULATIVE_PREFILL_STEP)))

    class FakeModel:
        layers: tuple[()] = ()

        def make_cache(self) -> list[Any]:
            return []

        def __call__(self, chunk: Any, cache: Any) -> None:
            calls.append(int(chunk.shape[1]))
            job.cancelled = True  # the client goes away during the first chunk

    job.model = job.draft_model = FakeModel()
    with pytest.raises(Aborted):
        next(speculative_stream(job, lambda x: x, None))  # type: ignore[arg-type]
    assert calls == [SPECULATIVE_PREFILL_STEP] * 2  # one chunk, target and draft
