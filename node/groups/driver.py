"""A node agent's side of a node group: check, start, watch and drive its rank process.

Each member's agent calls `check_member` (bad input fails here, before anything
starts), then `RankProcess.start` with the shared host list. Rank 0's agent
awaits `ready()` and streams generations with `generate()`; every agent watches
its own rank. A rank that exits (its member died, a peer was lost, the agent
shut it down) marks the process down at once: a running generation ends with
`Unavailable`, later ones are refused until the group is formed again.
Collectives have no timeout of their own, so the driver keeps one per decode
step (`step_timeout`): a rank silent that long is killed, which brings the
ring, and so every member, down with it.

The ring backend (MLX) does no authentication: its ports must be reachable by
the group's members only (docs/groups.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import sys
import tempfile
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mesh.errors import InvalidRequest, ModelLoadError, Unavailable

log = logging.getLogger(__name__)

STRATEGIES = ("tensor", "pipeline")


def strategies(config: dict[str, Any]) -> frozenset[str]:
    """How the installed mlx-lm can split this architecture: "tensor" (the model has
    `shard()`: every layer's heads and MLP columns split) and "pipeline" (its inner
    model is a `PipelineMixin`: consecutive layers per rank)."""
    import inspect

    from mlx_lm.models.pipeline import PipelineMixin
    from mlx_lm.utils import _get_classes

    try:
        model_class, _ = _get_classes(config)
    except ValueError:  # an architecture mlx-lm does not know
        return frozenset()
    out = {"tensor"} if hasattr(model_class, "shard") else set()
    module = sys.modules[model_class.__module__]
    if any(
        inspect.isclass(c) and issubclass(c, PipelineMixin) and c is not PipelineMixin
        for c in vars(module).values()
    ):
        out.add("pipeline")
    return frozenset(out)


@dataclass(frozen=True, slots=True)
class GroupSpec:
    """A group as its members see it: a model, its ranks' `ip:port` in rank order."""

    name: str
    model_dir: Path
    hosts: tuple[str, ...]
    strategy: str = "tensor"
    backend: str = "ring"
    # Rank 0's control port (ip:port, liveness of every member) and the token a
    # member shows there; default: rank 0's ip, its ring port + 1000.
    control: str = ""
    token: str = ""

    @property
    def control_address(self) -> str:
        if self.control:
            return self.control
        ip, _, port = self.hosts[0].rpartition(":")
        return f"{ip}:{int(port) + 1000}" if port.isdigit() else ""

    @property
    def size(self) -> int:
        return len(self.hosts)


def check_member(spec: GroupSpec) -> dict[str, Any]:
    """The model's config, after the checks a member makes before starting its rank.

    InvalidRequest: an unsupported strategy or backend, an architecture that cannot
    be sharded this way, a size the model's heads do not divide; ModelLoadError: the
    model's files are not on this member.
    """
    if spec.strategy not in STRATEGIES:
        raise InvalidRequest(
            f"group strategy {spec.strategy!r} is not one of {', '.join(STRATEGIES)}"
        )
    if spec.backend != "ring":
        raise InvalidRequest(f"group backend {spec.backend!r} is not built; use 'ring'")
    if spec.size < 2:
        raise InvalidRequest(f"a group needs at least 2 members, got {spec.size}")
    for host in spec.hosts:
        _check_address(host)
    _check_address(spec.control_address)
    config_path = spec.model_dir / "config.json"
    if not config_path.is_file() or not any(spec.model_dir.glob("*.safetensors")):
        raise ModelLoadError(f"group {spec.name!r}: no model files in {spec.model_dir}")
    config: dict[str, Any] = json.loads(config_path.read_text())
    arch = str(config.get("model_type", "")) or "this"
    can = strategies(config)
    if spec.strategy not in can:
        raise InvalidRequest(
            f"group {spec.name!r}: mlx-lm cannot split {arch} models with {spec.strategy} "
            f"parallelism"
            + (f" (it can with: {', '.join(sorted(can))})" if can else " (nor any other way)")
        )
    if spec.strategy == "pipeline":
        layers = int(config.get("num_hidden_layers", 0))
        if layers < spec.size:
            raise InvalidRequest(
                f"group {spec.name!r}: {spec.size} members need at least as many layers; "
                f"the model has {layers}"
            )
        return config
    heads = int(config.get("num_attention_heads", 0))
    kv_heads = int(config.get("num_key_value_heads", heads))
    if not heads or heads % spec.size or kv_heads % spec.size:
        raise InvalidRequest(
            f"group {spec.name!r}: {spec.size} members do not divide the model's "
            f"{heads} attention heads and {kv_heads} KV heads"
        )
    return config


