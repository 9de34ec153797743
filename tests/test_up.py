"""`macmesh up` as a user runs it: node + coordinator in one process, default model."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import anthropic
import httpx
import openai
import pytest

pytestmark = pytest.mark.model

MACMESH = str(Path(sys.executable).parent / "macmesh")


@pytest.fixture(scope="module")
def up(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    home = tmp_path_factory.mktemp("up-home")
    env = {**os.environ, "MACMESH_HOME": str(home), "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        [
            MACMESH, "up", "--grpc-port", "0", "--http-port", "0",
            "--models-dir", str(models_dir), "--no-hf-cache", "--no-bonjour",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        lines = [proc.stdout.readline(), proc.stdout.readline()]
        match = re.search(r"coordinator listening on (\S+)", lines[1])
        assert "node listening on" in lines[0] and match, lines
        url = match.group(1)
        for _ in range(200):
            if httpx.get(url + "/health").json()["nodes_online"]:
                break
        yield url
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_openai_sdk_through_up(up: str) -> None:
    client = openai.OpenAI(base_url=up + "/v1", api_key="x", max_retries=0)
    out = client.chat.completions.create(
        model="smollm2",
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        temperature=0,
        max_tokens=8,
    )
    assert (out.choices[0].message.content or "").startswith("The capital of France is")


def test_any_claude_model_falls_back_to_the_default(up: str) -> None:
    client = anthropic.Anthropic(base_url=up, api_key="x", max_retries=0)
    msg = client.messages.create(
        model="claude-sonnet-4-6",
        max_tokens=8,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        # This SDK version has no sampling arguments; the API still takes them.
        extra_body={"temperature": 0},
    )
    assert msg.model == "claude-sonnet-4-6"
    text = "".join(b.text for b in msg.content if b.type == "text")
    assert text.startswith("The capital of France is")
