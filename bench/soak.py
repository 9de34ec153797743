"""Load and chaos (`make soak`): many streaming clients on both APIs against a lab of real
`macmesh` processes while faults hit it, every stream checked token for token.

The lab runs as users deploy it, on loopback: plain `macmesh node` processes with a
simulated model whose answer is a known function of the prompt's length (so a stream that
lost, repeated or borrowed tokens is caught), one node serving a tiny GGUF through a real
llama-server, optionally one node in its own network namespace (root and iproute2), and a
`macmesh coordinator` in front. Clients alternate the OpenAI and Anthropic APIs, with
prompts and answer lengths drawn at random.

Phases:
1. capacity: concurrency stepped up (no faults) to find what one coordinator holds here,
   with the mesh's overhead per request = the client's time to first token minus the
   node's own queue and prefill time (from the coordinator's request log);
2. chaos: a steady load while the faults are injected in turn: kill -9 of a node and its
   restart, SIGSTOP of a node (hung, TCP open) and SIGCONT, kill -9 of a llama-server,
   a coordinator restart, and the namespace node's link going down and up.

Each stream ends as one of: intact (finished, every token as expected), a clear error (an
error status or an error event, noted with the fault in force), cut (ended with neither a
finish nor an error: must be 0), mixed (finished with tokens that are not its own: must be
0); a request that got no response at all while the coordinator restarted (connection
refused, or a kept-alive connection closed as the request went out) is counted apart:
nothing of it was cut, and an SDK retries it. After
the load: requests still in flight anywhere (must be 0), and the processes' memory.

    python bench/soak.py [--duration 240] [--clients 24] [--json docs/results/soak.json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from macmesh.bench.procs import ManagedProcess, machine_info  # noqa: E402
from macmesh.bench.stats import percentile  # noqa: E402
from node.backends.sim import SIM_WORDS  # noqa: E402

SIM = "soak"
# 20k tok/s prefill, 60 tok/s decode per stream, nearly flat with batch size.
SIM_SPEC = f"{SIM}:20000:60:32768:0.02"
GGUF = "soak-tiny.gguf"
GGUF_SHARE = 0.1
# Every link authenticated, as a lab runs (the namespace node is off loopback).
SECRET = "soak-" + os.urandom(16).hex()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_mib(pid: int) -> float | None:
    """Resident memory of a process and its children (llama-server), MiB."""
    total = 0
    pids = [pid, *children(pid)]
    for p in pids:
        with contextlib.suppress(OSError, ValueError):
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
    return round(total / 1024, 1) if total else None


def children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            if int(fields[1]) == pid:
                out.append(int(stat.parent.name))
    return out


# ---------------------------------------------------------------- the lab


@dataclass
class Node:
    name: str
    port: int
    home: Path
    args: list[str]
    exe: list[str] = field(default_factory=list)
    proc: ManagedProcess | None = None

    @property
    def pid(self) -> int:
        assert self.proc is not None and self.proc.proc is not None
        return self.proc.proc.pid


class Lab:
    """The processes, started and stopped as launchd would."""

    def __init__(self, root: Path, *, netns: bool) -> None:
        self.root = root
        self.nodes: dict[str, Node] = {}
        self.http = _port()
        self.coordinator: ManagedProcess | None = None
        self.ns: dict[str, str] | None = None
        for i in range(3):
            self._node(f"sim{i}", ["--sim-model", SIM_SPEC])
        gguf_home = root / "gguf0"
        (gguf_home / "models").mkdir(parents=True)
        from tests.gguf_fixtures import make_tiny, write_tiny_gguf

        write_tiny_gguf(gguf_home / "models" / GGUF, make_tiny())
        self._node("gguf0", [])
        if netns:
            self.ns = _make_netns()
            if self.ns is not None:
                node = self._node("netns0", ["--sim-model", SIM_SPEC, "--host", self.ns["ns_ip"]])
                node.exe = ["ip", "netns", "exec", self.ns["ns"], str(_macmesh())]

    def _node(self, name: str, extra: list[str]) -> Node:
        home = self.root / name
        home.mkdir(exist_ok=True)
        (home / "node_id").write_text(name + "\n")
        port = _port()
        args = ["node", "--grpc-port", str(port), "--metrics-port", "-1", "--no-hf-cache"]
        args += ["--no-default-model", "--max-waiting", "1024", *extra]
        node = self.nodes[name] = Node(name, port, home, args)
        return node

    def target(self, node: Node) -> str:
        host = self.ns["ns_ip"] if self.ns and node.name == "netns0" else "127.0.0.1"
        return f"{host}:{node.port}"

    def start_node(self, node: Node) -> None:
        node.proc = ManagedProcess(
            node.name,
            node.args,
            home=node.home,
            log_path=self.root / f"{node.name}.log",
            ready="macmesh node listening on ",
            exe=node.exe,
            env={"HF_HUB_OFFLINE": "1", "MACMESH_SECRET": SECRET},
        )
        node.proc.start()
        node.proc.wait_ready(120)

    def start_coordinator(self) -> None:
        home = self.root / "coordinator"
        home.mkdir(exist_ok=True)
        peers = [a for n in self.nodes.values() for a in ("--peer", self.target(n))]
        args = ["coordinator", "--port", str(self.http), "--no-bonjour", *peers]
        args += ["--request-log-size", "200000"]
        self.coordinator = ManagedProcess(
            "coordinator",
            args,
            home=home,
            log_path=self.root / f"coordinator-{time.monotonic_ns()}.log",
            ready="macmesh coordinator listening on ",
            env={"HF_HUB_OFFLINE": "1", "MACMESH_SECRET": SECRET},
        )
        self.coordinator.start()
        self.coordinator.wait_ready(60)

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.http}"

    def start(self) -> None:
        for node in self.nodes.values():
            self.start_node(node)
        self.start_coordinator()
        _wait(lambda: self.health()["nodes_online"] == len(self.nodes), 120, "all nodes online")
        r = httpx.post(
            f"{self.base}/api/models/load", json={"model": GGUF, "node": "gguf0"}, timeout=120
        )
        r.raise_for_status()

    def health(self) -> dict[str, Any]:
        body: dict[str, Any] = httpx.get(f"{self.base}/health", timeout=5).json()
        return body

    def stop(self) -> None:
        for node in self.nodes.values():
            if node.proc is not None and node.proc.proc is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(node.proc.proc.pid, signal.SIGCONT)
        if self.coordinator is not None:
            self.coordinator.stop()
        for node in self.nodes.values():
            if node.proc is not None:
                node.proc.stop()
        if self.ns is not None:
            _ip("link", "del", self.ns["host_if"])
            _ip("netns", "del", self.ns["ns"])

    def memory(self) -> dict[str, float | None]:
        out: dict[str, float | None] = {}
        if self.coordinator is not None and self.coordinator.proc is not None:
            out["coordinator"] = rss_mib(self.coordinator.proc.pid)
        for node in self.nodes.values():
            if node.proc is not None and node.proc.proc is not None:
                out[node.name] = rss_mib(node.pid)
        return out


def _macmesh() -> Path:
    return Path(sys.executable).parent / "macmesh"


def _ip(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["ip", *args], capture_output=True, text=True, check=False)


def _make_netns() -> dict[str, str] | None:
    if shutil.which("ip") is None or os.geteuid() != 0:
        return None
    tag = f"{os.getpid() % 100000:05d}"
    ns, host_if, ns_if = f"soak{tag}", f"sk{tag}a", f"sk{tag}b"
    host_ip, ns_ip = "10.233.77.1", "10.233.77.2"
    if _ip("netns", "add", ns).returncode != 0:
        return None
    steps = [
        ("link", "add", host_if, "type", "veth", "peer", "name", ns_if),
        ("link", "set", ns_if, "netns", ns),
        ("addr", "add", f"{host_ip}/24", "dev", host_if),
        ("link", "set", host_if, "up"),
        ("-n", ns, "addr", "add", f"{ns_ip}/24", "dev", ns_if),
        ("-n", ns, "link", "set", ns_if, "up"),
        ("-n", ns, "link", "set", "lo", "up"),
    ]
    for step in steps:
        if _ip(*step).returncode != 0:
            _ip("link", "del", host_if)
            _ip("netns", "del", ns)
            return None
    return {"ns": ns, "host_if": host_if, "ns_ip": ns_ip, "host_ip": host_ip}


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
            if check():
                return
        time.sleep(0.2)
    raise SystemExit(f"soak: {what}: not within {timeout:.0f}s")


# ---------------------------------------------------------------- clients


@dataclass
class Outcome:
    kind: str  # intact | error | cut | mixed | refused
    api: str
    model: str
    id: str = ""
    detail: str = ""
    fault: str = ""  # the fault in force when it ended
    ttft: float | None = None
    started: float = 0.0
    tokens: int = 0


class Chaos:
    """The fault in force now (for labelling outcomes)."""

    def __init__(self) -> None:
        self.now = ""
        self.log: list[dict[str, Any]] = []


async def one_stream(
    client: httpx.AsyncClient,
    base: str,
    rng: random.Random,
    chaos: Chaos,
    gguf_refs: dict[str, str],
) -> Outcome:
    api = rng.choice(("openai", "anthropic"))
    gguf = rng.random() < GGUF_SHARE
    if gguf:
        prompt = rng.choice(sorted(gguf_refs))
        max_tokens, model = 16, GGUF
    else:
        words = rng.randint(3, 400)
        prompt = " ".join(rng.choice(SIM_WORDS) for _ in range(words))
        max_tokens, model = rng.randint(10, 120), SIM
    messages = [{"role": "user", "content": prompt}]
    out = Outcome("cut", api, model, started=time.monotonic())
    text: list[str] = []
    finished = False
    prompt_tokens = completion = None
    t0 = time.monotonic()
    responded = False
    try:
        if api == "openai":
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True,
                    "stream_options": {"include_usage": True}}  # fmt: skip
            if gguf:
                body["temperature"] = 0
            req = client.stream("POST", f"{base}/v1/chat/completions", json=body)
        else:
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "stream": True}
            if gguf:
                body["temperature"] = 0
            req = client.stream(
                "POST",
                f"{base}/v1/messages",
                json=body,
                headers={"anthropic-version": "2023-06-01"},
            )
        async with req as resp:
            responded = True
            if resp.status_code != 200:
                await resp.aread()
                out.kind, out.detail = "error", f"HTTP {resp.status_code}: {resp.text[:200]}"
                return out
            event = ""
            async for line in resp.aiter_lines():
                if line.startswith("event:"):
                    event = line[6:].strip()
                    continue
                if not line.startswith("data:"):
                    continue
                data = line[5:].strip()
                if data == "[DONE]":
                    continue
                msg = json.loads(data)
                if "error" in msg and (api == "openai" or event == "error"):
                    err = msg["error"]
                    out.kind, out.detail = "error", str(err.get("message", err))[:200]
                    return out
                if api == "openai":
                    out.id = out.id or msg.get("id", "")
                    for choice in msg.get("choices") or []:
                        piece = (choice.get("delta") or {}).get("content")
                        if piece:
                            if out.ttft is None:
                                out.ttft = time.monotonic() - t0
                            text.append(piece)
                        if choice.get("finish_reason"):
                            finished = True
                    if msg.get("usage"):
                        prompt_tokens = msg["usage"]["prompt_tokens"]
                        completion = msg["usage"]["completion_tokens"]
                elif event == "message_start":
                    out.id = msg["message"]["id"]
                    prompt_tokens = msg["message"]["usage"]["input_tokens"]
                elif event == "content_block_delta":
                    piece = msg["delta"].get("text")
                    if piece:
                        if out.ttft is None:
                            out.ttft = time.monotonic() - t0
                        text.append(piece)
                elif event == "message_delta":
                    completion = msg["usage"]["output_tokens"]
                elif event == "message_stop":
                    finished = True
    except (httpx.HTTPError, json.JSONDecodeError, KeyError) as exc:
        out.detail = f"{type(exc).__name__}: {exc}"[:200]
        if not responded and isinstance(exc, httpx.TransportError):
            # No response began: refused, or a kept-alive connection the restarting
            # coordinator closed as the request went out. Nothing was cut; an SDK retries.
            out.kind = "refused"
        return out  # else cut
    finally:
        out.fault = chaos.now
    got = "".join(text)
    out.tokens = completion or 0
    if not finished:
        out.detail = "stream ended without a finish or an error"
        return out
    if gguf:
        out.kind = "intact" if got == gguf_refs[prompt] else "mixed"
        out.detail = "" if out.kind == "intact" else f"got {got!r}, expected {gguf_refs[prompt]!r}"
        return out
    if prompt_tokens is None or completion is None:
        out.kind, out.detail = "mixed", "no usage"
        return out
    expected = " ".join(SIM_WORDS[(prompt_tokens + i) % len(SIM_WORDS)] for i in range(completion))
    ok = got == expected and completion == max_tokens
    out.kind = "intact" if ok else "mixed"
    if not ok:
        out.detail = f"{completion}/{max_tokens} tokens; got {got[:80]!r} want {expected[:80]!r}"
    return out


async def load(
    base: str, clients: int, until: float, chaos: Chaos, refs: dict[str, str], seed: int
) -> list[Outcome]:
    outcomes: list[Outcome] = []
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients)
    timeout = httpx.Timeout(120, connect=5)
    async with httpx.AsyncClient(limits=limits, timeout=timeout) as client:

        async def worker(i: int) -> None:
            rng = random.Random(seed * 1000 + i)
            while time.monotonic() < until:
                out = await one_stream(client, base, rng, chaos, refs)
                outcomes.append(out)
                if out.kind == "refused":
                    await asyncio.sleep(0.5)  # as an SDK retries a refused connection

        await asyncio.gather(*(worker(i) for i in range(clients)))
    return outcomes


def gguf_references(base: str) -> dict[str, str]:
    """The tiny GGUF's greedy answers to a few prompts, before any load (non-streamed)."""
    refs = {}
    for prompt in ("alpha beta", "the sea", "one two three", "lighthouse"):
        r = httpx.post(
            f"{base}/v1/chat/completions",
            json={
                "model": GGUF,
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 16,
                "temperature": 0,
            },
            timeout=60,
        )
        r.raise_for_status()
        refs[prompt] = r.json()["choices"][0]["message"]["content"] or ""
    return refs


