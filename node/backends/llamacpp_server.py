"""Process supervision for `llama-server` (llama.cpp); its settings: llamacpp_settings.

One `LlamaServer` is one supervised child process serving one GGUF model (and
optionally a draft model). It is started on demand (single-flight: concurrent
first requests share one start), polled until `/health` answers, watched for
crashes, and stopped on unload and node shutdown.

A child must not outlive its node, even after `kill -9` of the node: on Linux
the kernel kills it (`PR_SET_PDEATHSIG`); everywhere, a pid file under
`$MACMESH_HOME/run/` lets the next node start reap a child whose owner died.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import socket
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil

from node.backends.llamacpp_settings import (
    CONFIG_FILE,
    GGUFSettings,
    LlamaServerError,
    find_llama_server,
)

log = logging.getLogger(__name__)

_LOG_MAX_BYTES = 10 * 1024 * 1024
_HEALTH_POLL_S = 0.1
_STOP_GRACE_S = 5.0


def _with_parent_death(cmd: list[str]) -> list[str]:
    """On Linux, `cmd` run so that it gets SIGKILL when the node dies.

    `setpriv --pdeathsig` (util-linux) sets PR_SET_PDEATHSIG and execs the
    command. Not a `preexec_fn`: Python code between fork and exec in a
    process with gRPC's threads can deadlock or crash the child. Without
    setpriv (or off Linux) a server a killed node leaves behind is reaped by
    the next node start (its pid file).
    """
    if not sys.platform.startswith("linux"):
        return cmd
    setpriv = shutil.which("setpriv")
    return [setpriv, "--pdeathsig", "KILL", "--", *cmd] if setpriv else cmd


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _os_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _log_tail(path: Path, lines: int = 8) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 8192))
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.strip().splitlines()[-lines:])


def reap_orphans(run_dir: Path) -> int:
    """Kill llama-servers whose node died without stopping them; returns how many.

    Only a process whose pid, start time and binary all match its pid file
    is touched, so a reused pid is never killed.
    """
    reaped = 0
    for pidfile in run_dir.glob("llama-server-*.json"):
        try:
            rec = json.loads(pidfile.read_text())
            owner, pid = int(rec["owner_pid"]), int(rec["pid"])
        except (OSError, ValueError, KeyError, TypeError):
            pidfile.unlink(missing_ok=True)
            continue
        if _alive(owner, rec.get("owner_started")):
            continue  # another node on this machine (same home) still owns it
        if _alive(pid, rec.get("started")):
            try:
                proc = psutil.Process(pid)
                if Path(proc.exe()).name == Path(rec.get("binary", "")).name:
                    proc.kill()
                    proc.wait(5)
                    reaped += 1
                    log.warning("reaped orphaned llama-server pid %d (%s)", pid, rec.get("model"))
            except (psutil.Error, OSError) as exc:
                log.warning("cannot reap llama-server pid %d: %s", pid, exc)
        pidfile.unlink(missing_ok=True)
    return reaped


def _alive(pid: int, started: object) -> bool:
    try:
        proc = psutil.Process(pid)
        if isinstance(started, int | float) and abs(proc.create_time() - started) > 1.0:
            return False
        return proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@dataclass
class ServerSpec:
    """What one llama-server runs: a model and optionally a draft."""

    model_id: str
    model_path: Path
    draft_id: str = ""
    draft_path: Path | None = None

    @property
    def key(self) -> tuple[str, str]:
        return (self.model_id, self.draft_id)

    @property
    def label(self) -> str:
        return self.model_id + (f" (draft {self.draft_id})" if self.draft_id else "")


@dataclass
class ServerInfo:
    """What a healthy server told us about itself (`/props`)."""

    n_ctx: int
    supports_tools: bool
    supports_thinking: bool
    chat_template: str


@dataclass
class LlamaServer:
    """One supervised llama-server child; see the module docstring."""

    spec: ServerSpec
    home: Path
    on_change: Callable[[], None] = lambda: None
    proc: asyncio.subprocess.Process | None = None
    port: int = 0
    info: ServerInfo | None = None
    client: httpx.AsyncClient | None = None
    started_at: float = 0.0
    load_seconds: float = 0.0
    # Set when the process ended without being asked to.
    crashed: str = ""
    _start: asyncio.Task[None] | None = None
    _watch: asyncio.Task[None] | None = None
    _stopping: bool = False
    _settings: GGUFSettings = field(default_factory=GGUFSettings)

    @property
    def healthy(self) -> bool:
        return self.proc is not None and self.proc.returncode is None and self.info is not None

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def log_path(self) -> Path:
        safe = "".join(c if c.isalnum() or c in "-._" else "_" for c in self.spec.label)
        return self.home / "logs" / f"llama-server-{safe}.log"

    @property
    def pid_path(self) -> Path:
        return self.home / "run" / f"llama-server-{os.getpid()}-{id(self):x}.json"

    def memory_bytes(self) -> int:
        """Resident memory of the server process (weights + KV cache)."""
        if self.proc is None or self.proc.returncode is not None:
            return 0
        try:
            return int(psutil.Process(self.proc.pid).memory_info().rss)
        except psutil.Error:
            return 0

    async def ensure_started(self, settings: GGUFSettings) -> None:
        """Start the server unless it is healthy; concurrent callers share one start."""
        if self.healthy:
            return
        if self._start is None or self._start.done():
            self._settings = settings
            self._start = asyncio.create_task(self._start_once(settings))
        # shield: one caller giving up must not cancel the start the others wait on.
        await asyncio.shield(self._start)

    def _command(self, binary: Path, settings: GGUFSettings, port: int, ctx: int) -> list[str]:
        cmd = [
            str(binary),
            "--model",
            str(self.spec.model_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--jinja",
            "--no-webui",
            "--parallel",
            str(settings.parallel),
            "--log-colors",
            "off",
        ]
        if ctx:
            # llama-server splits --ctx-size across its slots.
            cmd += ["--ctx-size", str(ctx * settings.parallel)]
        if settings.threads:
            cmd += ["--threads", str(settings.threads)]
        if self.spec.draft_path is not None:
            cmd += ["--spec-draft-model", str(self.spec.draft_path), "--spec-type", "draft-simple"]
            if settings.draft_n:
                cmd += ["--spec-draft-n-max", str(settings.draft_n)]
            if settings.draft_p_min is not None:
                cmd += ["--spec-draft-p-min", str(settings.draft_p_min)]
        return cmd + list(settings.default_args)

    def _ports(self, settings: GGUFSettings) -> list[int]:
        if settings.port_range is None:
            return [_os_port() for _ in range(3)]
        lo, hi = settings.port_range
        free = [p for p in range(lo, hi + 1) if _port_free(p)]
        if not free:
            raise LlamaServerError(
                f"no free port in port_range [{lo}, {hi}] of {CONFIG_FILE}: every port is in "
                "use; widen the range or free a port"
            )
        return free[:3]

    async def _start_once(self, settings: GGUFSettings) -> None:
        from node.models.gguf_catalog import context_length_of

        t0 = time.perf_counter()
        binary = find_llama_server(settings.llama_server_path)
        if not self.spec.model_path.is_file():
            raise LlamaServerError(f"GGUF file {self.spec.model_path} is missing")
        if self.spec.draft_path is not None and not self.spec.draft_path.is_file():
            raise LlamaServerError(f"draft GGUF file {self.spec.draft_path} is missing")
        ctx = settings.ctx_size or min(context_length_of(self.spec.model_path) or 4096, 32768)
        await self.stop()
        self.crashed = ""
        last_error = ""
        for port in self._ports(settings):
            error = await self._spawn(binary, settings, port, ctx, t0)
            if error is None:
                self.load_seconds = time.perf_counter() - t0
                log.info(
                    "llama-server for %s up on port %d in %.1fs (pid %d, log %s)",
                    self.spec.label,
                    port,
                    self.load_seconds,
                    self.proc.pid if self.proc else 0,
                    self.log_path,
                )
                self.on_change()
                return
            last_error = error
            died_by_signal = self.proc is not None and (self.proc.returncode or 0) < 0
            if died_by_signal:
                # Seen rarely here: a segfault during start-up that does not recur.
                log.warning("%s; trying once more", error.splitlines()[0])
                continue
            if "bind" not in error and "address already in use" not in error.lower():
                break  # not a port problem: another port will not help
        raise LlamaServerError(last_error)

    async def _spawn(
        self, binary: Path, settings: GGUFSettings, port: int, ctx: int, t0: float
    ) -> str | None:
        """Start on `port` and wait for health; an error message, or None when healthy."""
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        if self.log_path.exists() and self.log_path.stat().st_size > _LOG_MAX_BYTES:
            os.replace(self.log_path, self.log_path.with_suffix(".log.1"))
        cmd = self._command(binary, settings, port, ctx)
        with self.log_path.open("ab") as logf:
            logf.write(f"\n=== {time.strftime('%F %T')} macmesh starts: {' '.join(cmd)}\n".encode())
            logf.flush()
            try:
                self.proc = await asyncio.create_subprocess_exec(
                    *_with_parent_death(cmd),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=logf,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,  # a terminal's Ctrl-C reaches the node, not it
                )
            except OSError as exc:
                raise LlamaServerError(f"cannot run {binary}: {exc}") from None
        self.port = port
        self._stopping = False
        self._write_pidfile(binary)
        # No keep-alive: llama-server (cpp-httplib) closes idle connections on its own
        # schedule, and a reused one that it just closed fails the request. A fresh
        # loopback connection costs well under a millisecond.
        self.client = httpx.AsyncClient(
            base_url=self.base_url,
            timeout=httpx.Timeout(None, connect=5.0),
            limits=httpx.Limits(max_keepalive_connections=0, max_connections=256),
        )
        deadline = t0 + settings.startup_timeout
        while True:
            if self.proc.returncode is not None:
                tail = _log_tail(self.log_path)
                await self._discard()
                return (
                    f"llama-server for {self.spec.label} exited with code "
                    f"{self.proc.returncode if self.proc else '?'} while starting; "
                    f"log {self.log_path}:\n{tail}"
                )
            with contextlib.suppress(httpx.HTTPError):
                r = await self.client.get("/health", timeout=2.0)
                if r.status_code == 200:
                    break
            if time.perf_counter() >= deadline:
                await self.stop()
                return (
                    f"llama-server for {self.spec.label} did not become healthy within "
                    f"{settings.startup_timeout:.0f}s (log {self.log_path}); a large model may "
                    f"need a higher `startup_timeout` in {CONFIG_FILE}"
                )
            await asyncio.sleep(_HEALTH_POLL_S)
        self.info = await self._props()
        self.started_at = time.time()
        self._watch = asyncio.create_task(self._watch_exit(self.proc))
        return None

    async def _props(self) -> ServerInfo:
        assert self.client is not None
        r = await self.client.get("/props", timeout=10.0)
        r.raise_for_status()
        props = r.json()
        caps = props.get("chat_template_caps") or {}
        template = str(props.get("chat_template") or "")
        return ServerInfo(
            n_ctx=int((props.get("default_generation_settings") or {}).get("n_ctx") or 0),
            supports_tools=bool(caps.get("supports_tools") or caps.get("supports_tool_calls")),
            supports_thinking="enable_thinking" in template or "<think>" in template,
            chat_template=template,
        )

    def _write_pidfile(self, binary: Path) -> None:
        assert self.proc is not None
        try:
            started = psutil.Process(self.proc.pid).create_time()
            owner_started = psutil.Process(os.getpid()).create_time()
        except psutil.Error:
            return
        self.pid_path.parent.mkdir(parents=True, exist_ok=True)
        self.pid_path.write_text(
            json.dumps(
                {
                    "pid": self.proc.pid,
                    "started": started,
                    "owner_pid": os.getpid(),
                    "owner_started": owner_started,
                    "binary": str(binary),
                    "model": self.spec.label,
                    "port": self.port,
                }
            )
        )

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        code = await proc.wait()
        if self._stopping or proc is not self.proc:
            return
        how = f"signal {-code}" if code < 0 else f"exit code {code}"
        self.crashed = f"llama-server for {self.spec.label} died ({how})"
        log.error("%s; log %s:\n%s", self.crashed, self.log_path, _log_tail(self.log_path))
        self.info = None
        self.pid_path.unlink(missing_ok=True)
        self.on_change()
        # Restart now, so the next request finds it warm; a failure waits for that request.
        with contextlib.suppress(LlamaServerError):
            await self.ensure_started(self._settings)

    async def _discard(self) -> None:
        if self.client is not None:
            await self.client.aclose()
            self.client = None
        self.info = None
        self.pid_path.unlink(missing_ok=True)

    async def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after a grace period)."""
        proc, self.proc = self.proc, None
        self._stopping = True
        if self._watch is not None and self._watch is not asyncio.current_task():
            self._watch.cancel()
        self._watch = None
        await self._discard()
        if proc is None or proc.returncode is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        try:
            await asyncio.wait_for(proc.wait(), _STOP_GRACE_S)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
        self.on_change()
