"""Node groups in the node agent: this node's ranks, and rank 0's group model as a backend.

A coordinator forms a group by asking every member's agent to `check` its rank
(files, architecture, heads, memory; a port reserved) and then to `start` it
with the shared host list (node.groups.driver starts the rank process). Rank 0's
node then serves the group as a model named after the group, over the usual
Backend contract: rendering with the model's tokenizer, one generation at a
time streamed from the rank process, parsed like MLX output (stop strings,
think blocks, tool calls). Every rank is reported in `NodeState.groups`
(forming, up, down with the reason) so coordinators list groups, refuse a down
one with its reason, and count each member's share in placement.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import time
from collections.abc import AsyncGenerator
from dataclasses import dataclass, field
from typing import Any

from mesh.errors import InvalidRequest, ModelLoadError, ModelNotFound, Unavailable, from_code
from mesh.types import (
    CachedPrefix,
    ChatPrompt,
    ErrorEvent,
    Finish,
    FinishReason,
    GenerateEvent,
    GenerateRequest,
    GroupRank,
    ModelInfo,
    ModelLoad,
    RenderedPrompt,
    Started,
    Usage,
)
from node.backends.base import BackendContext
from node.backends.chat_template import template_supports_tools
from node.backends.common import check_prompt, request_id, room
from node.backends.mlx_prompt import parser_config, prompt_ids, render_chat
from node.backends.outparse import OutputParser
from node.backends.stats import Admission, ModelStats
from node.groups.driver import GroupSpec, RankProcess, check_member
from node.models.catalog import Catalog
from node.models.entry import CatalogEntry
from node.sampling import resolve_sampling

log = logging.getLogger(__name__)

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
# How long rank 0 waits for the whole group to form and load.
FORM_TIMEOUT = 600.0
# Waiting generations per group beyond this are refused (a group runs one at a time).
MAX_WAITING = 64


@dataclass(frozen=True, slots=True)
class RankCheck:
    """A member's answer to a check: its reserved ring address, and what its rank needs."""

    host: str
    control: str
    memory_bytes: int
    architecture: str
    context_length: int


@dataclass(eq=False)
class _Rank:
    """This node's rank of one group."""

    spec: GroupSpec
    model: str
    rank: int
    members: tuple[str, ...]
    entry: CatalogEntry
    proc: RankProcess
    estimate: int
    state: str = "forming"
    detail: str = ""
    started_at: float = field(default_factory=time.time)
    # Rank 0 only, once formed: what rendering and parsing need.
    tokenizer: Any = None
    native_tools: bool = False
    context_length: int = 0
    stats: ModelStats = field(default_factory=ModelStats)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)

    def report(self) -> GroupRank:
        return GroupRank(
            name=self.spec.name,
            model=self.model,
            rank=self.rank,
            size=self.spec.size,
            members=self.members,
            strategy=self.spec.strategy,
            backend=self.spec.backend,
            state=self.state,
            detail=self.detail,
            memory_bytes=self.proc.memory_bytes or self.estimate,
            host=self.spec.hosts[self.rank],
            started_at=self.started_at,
        )