def overheads(base: str, outcomes: list[Outcome]) -> list[float]:
    """Client TTFT minus the node's queue and prefill, per intact simulated stream (ms)."""
    log = httpx.get(f"{base}/api/requests", params={"limit": 1000, "model": SIM}, timeout=30)
    records = {r["id"]: r for r in log.json()["requests"]}
    out = []
    for o in outcomes:
        r = records.get(o.id)
        if o.kind != "intact" or o.ttft is None or r is None or r.get("queue_seconds") is None:
            continue
        out.append(1000 * (o.ttft - r["queue_seconds"] - r["prefill_seconds"]))
    return out


# ---------------------------------------------------------------- phases


def capacity(
    lab: Lab, steps: list[int], seconds: float, refs: dict[str, str]
) -> list[dict[str, Any]]:
    rows = []
    for n in steps:
        chaos = Chaos()
        t0 = time.monotonic()
        outcomes = asyncio.run(load(lab.base, n, t0 + seconds, chaos, refs, seed=n))
        wall = time.monotonic() - t0
        ov = overheads(lab.base, outcomes)
        kinds = Counter(o.kind for o in outcomes)
        tokens = sum(o.tokens for o in outcomes if o.kind == "intact")
        rows.append(
            {
                "streams": n,
                "requests": len(outcomes),
                "outcomes": dict(kinds),
                "tokens_per_second": round(tokens / wall, 1),
                "overhead_ms_p50": round(percentile(ov, 50), 1),
                "overhead_ms_p99": round(percentile(ov, 99), 1),
            }
        )
        print(f"capacity {n:4d} streams: {rows[-1]}", flush=True)
    return rows


