"""Node groups (node.groups): SmolLM2 sharded over 3 real rank processes, ring over loopback.

The greedy answer of the group is the single process's answer, token for token;
a consumer that stops early cancels on every rank; killing a member mid-stream
ends the stream with Unavailable and takes the whole group down, without a hang.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from mesh.errors import InvalidRequest, ModelLoadError, Unavailable
from node.groups.driver import GroupSpec, RankProcess, check_member
from tests.group_models import make_tiny_qwen2
from tests.procs import free_port

PROMPT = "What is the capital of France?"


def _spec(
    models_dir: Path,
    size: int,
    *,
    name: str = "g",
    token: str = "s3cret",
    model: Path | None = None,
    strategy: str = "tensor",
) -> GroupSpec:
    hosts = tuple(f"127.0.0.1:{free_port()}" for _ in range(size))
    return GroupSpec(
        name,
        model or models_dir / "smollm2",
        hosts,
        strategy=strategy,
        control=f"127.0.0.1:{free_port()}",
        token=token,
    )


def _prompt(models_dir: Path) -> list[int]:
    from mlx_lm.utils import load_tokenizer

    tok: Any = load_tokenizer(models_dir / "smollm2")  # type: ignore[no-untyped-call]
    ids = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    return list(ids)


def _single(
    models_dir: Path, prompt: list[int], n: int, model_dir: Path | None = None
) -> tuple[list[int], float]:
    """The unsharded greedy tokens (in this process) and its tokens/s."""
    import mlx.core as mx
    from mlx_lm import load
    from mlx_lm.generate import generate_step

    model = load(str(model_dir or models_dir / "smollm2"))[0]
    out: list[int] = []
    t0 = time.perf_counter()
    for tok, _ in generate_step(mx.array(prompt), model, max_tokens=n):
        out.append(int(tok))
    return out, len(out) / (time.perf_counter() - t0)


async def _collect(stream: AsyncIterator[dict[str, Any]]) -> tuple[list[int], dict[str, Any]]:
    tokens: list[int] = []
    async for event in stream:
        if "token" in event:
            tokens.append(int(event["token"]))
        else:
            return tokens, event
    raise AssertionError("the stream ended without a done event")


# ---------- checks before anything starts ----------


def _model_copy(models_dir: Path, tmp_path: Path, **config: Any) -> Path:
    dst = tmp_path / "m"
    shutil.copytree(models_dir / "smollm2", dst)
    cfg = json.loads((dst / "config.json").read_text())
    cfg.update(config)
    (dst / "config.json").write_text(json.dumps(cfg))
    return dst


def test_member_checks(models_dir: Path, tmp_path: Path) -> None:
    hosts3 = ("127.0.0.1:1", "127.0.0.1:2", "127.0.0.1:3")
    good = GroupSpec("g", models_dir / "smollm2", hosts3)
    assert check_member(good)["num_attention_heads"] == 9
    # 9 query heads / 3 KV heads: 2 members cannot share them.
    with pytest.raises(InvalidRequest, match="do not divide"):
        check_member(GroupSpec("g", models_dir / "smollm2", hosts3[:2]))
    with pytest.raises(InvalidRequest, match="cannot split gpt2 models"):
        check_member(GroupSpec("g", _model_copy(models_dir, tmp_path, model_type="gpt2"), hosts3))
    with pytest.raises(ModelLoadError, match="no model files"):
        check_member(GroupSpec("g", tmp_path / "absent", hosts3))
    # mlx-lm's llama has shard() but no pipeline(); its qwen2 has both.
    with pytest.raises(InvalidRequest, match=r"cannot split llama .* pipeline .*with: tensor"):
        check_member(GroupSpec("g", models_dir / "smollm2", hosts3, strategy="pipeline"))
    qwen = make_tiny_qwen2(tmp_path / "qwen", models_dir / "smollm2", layers=2)
    assert check_member(GroupSpec("g", qwen, hosts3[:2], strategy="pipeline"))
    with pytest.raises(InvalidRequest, match="at least as many layers"):
        check_member(GroupSpec("g", qwen, hosts3, strategy="pipeline"))
    with pytest.raises(InvalidRequest, match="not one of"):
        check_member(GroupSpec("g", qwen, hosts3, strategy="expert"))
    with pytest.raises(InvalidRequest, match="not built"):
        check_member(GroupSpec("g", qwen, hosts3, backend="jaccl"))
    with pytest.raises(InvalidRequest, match="not ip:port"):
        check_member(GroupSpec("g", models_dir / "smollm2", ("a", "b", "c")))
    with pytest.raises(InvalidRequest, match="at least 2"):
        check_member(GroupSpec("g", models_dir / "smollm2", hosts3[:1]))


# ---------- a real group ----------


async def _form(spec: GroupSpec, tokens: dict[int, str] | None = None) -> list[RankProcess]:
    ranks = []
    for r in range(spec.size):
        member = spec
        if tokens and r in tokens:
            member = GroupSpec(
                spec.name,
                spec.model_dir,
                spec.hosts,
                strategy=spec.strategy,
                control=spec.control,
                token=tokens[r],
            )
        ranks.append(RankProcess(member, r, step_timeout=30))
    for rank in ranks:
        await rank.start()
    return ranks


def test_three_rank_group(models_dir: Path) -> None:
    """Identical greedy tokens; cancel; a member killed mid-stream brings the group down."""
    n = 6
    prompt = _prompt(models_dir)
    expected, single_tps = _single(models_dir, prompt, n)

    async def main() -> None:
        ranks = await _form(_spec(models_dir, 3))
        try:
            ready = await ranks[0].ready(timeout=120)
            assert ready["size"] == 3
            t0 = time.perf_counter()
            got, done = await _collect(ranks[0].generate(prompt, max_tokens=n))
            group_tps = len(got) / (time.perf_counter() - t0)
            assert got == expected and done["done"] == "length"
            print(f"\nsingle {single_tps:.2f} tok/s, group of 3 {group_tps:.2f} tok/s")

            # A consumer that stops early: every rank stops, the group stays up.
            stream = ranks[0].generate(prompt, max_tokens=50)
            async for event in stream:
                assert "token" in event
                break
            await stream.aclose()  # type: ignore[attr-defined]
            assert all(r.up for r in ranks)
            got, _ = await _collect(ranks[0].generate(prompt, max_tokens=2))
            assert got == expected[:2]

            # A member dies mid-stream: the stream ends with Unavailable, at once.
            t0 = time.perf_counter()
            with pytest.raises(Unavailable, match=r"left the group|lost|exited"):
                async for _event in ranks[0].generate(prompt, max_tokens=200):
                    if ranks[2].up:
                        assert ranks[2].pid is not None
                        ranks[2]._kill("killed by the test")
            assert time.perf_counter() - t0 < 20
            for _ in range(100):  # every rank follows within moments
                if not any(r.up for r in ranks):
                    break
                await asyncio.sleep(0.1)
            assert not any(r.up for r in ranks), [r.down_reason for r in ranks]
            with pytest.raises(Unavailable, match="is down"):
                await _collect(ranks[0].generate(prompt, max_tokens=2))
        finally:
            for rank in ranks:
                await rank.stop()

    asyncio.run(main())


def test_member_with_wrong_token_is_refused(
    models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 0's control port takes only the group's members: the group never forms."""
    monkeypatch.setenv("MACMESH_GROUP_CONTROL_TIMEOUT", "5")

    async def main() -> None:
        ranks = await _form(_spec(models_dir, 3), tokens={2: "wrong"})
        try:
            with pytest.raises(Unavailable, match=r"never connected"):
                await ranks[0].ready(timeout=120)
        finally:
            for rank in ranks:
                await rank.stop()

    asyncio.run(main())