def _free_port(ip: str, port: int = 0) -> int:
    """A port free on `ip` now (`port` itself when given and free)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((ip, port))
        except OSError as exc:
            raise Unavailable(f"group port {ip}:{port} is not free on this node: {exc}") from None
        return int(s.getsockname()[1])


class GroupBackend:
    """This node's group ranks; serves rank 0's groups as models."""

    name = "group"

    def __init__(self, context: BackendContext) -> None:
        self._config = context.config
        self._catalog: Catalog = context.catalog
        self._on_change = context.on_change
        self._ranks: dict[str, _Rank] = {}

    # ---------- membership (the CheckGroupRank / StartGroupRank / StopGroupRank RPCs) ----------

    def ranks(self) -> list[GroupRank]:
        """Every rank this node holds, for `NodeState.groups`."""
        return [r.report() for _, r in sorted(self._ranks.items())]

    def shares(self) -> dict[str, int]:
        """Memory each live rank takes here (a `group:` key per group), for the budget."""
        return {
            f"group:{n}": r.proc.memory_bytes or r.estimate
            for n, r in self._ranks.items()
            if r.state != "down"
        }

    def _entry(self, name: str, model: str) -> CatalogEntry:
        if not NAME.match(name):
            raise InvalidRequest(
                f"group name {name!r} must be 1-64 letters, digits, '.', '_' or '-'",
                field="name",
            )
        try:
            entry = self._catalog.get(model)
        except ModelNotFound:
            raise from_code(
                "NOT_FOUND", f"group {name!r}: model {model!r} has no files on this node"
            ) from None
        if name in self._catalog.entries():
            raise InvalidRequest(
                f"group name {name!r} is the name of a model on this node; pick another",
                field="name",
            )
        if entry.backend != "mlx":
            raise InvalidRequest(
                f"group {name!r}: {model!r} is a {entry.backend} model; "
                "groups shard MLX models only",
                field="model",
            )
        return entry

    def check(
        self,
        name: str,
        model: str,
        rank: int,
        size: int,
        host_hint: str,
        *,
        strategy: str,
        backend: str,
    ) -> RankCheck:
        """Whether this node can be rank `rank` of `size`: the files, the architecture,
        the heads; a ring port (and rank 0's control port) reserved. Starts nothing."""
        entry = self._entry(name, model)
        current = self._ranks.get(name)
        if current is not None and current.state != "down":
            raise InvalidRequest(
                f"group {name!r} is already {current.state} on this node; remove it first",
                field="name",
            )
        ip = self._config.group_host or host_hint or "127.0.0.1"
        placeholder = tuple(f"{ip}:1" for _ in range(size))
        spec = GroupSpec(name, entry.path, placeholder, strategy, backend, control=f"{ip}:1")
        if not 0 <= rank < size:
            raise InvalidRequest(f"rank {rank} is outside a group of {size}", field="rank")
        config = check_member(spec)
        port = _free_port(ip, self._config.group_port)
        control = ""
        if rank == 0:
            control_port = self._config.group_port + 1 if self._config.group_port else 0
            control = f"{ip}:{_free_port(ip, control_port)}"
        return RankCheck(
            host=f"{ip}:{port}",
            control=control,
            memory_bytes=self.share(entry, size),
            architecture=str(config.get("model_type", "")),
            context_length=entry.context_length or int(config.get("max_position_embeddings", 0)),
        )

    @staticmethod
    def share(entry: CatalogEntry, size: int) -> int:
        """One rank's share: 1/size of the weights and of one sequence's KV cache."""
        return -(-(entry.estimated_bytes or entry.size_bytes) // max(size, 1))

    async def start(
        self,
        name: str,
        model: str,
        rank: int,
        hosts: tuple[str, ...],
        members: tuple[str, ...],
        *,
        strategy: str,
        backend: str,
        control: str,
        token: str,
    ) -> GroupRank:
        """Start this node's rank; rank 0 returns once the group formed (or raises)."""
        entry = self._entry(name, model)
        old = self._ranks.get(name)
        if old is not None:
            if old.state != "down":
                raise InvalidRequest(
                    f"group {name!r} is already {old.state} on this node; remove it first",
                    field="name",
                )
            await self.stop(name)
        spec = GroupSpec(name, entry.path, hosts, strategy, backend, control=control, token=token)
        proc = RankProcess(spec, rank, on_down=lambda why: self._down(name, why))
        r = _Rank(spec, model, rank, members, entry, proc, self.share(entry, spec.size))
        self._ranks[name] = r
        self._on_change()
        try:
            await proc.start()
            if rank == 0:
                r.tokenizer, r.context_length = await asyncio.to_thread(_tokenizer, entry)
                r.native_tools = template_supports_tools(
                    getattr(r.tokenizer, "chat_template", None)
                )
                await proc.ready(FORM_TIMEOUT)
        except BaseException as exc:
            if r.state != "down":
                self._down(name, str(exc) or type(exc).__name__)
            with contextlib.suppress(Exception):
                await proc.stop(grace=2.0)
            raise
        if r.state == "forming":
            r.state = "up"
            log.info("group %s: rank %d of %d up", name, rank, spec.size)
            self._on_change()
        return r.report()

    def _down(self, name: str, reason: str) -> None:
        r = self._ranks.get(name)
        if r is None or r.state == "down":
            return
        r.state, r.detail = "down", reason
        self._on_change()

    async def stop(self, name: str) -> bool:
        """Stop and forget this node's rank of `name`; False when it had none."""
        r = self._ranks.pop(name, None)
        if r is None:
            return False
        await r.proc.stop()
        self._on_change()
        return True

    # ---------- the Backend protocol: rank 0's groups as models ----------

    def _serving(self, model_id: str) -> _Rank:
        r = self._ranks.get(model_id)
        if r is None or r.rank != 0:
            raise ModelNotFound(model_id)
        if r.state != "up":
            why = r.detail if r.state == "down" else "it is still forming"
            raise Unavailable(f"group {model_id!r} is {r.state}: {why}")
        return r

    def claims(self, model_id: str) -> bool:
        r = self._ranks.get(model_id)
        return r is not None and r.rank == 0

    def model_dirs(self) -> tuple[Any, ...]:
        return ()

    def loaded(self) -> dict[str, ModelInfo]:
        return {
            n: ModelInfo(
                id=n,
                backend=self.name,
                source="group",
                path=str(r.entry.path),
                loaded=True,
                size_bytes=r.entry.size_bytes,
                context_length=r.context_length,
                quantization=r.entry.quantization,
                supports_tools=True,
                supports_thinking=bool(getattr(r.tokenizer, "has_thinking", False)),
                memory_bytes=r.proc.memory_bytes,
                estimated_bytes=r.estimate,
                kv_bytes_per_token=r.entry.kv_bytes_per_token // r.spec.size,
            )
            for n, r in self._ranks.items()
            if r.rank == 0 and r.state == "up"
        }

    def available(self) -> dict[str, ModelInfo]:
        return {}

    async def load(self, model_id: str) -> tuple[ModelInfo, float]:
        self._serving(model_id)
        return self.loaded()[model_id], 0.0

    async def unload(self, model_id: str) -> bool:
        raise ModelLoadError(
            f"{model_id!r} is a node group: stop it with `macmesh groups rm {model_id}`"
        )

    async def render(
        self, model_id: str, chat: ChatPrompt, include_text: bool = False
    ) -> RenderedPrompt:
        r = self._serving(model_id)
        ids = await asyncio.to_thread(render_chat, r.tokenizer, model_id, r.native_tools, chat)
        text = r.tokenizer.decode(ids) if include_text else ""
        return RenderedPrompt(token_ids=tuple(ids), context_length=r.context_length, text=text)

    async def tokenize(self, model_id: str, text: str, add_special_tokens: bool) -> list[int]:
        r = self._serving(model_id)
        return list(r.tokenizer.encode(text, add_special_tokens=add_special_tokens))

    async def generate(self, request: GenerateRequest) -> AsyncGenerator[GenerateEvent, None]:
        """One generation on the whole group (one at a time: the ranks run in lockstep)."""
        r = self._serving(request.model)
        if request.draft_model:
            raise InvalidRequest(
                "speculative decoding is not available for node groups", field="draft_model"
            )
        sampling = resolve_sampling(request.sampling, self._config.sampling)
        ids = await prompt_ids(r.tokenizer, request.model, r.native_tools, request.prompt)
        check_prompt(ids, r.context_length)
        max_tokens = room(sampling.max_tokens, ids, r.context_length)
        parser = OutputParser(
            parser_config(r.tokenizer, r.native_tools, ids, request.all_tools, sampling.stop)
        )
        rid = request_id(request, "grp")
        with Admission(r.stats, MAX_WAITING) as adm:
            queued = r.stats.waiting - 1 + r.stats.running
            yield Started(
                request_id=rid, model=request.model, prompt_tokens=len(ids), queue_position=queued
            )
            arrived = time.perf_counter()
            async with r.lock:
                adm.run()
                self._on_change()
                begun = time.perf_counter()
                first = 0.0
                tokens = cached = 0
                reason = FinishReason.LENGTH
                stream = r.proc.generate(
                    ids,
                    max_tokens=max_tokens,
                    temperature=sampling.temperature,
                    seed=sampling.seed if sampling.seed is not None else int(time.time_ns()),
                    top_p=sampling.top_p,
                    min_p=sampling.min_p,
                    top_k=sampling.top_k,
                    repetition_penalty=sampling.repetition_penalty,
                )
                try:
                    async for event in stream:
                        if "done" in event:
                            cached = int(event.get("cached", 0))
                            reason = {
                                "stop": FinishReason.STOP,
                                "cancelled": FinishReason.CANCELLED,
                            }.get(event["done"], FinishReason.LENGTH)
                            break
                        tokens += 1
                        cached = int(event.get("cached", cached))
                        if not first:
                            first = time.perf_counter()
                            adm.prefilled()
                        r.stats.count_decoded(1)
                        for out in parser.feed(event.get("text", "")):
                            yield out
                        if parser.stopped:
                            reason = FinishReason.STOP_SEQUENCE
                            break
                except Unavailable as err:
                    for out in parser.finish():
                        yield out
                    yield ErrorEvent(code="UNAVAILABLE", message=str(err))
                    yield Finish(
                        FinishReason.ERROR, Usage(prompt_tokens=len(ids), completion_tokens=tokens)
                    )
                    return
                finally:
                    await stream.aclose()
                for out in parser.finish():
                    yield out
                if parser.tool_calls and reason is not FinishReason.STOP_SEQUENCE:
                    reason = FinishReason.TOOL_CALLS
                end = time.perf_counter()
                usage = Usage(
                    prompt_tokens=len(ids),
                    completion_tokens=tokens,
                    cached_prompt_tokens=cached,
                    prompt_seconds=(first or end) - begun,
                    generation_seconds=end - (first or end),
                    queue_seconds=begun - arrived,
                )
                r.stats.observe_usage(usage)
                yield Finish(reason, usage, stop_sequence=parser.stop_sequence)

    def load_stats(self) -> list[ModelLoad]:
        return [r.stats.to_load(n) for n, r in self._ranks.items() if r.rank == 0]

    def cache_state(self) -> list[CachedPrefix]:
        return []  # a group runs every request from an empty KV cache

    @property
    def running(self) -> int:
        return sum(r.stats.running for r in self._ranks.values())

    @property
    def waiting(self) -> int:
        return sum(r.stats.waiting for r in self._ranks.values())

    async def close(self, grace: float) -> None:
        await asyncio.gather(*(self.stop(n) for n in list(self._ranks)), return_exceptions=True)


def _tokenizer(entry: CatalogEntry) -> tuple[Any, int]:
    """The model's tokenizer (mlx-lm's wrapper) and its context length."""
    import json

    from mlx_lm.utils import load_tokenizer

    config = json.loads((entry.path / "config.json").read_text())
    tok = load_tokenizer(entry.path, eos_token_ids=config.get("eos_token_id"))  # type: ignore[no-untyped-call]
    context = entry.context_length or int(getattr(tok, "model_max_length", 0) or 0)
    if not context or context > 10_000_000:
        context = int(config.get("max_position_embeddings", 4096))
    return tok, context


def create(ctx: BackendContext) -> GroupBackend:
    """Every node can be a group member (nothing runs until a coordinator forms one)."""
    return GroupBackend(ctx)
