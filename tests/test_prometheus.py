"""A real Prometheus scrapes a live mesh through the coordinator's discovery, and every
query of the shipped Grafana dashboard returns data.

Prometheus comes from the system (`prometheus` + `promtool` on PATH); where it is
missing, scripts/ensure_prometheus.sh installs the Debian package (root + apt-get).
Only where that is impossible is the test skipped, with the script's reason.
"""

from __future__ import annotations

import json
import math
import re
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import openai
import pytest

from coordinator.config import CoordinatorConfig
from node.config import NodeConfig, SimModelSpec
from tests.conftest import RunningCoordinator, RunningNode, start_coordinator, start_node

ROOT = Path(__file__).resolve().parent.parent
PROMETHEUS_YML = ROOT / "deploy" / "prometheus" / "prometheus.yml"
DASHBOARD = ROOT / "deploy" / "grafana" / "dashboards" / "macmesh.json"
ENSURE = ROOT / "scripts" / "ensure_prometheus.sh"
MODEL = "sim-a"
pytestmark = pytest.mark.prometheus
# Grafana's variables, as "All" and a short dashboard range would expand them.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__range": "10m",
    "$__interval": "1s",
    "$node": ".*",
    "$model": ".*",
}


@pytest.fixture(scope="module")
def prometheus_bin() -> tuple[str, str]:
    """`prometheus` and `promtool`, installed by the helper script when missing."""
    done = subprocess.run(["bash", str(ENSURE)], capture_output=True, text=True, timeout=600)
    prometheus, promtool = shutil.which("prometheus"), shutil.which("promtool")
    if done.returncode != 0 or prometheus is None or promtool is None:
        pytest.skip(f"Prometheus is not available and cannot be installed: {done.stderr.strip()}")
    return prometheus, promtool


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(check: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.1)


def test_promtool_accepts_the_shipped_config(prometheus_bin: tuple[str, str]) -> None:
    _, promtool = prometheus_bin
    done = subprocess.run(
        [promtool, "check", "config", str(PROMETHEUS_YML)], capture_output=True, text=True
    )
    assert done.returncode == 0, done.stdout + done.stderr


def prometheus_config(sd_url: str) -> str:
    """The shipped config, pointed at `sd_url`, scraping and discovering every second."""
    text = PROMETHEUS_YML.read_text()
    subs = [
        (r"(url:\s*)\S+/api/prometheus/targets", rf"\g<1>{sd_url}"),
        (r"(scrape_interval:\s*)\S+", r"\g<1>1s"),
        (r"(evaluation_interval:\s*)\S+", r"\g<1>1s"),
        (r"(refresh_interval:\s*)\S+", r"\g<1>1s"),
    ]
    for pattern, repl in subs:
        text, n = re.subn(pattern, repl, text)
        assert n, f"{PROMETHEUS_YML} has no {pattern!r} to point at the test mesh"
    return text