def chaos_phase(lab: Lab, clients: int, duration: float, refs: dict[str, str]) -> dict[str, Any]:
    chaos = Chaos()
    start = time.monotonic()
    until = start + duration
    box: dict[str, list[Outcome]] = {}

    def run_load() -> None:
        box["outcomes"] = asyncio.run(load(lab.base, clients, until, chaos, refs, seed=7))

    import threading

    loader = threading.Thread(target=run_load)
    loader.start()
    faults = fault_plan(lab)
    step = duration / (len(faults) + 1)
    for i, (name, action, recover, hold) in enumerate(faults, start=1):
        _sleep_until(start + i * step)
        chaos.now = name
        t = round(time.monotonic() - start, 1)
        action()
        time.sleep(hold)
        recover()
        chaos.log.append({"fault": name, "at_s": t, "held_s": hold})
        print(f"fault at {t:6.1f}s: {name}", flush=True)
        _wait(lambda: lab.health()["nodes_online"] == len(lab.nodes), 60, f"recovery from {name}")
        chaos.now = f"after {name}"
    loader.join()
    outcomes = box["outcomes"]
    return {
        "outcomes": outcomes,
        "faults": chaos.log,
        "seconds": round(time.monotonic() - start, 1),
    }


def _sleep_until(t: float) -> None:
    time.sleep(max(0.0, t - time.monotonic()))


