"""Real `macmesh` processes for tests: spawn, wait until they answer, stop the whole group.

Processes run as launchd (or a terminal) runs them: `macmesh node` /
`macmesh coordinator` with their own `MACMESH_HOME`, logs to a file. An
optional `prefix` (e.g. `nsenter -t PID -n`) runs them in another namespace.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

MACMESH = str(Path(sys.executable).parent / "macmesh")


def free_port() -> int:
    """A port free on 127.0.0.1 now (the caller binds it soon after)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    """One spawned process group and its log."""

    popen: subprocess.Popen[bytes]
    log: Path
    name: str

    def text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def alive(self) -> bool:
        return self.popen.poll() is None


@dataclass
class Procs:
    """Every process a test started; `stop_all` ends them (and their children)."""

    logs: Path
    prefix: Sequence[str] = ()
    started: list[Proc] = field(default_factory=list)

    def spawn(self, name: str, args: Sequence[str], env: dict[str, str]) -> Proc:
        log = self.logs / f"{name}.log"
        out = log.open("ab")
        popen = subprocess.Popen(
            [*self.prefix, *args],
            env={**os.environ, "PYTHONUNBUFFERED": "1", **env},
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        out.close()
        proc = Proc(popen, log, name)
        self.started.append(proc)
        return proc

    def stop(self, proc: Proc, timeout: float = 20) -> None:
        """SIGTERM to the group (a node drains and stops its llama-servers), then SIGKILL."""
        if proc.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.popen.pid, signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.popen.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.popen.wait(5)

    def stop_all(self) -> None:
        for proc in reversed(self.started):
            self.stop(proc)


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
                raise AssertionError(f"{p.name} exited ({p.popen.returncode}):\n{p.text()[-4000:]}")
        if time.monotonic() - t0 > timeout:
            logs = "\n".join(f"--- {p.name}\n{p.text()[-3000:]}" for p in procs)
            raise AssertionError(f"{what}: not within {timeout:.0f}s\n{logs}")
        time.sleep(0.1)