class Prometheus:
    """A prometheus process on a free port with its own storage."""

    def __init__(self, binary: str, config: Path, data: Path) -> None:
        self.url = f"http://127.0.0.1:{free_port()}"
        self.proc = subprocess.Popen(
            [
                binary,
                f"--config.file={config}",
                f"--storage.tsdb.path={data}",
                f"--web.listen-address={self.url.removeprefix('http://')}",
                "--log.level=warn",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )

    def ready(self) -> bool:
        if self.proc.poll() is not None:
            assert self.proc.stderr is not None
            raise AssertionError(f"prometheus exited: {self.proc.stderr.read()}")
        try:
            return httpx.get(self.url + "/-/ready", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    def api(self, path: str, **params: str) -> Any:
        r = httpx.get(f"{self.url}/api/v1/{path}", params=params, timeout=10)
        body = r.json()
        assert r.status_code == 200 and body["status"] == "success", (path, params, body)
        return body["data"]

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def sim_node(home: Path) -> RunningNode:
    return start_node(
        NodeConfig(
            grpc_port=0,
            metrics_port=0,
            home=home,
            models_dir=home / "models",
            scan_hf_cache=False,
            sim_models=(SimModelSpec(MODEL, 50_000, 500, 8192),),
        )
    )


@pytest.fixture
def mesh(tmp_path: Path) -> Iterator[tuple[list[RunningNode], RunningCoordinator]]:
    """Two simulated nodes serving the same model, a coordinator with aliases and tiers."""
    nodes = [sim_node(tmp_path / "n1"), sim_node(tmp_path / "n2")]
    home = tmp_path / "coord"
    home.mkdir()
    (home / "model_aliases.json").write_text(json.dumps({"fast": MODEL, "gpt-*": MODEL}))
    routing = {"tiers": {"haiku": {"model": MODEL}, "sonnet": {"model": MODEL}}}
    (home / "claude_routing.json").write_text(json.dumps(routing))
    coord = start_coordinator(
        CoordinatorConfig(home=home, peers=tuple(n.target for n in nodes)), wait_nodes=2
    )
    try:
        yield nodes, coord
    finally:
        coord.stop()
        for n in nodes:
            n.stop()


def traffic(url: str) -> None:
    """What the dashboard shows: both APIs, alias / wildcard / tier names, streams, a shared
    long prefix (prefix-cache hits), an unknown model (404) and a client that goes away."""
    oai = openai.OpenAI(base_url=url + "/v1", api_key="test", max_retries=0)
    ant = anthropic.Anthropic(base_url=url, api_key="test", max_retries=0)
    system = "You are a careful assistant for the lab. " * 40  # ~1600 tokens, shared
    for question in ("first question", "second question"):
        oai.chat.completions.create(
            model=MODEL,
            max_tokens=8,
            messages=[{"role": "system", "content": system}, {"role": "user", "content": question}],
        )
    for chunk in oai.chat.completions.create(
        model="fast", max_tokens=8, stream=True, messages=[{"role": "user", "content": "hi"}]
    ):
        del chunk
    oai.completions.create(model="gpt-4o", prompt="Once upon a time", max_tokens=8)
    ant.messages.create(
        model="claude-3-5-haiku-latest",
        max_tokens=8,
        messages=[{"role": "user", "content": "hello"}],
    )
    with ant.messages.stream(
        model="claude-sonnet-lab", max_tokens=8, messages=[{"role": "user", "content": "hey"}]
    ) as stream:
        stream.until_done()
    with pytest.raises(openai.NotFoundError):
        oai.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
    gone = oai.chat.completions.create(
        model=MODEL, max_tokens=2000, stream=True, messages=[{"role": "user", "content": "bye"}]
    )
    next(iter(gone))
    gone.close()


def expressions(dashboard: dict[str, Any]) -> list[tuple[str, str]]:
    """(panel title, PromQL) for every query of every panel, rows included."""
    out: list[tuple[str, str]] = []
    for panel in dashboard["panels"]:
        for inner in [panel, *panel.get("panels", [])]:
            out.extend((inner["title"], t["expr"]) for t in inner.get("targets", []))
    return out


def expand(expr: str) -> str:
    for name, value in sorted(GRAFANA_VARS.items(), key=lambda kv: -len(kv[0])):
        expr = expr.replace("${" + name[1:] + "}", value).replace(name, value)
    assert "$" not in expr, f"unexpanded Grafana variable in {expr}"
    return expr


def test_every_dashboard_query_returns_data(
    prometheus_bin: tuple[str, str],
    mesh: tuple[list[RunningNode], RunningCoordinator],
    tmp_path: Path,
) -> None:
    nodes, coord = mesh
    config = tmp_path / "prometheus.yml"
    config.write_text(prometheus_config(coord.base_url + "/api/prometheus/targets"))
    prom = Prometheus(prometheus_bin[0], config, tmp_path / "tsdb")
    try:
        wait_for(prom.ready, 30, "prometheus to be ready")

        def all_up() -> bool:
            active = prom.api("targets", state="active")["activeTargets"]
            return len(active) == 3 and all(t["health"] == "up" for t in active)

        wait_for(all_up, 30, "Prometheus to find and scrape both nodes and the coordinator")
        active = prom.api("targets", state="active")["activeTargets"]
        roles = sorted((t["labels"]["role"], t["labels"].get("node", "")) for t in active)
        node_ids = sorted(n.server.core.node_id for n in nodes if n.server.core)
        assert roles == [("coordinator", ""), *(("node", i) for i in node_ids)]

        # Two waves a few scrapes apart: rate() needs a series to move between samples.
        traffic(coord.base_url)
        time.sleep(2.5)
        traffic(coord.base_url)
        time.sleep(2.5)

        dashboard = json.loads(DASHBOARD.read_text())
        queries = expressions(dashboard)
        assert len(queries) >= 20
        empty = []
        for title, expr in queries:
            result = prom.api("query", query=expand(expr))["result"]
            values = [float(r["value"][1]) for r in result]
            if not any(math.isfinite(v) for v in values):
                empty.append(f"{title}: {expr} -> {result}")
        assert not empty, "dashboard queries without data:\n" + "\n".join(empty)

        # The template variables list real values.
        for var in dashboard["templating"]["list"]:
            if var["type"] != "query":
                continue
            match = re.fullmatch(r"label_values\((.+), (\w+)\)", var["definition"])
            assert match, var["definition"]
            series = prom.api("series", **{"match[]": expand(match.group(1))})
            assert {s[match.group(2)] for s in series}, var["name"]

        # Routing reasons and requests by tier and alias are what the traffic did.
        by = prom.api("query", query="sum by (tier) (macmesh_requests_total)")["result"]
        assert {r["metric"]["tier"] for r in by} >= {"haiku", "sonnet", "none"}
        by = prom.api("query", query="sum by (alias) (macmesh_requests_total)")["result"]
        assert {r["metric"]["alias"] for r in by} >= {"fast", "gpt-*", MODEL, "other"}
        hits = prom.api("query", query="sum(macmesh_prefix_cache_hits_total)")["result"]
        assert float(hits[0]["value"][1]) > 0
    finally:
        prom.stop()