def fault_plan(lab: Lab) -> list[tuple[str, Any, Any, float]]:
    sim0, sim1, gguf0 = lab.nodes["sim0"], lab.nodes["sim1"], lab.nodes["gguf0"]

    def kill9(node: Node) -> None:
        os.kill(node.pid, signal.SIGKILL)
        assert node.proc is not None and node.proc.proc is not None
        node.proc.proc.wait()

    def kill_llama() -> None:
        for pid in children(gguf0.pid):
            with contextlib.suppress(OSError):
                if "llama" in Path(f"/proc/{pid}/comm").read_text():
                    os.kill(pid, signal.SIGKILL)

    def restart_coordinator() -> None:
        assert lab.coordinator is not None
        lab.coordinator.stop()

    plan: list[tuple[str, Any, Any, float]] = [
        ("kill -9 node sim0, restart", lambda: kill9(sim0), lambda: lab.start_node(sim0), 3.0),
        ("SIGSTOP node sim1 (hung, TCP open)", lambda: os.kill(sim1.pid, signal.SIGSTOP),
         lambda: os.kill(sim1.pid, signal.SIGCONT), 8.0),
        ("kill -9 llama-server of gguf0", kill_llama, lambda: None, 0.0),
        ("restart the coordinator", restart_coordinator, lab.start_coordinator, 0.0),
    ]  # fmt: skip
    if lab.ns is not None:
        host_if = lab.ns["host_if"]
        plan.append(
            (
                "link of node netns0 down, then up",
                lambda: _ip("link", "set", host_if, "down"),
                lambda: _ip("link", "set", host_if, "up"),
                8.0,
            )
        )
    return plan


