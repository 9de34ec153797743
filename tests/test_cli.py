"""The `macmesh` command as users run it: real processes, real signals."""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mesh.client import NodeClient
from mesh.types import (
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateRequest,
    Message,
    SamplingParams,
    TextDelta,
)

MACMESH = str(Path(sys.executable).parent / "macmesh")


def run(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [MACMESH, *args], capture_output=True, text=True, timeout=120, env=env, check=False
    )


@pytest.mark.parametrize(
    "argv",
    [
        [],
        ["node"],
        ["up"],
        ["models"],
        ["models", "list"],
        ["models", "import-gguf"],
        ["models", "prepare-default"],
        ["generate"],
    ],
)
def test_help_for_every_command(argv: list[str]) -> None:
    result = run(*argv, "--help")
    assert result.returncode == 0, result.stderr
    assert "usage: macmesh" in result.stdout


def test_import_gguf_errors_are_clear(tmp_path: Path) -> None:
    missing = run("models", "import-gguf", str(tmp_path / "nope.gguf"))
    assert missing.returncode == 2 and "no such file" in missing.stderr
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf at all")
    bad = run("models", "import-gguf", str(junk), "--models-dir", str(tmp_path / "m"))
    assert bad.returncode == 1 and "GGUF" in bad.stderr
    assert not (tmp_path / "m" / "junk").exists()


@pytest.mark.model
def test_import_and_list(tmp_path: Path) -> None:
    from node.models.default import default_gguf

    src = default_gguf()
    assert src is not None
    out = run("models", "import-gguf", str(src), "--name", "smol", "--models-dir", str(tmp_path))
    assert out.returncode == 0, out.stderr
    assert "q4_1" in out.stdout
    listed = run("models", "list", "--models-dir", str(tmp_path), "--no-hf-cache", "--json")
    assert '"id": "smol"' in listed.stdout
    (smol,) = [m for m in json.loads(listed.stdout) if m["id"] == "smol"]
    assert smol["kv_bytes_per_token"] > 0
    assert smol["estimated_bytes"] == (
        smol["size_bytes"] + smol["kv_bytes_per_token"] * smol["context_length"]
    )
    table = run("models", "list", "--models-dir", str(tmp_path), "--no-hf-cache")
    assert "est. memory" in table.stdout and "smol" in table.stdout


class NodeProcess:
    def __init__(self, proc: subprocess.Popen[str], target: str) -> None:
        self.proc = proc
        self.target = target


@pytest.fixture
def node_process(models_dir: Path, tmp_path: Path) -> Iterator[NodeProcess]:
    env = {**os.environ, "MACMESH_HOME": str(tmp_path / "home"), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            MACMESH, "node", "--grpc-port", "0", "--models-dir", str(models_dir),
            "--no-hf-cache", "--no-bonjour", "--preload", "smollm2", "--shutdown-grace", "0",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"listening on (\S+)", line)
        assert match, f"unexpected first line: {line!r}"
        yield NodeProcess(proc, match.group(1))
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)


@pytest.mark.model
async def test_sigterm_ends_inflight_stream_with_clear_error(node_process: NodeProcess) -> None:
    """With no grace left, an in-flight stream ends with an error event, then the node exits."""
    request = GenerateRequest(
        model="smollm2",
        prompt=ChatPrompt((Message("user", "Write a long story about a dragon."),)),
        sampling=SamplingParams(max_tokens=400),
    )
    events = []
    async with NodeClient(node_process.target) as client:
        async for ev in client.generate(request):
            events.append(ev)
            if isinstance(ev, TextDelta) and len(events) == 3:
                node_process.proc.send_signal(signal.SIGTERM)
    errors = [e for e in events if isinstance(e, ErrorEvent)]
    assert errors and "shutting down" in errors[0].message
    last = events[-1]
    assert isinstance(last, Finish) and last.reason is FinishReason.CANCELLED
    t0 = time.monotonic()
    assert await asyncio.to_thread(node_process.proc.wait, 20) == 0
    assert time.monotonic() - t0 < 20


@pytest.mark.model
async def test_sigint_stops_an_idle_node(node_process: NodeProcess) -> None:
    async with NodeClient(node_process.target) as client:
        models = await client.list_models()  # voice models (docs/voice.md) aside
        assert [m.id for m in models if m.kind == "chat"] == ["smollm2", "smollm2.gguf"]
    node_process.proc.send_signal(signal.SIGINT)
    assert await asyncio.to_thread(node_process.proc.wait, 20) == 0
