"""The real Claude Code CLI, at full prompt size, against a lab of plain nodes.

Everything runs in a loopback-only network namespace (`unshare -n`): two
`macmesh node` processes whose seed-style `gguf_config.json` points at the
32k-context Gemma 3 270M GGUF, and a `macmesh coordinator` whose seed-style
`claude_routing.json` sends every Claude tier to it. Claude Code 2.1.197
(`make claude-code`, from npm) runs `claude -p` twice in one project (two
sessions) and once with `--continue`. Each session's ~25k-token prompt must be
prefilled once: the second session reuses the first one's prefix on the node
that holds it (the billing header, which differs between sessions at token 0,
is dropped by the coordinator), and the `--continue` turn reuses its own.

Skipped, with the reason, where npm (hence the CLI) is missing or a network
namespace cannot be made (not root).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.procs import MACMESH, Procs, free_port, wait_until

pytestmark = pytest.mark.model

ROOT = Path(__file__).resolve().parent.parent
CLAUDE = ROOT / ".tools" / "claude-code" / "node_modules" / ".bin" / "claude"
GEMMA = Path(sys.prefix) / "share" / "macmesh" / "models" / "gemma-3-270m-q4_k_m.gguf"
# Seed style: the GGUF named without its suffix, with its backend.
GEMMA_TIER = {"model": "gemma-3-270m-q4_k_m", "backend": "gguf"}
# One request per `claude -p` run (no side calls in print mode); each log line says
# where it ran: "... -> MODEL (RULE) on TARGET [REASON]: N prompt tokens ...".
SIM = "sim-cc-40k"
REQUEST_LINE = re.compile(
    r"-> (\S+) \((\S+)\) on (\S+) \[(\S+)\]: (\d+) prompt tokens.*?prefill ([\d.]+)s"
)


@dataclass
class Lab:
    ns: list[str]
    procs: Procs
    project: Path
    claude_home: Path
    coordinator_log: Path
    base: str
    nodes: dict[str, str]  # target -> name


def _namespace() -> subprocess.Popen[bytes]:
    if shutil.which("unshare") is None or shutil.which("nsenter") is None:
        pytest.skip("util-linux unshare/nsenter not installed")
    holder = subprocess.Popen(
        ["unshare", "-n", "sleep", "3600"], stderr=subprocess.PIPE, start_new_session=True
    )
    try:
        holder.wait(0.5)
    except subprocess.TimeoutExpired:
        return holder
    err = holder.stderr.read().decode() if holder.stderr else ""
    pytest.skip(f"cannot make a network namespace here: {err.strip()}")


def _ns_http(ns: list[str], method: str, url: str, body: Any = None) -> Any:
    """An HTTP call from inside the namespace (the coordinator listens only there)."""
    code = (
        "import httpx, json, sys; r = httpx.request(sys.argv[1], sys.argv[2], timeout=10, "
        "json=json.loads(sys.argv[3])); r.raise_for_status(); print(json.dumps(r.json()))"
    )
    argv = [*ns, sys.executable, "-c", code, method, url, json.dumps(body)]
    out = subprocess.run(argv, capture_output=True, timeout=30)
    if out.returncode != 0:
        raise OSError(out.stderr.decode()[-500:])
    return json.loads(out.stdout)


def _ns_get(ns: list[str], url: str) -> Any:
    return _ns_http(ns, "GET", url)


@pytest.fixture(scope="module")
def lab(tmp_path_factory: pytest.TempPathFactory, llama_server_binary: Path) -> Iterator[Lab]:
    if not CLAUDE.exists():
        why = "npm is missing" if shutil.which("npm") is None else "run `make claude-code`"
        pytest.skip(f"the Claude Code CLI is not installed ({why})")
    assert GEMMA.exists(), "the Gemma GGUF is part of `make install`"
    holder = _namespace()
    ns = ["nsenter", "-t", str(holder.pid), "-n"]
    subprocess.run([*ns, "ip", "link", "set", "lo", "up"], check=True)
    root = tmp_path_factory.mktemp("cc-lab")
    procs = Procs(root, prefix=ns)
    env = {"HF_HOME": str(root / "hf"), "HF_HUB_OFFLINE": "1"}
    ports = [free_port() for _ in range(3)]
    try:
        nodes: dict[str, str] = {}
        for i, port in enumerate(ports[:2]):
            home = root / f"home{i}"
            home.mkdir()
            # Seed-style gguf_config.json: a folder of GGUF files, threads for 2 cores.
            (home / "gguf_config.json").write_text(
                json.dumps({"model_dirs": [str(GEMMA.parent)], "threads": 2})
            )
            procs.spawn(
                f"node{i}",
                [MACMESH, "node", "--grpc-port", str(port), "--metrics-port", "-1"],
                {**env, "MACMESH_HOME": str(home)},
            )
            nodes[f"127.0.0.1:{port}"] = f"node{i}"
        # A SIMULATED 40k-context model (1 token per byte), for a session long enough
        # to need compaction without minutes of real prefill.
        sim_port = free_port()
        procs.spawn(
            "sim-node",
            [
                MACMESH,
                "node",
                "--grpc-port",
                str(sim_port),
                "--metrics-port",
                "-1",
                "--no-default-model",
                "--no-hf-cache",
                "--sim-model",
                f"{SIM}:200000:500:40000",
            ],
            {**env, "MACMESH_HOME": str(root / "sim-home")},
        )
        nodes[f"127.0.0.1:{sim_port}"] = "sim-node"
        coord_home = root / "coord"
        coord_home.mkdir()
        tiers = {"haiku": GEMMA_TIER, "sonnet": GEMMA_TIER, "opus": GEMMA_TIER}
        (coord_home / "claude_routing.json").write_text(json.dumps({"tiers": tiers}))
        # A base model rambles; a few tokens are enough for wire and cache checks.
        (coord_home / "inference_settings.json").write_text(
            json.dumps({"max_output_tokens": 8, "temperature": 0})
        )
        peers = [a for t in nodes for a in ("--peer", t)]
        coord = procs.spawn(
            "coordinator",
            [MACMESH, "coordinator", "--port", str(ports[2]), "--no-bonjour", *peers],
            {**env, "MACMESH_HOME": str(coord_home)},
        )
        base = f"http://127.0.0.1:{ports[2]}"

        def gemma_on_both() -> bool:
            models = {m["id"]: m for m in _ns_get(ns, f"{base}/api/models")["models"]}
            gemma = models.get(GEMMA.name, {"nodes": []})
            return len(gemma["nodes"]) == 2 and SIM in models

        wait_until(gemma_on_both, 240, "both nodes advertise Gemma", procs.started)
        project = root / "project"
        project.mkdir()
        (project / "main.py").write_text('print("hello")\n')
        git = ["git", "-c", "user.name=t", "-c", "user.email=t@t", "-C", str(project)]
        subprocess.run([*git, "init", "-q"], check=True)
        subprocess.run([*git, "add", "."], check=True)
        subprocess.run([*git, "commit", "-qm", "init"], check=True)
        yield Lab(ns, procs, project, root / "claude-home", coord.log, base, nodes)
    finally:
        procs.stop_all()
        holder.kill()
        holder.wait(5)


def claude(
    lab: Lab, *args: str, model: str = "claude-sonnet-4-6", home: Path | None = None
) -> dict[str, Any]:
    """One `claude -p` run in the project, as a user's shell runs it; its JSON result."""
    home = home or lab.claude_home
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "ANTHROPIC_BASE_URL": lab.base,
        "ANTHROPIC_AUTH_TOKEN": "local",
        "ANTHROPIC_MODEL": model,
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
    }
    home.mkdir(exist_ok=True)
    out = subprocess.run(
        [*lab.ns, str(CLAUDE), "-p", *args, "--output-format", "json"],
        cwd=lab.project,
        env=env,
        capture_output=True,
        timeout=540,
    )
    text = out.stdout.decode(errors="replace")
    assert out.returncode == 0, f"claude exited {out.returncode}: {text[-2000:]}"
    result: dict[str, Any] = json.loads(text)
    return result


