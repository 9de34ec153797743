"""The `macmesh` child processes the benchmarks start, and the default model they use.

Shared by the scripts in bench/ (`from macmesh.bench.procs import ...`) and the
package's own benchmarks.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import IO, Any

from node.models.default import DEFAULT_MODEL_ID

__all__ = [
    "DEFAULT_MODEL_ID",
    "START_TIMEOUT_S",
    "STOP_TIMEOUT_S",
    "ManagedProcess",
    "ProcessError",
    "exit_on_sigterm",
    "machine_info",
    "macmesh_exe",
    "prepare_default_model",
]

START_TIMEOUT_S = 300.0
STOP_TIMEOUT_S = 20.0


class ProcessError(RuntimeError):
    """A child that did not start, or a default model that was not prepared."""


def macmesh_exe() -> Path:
    """The `macmesh` console script of the running venv."""
    return Path(sys.executable).parent / "macmesh"


class ManagedProcess:
    """A `macmesh` child with its own MACMESH_HOME and log; always stopped by `stop()`.

    stdout is read line by line (a thread fills a queue) to find the line that
    starts with `ready`; stderr goes to `log_path`. `label` names the process
    in error messages; `tail_on_exit` adds the log tail to the error when it
    exits during start-up; `unset` names variables of this environment the
    child must not inherit.
    """

    def __init__(
        self,
        name: str,
        args: Sequence[str],
        *,
        home: Path,
        log_path: Path,
        ready: str,
        exe: Sequence[str] = (),
        label: str = "",
        tail_on_exit: bool = True,
        env: Mapping[str, str] | None = None,
        unset: Sequence[str] = (),
    ) -> None:
        self.name = name
        self.args = list(args)
        self.exe = list(exe) or [str(macmesh_exe())]
        self.home = home
        self.log_path = log_path
        self.ready = ready
        self.label = label or name
        self.tail_on_exit = tail_on_exit
        self.env = dict(env or {})
        self.unset = tuple(unset)
        self.proc: subprocess.Popen[str] | None = None
        self._lines: queue.Queue[str | None] = queue.Queue()
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self.home.mkdir(parents=True, exist_ok=True)
        env = {
            **os.environ,
            **self.env,
            "MACMESH_HOME": str(self.home),
            "PYTHONUNBUFFERED": "1",
        }
        for name in self.unset:
            env.pop(name, None)
        self._log = self.log_path.open("wb")
        self.proc = subprocess.Popen(
            [*self.exe, *self.args], stdout=subprocess.PIPE, stderr=self._log, env=env, text=True
        )
        threading.Thread(target=self._pump, daemon=True, name=f"{self.name}-stdout").start()

    def _pump(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        for line in self.proc.stdout:
            self._lines.put(line)
        self._lines.put(None)

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        """What follows the `ready` prefix (an address or a URL)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise ProcessError(
                    f"{self.label} did not start in {timeout:g}s; see {self.log_path}"
                )
            try:
                line = self._lines.get(timeout=left)
            except queue.Empty:
                continue
            if line is None:
                tail = f":\n{self.log_tail()}" if self.tail_on_exit else ""
                raise ProcessError(f"{self.label} exited during start-up{tail}")
            if line.startswith(self.ready):
                return line[len(self.ready) :].strip()

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM, then SIGKILL after a timeout."""
        proc = self.proc
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if self._log is not None:
            self._log.close()
            self._log = None


def prepare_default_model(models_dir: Path) -> Path:
    """Import the embedded default model with the `macmesh` CLI of this venv."""
    subprocess.run(
        [str(macmesh_exe()), "models", "prepare-default", "--models-dir", str(models_dir)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    path = models_dir / DEFAULT_MODEL_ID
    if not (path / "config.json").is_file():
        raise ProcessError(f"prepare-default did not produce {path}")
    return path


def machine_info(packages: Mapping[str, str]) -> dict[str, Any]:
    """Platform facts plus installed versions: `packages` maps JSON key -> distribution."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return ""

    info: dict[str, Any] = {
        "platform": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        **{key: version(dist) for key, dist in packages.items()},
    }
    try:
        import mlx.core as mx

        info["mlx_default_device"] = str(mx.default_device())
    except ImportError:
        info["mlx_default_device"] = ""
    return info


def exit_on_sigterm(signum: int, _frame: object) -> None:
    """SIGTERM handler: unwind through the `finally` that stops the children
    (the default action would not)."""
    raise SystemExit(128 + signum)
