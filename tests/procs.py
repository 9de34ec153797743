"""Real `macmesh` processes for tests, on the benchmarks' harness (macmesh.bench.procs).

Processes run as launchd (or a terminal) runs them: `macmesh node` /
`macmesh coordinator` with their own `MACMESH_HOME`, stderr to a log file. An
optional `prefix` (e.g. `nsenter -t PID -n`) runs them in another namespace.
"""

from __future__ import annotations

import contextlib
import socket
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from macmesh.bench.procs import ManagedProcess

MACMESH = str(Path(sys.executable).parent / "macmesh")


def free_port() -> int:
    """A port free on 127.0.0.1 now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One spawned process and its log."""

    process: ManagedProcess

    @property
    def name(self) -> str:
        return self.process.name

    @property
    def log(self) -> Path:
        return self.process.log_path

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        proc = self.process.proc
        return proc is not None and proc.poll() is None

    def returncode(self) -> int | None:
        proc = self.process.proc
        return None if proc is None else proc.poll()


@dataclass
class Procs:
    """Every process a test started; `stop_all` ends them (SIGTERM, then SIGKILL)."""

    logs: Path
    prefix: Sequence[str] = ()
    started: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str]) -> Proc:
        """Start `args` (the program first) with `env`, which names its MACMESH_HOME."""
        process = ManagedProcess(
            name,
            args[1:],
            home=Path(env["MACMESH_HOME"]),
            log_path=self.logs / f"{name}.log",
            ready="macmesh ",
            exe=[*self.prefix, args[0]],
            env=env,
        )
        process.start()
        proc = Proc(process)
        self.started.append(proc)
        return proc

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            proc.process.stop()


def wait_until(
    check: Callable[[], bool], timeout: float, what: str, procs: Sequence[Proc] = ()
) -> float:
    """Poll `check` until true; seconds it took. Fails with the logs of `procs`."""
    t0 = time.monotonic()
    while True:
        with contextlib.suppress(OSError, ValueError, KeyError, httpx.TransportError):
            if check():
                return time.monotonic() - t0
        for p in procs:
            if not p.alive():
                raise AssertionError(f"{p.name} exited ({p.returncode()}):\n{p.text()[-4000:]}")
        if time.monotonic() - t0 > timeout:
            logs = "\n".join(f"--- {p.name}\n{p.text()[-3000:]}" for p in procs)
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{logs}")
        time.sleep(0.1)


@dataclass
class Lab:
    """Plain `macmesh node` processes (ids node-0, node-1, ...) and a separate
    `macmesh coordinator` peering with them, as a lab deploys them."""

    procs: Procs
    nodes: list[Proc]
    coordinator: Proc
    base: str

    @property
    def everyone(self) -> list[Proc]:
        return [*self.nodes, self.coordinator]


def start_lab(root: Path, n: int, prepare: Callable[[int, Path], object]) -> Lab:
    """`n` nodes, each home filled by `prepare(i, home)` (its `models/` exists), and the
    coordinator; returns once it sees all `n` online. The caller stops `lab.procs`."""
    procs = Procs(root)
    ports = [free_port() for _ in range(n + 1)]
    nodes: list[Proc] = []
    try:
        for i, port in enumerate(ports[:n]):
            home = root / f"home{i}"
            (home / "models").mkdir(parents=True)
            (home / "node_id").write_text(f"node-{i}\n")
            prepare(i, home)
            nodes.append(
                procs.spawn(
                    f"node{i}",
                    [MACMESH, "node", "--grpc-port", str(port), "--metrics-port", "-1"],
                    {"MACMESH_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_HOME": str(root)},
                )
            )
        (root / "coord").mkdir()
        peers = [a for p in ports[:n] for a in ("--peer", f"127.0.0.1:{p}")]
        coord = procs.spawn(
            "coordinator",
            [MACMESH, "coordinator", "--port", str(ports[n]), "--no-bonjour", *peers],
            {"MACMESH_HOME": str(root / "coord"), "HF_HUB_OFFLINE": "1"},
        )
        base = f"http://127.0.0.1:{ports[n]}"
        wait_until(
            lambda: httpx.get(f"{base}/health").json()["nodes_online"] == n,
            240,
            f"{n} nodes online",
            [*nodes, coord],
        )
    except BaseException:
        procs.stop_all()
        raise
    return Lab(procs, nodes, coord, base)