@dataclass
class Ran:
    """One request as the coordinator's log line tells it."""

    model: str
    target: str
    prompt_tokens: int
    prefill_s: float


def requests(lab: Lab, model: str = GEMMA.name) -> list[Ran]:
    """Every request the coordinator ran for `model`, in order."""
    found = REQUEST_LINE.findall(lab.coordinator_log.read_text(errors="replace"))
    return [
        Ran(m, target, int(tokens), float(prefill))
        for m, _rule, target, _reason, tokens, prefill in found
        if m == model
    ]


def reuse(result: dict[str, Any]) -> tuple[float, int]:
    usage = result["usage"]
    read = int(usage.get("cache_read_input_tokens", 0))
    total = read + int(usage["input_tokens"]) + int(usage.get("cache_creation_input_tokens", 0))
    return read / total, total


def test_two_sessions_and_a_continue_share_the_prefix(lab: Lab) -> None:
    first = claude(lab, "say hi")
    share1, tokens = reuse(first)
    assert tokens > 20_000, f"a full Claude Code prompt, not a bare one: {tokens} tokens"
    # A new session in the same project, with another first prompt: raw, its billing
    # header differs from the first session's at token 0.
    second = claude(lab, "what is 2+2")
    share2, _ = reuse(second)
    third = claude(lab, "--continue", "and again")
    share3, _ = reuse(third)
    ran = requests(lab)
    print(
        f"prompt {tokens} tokens; reuse: first {share1:.1%}, second session {share2:.1%}, "
        f"--continue {share3:.1%}; prefill: {', '.join(f'{r.prefill_s:.2f}s' for r in ran)}; "
        f"claude wall: {first['duration_ms'] / 1000:.1f}s, {second['duration_ms'] / 1000:.1f}s, "
        f"{third['duration_ms'] / 1000:.1f}s; nodes: {[lab.nodes[r.target] for r in ran]}"
    )
    assert first["session_id"] != second["session_id"]
    assert share2 >= 0.90, f"second session reused {share2:.1%} of its prompt"
    assert share3 >= 0.95, f"--continue reused {share3:.1%} of its prompt"
    assert len(ran) == 3, ran
    assert ran[1].target == ran[0].target, "the second session ran where the first one's prefix is"
    assert ran[2].target == ran[0].target