def in_flight(lab: Lab) -> dict[str, int]:
    nodes = httpx.get(f"{lab.base}/api/nodes", timeout=10).json()["nodes"]
    return {
        n["id"]: int(n.get("inflight") or 0)
        + int(n.get("running") or 0)
        + int(n.get("waiting") or 0)
        for n in nodes
    }


def summarize(outcomes: list[Outcome]) -> dict[str, Any]:
    kinds = Counter(o.kind for o in outcomes)
    errors = Counter(
        f"{o.fault or 'no fault'}: {o.detail[:90]}" for o in outcomes if o.kind == "error"
    )
    return {
        "requests": len(outcomes),
        "intact": kinds["intact"],
        "clear_errors": kinds["error"],
        "no_response_while_coordinator_restarted": kinds["refused"],
        "cut": kinds["cut"],
        "mixed": kinds["mixed"],
        "errors_by_fault": dict(errors.most_common(12)),
        "cut_examples": [asdict(o) for o in outcomes if o.kind == "cut"][:5],
        "mixed_examples": [asdict(o) for o in outcomes if o.kind == "mixed"][:5],
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--duration", type=float, default=240, help="chaos phase seconds")
    parser.add_argument("--clients", type=int, default=24, help="streams during the chaos phase")
    parser.add_argument("--capacity", default="8,32,64,128", help="concurrency steps ('' = skip)")
    parser.add_argument("--capacity-seconds", type=float, default=20)
    parser.add_argument("--no-netns", action="store_true", help="skip the namespace node")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="macmesh-soak-"))
    lab = Lab(root, netns=not args.no_netns)
    result: dict[str, Any] = {
        "machine": machine_info({"grpcio": "grpcio", "httpx": "httpx"}),
        "lab": {"nodes": sorted(lab.nodes), "netns": lab.ns is not None, "sim": SIM_SPEC},
    }
    try:
        lab.start()
        refs = gguf_references(lab.base)
        result["memory_before_mib"] = lab.memory()
        steps = [int(x) for x in args.capacity.split(",") if x]
        result["capacity"] = capacity(lab, steps, args.capacity_seconds, refs)
        chaos = chaos_phase(lab, args.clients, args.duration, refs)
        time.sleep(3)
        result["chaos"] = {
            "clients": args.clients,
            "seconds": chaos["seconds"],
            "faults": chaos["faults"],
            **summarize(chaos["outcomes"]),
        }
        _wait(lambda: sum(in_flight(lab).values()) == 0, 30, "nothing in flight")
        result["in_flight_after"] = in_flight(lab)
        result["memory_after_mib"] = lab.memory()
    finally:
        lab.stop()
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    bad = (
        result["chaos"]["cut"] + result["chaos"]["mixed"] + sum(result["in_flight_after"].values())
    )
    print(f"soak: {'PASS' if bad == 0 else 'FAIL'} (cut + mixed + in flight = {bad})")
    shutil.rmtree(root, ignore_errors=True)
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