def _check_address(host: str) -> None:
    if not host:
        raise InvalidRequest("group hosts must be ip:port")
    ip, _, port = host.rpartition(":")
    if not ip or not port.isdigit():
        raise InvalidRequest(f"group host {host!r} is not ip:port")


class RankProcess:
    """This agent's rank of a group, as a child process."""

    def __init__(
        self,
        spec: GroupSpec,
        rank: int,
        *,
        step_timeout: float = 60.0,
        on_down: Callable[[str], None] | None = None,
    ) -> None:
        """`on_down(reason)`: called once, on the event loop, when the rank goes down."""
        if not 0 <= rank < spec.size:
            raise InvalidRequest(f"rank {rank} is outside a group of {spec.size}")
        self.spec = spec
        self.rank = rank
        self.step_timeout = step_timeout
        self._on_down = on_down
        self.down_reason = ""
        self.memory_bytes = 0
        self._proc: asyncio.subprocess.Process | None = None
        self._watch: asyncio.Task[None] | None = None
        self._stderr: list[str] = []
        self._lock = asyncio.Lock()
        self._dir = tempfile.TemporaryDirectory(prefix=f"macmesh-group-{spec.name}-")

    @property
    def up(self) -> bool:
        return self._proc is not None and self._proc.returncode is None and not self.down_reason

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    async def start(self) -> None:
        """Check the member, then start the rank (it forms the ring with its peers)."""
        await asyncio.to_thread(check_member, self.spec)
        hostfile = Path(self._dir.name) / "hosts.json"
        hostfile.write_text(json.dumps([[h] for h in self.spec.hosts]))
        env = dict(
            os.environ,
            MLX_RANK=str(self.rank),
            MLX_HOSTFILE=str(hostfile),
            MACMESH_GROUP_CONTROL=self.spec.control_address,
            MACMESH_GROUP_STRATEGY=self.spec.strategy,
            MACMESH_GROUP_TOKEN=self.spec.token,
        )
        self._proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "node.groups",
            "--model",
            str(self.spec.model_dir),
            env=env,
            # Every rank holds its agent's pipe: EOF (the agent died) takes it down.
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE if self.rank == 0 else asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._watch = asyncio.create_task(self._watch_exit(self._proc))
        log.info("group %s: rank %d started (pid %d)", self.spec.name, self.rank, self._proc.pid)

    async def _watch_exit(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stderr is not None
        async for raw in proc.stderr:
            self._stderr = [*self._stderr[-19:], raw.decode(errors="replace").rstrip()]
        code = await proc.wait()
        if not self.down_reason:
            tail = next((line for line in reversed(self._stderr) if line), "")
            self._down(f"rank {self.rank} exited with status {code}: {tail}".rstrip(": "))

    def _down(self, reason: str) -> None:
        """The first reason the rank is down is the one reported."""
        if self.down_reason:
            return
        self.down_reason = reason
        if reason != "stopped":
            log.warning("group %s is down: %s", self.spec.name, reason)
        if self._on_down is not None:
            self._on_down(reason)

    def _check_up(self) -> None:
        if not self.up:
            raise Unavailable(f"group {self.spec.name!r} is down: {self.down_reason or 'stopped'}")

    async def _read(self, timeout: float) -> dict[str, Any]:
        """Rank 0's next event; Unavailable (and the rank killed) on EOF, error or silence."""
        assert self._proc is not None and self._proc.stdout is not None
        try:
            line = await asyncio.wait_for(self._proc.stdout.readline(), timeout)
        except TimeoutError:
            self._kill(f"rank 0 silent for {timeout:.0f}s (a member hung or is unreachable)")
            raise Unavailable(f"group {self.spec.name!r} is down: {self.down_reason}") from None
        if not line:
            if self._watch is not None:  # the exit status and stderr tell why
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(asyncio.shield(self._watch), 5)
            self._down("rank 0 exited")
            raise Unavailable(f"group {self.spec.name!r} is down: {self.down_reason}")
        event: dict[str, Any] = json.loads(line)
        if "error" in event:
            self._down(f"rank 0: {event['error']}")
            raise Unavailable(f"group {self.spec.name!r} is down: {self.down_reason}")
        return event

    async def ready(self, timeout: float = 300.0) -> dict[str, Any]:
        """Rank 0: wait until every rank has loaded its shard (`timeout`: formation)."""
        if self.rank != 0:
            raise InvalidRequest("only rank 0 reports readiness")
        self._check_up()
        event = await self._read(timeout)
        self.memory_bytes = int(event.get("memory_bytes", 0))
        return event

    async def generate(
        self,
        tokens: Sequence[int],
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        seed: int = 0,
        top_p: float = 1.0,
        min_p: float = 0.0,
        top_k: int = 0,
        repetition_penalty: float = 1.0,
    ) -> AsyncGenerator[dict[str, Any], None]:
        """Rank 0: stream {"token", "text"} events, then the {"done"} one.

        One generation at a time (every rank runs it); a consumer that stops early
        cancels it on all ranks at the next step.
        """
        if self.rank != 0:
            raise InvalidRequest("only rank 0 generates")
        async with self._lock:
            self._check_up()
            self._send(
                {
                    "op": "generate",
                    "tokens": list(tokens),
                    "max_tokens": max_tokens,
                    "temperature": temperature,
                    "seed": seed,
                    "top_p": top_p,
                    "min_p": min_p,
                    "top_k": top_k,
                    "repetition_penalty": repetition_penalty,
                }
            )
            finished = False
            try:
                while True:
                    event = await self._read(self.step_timeout)
                    finished = "done" in event  # before the yield: the consumer may stop here
                    yield event
                    if finished:
                        return
            finally:
                if not finished and self.up:
                    self._send({"op": "cancel"})
                    while self.up:  # drain to the done event: the ranks are in step again
                        if "done" in await self._read(self.step_timeout):
                            break

    def _send(self, cmd: dict[str, Any]) -> None:
        assert self._proc is not None and self._proc.stdin is not None
        try:
            self._proc.stdin.write((json.dumps(cmd) + "\n").encode())
        except (BrokenPipeError, ConnectionResetError):
            self._down("rank 0 exited")
            raise Unavailable(f"group {self.spec.name!r} is down: {self.down_reason}") from None

    def _kill(self, reason: str) -> None:
        self._down(reason)
        if self._proc is not None and self._proc.returncode is None:
            self._proc.kill()

    async def stop(self, grace: float = 5.0) -> None:
        """Shut the rank down (rank 0: the whole group, cleanly); kill it after `grace`."""
        proc = self._proc
        if proc is None:
            return
        self._down("stopped")  # an exit now is no failure
        if proc.returncode is None:
            if self.rank == 0 and proc.stdin is not None:
                with contextlib.suppress(Unavailable):
                    self._send({"op": "shutdown"})
                    proc.stdin.close()
            else:
                proc.terminate()
            try:
                await asyncio.wait_for(proc.wait(), grace)
            except TimeoutError:
                proc.kill()
                await proc.wait()
        if self._watch is not None:
            await self._watch
        self._dir.cleanup()