@pytest.mark.slow
def test_verbatim_prompts_prefill_a_new_session_again(lab: Lab) -> None:
    """The control: with `"prompt_hygiene": false` the same session as the test above
    starts with its billing header, and not one cached block matches."""
    url = f"{lab.base}/api/inference-settings"
    settings = _ns_get(lab.ns, url)
    settings.pop("error", None)
    _ns_http(lab.ns, "PUT", url, {**settings, "prompt_hygiene": False})
    before = len(requests(lab))
    try:
        other = claude(lab, "what is 2+2")
    finally:
        _ns_http(lab.ns, "PUT", url, settings)
    share, tokens = reuse(other)
    ran = requests(lab)[before:]
    print(f"verbatim: a new session reused {share:.1%} of {tokens} tokens; prefill {ran}")
    assert share < 0.05


def test_a_session_past_the_context_compacts_instead_of_failing(lab: Lab) -> None:
    """Claude Code learns no gateway model's window; it compacts when told the prompt is
    too long (`prompt is too long: N tokens > M maximum`, N > M) and the session has
    three exchanges or more. A model name Claude Code does not know also brings its
    mid-conversation system turn, which the coordinator folds into the user turn."""
    home = lab.claude_home.parent / "claude-home-sim"
    filler = "Here is more context for the task: " + "lorem ipsum dolor sit amet " * 450
    claude(lab, "say hi", model=SIM, home=home)
    for _ in range(2):
        claude(lab, "--continue", filler, model=SIM, home=home)
    before = len(requests(lab, SIM))
    prompts = [r.prompt_tokens for r in requests(lab, SIM)]
    assert prompts[-1] > 30_000, f"the third turn nearly fills the 40k context: {prompts}"
    last = claude(lab, "--continue", filler, model=SIM, home=home)  # over 40k: compacts
    log = lab.coordinator_log.read_text(errors="replace")
    refused = re.findall(
        r"refused: INVALID_ARGUMENT: prompt is too long: (\d+) tokens > (\d+)", log
    )
    assert refused and all(int(n) > int(m) == 40_000 for n, m in refused), refused
    after = requests(lab, SIM)[before:]
    # The compaction request, then the turn itself retried on the summary, both served.
    assert len(after) >= 2, after
    assert after[-1].prompt_tokens < 40_000
    assert last["is_error"] is False, last