def test_two_stage_pipeline(models_dir: Path, tmp_path: Path) -> None:
    """Pipeline parallelism (consecutive layers per rank): the same greedy tokens as the
    whole model in one process, request after request."""
    model = make_tiny_qwen2(tmp_path / "qwen", models_dir / "smollm2")
    prompt = _prompt(models_dir)
    expected, _ = _single(models_dir, prompt, 12, model_dir=model)

    async def main() -> None:
        ranks = await _form(_spec(models_dir, 2, model=model, strategy="pipeline"))
        try:
            await ranks[0].ready(timeout=120)
            # The second time, the ranks' held KV cache serves all but the last prompt
            # token; the tokens stay the same.
            for i in range(2):
                got, done = await _collect(ranks[0].generate(prompt, max_tokens=12))
                assert (got, done["done"]) == (expected[: len(got)], done["done"])
                assert len(got) == 12 or done["done"] == "stop"
                assert done["cached"] == (len(prompt) - 1 if i else 0), done
            # A prompt that shares only a prefix: that much is served, the rest computed.
            other = prompt[:-4] + prompt[-2:]
            want, _ = _single(models_dir, other, 6, model_dir=model)
            got, done = await _collect(ranks[0].generate(other, max_tokens=6))
            assert got == want[: len(got)] and done["cached"] == len(prompt) - 4, done
        finally:
            for rank in ranks:
                await rank.stop()

    asyncio.run(main())
